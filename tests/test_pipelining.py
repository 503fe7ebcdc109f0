"""PIPELINING (RFC 2920): ``SMTPSession.start_transaction`` / ``send_message`` with
``pipelining=True``, and ``deliver_domain``'s pipelined transactions.

Two kinds of real peers on loopback:

- a raw socket server scripted line by line (``RawServer``), which proves the
  client really pipelines: it reads MAIL, every RCPT and DATA *before* it
  answers anything, so a client waiting for the MAIL reply would time out;
- the scripted aiosmtpd servers (``mxq.sandbox.smtpd``), which advertise
  PIPELINING, for the per-recipient semantics (452, refused MAIL, refused
  DATA, 421) being the same as in the classic dialogue.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, deliver_domain
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.errors import SMTPSenderRefused, SMTPServerDisconnected, Scope
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.sandbox.smtpd import Behaviour, start_server
from mxq.workers.session import SMTPSession
from mxq.workers.timeouts import Timeouts

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
pytestmark = pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (port 25 on 127.0.31.x)")

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=3, data_final=3)
MSG = b"From: a@src.test\r\nSubject: pipelined\r\n\r\nHello.\r\n.leading dot\r\n"


class RawServer:
    """A one-connection-at-a-time SMTP server driven by a script function (``script(conn)``).

    ``conn.line()`` reads one line (``None`` when the client sent nothing for
    ``wait`` seconds or closed), ``conn.send(*lines)`` writes reply lines in one
    write.  Whatever the script records goes in ``self.seen``; an exception in
    the script is kept in ``self.error`` and re-raised by ``check()``.
    """

    def __init__(self, host: str, script, port: int = 25):
        self.script, self.seen, self.error = script, [], None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(5)
        self.host, self.port = host, port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                self.script(_Conn(conn, self.seen))
            except Exception as e:      # reported by check()
                self.error = e

    def check(self):
        """Wait for the script to end; raise what it raised."""
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server script did not finish"
        if self.error is not None:
            raise self.error

    def stop(self):
        """Close the listening socket."""
        self.sock.close()


class _Conn:
    def __init__(self, sock, seen):
        self.sock, self.seen = sock, seen
        self.buf = b""

    def line(self, wait: float = 1.5) -> str | None:
        """One line; None when nothing complete came within ``wait`` seconds, or at end of stream."""
        self.sock.settimeout(wait)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                return None
            if not chunk:
                return None
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        return raw.decode("utf-8").rstrip("\r")

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(f"{x}\r\n" for x in lines).encode())

    def greet(self, pipelining: bool = True) -> None:
        self.send("220 raw.test ESMTP")
        assert self.line().upper().startswith("EHLO")
        self.send("250-raw.test", *(["250-PIPELINING"] if pipelining else []), "250 8BITMIME")

    def group(self, n: int) -> list[str]:
        """Read n command lines without answering any (the client must have pipelined them)."""
        got = []
        for _ in range(n):
            x = self.line()
            assert x is not None, f"the client stopped after {got}: it waited for a reply (no pipelining)"
            got.append(x)
        self.seen.append(("group", got))
        return got

    def data(self) -> bytes:
        """Read message text up to the lone dot; returns it with the dot."""
        out = []
        while True:
            x = self.line()
            assert x is not None, "message text ended early"
            out.append(x)
            if x == ".":
                self.seen.append(("data", out))
                return "\r\n".join(out).encode()


@pytest.fixture
def raw():
    started = []

    def start(host, script):
        s = RawServer(host, script)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def session(host, **kw):
    return SMTPSession(host, 25, helo_name="client.pipe.test", tls="none", timeouts=FAST, **kw)


# ----------------------------------------------------------------------------- the wire


def test_envelope_goes_in_one_group_and_content_with_the_dot(raw):
    def script(c):
        c.greet()
        verbs = [x.split(":")[0].split(" ")[0] for x in c.group(4)]
        assert verbs == ["MAIL", "RCPT", "RCPT", "DATA"], verbs
        c.send("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "354 go ahead")
        c.data()
        c.send("250 2.0.0 queued as X1")
        assert c.line() == "QUIT"
        c.send("221 bye")

    srv = raw("127.0.31.1", script)
    with session("127.0.31.1", pipelining=True) as s:
        assert s.pipelining
        r = s.send_message("a@src.test", ["ok@dst.test", "nobody@dst.test"], MSG)
    srv.check()
    assert [r.recipients[a].code for a in ("ok@dst.test", "nobody@dst.test")] == [250, 550]
    assert r.reply.code == 250 and r.delivered == ["ok@dst.test"]
    (kind, lines), = [x for x in srv.seen if x[0] == "data"]
    assert lines == ["From: a@src.test", "Subject: pipelined", "", "Hello.", "..leading dot", "."]


def test_nobody_accepted_but_data_says_354_gets_a_lone_dot_then_rset(raw):
    """RFC 2920 section 3.1: the client must not assume DATA fails when no RCPT worked."""
    def script(c):
        c.greet()
        c.group(3)
        c.send("250 ok", "550 5.1.1 no", "354 go ahead anyway")
        assert c.line() == "."            # an empty message: nothing of the content
        c.seen.append(("dot", True))
        c.send("554 5.5.1 no valid recipients")
        assert c.line() == "RSET"
        c.send("250 ok")
        assert c.line() == "QUIT"
        c.send("221 bye")

    srv = raw("127.0.31.2", script)
    with session("127.0.31.2", pipelining=True) as s:
        r = s.send_message("a@src.test", ["nobody@dst.test"], MSG)
        assert r.reply is None and r.accepted == []
    srv.check()
    assert ("dot", True) in srv.seen


def test_without_the_extension_commands_go_one_at_a_time(raw):
    def script(c):
        c.greet(pipelining=False)
        for reply in ("250 ok", "250 ok", "354 go"):
            x = c.line()
            c.seen.append(("cmd", x))
            c.send(reply)
        c.data()
        c.send("250 2.0.0 queued")
        assert c.line() == "QUIT"
        c.send("221 bye")

    srv = raw("127.0.31.3", script)
    with session("127.0.31.3", pipelining=True) as s:
        assert not s.pipelining
        assert s.send_message("a@src.test", ["ok@dst.test"], MSG).reply.code == 250
    srv.check()
    assert [x[1].split(":")[0] for x in srv.seen if x[0] == "cmd"] == ["MAIL FROM", "RCPT TO", "DATA"]


# ----------------------------------------------------------------------------- same verdicts as the classic dialogue


@pytest.fixture
def serve():
    handles = []

    def _serve(host, behaviour=None):
        h = start_server(host, 25, behaviour or Behaviour())
        handles.append(h)
        return h

    yield _serve
    for h in handles:
        h.stop()


def test_452_each_recipient_keeps_its_own_reply(serve):
    srv = serve("127.0.31.10", Behaviour(rcpt_limit=2))
    rcpts = [f"r{i}@b.test" for i in range(4)]
    with session(srv.host, pipelining=True) as s:
        r = s.send_message("a@a.test", rcpts, MSG)
        assert [r.recipients[a].code for a in rcpts] == [250, 250, 452, 452]
        assert r.delivered == ["r0@b.test", "r1@b.test"]
        assert s.send_message("a@a.test", rcpts[2:], MSG).delivered == rcpts[2:]
    assert [m.rcpt_tos for m in srv.messages] == [rcpts[:2], rcpts[2:]]
    assert len(srv.sessions) == 1


def test_refused_mail_leaves_the_connection_usable_without_rset(serve):
    srv = serve("127.0.31.11", Behaviour(mail_reply="553 5.7.1 <{address}>: Sender address rejected"))
    with session(srv.host, pipelining=True) as s:
        with pytest.raises(SMTPSenderRefused) as ei:
            s.send_message("bad@a.test", ["b@b.test"], MSG)
        assert ei.value.code == 553 and ei.value.scope == Scope.MESSAGE
        assert s.connected and s.noop().code == 250      # the RCPT/DATA replies were read: in step
    assert srv.messages == [] and srv.stats["rset"] == 0


def test_refused_data_is_returned_and_reset(serve):
    srv = serve("127.0.31.12", Behaviour(data_init_reply="451 4.3.0 not now"))
    with session(srv.host, pipelining=True) as s:
        assert s.send_message("a@a.test", ["b@b.test"], MSG).reply.code == 451
        assert s.send_message("a@a.test", ["c@b.test"], MSG).reply.code == 451
    assert srv.stats["rset"] == 2 and srv.messages == []


def test_421_to_rcpt_is_a_site_failure(serve):
    srv = serve("127.0.31.13", Behaviour(rcpt_rules={"bye": "421 4.3.2 shutting down"}))
    with session(srv.host, pipelining=True) as s:
        with pytest.raises(SMTPServerDisconnected) as ei:
            s.send_message("a@a.test", ["ok@b.test", "bye@b.test", "c@b.test"], MSG)
        assert not s.connected
    assert ei.value.code == 421 and ei.value.scope == Scope.SITE
    assert srv.messages == []


def test_non_ascii_recipient_without_smtputf8_is_refused_locally(serve):
    srv = serve("127.0.31.14", Behaviour(smtputf8=False))
    with session(srv.host, pipelining=True) as s:
        tx = s.start_transaction("a@a.test", ["ok@b.test", "\u00fcber@b.test"], None)
        assert tx.recipients[0].code == 250
        assert tx.recipients[1].code is None and tx.recipients[1].enhanced == "5.6.7"    # never sent
        assert tx.data.code == 354 and s.accepted == ["ok@b.test"]
        assert s.send_content(MSG).code == 250
        assert s.send_message("a@a.test", ["ok2@b.test"], MSG).reply.code == 250
    assert [m.rcpt_tos for m in srv.messages] == [["ok@b.test"], ["ok2@b.test"]]
    assert not any("\u00fc" in c for c in srv.sessions[0].commands)


# ----------------------------------------------------------------------------- deliver_domain


def engine():
    settings = Settings(helo_name="client.pipe.test", dns_servers=parse_dns_servers("127.0.0.1:9"), timeouts=FAST,
                        tls="none")
    return settings, Resolver(settings)


def env(*rcpts, content=MSG):
    return Envelope(sender="s@src.test", recipients=[Recipient(r) for r in rcpts], content=content)


def test_deliver_domain_pipelines_and_a_recipient_after_452_is_not_sent_twice(raw):
    """Replies 250, 452, 250: a and c are in the first transaction, b alone in the second."""
    def script(c):
        c.greet()
        first = c.group(5)
        assert [x.split(":")[0] for x in first] == ["MAIL FROM", "RCPT TO", "RCPT TO", "RCPT TO", "DATA"]
        c.send("250 ok", "250 ok", "452 4.5.3 too many recipients", "250 ok", "354 go")
        c.data()
        c.send("250 2.0.0 queued as A")
        second = c.group(3)
        c.seen.append(("second", second))
        c.send("250 ok", "250 ok", "354 go")
        c.data()
        c.send("250 2.0.0 queued as B")
        assert c.line() == "QUIT"
        c.send("221 bye")

    srv = raw("127.0.31.20", script)
    settings, resolver = engine()
    d = "[127.0.31.20]"
    (results,) = deliver_domain(d, [env(f"a@{d}", f"b@{d}", f"c@{d}")], settings=settings, resolver=resolver,
                                host_status=MemoryHostStatus())
    srv.check()
    assert [r.state for r in results] == [State.DELIVERED] * 3
    assert [r.text for r in results] == ["queued as A", "queued as B", "queued as A"]
    assert all(r.attempts == 1 for r in results)
    (second,) = [x[1] for x in srv.seen if x[0] == "second"]
    assert second[1] == f"RCPT TO:<b@{d}>"
    assert len([x for x in srv.seen if x[0] == "data"]) == 2


def test_deliver_domain_verdicts_match_the_classic_dialogue(serve):
    """One connection, several envelopes: bounced, deferred, delivered as with one command at a time."""
    srv = serve("127.0.31.21")
    settings, resolver = engine()
    d = "[127.0.31.21]"
    envs = [env(f"ok1@{d}", f"reject1@{d}"), env(f"later1@{d}"), env(f"ok2@{d}")]
    results = deliver_domain(d, envs, settings=settings, resolver=resolver, host_status=MemoryHostStatus())
    assert [[r.state for r in rs] for rs in results] == [
        [State.DELIVERED, State.BOUNCED], [State.DEFERRED], [State.DELIVERED]]
    assert results[0][1].code == 550 and results[1][0].code == 450
    assert srv.stats["connections"] == 1
    assert srv.stats["rset"] == 1            # the all-refused envelope was reset, nothing else
    assert [m.rcpt_tos for m in srv.messages] == [[f"ok1@{d}"], [f"ok2@{d}"]]


# ----------------------------------------------------------------------------- one round trip per message


def test_next_message_goes_before_the_final_reply_of_the_one_before(raw):
    """The text and dot of message 1 open the group of message 2 (RFC 2920 section 3.1)."""
    def script(c):
        c.greet()
        c.group(3)
        c.send("250 ok", "250 ok", "354 go")
        c.data()
        second = c.group(3)                  # message 2's envelope before any final reply was sent
        c.seen.append(("second", second))
        c.send("250 2.0.0 queued as A", "250 ok", "250 ok", "354 go")
        c.data()
        assert c.line(wait=0.5) is None      # nothing more until message 2's final reply is read
        c.send("250 2.0.0 queued as B")
        assert c.line() == "QUIT"
        c.send("221 bye")

    srv = raw("127.0.31.30", script)
    settings, resolver = engine()
    d = "[127.0.31.30]"
    results = deliver_domain(d, [env(f"a@{d}"), env(f"b@{d}")], settings=settings, resolver=resolver,
                             host_status=MemoryHostStatus())
    srv.check()
    assert [(rs[0].state, rs[0].text) for rs in results] == [(State.DELIVERED, "queued as A"),
                                                            (State.DELIVERED, "queued as B")]
    (second,) = [x[1] for x in srv.seen if x[0] == "second"]
    assert second == ["MAIL FROM:<s@src.test>", f"RCPT TO:<b@{d}>", "DATA"]


def test_a_late_refusal_of_the_message_before_bounces_only_that_one(serve):
    srv = serve("127.0.31.31", Behaviour(data_reply="554 5.6.0 rejected after DATA"))
    settings, resolver = engine()
    d = "[127.0.31.31]"
    results = deliver_domain(d, [env(f"a@{d}"), env(f"b@{d}"), env(f"later@{d}")], settings=settings,
                             resolver=resolver, host_status=MemoryHostStatus())
    assert [rs[0].state for rs in results] == [State.BOUNCED, State.BOUNCED, State.DEFERRED]
    assert [rs[0].code for rs in results] == [554, 554, 450]
    assert srv.stats["connections"] == 1 and srv.stats["data_refused"] == 2


def test_421_as_the_final_reply_moves_that_message_and_the_next_on(raw):
    def script(c):
        c.greet()
        c.group(3)
        c.send("250 ok", "250 ok", "354 go")
        c.data()
        c.group(3)                           # message 2's envelope, sent before the reply below
        c.send("421 4.3.2 shutting down")
        c.seen.append(("closed", True))

    srv = raw("127.0.31.32", script)
    settings, resolver = engine()
    d = "[127.0.31.32]"
    results = deliver_domain(d, [env(f"a@{d}"), env(f"b@{d}")], settings=settings, resolver=resolver,
                             host_status=MemoryHostStatus())
    srv.check()
    assert [rs[0].state for rs in results] == [State.DEFERRED, State.DEFERRED]
    assert [rs[0].code for rs in results] == [421, 421]


def test_connection_lost_before_the_final_reply_is_never_a_delivery(raw):
    def script(c):
        c.greet()
        c.group(3)
        c.send("250 ok", "250 ok", "354 go")
        c.data()
        c.seen.append(("dropped", True))     # close without any final reply

    srv = raw("127.0.31.33", script)
    settings, resolver = engine()
    d = "[127.0.31.33]"
    results = deliver_domain(d, [env(f"a@{d}"), env(f"b@{d}")], settings=settings, resolver=resolver,
                             host_status=MemoryHostStatus())
    srv.check()
    assert [rs[0].state for rs in results] == [State.DEFERRED, State.DEFERRED]
    assert results[0][0].enhanced == "4.4.2"


def test_the_owed_final_reply_must_be_read_before_another_command(serve):
    from mxq.workers.errors import SMTPProtocolError

    srv = serve("127.0.31.34")
    with session(srv.host, pipelining=True) as s:
        tx = s.start_transaction("a@a.test", ["b@b.test"])
        assert tx.data.code == 354 and tx.previous is None
        assert s.send_content(MSG, wait=False) is None and s.owes_final
        with pytest.raises(SMTPProtocolError):
            s.noop()                         # its reply would be taken for the message's
        tx = s.start_transaction("a@a.test", ["c@b.test"])
        assert tx.previous.code == 250 and s.last_final is tx.previous and not s.owes_final
        s.send_content(MSG, wait=False)
        assert s.final_reply().code == 250 and s.final_reply() is None
        s.start_transaction("a@a.test", ["d@b.test"])
        s.send_content(MSG, wait=False)
    # leaving the block without reading it: the held text and dot were never sent
    assert not s.connected and s.owes_final is False
    assert [m.rcpt_tos for m in srv.messages] == [["b@b.test"], ["c@b.test"]]
    assert "QUIT" not in srv.sessions[0].commands and srv.stats["quit"] == 0
    with session(srv.host) as s:             # without PIPELINING asked for, no deferred reply
        s.start_transaction("a@a.test", ["e@b.test"])
        with pytest.raises(SMTPProtocolError):
            s.send_content(MSG, wait=False)


def test_a_run_interrupted_while_a_message_is_held_never_completes_it(serve, monkeypatch):
    """An exception (a soft time limit, say) between two messages: the held dot is never sent."""
    import mxq.workers.delivery as delivery

    class Interrupted(Exception):
        pass

    calls = []
    real = delivery._Run.pipelined_transaction

    def second_call_interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            assert self.unconfirmed            # message 1 is held, its verdict unknown
            raise Interrupted()
        return real(self, *a, **kw)

    monkeypatch.setattr(delivery._Run, "pipelined_transaction", second_call_interrupted)
    srv = serve("127.0.31.35")
    settings, resolver = engine()
    d = "[127.0.31.35]"
    with pytest.raises(Interrupted):
        deliver_domain(d, [env(f"a@{d}"), env(f"b@{d}")], settings=settings, resolver=resolver,
                       host_status=MemoryHostStatus())
    assert srv.messages == [] and srv.stats["mail"] == 1       # DATA was answered 354, the text never came


def test_reply_unread_tells_a_reply_waiting_in_the_socket_from_a_server_still_silent(raw):
    """``SMTPSession.reply_unread``: what ``silence`` asks before it counts a wait as the server's.

    True only while the server has sent bytes the session has not read: then the wait is the
    client's (a busy process not yet back to read them), not the server's."""
    from tests.fixtures_infra import wait_until

    speak, done = threading.Event(), threading.Event()

    def script(c):
        c.greet(pipelining=False)
        speak.wait(10)                   # silent until the test says so
        c.send("421 4.4.2 raw.test closing: idle too long")
        done.wait(10)

    srv = raw("127.0.31.36", script)
    s = session(srv.host)
    try:
        s.connect()
        assert not s.reply_unread        # the handshake's replies are all read; the server is silent
        speak.set()
        wait_until(lambda: s.reply_unread, 5, "the server's line in the socket, unread")
        assert not s.reusable            # (the same poll: something unasked came)
    finally:
        done.set()
        s.abort()
    assert not s.reply_unread            # not connected
    srv.check()


def test_silence_counts_how_long_the_server_has_owed_a_reply(raw):
    """``SMTPSession.silence``: what the speculation watch asks of a lane's first transaction.

    Zero while nothing is asked; while the server sits on a command it grows from the moment the
    read of the reply began; zero again once the reply is in."""
    hold, done = threading.Event(), threading.Event()

    def script(c):
        c.greet(pipelining=False)
        assert (c.line(10) or "").upper() == "NOOP"
        hold.wait(10)                    # silent on the NOOP until the test says so
        c.send("250 2.0.0 ok")
        done.wait(10)

    srv = raw("127.0.31.37", script)
    s = session(srv.host)
    try:
        s.connect()
        assert s.silence == 0.0          # nothing asked: nothing owed
        assert _noop_answered_after_silence(s, hold, 0.2).code == 250
        assert s.silence == 0.0          # answered: nothing owed
    finally:
        done.set()
        s.abort()
    srv.check()


def _noop_answered_after_silence(s, hold: threading.Event, silent: float):
    """NOOP from another thread; once the server (holding its reply until ``hold`` is set) has
    been silent on it ``silent`` seconds as the session sees it (``silence``), let it answer;
    returns the reply."""
    from tests.fixtures_infra import wait_until

    replies = []
    asking = threading.Thread(target=lambda: replies.append(s.noop()))
    asking.start()
    wait_until(lambda: s.silence >= silent, 5, f"the server silent on NOOP for {silent} s")
    hold.set()
    asking.join(5)
    assert replies, "NOOP got no reply"
    return replies[0]


class _LateReader:
    """The session's socket as a busy process reads it: every ``recv`` starts ``late`` seconds late
    (a gevent worker's greenlet resumed long after its data came); the rest is the real socket."""

    def __init__(self, sock, late: float):
        self._sock, self._late = sock, late

    def recv(self, n):
        time.sleep(self._late)
        return self._sock.recv(n)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="the kernel's arrival time needs Linux's TCP_INFO")
def test_server_seconds_are_the_servers_wait_not_the_clients_delay_in_reading(raw):
    """``SMTPSession.server_seconds``: what the queue manager sizes a lane's chunks on.

    A reply the server sat on counts whole; a reply that came at once and was read late (the
    process busy with other connections) counts nothing of that delay: timing the read made
    instant exchanges look slow to a busy gevent worker, which then cut their mail into small
    chunks (docs/DESIGN.md, 2026-12-05 evening)."""
    hold, done = threading.Event(), threading.Event()

    def script(c):
        c.greet(pipelining=False)
        assert (c.line(10) or "").upper() == "NOOP"
        hold.wait(10)                    # silent on the first NOOP until the test says so
        c.send("250 2.0.0 ok")
        assert (c.line(10) or "").upper() == "NOOP"
        c.send("250 2.0.0 ok")           # the second at once
        done.wait(10)

    srv = raw("127.0.31.38", script)
    s = session(srv.host)
    try:
        s.connect()
        assert s.server_timed
        base = s.server_seconds
        assert _noop_answered_after_silence(s, hold, 0.3).code == 250
        held = s.server_seconds - base
        assert held >= 0.28, held        # (the kernel's clock: a jiffy, 1-10 ms)

        s._reader.sock = _LateReader(s._reader.sock, 0.4)
        started = time.monotonic()
        assert s.noop().code == 250
        took = time.monotonic() - started
        instant = s.server_seconds - base - held
        assert took >= 0.4
        assert instant < 0.1, instant    # the 0.4 s were this client's, not the server's
        assert s.server_timed
    finally:
        done.set()
        s.abort()
    srv.check()

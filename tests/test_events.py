"""Session events, ``command()`` and ``write()`` (issue 11: the control's events and lower-level access).

Real peers on loopback in the test network namespace: scripted aiosmtpd
servers (STARTTLS with a test CA, AUTH, PIPELINING) and the hostile raw
servers for a timeout.  Each test records the events a session emits and
checks their order and payloads against what the server saw.
"""

from __future__ import annotations

import io
import os
import time

import pytest

from mxq.sandbox.hostile import HostileServer
from mxq.sandbox.smtpd import Behaviour, make_tls, start_server
from mxq.workers import events
from mxq.workers.envelope import Recipient
from mxq.workers.errors import (InvalidInput, SMTPProtocolError, SMTPTimeoutError, register_interrupt,
                                unregister_interrupt)
from mxq.workers.session import SMTPSession
from mxq.workers.timeouts import Timeouts
from mxq.workers.trace import ConversationTrace, ProgressBar

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
pytestmark = pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (127.0.164.x:25)")

NET = "127.0.164."
FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=5, data_final=5)
MSG = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: events\r\n\r\nHello.\r\n.a leading dot\r\n"


@pytest.fixture
def serve():
    started = []

    def start(octet: int, behaviour: Behaviour | None = None):
        srv = start_server(NET + str(octet), 25, behaviour or Behaviour())
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def tls():
    return make_tls("mx.sandbox.test", *(NET + str(i) for i in range(1, 20)))


def kinds(seen):
    return [e.kind for e in seen]


def brief(seen):
    """The conversation as (kind, detail) pairs: commands by line, replies by phase and code."""
    out = []
    for e in seen:
        if e.kind == "command":
            out.append(("->", e.phase, e.line if e.verb not in ("MAIL", "RCPT") else e.verb, e.pipelined))
        elif e.kind == "reply":
            out.append(("<-", e.phase, e.reply.code))
        elif e.kind in ("connected", "closed", "tls"):
            out.append((e.kind,))
        elif e.kind == "progress":
            out.append(("progress", e.sent, e.total, e.done))
    return out


# ------------------------------------------------------------------------------- order and payloads

def test_staged_transaction_events_in_wire_order(serve):
    srv = serve(1)
    seen = []
    s = SMTPSession(srv.host, 25, timeouts=FAST, tls="none", helo_name="client.events.test",
                    observers=[seen.append])
    s.connect()
    s.create_message("a@src.test", size=len(MSG))
    s.add_recipient("b@dst.test")
    s.add_recipient("reject-me@dst.test")
    s.append_message(MSG[:20])
    s.append_message(MSG[20:])
    final = s.close_message()
    s.disconnect()
    assert final.code == 250
    assert brief(seen) == [
        ("connected",),
        ("<-", "greeting", 220),
        ("->", "ehlo", "EHLO client.events.test", False),
        ("<-", "ehlo", 250),
        ("->", "mail", "MAIL", False),
        ("<-", "mail", 250),
        ("->", "rcpt", "RCPT", False),
        ("<-", "rcpt", 250),
        ("->", "rcpt", "RCPT", False),
        ("<-", "rcpt", 550),
        ("->", "data", "DATA", False),
        ("<-", "data", 354),
        ("progress", 20, len(MSG), False),
        ("progress", len(MSG), len(MSG), False),
        ("progress", len(MSG), len(MSG), True),
        ("->", "dot", ".", False),
        ("<-", "dot", 250),
        ("->", "quit", "QUIT", False),
        ("<-", "quit", 221),
        ("closed",),
    ]
    mail = next(e for e in seen if e.kind == "command" and e.verb == "MAIL")
    assert mail.line == f"MAIL FROM:<a@src.test> SIZE={len(MSG)}" and mail.session is s
    refused = [e for e in seen if e.kind == "reply" and e.reply.code == 550][0]
    assert refused.reply.enhanced == "5.1.1" and "User unknown" in refused.reply.text
    greeting = seen[1]
    assert greeting.lines[0].startswith("mx.sandbox.test") and greeting.reply == s.greeting
    ehlo_reply = seen[3]
    assert len(ehlo_reply.lines) > 3 and any(line.startswith("SIZE") for line in ehlo_reply.lines)
    assert seen[0].peer == (srv.host, 25) and seen[0].local[0].startswith("127.")
    assert seen[-1].quit is True
    # What the server saw matches what the events said was sent.
    sess = srv.sessions[0]
    assert [c.split(" ")[0].upper() for c in sess.commands] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


def test_pipelined_transaction_events(serve):
    srv = serve(2)
    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="none", pipelining=True, observers=[seen.append]) as s:
        assert s.pipelining
        tx = s.start_transaction("a@src.test", ["b@dst.test", "c@dst.test"], size=len(MSG))
        assert tx.data.code == 354
        s.send_content(MSG, wait=False)
        tx2 = s.start_transaction("a@src.test", ["d@dst.test"], size=len(MSG))
        assert tx2.previous.code == 250
        s.send_content(MSG, wait=False)
        assert s.final_reply().code == 250
    conv = brief(seen)
    start = conv.index(("->", "mail", "MAIL", True))
    assert conv[start:start + 8] == [
        ("->", "mail", "MAIL", True), ("->", "rcpt", "RCPT", True), ("->", "rcpt", "RCPT", True),
        ("->", "data", "DATA", True),
        ("<-", "mail", 250), ("<-", "rcpt", 250), ("<-", "rcpt", 250), ("<-", "data", 354)]
    # The first message's text and dot opened the second group: written in the same write,
    # traced before its commands, its final reply read first.
    rest = conv[start + 8:]
    assert rest[:7] == [
        ("progress", len(MSG), len(MSG), True), ("->", "dot", ".", True),
        ("->", "mail", "MAIL", True), ("->", "rcpt", "RCPT", True), ("->", "data", "DATA", True),
        ("<-", "dot", 250), ("<-", "mail", 250)]
    assert rest[-6:] == [("progress", len(MSG), len(MSG), True), ("->", "dot", ".", False), ("<-", "dot", 250),
                         ("->", "quit", "QUIT", False), ("<-", "quit", 221), ("closed",)]
    assert len(srv.messages) == 2


def test_20_mb_streamed_message_progress_is_monotonic_and_ends_at_the_total(serve, tmp_path):
    srv = serve(3, Behaviour(keep_content=False))
    path = tmp_path / "big.eml"
    line = b"x" * 76 + b"\r\n"
    with open(path, "wb") as f:
        f.write(b"From: a@src.test\r\nSubject: big\r\n\r\n")
        f.write(line * (20 * 1024 * 1024 // len(line)))
    size = path.stat().st_size
    progress = []
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="none",
                     observers=[lambda e: progress.append(e) if e.kind == "progress" else None]) as s:
        result = s.send_message("a@src.test", ["b@dst.test"], path)
    assert result.reply.code == 250
    sent = [e.sent for e in progress]
    assert len(progress) >= 20 * 1024 * 1024 // (64 * 1024)          # one per 64 KB block at least
    assert sent == sorted(sent) and sent[-1] == size
    assert all(e.total == size for e in progress)
    assert progress[-1].done and not any(e.done for e in progress[:-1])
    assert srv.messages[0].size == size


def test_timeout_event_with_phase_and_limit(serve):
    srv = serve(4, Behaviour(delays={"rcpt": 1.0}))
    seen = []
    t = Timeouts(connect=2, greeting=2, command=0.4)
    with SMTPSession(srv.host, 25, timeouts=t, tls="none", observers=[seen.append]) as s:
        s.create_message("a@src.test")
        with pytest.raises(SMTPTimeoutError):
            s.add_recipient("b@dst.test")
    timeouts = [e for e in seen if e.kind == "timeout"]
    assert [(e.phase, e.limit) for e in timeouts] == [("rcpt", 0.4)]
    assert kinds(seen)[-3:] == ["command", "timeout", "closed"] and seen[-1].quit is False


def test_connect_timeout_event():
    # A listener that never accepts, with its backlog full: the connect times out.
    from mxq.sandbox.smtpd import start_silent_server

    srv = start_silent_server(NET + "5", 25, "connect")
    seen = []
    try:
        s = SMTPSession(srv.host, 25, timeouts=Timeouts(connect=0.5), observers=[seen.append])
        with pytest.raises(SMTPTimeoutError):
            s.connect()
    finally:
        srv.stop()
    assert [(e.kind, e.phase, e.limit) for e in seen] == [("timeout", "connect", 0.5)]


def test_tls_started_event_unverified_and_verified(serve, tls):
    srv = serve(6, Behaviour(starttls=tls.server_context))
    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, observers=[seen.append]) as s:
        s.noop()
    (ev,) = [e for e in seen if e.kind == "tls"]
    assert ev.protocol == s.tls_protocol and ev.protocol.startswith("TLS") and ev.cipher and ev.bits >= 128
    assert ev.verified is False and s.tls_verified is False
    # The EHLO after STARTTLS comes after the TLS event.
    assert kinds(seen).index("tls") < [i for i, e in enumerate(seen) if e.kind == "command"][-2]
    seen.clear()
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="required", tls_context=tls.client_context,
                     server_hostname="mx.sandbox.test", observers=[seen.append]) as s:
        pass
    (ev,) = [e for e in seen if e.kind == "tls"]
    assert ev.verified is True and ev.server_hostname == "mx.sandbox.test" and s.tls_verified


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_auth_payloads_are_masked(serve, tls, mechanism):
    srv = serve(7, Behaviour(starttls=tls.server_context, auth={"user": "s3cret-pass"}))
    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, observers=[seen.append]) as s:
        assert s.authenticate("user", "s3cret-pass", mechanism=mechanism).code == 235
    lines = [e.line for e in seen if e.kind == "command" and e.phase == "auth"]
    # smtplib sends an initial response with PLAIN (the credentials) and LOGIN (the user name).
    assert lines == {"PLAIN": ["AUTH PLAIN ****"], "LOGIN": ["AUTH LOGIN ****", "****"],
                     "CRAM-MD5": ["AUTH CRAM-MD5", "****"]}[mechanism]
    text = repr(seen)
    assert "s3cret" not in text and "dXNlcg" not in text   # neither the password nor base64 of the user
    assert srv.sessions[0].auth_user == "user"


# ------------------------------------------------------------------------------- observer contract

def test_zero_cost_when_nobody_listens(serve, monkeypatch):
    made = []
    for name in ("Connected", "CommandSent", "ReplyReceived", "DataProgress", "TLSStarted", "Closed", "TimedOut"):
        cls = getattr(events, name)
        monkeypatch.setattr(events, name, lambda *a, _cls=cls, **k: made.append(_cls) or _cls(*a, **k))
    srv = serve(8)
    with SMTPSession(srv.host, 25, timeouts=FAST) as s:
        s.send_message("a@src.test", ["b@dst.test"], MSG)
    assert made == []
    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, observers=[seen.append]) as s:
        s.send_message("a@src.test", ["b@dst.test"], MSG)
    assert len(made) == len(seen) > 10


def test_failing_observer_is_logged_and_ignored_but_an_interrupt_goes_through(serve, caplog):
    srv = serve(9)

    def broken(event):
        raise ValueError("observer bug")

    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, observers=[broken, seen.append]) as s:
        assert s.send_message("a@src.test", ["b@dst.test"], MSG).reply.code == 250
    assert "observer bug" in caplog.text and seen     # the next observer still got every event

    class Stop(Exception):
        pass

    register_interrupt(Stop)
    try:
        def stopper(event):
            if event.kind == "command" and event.verb == "RCPT":
                raise Stop()
        s = SMTPSession(srv.host, 25, timeouts=FAST, observers=[stopper])
        s.connect()
        with pytest.raises(Stop):
            s.send_message("a@src.test", ["c@dst.test"], MSG)
        s.abort()
    finally:
        unregister_interrupt(Stop)
    assert len(srv.messages) == 1


def test_observe_and_unobserve(serve):
    srv = serve(10)
    seen = []
    s = SMTPSession(srv.host, 25, timeouts=FAST)
    assert s.observe(seen.append) is not None and s.observers == (seen.append,)
    s.observe(seen.append)                              # once only
    s.connect()
    s.unobserve(seen.append)
    s.noop()
    s.disconnect()
    assert seen[-1].kind == "reply" and seen[-1].phase == "ehlo"       # nothing after unobserve()
    assert not [e for e in seen if e.kind == "command" and e.verb == "NOOP"]


# ------------------------------------------------------------------------------- command() and write()

def test_command_for_extensions_the_session_does_not_wrap(serve):
    srv = serve(11)
    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="none", observers=[seen.append]) as s:
        vrfy = s.command("VRFY", "someone@dst.test")
        help_ = s.command("HELP")
        bogus = s.command("XVENDOR", "do-something")
        assert s.noop().code == 250                       # still in step
    assert vrfy.code == 252 and help_.code == 250 and bogus.code == 500
    sent = [(e.phase, e.line) for e in seen if e.kind == "command"]
    assert ("command", "VRFY someone@dst.test") in sent and ("command", "XVENDOR do-something") in sent
    assert [e.reply.code for e in seen if e.kind == "reply" and e.phase == "command"] == [252, 250, 500]
    assert any(reply.startswith("252") for _, reply in srv.sessions[0].replies)   # the server answered VRFY


def test_a_whole_transaction_by_command_and_write(serve):
    srv = serve(12)
    seen = []
    raw = b"From: a@src.test\r\nSubject: raw\r\n\r\n..stuffed by the caller\r\nend"
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="none", observers=[seen.append]) as s:
        assert s.command("MAIL", "FROM:<a@src.test>").code == 250
        assert s.command("RCPT", "TO:<b@dst.test>").code == 250 and s.accepted == ["b@dst.test"]
        assert s.command("RCPT", "TO:<reject@dst.test>").code == 550 and s.accepted == ["b@dst.test"]
        assert s.command("DATA").code == 354
        s.write(raw[:30])
        s.write(raw[30:])
        assert s.close_message().code == 250
        assert s.command("MAIL", "FROM:<a@src.test>").code == 250   # a new transaction may start
        assert s.command("RSET").code == 250
    (msg,) = srv.messages
    assert msg.rcpt_tos == ["b@dst.test"]
    assert msg.content == b"From: a@src.test\r\nSubject: raw\r\n\r\n.stuffed by the caller\r\nend\r\n"
    assert [e.size for e in seen if e.kind == "write"] == [30, len(raw) - 30]


def test_command_refusals_send_nothing(serve):
    srv = serve(13, Behaviour(rcpt_rules={}))
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="none", pipelining=True) as s:
        before = list(srv.sessions[0].commands)
        for verb, arg, why in [("DATA", "", "outside a transaction"), ("RCPT", "TO:<b@dst.test>", "no transaction"),
                               ("STARTTLS", "", "tls policy"), ("QUIT", "", "disconnect()"),
                               ("EHLO", "x", "connect()"), ("BDAT", "10 LAST", "not supported")]:
            with pytest.raises(SMTPProtocolError) as ei:
                s.command(verb, arg)
            assert why.split()[0] in ei.value.text, (verb, ei.value.text)
        for verb, arg in [("VRFY", "a\r\nDATA"), ("VR FY", ""), ("", "x"), ("NOOP", "\0")]:
            with pytest.raises(InvalidInput):
                s.command(verb, arg)
        with pytest.raises(InvalidInput):
            s.command("VRFY", "x" * 13000)
        with pytest.raises(SMTPProtocolError):
            s.write(b"text outside DATA")
        assert srv.sessions[0].commands == before        # nothing reached the server
        # MAIL inside a transaction, AUTH inside a transaction, DATA without an accepted recipient
        assert s.command("MAIL", "FROM:<a@src.test>").code == 250
        for verb, arg in [("MAIL", "FROM:<a@src.test>"), ("AUTH", "PLAIN"), ("DATA", "")]:
            with pytest.raises(SMTPProtocolError):
                s.command(verb, arg)
        s.command("RSET")
        # While a pipelined final reply is owed
        tx = s.start_transaction("a@src.test", ["b@dst.test"])
        assert tx.data.code == 354
        with pytest.raises(SMTPProtocolError):
            s.command("NOOP")                            # DATA is open
        s.send_content(MSG, wait=False)
        with pytest.raises(SMTPProtocolError) as ei:
            s.command("NOOP")
        assert "final_reply" in ei.value.text
        assert s.final_reply().code == 250
        assert s.command("NOOP").code == 250
        # write() refuses the end-of-data sequence
        s.command("MAIL", "FROM:<a@src.test>")
        s.command("RCPT", "TO:<b@dst.test>")
        s.command("DATA")
        with pytest.raises(InvalidInput):
            s.write(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<evil@x.test>\r\n")
        s.write(b"Subject: x\r\n\r\nbody\r\n")
        assert s.close_message().code == 250
    assert [m.content for m in srv.messages][-1] == b"Subject: x\r\n\r\nbody\r\n"


def test_write_never_ends_data_across_writes(serve):
    """The end-of-data sequence split across write() calls (or a lone "." line left for close_message to end)
    would end DATA early and let the rest of the text reach the server as commands (SMTP smuggling):
    each is refused with nothing sent, and the message that does go out is exactly what was written."""
    srv = serve(20, Behaviour(rcpt_rules={}))
    with SMTPSession(srv.host, 25, timeouts=FAST, tls="none") as s:
        s.command("MAIL", "FROM:<a@src.test>")
        s.command("RCPT", "TO:<b@dst.test>")
        assert s.command("DATA").code == 354
        s.write(b"Subject: split\r\n\r\nbody\r\n.")
        for evil in (b"\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n", b"\r\n"):
            with pytest.raises(InvalidInput):
                s.write(evil)
        with pytest.raises(InvalidInput):
            s.close_message()                     # CRLF + "." after a lone "." would end DATA twice
        s.write(b".stuffed\r\nline two\r")       # the caller completes the dot-stuffed line
        with pytest.raises(InvalidInput):
            s.write(b"\n.\r\nRSET\r\n")          # CR | LF.CRLF
        s.write(b"\n")
        assert s.close_message().code == 250
        assert s.command("NOOP").code == 250      # still in step with the server
    (msg,) = srv.messages
    assert msg.content == b"Subject: split\r\n\r\nbody\r\n.stuffed\r\nline two\r\n"
    assert not [c for c in srv.sessions[0].commands if c.upper().startswith(("RSET", "MAIL FROM:<EVIL"))]


def test_auth_by_command_is_masked(serve, tls):
    import base64

    srv = serve(14, Behaviour(starttls=tls.server_context, auth={"user": "pw-secret"}))
    seen = []
    with SMTPSession(srv.host, 25, timeouts=FAST, observers=[seen.append]) as s:
        r = s.command("AUTH", "LOGIN")
        assert r.code == 334
        assert s.command(base64.b64encode(b"user").decode()).code == 334
        assert s.command(base64.b64encode(b"pw-secret").decode()).code == 235
        assert s.command("NOOP").code == 250
    lines = [e.line for e in seen if e.kind == "command" and e.phase == "auth"]
    assert lines == ["AUTH LOGIN", "****", "****"]
    assert srv.sessions[0].auth_user == "user"


# ------------------------------------------------------------------------------- the trace and the bar

def test_conversation_trace_like_swaks(serve, tls):
    srv = serve(15, Behaviour(starttls=tls.server_context, auth={"user": "pw-secret"}))
    out = io.StringIO()
    with SMTPSession(srv.host, 25, timeouts=FAST, pipelining=True, observers=[ConversationTrace(out)]) as s:
        s.authenticate("user", "pw-secret", mechanism="PLAIN")
        s.send_message("a@src.test", ["b@dst.test"], MSG)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith(f"=== Connected to {srv.host}[{srv.host}]:25 from 127.")
    assert lines[1].startswith("<-  220 ")
    assert " -> STARTTLS" in lines and any(x.startswith("=== TLS started: TLS") for x in lines)
    assert " ~> AUTH PLAIN ****" in lines and "pw-secret" not in text
    assert "~>> MAIL FROM:<a@src.test> SIZE=%d" % len(MSG) in lines and "~>> DATA" in lines
    assert f" ~> [message text: {len(MSG):,} bytes]" in lines and " ~> ." in lines
    assert lines[-1] == "=== Connection closed (QUIT)"
    ehlo = [x for x in lines if x.startswith("<~  250")]
    assert ehlo and ehlo[0].startswith("<~  250-")


def test_progress_bar_reaches_100_percent(serve):
    srv = serve(16, Behaviour(keep_content=False))
    out = io.StringIO()
    body = (b"y" * 1000 + b"\r\n") * 1000
    with SMTPSession(srv.host, 25, timeouts=FAST, observers=[ProgressBar(out, tty=False)]) as s:
        s.send_message("a@src.test", ["b@dst.test"], body)
    lines = out.getvalue().splitlines()
    percents = [int(x.split("]")[1].split("%")[0]) for x in lines]
    assert percents == sorted(percents) and percents[-1] == 100 and len(lines) <= 12
    assert lines[-1].startswith("[" + "#" * 30 + "] 100%")


def test_timeout_is_traced(serve):
    out = io.StringIO()
    with HostileServer(NET + "17", 25, "trickle", interval=1.0) as srv:
        s = SMTPSession(srv.host, 25, timeouts=Timeouts(connect=1, greeting=0.5),
                        observers=[ConversationTrace(out)])
        with pytest.raises(SMTPTimeoutError):
            s.connect()
    assert "*** timed out after 0.5 s (phase greeting)" in out.getvalue()


# ------------------------------------------------------------------------------- mxq deliver --trace / --progress

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def mxq_deliver(*args, env=None):
    import subprocess
    import sys

    e = dict(os.environ, PYTHONPATH=str(ROOT), MXQ_CONNECT_TIMEOUT="2", MXQ_COMMAND_TIMEOUT="5",
             MXQ_HELO_NAME="client.events.test")
    for k in ("MXQ_RELAY", "MXQ_RELAY_MODE", "MXQ_REDIS_URL", "MXQ_TLS"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "deliver", *args], capture_output=True,
                          env=e, cwd=ROOT, timeout=60)


def test_mxq_deliver_trace_and_progress(dns_server, serve, tls, tmp_path):
    srv = serve(18, Behaviour(starttls=tls.server_context, keep_content=False))
    d = "trace.events.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": [srv.host]}})
    path = tmp_path / "big.eml"
    body = (b"z" * 998 + b"\n") * 3000                   # 3 MB: many blocks
    path.write_bytes(b"From: a@src.test\nTo: b@" + d.encode() + b"\nSubject: big\n\n" + body)
    p = mxq_deliver("--trace", "--progress", str(path))
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    lines = err.splitlines()
    assert any(x.startswith(f"=== Connected to mx.{d}[{srv.host}]:25 from ") for x in lines), err
    assert "<-  220 mx.sandbox.test ESMTP mxq sandbox" in lines
    assert " -> EHLO client.events.test" in lines and " -> STARTTLS" in lines
    assert any(x.startswith("=== TLS started: TLSv1.") and "certificate not verified" in x for x in lines)
    assert any(x.startswith(" ~> MAIL FROM:<a@src.test> SIZE=") for x in lines)
    assert " ~> RCPT TO:<b@trace.events.test>" in lines and " ~> DATA" in lines and "<~  354 End data with <CR><LF>.<CR><LF>" in lines
    assert any(x.startswith(" ~> [message text: ") for x in lines) and " ~> ." in lines
    assert lines[-1] == "=== Connection closed (QUIT)"
    bars = [x for x in lines if x.startswith("[")]
    assert len(bars) >= 5 and bars[-1].startswith("[" + "#" * 30 + "] 100%"), bars
    assert b"delivered" in p.stdout
    assert srv.messages[0].size > 3_000_000


def test_delivery_log_says_what_a_refusal_answered_and_logs_tls(dns_server, serve, tls, caplog):
    import logging

    from mxq.workers.config import Settings, parse_dns_servers
    from mxq.workers.delivery import MemoryHostStatus, deliver
    from mxq.workers.envelope import Envelope
    from mxq.workers.mx import Resolver

    srv = serve(19, Behaviour(starttls=tls.server_context))
    d = "log.events.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": [srv.host]}})
    settings = Settings(helo_name="client.events.test", dns_servers=parse_dns_servers(dns_server.address),
                        timeouts=FAST)
    caplog.set_level(logging.DEBUG, logger="mxq")
    env = Envelope(sender="a@src.test", recipients=[Recipient(f"ok@{d}"), Recipient(f"reject@{d}")], content=MSG)
    deliver(env, settings=settings, resolver=Resolver(settings), host_status=MemoryHostStatus())
    text = caplog.text
    assert f"said: 550 5.1.1 <reject@{d}>: Recipient address rejected: User unknown (in reply to RCPT TO command)" \
        in text
    assert f"Untrusted TLS connection established to mx.{d}[{srv.host}]:25: TLSv1." in text
    assert f"mx.{d}[{srv.host}]:25: -> RCPT TO:<reject@{d}>" in text          # the conversation at DEBUG
    assert f"mx.{d}[{srv.host}]:25: <- 550 5.1.1" in text

"""Bounds against hostile and broken peers (issue 9, item 4): every phase ends, memory stays small.

Real peers on loopback in the test network namespace: raw-socket servers
that misbehave on purpose (``mxq.sandbox.hostile``), scripted aiosmtpd
exchanges, the sandbox DNS server and a DNS server that never answers.

- a reply is bounded in size (an endless multi-line greeting, an endless
  EHLO reply, a 10 MB line) and in time (a deadline per phase, not per
  recv: a server trickling one byte a second is cut at the phase deadline);
- a server that reads the message a byte a second is cut at the data-block
  deadline;
- an MX set of 50 hosts costs at most ``mx_address_limit`` addresses and
  ``mx_session_limit`` sessions, and a handful of DNS lookups;
- a DNS server that never answers costs at most the DNS phase;
- an interrupt the caller registered (Celery's SoftTimeLimitExceeded) goes
  through the engine and dnspython instead of being taken for a failure.
"""

from __future__ import annotations

import os
import signal
import time
import tracemalloc
from contextlib import contextmanager

import pytest

from mxq.sandbox.hostile import HostileServer, SilentDNSServer
from mxq.sandbox.smtpd import Behaviour, start_server, start_silent_server
from mxq.workers import events
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, deliver_domain
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.errors import (Scope, SMTPProtocolError, SMTPTimeoutError, classify, is_interrupt,
                                register_interrupt, unregister_interrupt)
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.session import MAX_REPLY_BYTES, SMTPSession
from mxq.workers.timeouts import Timeouts

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
pytestmark = pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (127.0.160.x:25)")

NET = "127.0.160."
MSG = b"From: a@src.test\r\nSubject: bounds\r\n\r\nHello.\r\n"


def quick(**kw) -> Timeouts:
    base = dict(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_final=2, dns=3)
    base.update(kw)
    return Timeouts(**base)


@contextmanager
def hostile(octet: int, mode: str, **kw):
    srv = HostileServer(NET + str(octet), 25, mode, **kw)
    try:
        yield srv
    finally:
        srv.stop()


@contextmanager
def peak_memory(limit: int = 4 * 1024 * 1024):
    """Assert that Python allocations peak below ``limit`` bytes inside the block."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"


def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as e:   # noqa: BLE001 -- returned to the test
        return time.monotonic() - t0, e
    return time.monotonic() - t0, None


# ------------------------------------------------------------------------------- reply size

def test_endless_multiline_greeting_is_cut_by_size_with_little_memory():
    with hostile(1, "endless-greeting") as srv:
        tracemalloc.start()
        try:
            s = SMTPSession(srv.host, 25, timeouts=quick(greeting=30))
            elapsed, err = timed(s.connect)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(err, SMTPProtocolError), err
    assert err.reply.enhanced == "4.5.0" and "exceeded" in err.text and "greeting" in err.text
    assert err.scope is Scope.SITE and classify(err).try_next_exchange
    assert elapsed < 5, f"{elapsed:.1f} s for a 30 s greeting phase: the size bound should have cut it"
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes reading an endless greeting"
    assert not s.connected


def test_slowly_streamed_endless_greeting_is_cut_at_the_phase_deadline():
    # One 220- line every 50 ms stays far below the size bound: the greeting's
    # deadline (1.5 s) must end it, whatever the number of recv calls.
    seen = []
    with hostile(2, "endless-greeting", pace=0.05) as srv:
        s = SMTPSession(srv.host, 25, timeouts=quick(greeting=1.5), observers=[seen.append])
        elapsed, err = timed(s.connect)
    assert isinstance(err, SMTPTimeoutError), err
    assert 1.4 <= elapsed < 3.0
    assert "timed out while receiving the initial server greeting" in err.text
    (timeout,) = [e for e in seen if isinstance(e, events.TimedOut)]
    assert (timeout.phase, timeout.limit) == ("greeting", 1.5)
    assert isinstance(seen[-1], events.Closed) and seen[-1].quit is False


def test_endless_ehlo_reply_is_cut():
    with hostile(3, "endless-reply", at="EHLO") as srv:
        s = SMTPSession(srv.host, 25, timeouts=quick(command=30))
        elapsed, err = timed(s.connect)
    assert isinstance(err, SMTPProtocolError) and "EHLO" in err.text, err
    assert elapsed < 5


def test_ten_megabyte_line_is_cut_after_the_reply_budget():
    with hostile(4, "long-line", length=10 * 1024 * 1024) as srv:
        s = SMTPSession(srv.host, 25, timeouts=quick(greeting=30))
        elapsed, err = timed(s.connect)
        sent = srv.bytes_sent
    assert isinstance(err, SMTPProtocolError) and err.reply.enhanced == "4.5.0", err
    assert elapsed < 5
    # We stopped reading near the budget: the server could not push its 10 MB through.
    assert sent < 10 * 1024 * 1024


def test_long_reply_lines_are_kept_short_but_accepted(tmp_path):
    # 3,000-character reply lines (RFC 5321 says 512) from a real server: tolerated, truncated.
    long_text = "x" * 3000
    srv = start_server(NET + "5", 25, Behaviour(greeting_text=f"mx.bounds.test {long_text}",
                                                mail_reply=f"250 2.1.0 {long_text}"))
    try:
        with SMTPSession(srv.host, 25, timeouts=quick()) as s:
            assert s.greeting.code == 220 and len(s.greeting.text) < 2100
            reply = s.create_message("a@src.test")
            assert reply.code == 250 and reply.text.startswith("xxx") and len(reply.text) < 2100
            assert s.noop().code == 250             # still in step: the rest of the line was skipped
    finally:
        srv.stop()


# ------------------------------------------------------------------------------- phase deadlines

def test_server_trickling_one_byte_a_second_is_cut_at_the_greeting_deadline():
    seen = []
    with hostile(6, "trickle", interval=1.0) as srv, peak_memory():
        s = SMTPSession(srv.host, 25, timeouts=quick(greeting=2.0), observers=[seen.append])
        elapsed, err = timed(s.connect)
        sent = srv.bytes_sent
    assert isinstance(err, SMTPTimeoutError), err
    # A per-recv timeout of 2 s would never fire (a byte every second): the phase's does, at 2 s.
    assert 1.9 <= elapsed < 3.5, elapsed
    assert 1 <= sent <= 4
    assert [(e.phase, e.limit) for e in seen if e.kind == "timeout"] == [("greeting", 2.0)]


def test_trickled_reply_to_mail_is_cut_at_the_command_deadline():
    with hostile(7, "trickle-reply", at="MAIL", interval=0.5) as srv:
        with SMTPSession(srv.host, 25, timeouts=quick(command=1.5)) as s:
            elapsed, err = timed(lambda: s.create_message("a@src.test"))
    assert isinstance(err, SMTPTimeoutError) and "MAIL FROM" in err.text, err
    assert 1.4 <= elapsed < 3.0


def test_trickled_reply_to_the_final_dot_is_cut_at_the_data_final_deadline():
    with hostile(8, "trickle-reply", at=".", interval=0.5) as srv:
        with SMTPSession(srv.host, 25, timeouts=quick(data_final=1.5)) as s:
            s.create_message("a@src.test")
            s.add_recipient("b@dst.test")
            s.append_message(MSG)
            elapsed, err = timed(s.close_message)
    assert isinstance(err, SMTPTimeoutError) and "end of data" in err.text, err
    assert 1.4 <= elapsed < 3.0


def test_server_reading_one_byte_a_second_is_cut_at_the_data_block_deadline():
    seen = []
    big = (b"x" * 998 + b"\r\n") * 4096          # 4 MB: far more than the socket buffers hold
    with hostile(9, "slow-reader", rate=1) as srv:
        with SMTPSession(srv.host, 25, timeouts=quick(data_block=1.5), observers=[seen.append]) as s:
            s.create_message("a@src.test")
            s.add_recipient("b@dst.test")
            elapsed, err = timed(lambda: s.append_message(big))
    assert isinstance(err, SMTPTimeoutError) and "message content" in err.text, err
    assert 1.4 <= elapsed < 3.0
    assert [(e.phase, e.limit) for e in seen if e.kind == "timeout"] == [("content", 1.5)]


# ------------------------------------------------------------------------------- MX limits

@pytest.fixture
def dns(dns_server):
    return dns_server


def settings_for(dns_server, **kw) -> Settings:
    kw.setdefault("timeouts", quick(connect=1, greeting=1))
    return Settings(helo_name="client.bounds.test", dns_servers=parse_dns_servers(dns_server.address), **kw)


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="a@src.test", recipients=[Recipient(r) for r in rcpts], content=MSG)


def test_mx_set_of_50_hosts_costs_five_addresses_and_few_lookups(dns):
    # 50 exchanges at one preference, each with its own address where nothing listens
    # (connection refused at once).  Without a limit: 50 connects and 100 lookups.
    d = "fifty.bounds.test"
    records = {d: {"MX": [[10, f"mx{i}.{d}"] for i in range(50)]}}
    for i in range(50):
        records[f"mx{i}.{d}"] = {"A": [f"127.0.161.{i + 1}"]}
    dns.add(records)
    dns.reset_stats()
    settings = settings_for(dns)
    assert settings.mx_address_limit == 5 and settings.mx_session_limit == 2
    t0 = time.monotonic()
    with peak_memory():
        [[r]] = deliver_domain(d, [env(f"u@{d}")], settings=settings, resolver=Resolver(settings),
                               host_status=MemoryHostStatus())
    elapsed = time.monotonic() - t0
    assert r.state is State.DEFERRED and "Connection refused" in r.text
    assert r.attempts == 5, "one attempt per address tried"
    assert elapsed < 3
    lookups = dns.stats()["total"]
    # MX, A and AAAA of the five addresses used, and the domain's MTA-STS record (_mta-sts TXT).
    assert lookups <= 1 + 2 * 5 + 1, f"{lookups} DNS queries for one delivery attempt"


def test_session_limit_stops_after_two_sessions(dns):
    # Three exchanges accept TCP and answer 421 (a session each); the limit is 2 sessions.
    d = "sessions.bounds.test"
    servers = [start_server(f"127.0.162.{i}", 25, Behaviour(greeting_code=421)) for i in (1, 2, 3)]
    try:
        dns.add({d: {"MX": [[10 * i, f"mx{i}.{d}"] for i in (1, 2, 3)]},
                 **{f"mx{i}.{d}": {"A": [f"127.0.162.{i}"]} for i in (1, 2, 3)}})
        settings = settings_for(dns)
        [[r]] = deliver_domain(d, [env(f"u@{d}")], settings=settings, resolver=Resolver(settings),
                               host_status=MemoryHostStatus())
        conns = [s.stats.get("connections", 0) for s in servers]
    finally:
        for s in servers:
            s.stop()
    assert r.state is State.DEFERRED and r.code == 421
    assert conns == [1, 1, 0], conns
    unlimited = settings_for(dns, mx_session_limit=0)
    servers = [start_server(f"127.0.162.{i}", 25, Behaviour(greeting_code=421)) for i in (1, 2, 3)]
    try:
        deliver_domain(d, [env(f"v@{d}")], settings=unlimited, resolver=Resolver(unlimited),
                       host_status=MemoryHostStatus())
        assert [s.stats.get("connections", 0) for s in servers] == [1, 1, 1]
    finally:
        for s in servers:
            s.stop()


def test_mx_limits_from_the_environment():
    s = Settings.from_env({"MXQ_MX_ADDRESS_LIMIT": "3", "MXQ_MX_SESSION_LIMIT": "0", "MXQ_DNS_TIMEOUT": "7"})
    assert (s.mx_address_limit, s.mx_session_limit, s.timeouts.dns) == (3, 0, 7.0)
    with pytest.raises(ValueError, match="MXQ_MX_SESSION_LIMIT"):
        Settings.from_env({"MXQ_MX_SESSION_LIMIT": "-1"})
    with pytest.raises(ValueError, match="MXQ_DNS_TIMEOUT"):
        Settings.from_env({"MXQ_DNS_TIMEOUT": "soon"})


# ------------------------------------------------------------------------------- DNS phase

def test_dns_server_that_never_answers_costs_the_dns_phase_only():
    with SilentDNSServer(NET + "53", 53) as silent:
        settings = Settings(helo_name="client.bounds.test", dns_servers=parse_dns_servers(silent.address),
                            timeouts=quick(dns=1.5))
        t0 = time.monotonic()
        with peak_memory():
            [[r]] = deliver_domain("never.bounds.test", [env("u@never.bounds.test")], settings=settings,
                                   resolver=Resolver(settings), host_status=MemoryHostStatus())
        elapsed = time.monotonic() - t0
        assert silent.queries >= 1
    assert r.state is State.DEFERRED and r.enhanced == "4.4.3"
    assert 1.3 <= elapsed < 3.0, elapsed


def test_address_lookups_that_never_answer_are_bounded_by_the_dns_phase(dns):
    # The MX answers at once, but every exchange's address lookup is never answered:
    # 20 names x (A + AAAA) x a 5 s lookup lifetime would be 200 s.
    d = "slowhosts.bounds.test"
    dns.add({d: {"MX": [[10, f"h{i}.{d}"] for i in range(20)]},
             **{f"h{i}.{d}": {"TIMEOUT": True} for i in range(20)}})
    settings = settings_for(dns, timeouts=quick(dns=2.0))
    t0 = time.monotonic()
    [[r]] = deliver_domain(d, [env(f"u@{d}")], settings=settings, resolver=Resolver(settings),
                           host_status=MemoryHostStatus())
    elapsed = time.monotonic() - t0
    assert r.state is State.DEFERRED and r.enhanced == "4.4.3"
    assert elapsed < 3.5, elapsed


# ------------------------------------------------------------------------------- interrupts

class Interrupt(Exception):
    """Stands for Celery's SoftTimeLimitExceeded: a plain Exception raised from a signal handler."""


@pytest.fixture
def alarm():
    """``alarm(seconds)`` raises ``Interrupt`` in the main thread after ``seconds`` (like Celery's soft limit)."""
    register_interrupt(Interrupt)

    def handler(signum, frame):
        raise Interrupt("soft time limit")

    old = signal.signal(signal.SIGALRM, handler)

    def arm(seconds: float):
        signal.setitimer(signal.ITIMER_REAL, seconds)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
    unregister_interrupt(Interrupt)


def test_interrupt_goes_through_dnspython_promptly(alarm):
    with SilentDNSServer(NET + "54", 53) as silent:
        settings = Settings(helo_name="client.bounds.test", dns_servers=parse_dns_servers(silent.address),
                            timeouts=quick(dns=10))
        alarm(0.5)
        elapsed, err = timed(lambda: deliver_domain(
            "never2.bounds.test", [env("u@never2.bounds.test")], settings=settings,
            resolver=Resolver(settings, timeout=2.0, lifetime=10.0), host_status=MemoryHostStatus()))
    assert isinstance(err, Interrupt), err       # not a 4.4.3 deferral
    assert elapsed < 1.5, f"the interrupt took {elapsed:.1f} s to get out of the DNS phase"


def test_interrupt_goes_through_the_smtp_engine_without_quit(dns, alarm):
    d = "silentmx.bounds.test"
    srv = start_silent_server("127.0.163.1", 25, "greeting")
    try:
        dns.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": ["127.0.163.1"]}})
        settings = settings_for(dns, timeouts=quick(greeting=30))
        seen = []
        alarm(0.5)
        elapsed, err = timed(lambda: deliver_domain(d, [env(f"u@{d}")], settings=settings,
                                                    resolver=Resolver(settings), host_status=MemoryHostStatus(),
                                                    observers=[seen.append]))
    finally:
        srv.stop()
    assert isinstance(err, Interrupt), err
    assert elapsed < 1.5
    assert [type(e) for e in seen] == [events.Connected, events.Closed] and seen[-1].quit is False


def test_interrupt_mid_data_goes_through_and_nothing_is_completed(dns, alarm):
    d = "slowread.bounds.test"
    with hostile(10, "slow-reader") as srv:
        dns.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": [srv.host]}})
        settings = settings_for(dns, timeouts=quick(data_block=30))
        big = Envelope(sender="a@src.test", recipients=[Recipient(f"u@{d}")],
                       content=(b"y" * 998 + b"\r\n") * 4096)
        seen = []
        alarm(0.7)
        elapsed, err = timed(lambda: deliver_domain(d, [big], settings=settings, resolver=Resolver(settings),
                                                    host_status=MemoryHostStatus(), observers=[seen.append]))
    assert isinstance(err, Interrupt), err
    assert elapsed < 2.0
    # Stopped mid-text: the dot never went out, the connection was dropped without QUIT.
    assert [e.verb for e in seen if e.kind == "command"] == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert seen[-1].kind == "closed" and seen[-1].quit is False


def test_only_registered_exceptions_are_interrupts():
    class NotRegistered(Exception):
        pass

    assert not is_interrupt(NotRegistered()) and not is_interrupt(OSError())
    assert is_interrupt(KeyboardInterrupt()) and is_interrupt(SystemExit())
    register_interrupt(NotRegistered)
    try:
        assert is_interrupt(NotRegistered())
    finally:
        unregister_interrupt(NotRegistered)
    assert not is_interrupt(NotRegistered())
    with pytest.raises(TypeError):
        register_interrupt("SoftTimeLimitExceeded")


def test_the_pipeline_registers_celerys_soft_time_limit():
    from celery.exceptions import SoftTimeLimitExceeded

    import mxq.tasks.graph  # noqa: F401 -- registers at import

    assert is_interrupt(SoftTimeLimitExceeded())

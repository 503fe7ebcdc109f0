"""Port 25 blocked: detection, straight-to-relay delivery without connect timeouts, re-probes.

The fault is real: nftables, inside the test session's private network namespace, drops every
SYN to the exchanges' addresses (127.0.183.0/24, port 25) -- what a cloud provider's egress filter
does.  The relay is a scripted aiosmtpd server on 127.0.184.10:587 with STARTTLS and AUTH, which
nothing drops.  Domains are under ``p25.test``.  (The fleet-wide Redis state is tested with real
workers in tests/test_port25_pipeline.py.)
"""

from __future__ import annotations

import logging
import subprocess
import time

import pytest

from mxq.sandbox.smtpd import Behaviour, make_tls, start_server
from mxq.workers.config import RelayConfig, Settings, parse_dns_servers
from mxq.workers.delivery import deliver
from mxq.workers.errors import SMTPConnectError, SMTPTimeoutError
from mxq.workers.message import prepare
from mxq.workers.mx import Resolver
from mxq.workers.port25 import MemoryPort25State, Port25, Thresholds, conclude, failure_kind
from mxq.workers.reply import Reply
from mxq.workers.results import State
from mxq.workers.timeouts import Timeouts

from .conftest import IN_PRIVATE_NETNS

NET = "127.0.183."
RELAY_IP = "127.0.184.10"
CONNECT = 2.0
TIMEOUTS = Timeouts(connect=CONNECT, greeting=3, command=3, data_init=3, data_block=3, data_final=3)
MESSAGE = b"From: <s@src.p25.test>\r\nSubject: p25\r\n\r\nHello.\r\n"


def nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def blocked_port25():
    """Drop every SYN to NET*:25 (nftables, private namespace only); ``unblock()`` lifts it early."""
    if not IN_PRIVATE_NETNS:
        pytest.skip("needs the private network namespace (root): never touches the host's firewall")
    table = "mxq_p25_test"
    nft("add", "table", "inet", table)
    nft("add", "chain", "inet", table, "out", "{ type filter hook output priority 0; }")
    nft("add", "rule", "inet", table, "out", "ip", "daddr", NET + "0/24", "tcp", "dport", "25", "drop")
    state = {"on": True}

    def unblock():
        if state["on"]:
            nft("delete", "table", "inet", table)
            state["on"] = False

    yield unblock
    unblock()


@pytest.fixture
def relay(dns_server):
    tls = make_tls("smtp.relay.p25.test")
    srv = start_server(RELAY_IP, 587, Behaviour(hostname="smtp.relay.p25.test", starttls=tls.server_context,
                                                auth={"mxq": "relay-pw"}, require_starttls=True))
    dns_server.add({"smtp.relay.p25.test": {"A": [RELAY_IP]}})
    srv.tls = tls
    yield srv
    srv.stop()


def settings_for(dns_server):
    return Settings(helo_name="client.p25.test", dns_servers=parse_dns_servers(dns_server.address),
                    timeouts=TIMEOUTS, relay=RelayConfig.parse("smtp://mxq:relay-pw@smtp.relay.p25.test"),
                    relay_mode="fallback", mta_sts=False)


def domains(dns_server, first, n):
    """Domains p{first}..p{first+n-1}.p25.test, each with two exchanges on NET."""
    records, names = {}, []
    for i in range(first, first + n):
        d = f"p{i}.p25.test"
        records[d] = {"MX": [[10, f"mx1.{d}"], [20, f"mx2.{d}"]]}
        records[f"mx1.{d}"] = {"A": [f"{NET}{2 * i}"]}
        records[f"mx2.{d}"] = {"A": [f"{NET}{2 * i + 1}"]}
        names.append(d)
    dns_server.add(records)
    return names


def send(settings, resolver, rcpt, port25, relay):
    env = prepare(MESSAGE, sender="s@src.p25.test", recipients=[rcpt])
    t0 = time.monotonic()
    [r] = deliver(env, settings=settings, resolver=resolver, port25=port25, relay_tls_context=relay.tls.client_context)
    return r, time.monotonic() - t0


def test_blocked_port_25_goes_straight_to_the_relay(dns_server, blocked_port25, relay, caplog):
    caplog.set_level(logging.INFO, logger="mxq")
    s = settings_for(dns_server)
    resolver = Resolver(s)
    port25 = Port25(MemoryPort25State(), Thresholds(probe_interval=3600), relay=s.relay.name)
    names = domains(dns_server, 1, 10)
    t0 = time.monotonic()
    results = [send(s, resolver, f"u@{d}", port25, relay) for d in names]
    total = time.monotonic() - t0
    assert all(r.state is State.DELIVERED and r.relay for r, _ in results)
    # The first domain pays both its exchanges' connect timeouts, the second one (the third address
    # of a second domain: enough evidence, and the relay works), the others none at all.
    assert results[0][1] >= 2 * CONNECT and results[1][1] >= CONNECT
    assert results[1][0].attempts == 2                          # mx1, then straight to the relay
    for r, took in results[2:]:
        assert took < 0.5 and r.attempts == 1, (r, took)       # the relay only, at once
    assert total < 3 * CONNECT + 3                              # not 10 domains x 2 exchanges x 2 s
    assert port25.blocked()["kind"] == "timeout" and port25.blocked()["domains"] == 2
    said = [rec.getMessage() for rec in caplog.records
            if rec.name == "mxq.port25" and "port 25 appears blocked" in rec.getMessage()]
    assert len(said) == 1 and "smtp.relay.p25.test:587" in said[0]
    assert sorted(a for m in relay.messages for a in m.rcpt_tos) == sorted(f"u@{d}" for d in names)
    # A domain that does not exist still bounces: the MX lookup is made.
    env = prepare(MESSAGE, sender="s@src.p25.test", recipients=["u@nowhere.p25.test"])
    [r] = deliver(env, settings=s, resolver=resolver, port25=port25, relay_tls_context=relay.tls.client_context)
    assert r.state is State.BOUNCED and r.enhanced == "5.1.2"


def test_re_probe_finds_port_25_open_again(dns_server, blocked_port25, relay, caplog):
    caplog.set_level(logging.INFO, logger="mxq")
    s = settings_for(dns_server)
    resolver = Resolver(s)
    clock = [time.time()]
    port25 = Port25(MemoryPort25State(clock=lambda: clock[0]), Thresholds(probe_interval=60),
                    relay=s.relay.name, clock=lambda: clock[0])
    names = domains(dns_server, 31, 3)
    for d in names[:2]:
        send(s, resolver, f"v@{d}", port25, relay)
    assert port25.blocked() is not None
    # The network opens up; the exchanges of the third domain answer.
    blocked_port25()
    mx = start_server(f"{NET}{2 * 33}", 25, Behaviour(hostname=f"mx1.{names[2]}"))
    try:
        clock[0] += 61              # the probe interval has passed: the next delivery claims the probe
        r, took = send(s, resolver, f"w@{names[2]}", port25, relay)
        assert r.relay and took < 0.5                 # still through the relay: nobody waits for the probe
        deadline = time.monotonic() + 5
        while port25.blocked() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert port25.blocked() is None
        r, _ = send(s, resolver, f"x@{names[2]}", port25, relay)
        assert r.state is State.DELIVERED and not r.relay and r.exchange == f"mx1.{names[2]}"
        assert [m.rcpt_tos for m in mx.messages] == [[f"x@{names[2]}"]]
    finally:
        mx.stop()
    assert any("port 25 reachable again" in rec.getMessage() for rec in caplog.records)


def test_suspected_block_tries_the_relay_before_the_remaining_exchanges(dns_server, blocked_port25, relay, caplog):
    """Evidence from runs still under way elsewhere (two exchanges of another domain timed out; the relay
    not tried yet, so nothing is concluded): this run's first exchange times out too -- three exchanges of
    two domains -- so it goes to the relay at once instead of waiting on its second exchange as well;
    the relay works, and that concludes "blocked" (said once)."""
    caplog.set_level(logging.INFO, logger="mxq")
    s = settings_for(dns_server)
    resolver = Resolver(s)
    port25 = Port25(MemoryPort25State(), Thresholds(probe_interval=3600), relay=s.relay.name)
    other, d = domains(dns_server, 41, 2)
    port25.connect_failed(connect_error("timeout"), f"{NET}82", other)
    port25.connect_failed(connect_error("timeout"), f"{NET}83", other)
    assert port25.blocked() is None
    r, took = send(s, resolver, f"y@{d}", port25, relay)
    assert r.state is State.DELIVERED and r.relay and r.attempts == 2, r     # mx1, then the relay: not mx2
    assert CONNECT <= took < 2 * CONNECT, took
    assert port25.blocked() is not None and port25.blocked()["domains"] == 2
    said = [rec.getMessage() for rec in caplog.records if "port 25 appears blocked" in rec.getMessage()]
    assert len(said) == 1


def test_exchanges_this_host_has_no_route_to_are_not_evidence(dns_server, relay):
    """AAAA-only exchanges seen from a host without IPv6 (the private namespace has no IPv6 route but
    ::1): each connect fails at once with ENETUNREACH.  That is our routing table, not a port 25
    block: the mail goes to the relay (fallback, nothing accepted it), but nothing is concluded."""
    if not IN_PRIVATE_NETNS:
        pytest.skip("needs the private network namespace (no IPv6 route): never sends to the host's network")
    s = settings_for(dns_server)
    resolver = Resolver(s)
    port25 = Port25(MemoryPort25State(), Thresholds(probe_interval=3600), relay=s.relay.name)
    records, names = {}, []
    for i in range(1, 5):                     # 4 domains x 2 exchanges: 8 addresses, past every threshold
        d = f"v6only{i}.p25.test"
        records[d] = {"MX": [[10, f"mx1.{d}"], [20, f"mx2.{d}"]]}
        records[f"mx1.{d}"] = {"AAAA": [f"2001:db8:25::{2 * i}"]}      # documentation prefix, no route
        records[f"mx2.{d}"] = {"AAAA": [f"2001:db8:25::{2 * i + 1}"]}
        names.append(d)
    dns_server.add(records)
    results = [send(s, resolver, f"u@{d}", port25, relay) for d in names]
    for r, took in results:
        assert r.state is State.DELIVERED and r.relay, r
        assert r.attempts == 3, r                  # both exchanges tried (no shortcut to the relay), then it
        assert took < CONNECT, took                # ENETUNREACH is immediate: no connect timeout was paid
    assert port25.blocked() is None and port25.suspected() is None


def test_suspicion_needs_the_same_evidence_in_redis_and_in_memory(redis_server):
    """``suspected()`` is the rule without its relay condition, the same in both state stores."""

    from mxq.tasks.hoststatus import RedisPort25State

    srv = redis_server()
    stores = [MemoryPort25State(), RedisPort25State(srv.client())]
    t = Thresholds()
    now = time.time()
    for st in stores:
        assert st.suspected(now, t) is None
        st.failure("timeout", "10.0.0.1", "a.test", now, t)
        st.failure("timeout", "10.0.0.2", "a.test", now, t)
        st.failure("refused", "10.0.0.3", "b.test", now, t)
        assert st.suspected(now, t) is None                      # not the same way
        st.failure("timeout", "10.0.0.4", "b.test", now, t)
        got = st.suspected(now, t)
        assert (got["kind"], got["exchanges"], got["domains"]) == ("timeout", 3, 2)
        assert st.blocked() is None                              # the relay never worked: not concluded
        assert st.suspected(now + 301, t) is None                # the evidence is old
        st.success()
        assert st.suspected(now, t) is None


# -- the rule itself (pure logic) -------------------------------------------------------------------

def connect_error(kind: str):
    causes = {"timeout": TimeoutError(), "refused": ConnectionRefusedError(), "unreachable": OSError(113, "x"),
              "no route": OSError(101, "Network is unreachable")}
    cls = SMTPTimeoutError if kind == "timeout" else SMTPConnectError
    exc = cls(Reply.local("4.4.1", "connect failed"))
    exc.__cause__ = causes[kind]
    return exc


def test_failure_kinds():
    assert failure_kind(connect_error("timeout")) == "timeout"
    assert failure_kind(connect_error("refused")) == "refused"
    assert failure_kind(connect_error("unreachable")) == "unreachable"   # EHOSTUNREACH: ICMP from the path
    assert failure_kind(connect_error("no route")) is None               # ENETUNREACH: our own routing table
    greeting = SMTPTimeoutError(Reply.local("4.4.2", "timed out while receiving the initial server greeting"))
    greeting.__cause__ = TimeoutError()
    assert failure_kind(greeting) is None             # TCP got through: port 25 is open


def test_conclusion_needs_same_kind_distinct_exchanges_two_domains_and_a_working_relay():
    t = Thresholds()
    now = 1000.0
    three = [("timeout", "10.0.0.1", "a.test", now), ("timeout", "10.0.0.2", "a.test", now),
             ("timeout", "10.0.0.3", "b.test", now)]
    assert conclude(three, now, now, t)["kind"] == "timeout"
    assert conclude(three, None, now, t) is None                                   # the relay never worked
    assert conclude(three, now - 400, now, t) is None                              # ... not lately
    assert conclude([(k, i, "a.test", w) for k, i, _, w in three], now, now, t) is None   # one domain only
    mixed = three[:2] + [("refused", "10.0.0.3", "b.test", now)]
    assert conclude(mixed, now, now, t) is None                                    # not the same way
    old = [(k, i, d, now - 301) for k, i, d, _ in three]
    assert conclude(old, now, now, t) is None                                      # outside the window


def test_a_successful_connect_wipes_the_evidence():
    clock = [100.0]
    st = MemoryPort25State(clock=lambda: clock[0])
    p = Port25(st, Thresholds(), clock=lambda: clock[0])
    p.relay_worked()
    p.connect_failed(connect_error("timeout"), "10.0.0.1", "a.test")
    p.connect_failed(connect_error("timeout"), "10.0.0.2", "b.test")
    p.connected("10.0.0.9")                       # some other exchange answered
    p.connect_failed(connect_error("timeout"), "10.0.0.3", "c.test")
    assert p.blocked() is None
    p.connect_failed(connect_error("timeout"), "10.0.0.4", "d.test")
    p.connect_failed(connect_error("timeout"), "10.0.0.5", "e.test")
    assert p.blocked() is not None
    assert not st.claim_probe(clock[0], 300)      # the first probe comes one interval later...
    clock[0] += 301
    assert st.claim_probe(clock[0], 300) and not st.claim_probe(clock[0], 300)   # ...for one caller

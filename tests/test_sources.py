"""IPv6 delivery and source addresses (issue 11): AAAA exchanges, MXQ_SOURCE_ADDRESSES, per-domain pools.

Real servers in the test session's private network namespace: scripted
aiosmtpd exchanges on ``::1``, on IPv6 addresses this module adds to the
namespace's loopback (``fd00:25::/64``) and on 127.0.166.x; the sandbox DNS
server serves A and AAAA records; the servers record the peer address and
the EHLO name each connection came with.  The last test runs the pipeline
(real Redis, real Celery workers) with a pool chosen per domain in
``MXQ_SHAPING``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from mxq.tasks.shaping import Policy, check_pools
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, deliver_domain
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.session import SMTPSession
from mxq.workers.sources import SourceAddress, SourcePools
from mxq.workers.timeouts import Timeouts

pytest_plugins = ["tests.pipeline_fixtures"]

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
pytestmark = pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (adds fd00:25::/64 to lo)")

V6 = ("fd00:25::1", "fd00:25::2", "fd00:25::77", "fd00:25::88")
NET = "127.0.166."
MSG = b"From: a@src.test\r\nSubject: sources\r\n\r\nHello.\r\n"
FAST = Timeouts(connect=1, greeting=2, command=2, data_init=2, data_block=2, data_final=2, dns=3)


@pytest.fixture(scope="module")
def v6():
    """The IPv6 addresses of this module on the namespace's loopback."""
    for ip in V6:
        subprocess.run(["ip", "-6", "addr", "add", f"{ip}/128", "dev", "lo"], check=True)
    yield
    for ip in V6:
        subprocess.run(["ip", "-6", "addr", "del", f"{ip}/128", "dev", "lo"], check=False)


@pytest.fixture
def servers():
    started = []

    def start(host, **kw):
        srv = start_server(host, 25, Behaviour(hostname=f"mx.{host}", **kw))
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


def settings_for(dns_server, **kw) -> Settings:
    return Settings(helo_name="global.client.test", dns_servers=parse_dns_servers(dns_server.address),
                    timeouts=FAST, **kw)


def run(domain, settings, n=1, **kw):
    envs = [Envelope(sender="a@src.test", recipients=[Recipient(f"u{i}@{domain}")], content=MSG) for i in range(n)]
    return deliver_domain(domain, envs, settings=settings, resolver=Resolver(settings), host_status=MemoryHostStatus(),
                          **kw)


def peers(srv):
    return [(s.peer[0], s.ehlo_name) for s in srv.sessions]


# ------------------------------------------------------------------------------- IPv6

def test_aaaa_only_exchange_on_ipv6_loopback(dns_server, servers):
    d = "loop6.sources.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"AAAA": ["::1"]}})
    srv = servers("::1")
    [[r]] = run(d, settings_for(dns_server))
    assert r.state is State.DELIVERED and r.ip == "::1" and r.exchange == f"mx.{d}"
    assert peers(srv) == [("::1", "global.client.test")]


def test_aaaa_exchange_on_an_added_ipv6_address_and_fallback_from_a_dead_a(dns_server, servers, v6):
    # The exchange has an A record where nothing listens and an AAAA record that works:
    # A is tried first (refused at once), then the IPv6 address delivers.
    d = "dual.sources.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": [NET + "9"], "AAAA": ["fd00:25::1"]}})
    srv = servers("fd00:25::1")
    [[r]] = run(d, settings_for(dns_server))
    assert r.state is State.DELIVERED and r.ip == "fd00:25::1" and r.attempts == 2
    assert [p for p, _ in peers(srv)] == ["fd00:25::1"]     # the system chose the exchange's own address


# ------------------------------------------------------------------------------- source addresses

def test_source_address_per_family_with_its_helo_name(dns_server, servers, v6):
    d4, d6 = "four.sources.test", "six.sources.test"
    dns_server.add({d4: {"MX": [[10, f"mx.{d4}"]]}, f"mx.{d4}": {"A": [NET + "1"]},
                    d6: {"MX": [[10, f"mx.{d6}"]]}, f"mx.{d6}": {"AAAA": ["fd00:25::2"]}})
    srv4, srv6 = servers(NET + "1"), servers("fd00:25::2")
    settings = settings_for(dns_server, source_pools=Settings.from_env(
        {"MXQ_SOURCE_ADDRESSES": f"{NET}77=v4.client.test, fd00:25::77=v6.client.test"}).source_pools)
    [[r4]] = run(d4, settings)
    [[r6]] = run(d6, settings)
    assert r4.state is State.DELIVERED and r6.state is State.DELIVERED
    assert peers(srv4) == [(NET + "77", "v4.client.test")]
    assert peers(srv6) == [("fd00:25::77", "v6.client.test")]
    assert srv4.messages[0].ehlo_name == "v4.client.test"


def test_a_family_without_a_source_address_lets_the_system_choose(dns_server, servers, v6):
    d = "nov6.sources.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"AAAA": ["fd00:25::1"]}})
    srv = servers("fd00:25::1")
    settings = settings_for(dns_server, source_pools=SourcePools((("default", ((NET + "77", "v4.client.test"),)),)))
    [[r]] = run(d, settings)
    assert r.state is State.DELIVERED
    assert peers(srv) == [("fd00:25::1", "global.client.test")]


def test_named_pools_round_robin_and_fall_back_to_default_per_family(dns_server, servers, v6):
    d = "pools.sources.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": [NET + "2"]}})
    srv = servers(NET + "2")
    pools = SourcePools.parse(f"{NET}77=main.client.test, fd00:25::77=main6.client.test; "
                              f"bulk: {NET}88=bulk1.client.test, {NET}89=bulk2.client.test")
    settings = settings_for(dns_server, source_pools=pools)
    for _ in range(4):                       # one connection per run
        [[r]] = run(d, settings, source_pool="bulk")
        assert r.state is State.DELIVERED
    [[r]] = run(d, settings)
    got = peers(srv)
    assert got[:4] == [(NET + "88", "bulk1.client.test"), (NET + "89", "bulk2.client.test")] * 2
    assert got[4] == (NET + "77", "main.client.test")
    # bulk has no IPv6 address: the default pool's is used for an IPv6 exchange.
    assert pools.pick(6, "bulk") == SourceAddress("fd00:25::77", "main6.client.test")
    with pytest.raises(ValueError, match="source pool 'nosuch'"):
        run(d, settings, source_pool="nosuch")


def test_an_address_the_host_does_not_have_defers_and_never_marks_the_exchange_down(dns_server, servers):
    d = "nobind.sources.test"
    dns_server.add({d: {"MX": [[10, f"mx.{d}"]]}, f"mx.{d}": {"A": [NET + "3"]}})
    srv = servers(NET + "3")
    settings = settings_for(dns_server, source_pools=SourcePools.parse("192.0.2.55=gone.client.test"))
    status = MemoryHostStatus()
    [[r]] = deliver_domain(d, [Envelope("a@src.test", [Recipient(f"u@{d}")], MSG)], settings=settings,
                           resolver=Resolver(settings), host_status=status)
    assert r.state is State.DEFERRED and r.enhanced == "4.3.5" and "192.0.2.55" in r.text
    assert not status.is_down(NET + "3", 25) and srv.stats.get("connections", 0) == 0


def test_session_source_address_argument(servers, v6):
    srv = servers("fd00:25::1")
    with SMTPSession("fd00:25::1", 25, timeouts=FAST, source_address="fd00:25::88", helo_name="s.client.test") as s:
        assert s.local[0] == "fd00:25::88" and s.peer[0] == "fd00:25::1"
        assert s.send_message("a@src.test", ["b@dst.test"], MSG).reply.code == 250
    assert peers(srv) == [("fd00:25::88", "s.client.test")]


def test_source_addresses_setting_syntax():
    s = Settings.from_env({"MXQ_SOURCE_ADDRESSES": "192.0.2.10=mx1.example.com, [2001:db8::10]; "
                                                   "bulk: 192.0.2.20=b.example.com"})
    assert s.source_pools.names() == ["default", "bulk"]
    assert s.source_pools.addresses("default") == (SourceAddress("192.0.2.10", "mx1.example.com"),
                                                   SourceAddress("2001:db8::10", None))
    assert Settings.from_env({}).source_pools.names() == []
    for bad, words in [("mail.example.com", "not an IP address"), ("192.0.2.1; 192.0.2.2", "must start with"),
                       ("192.0.2.1=under_score", "not a host name"), ("a: 192.0.2.1; a: 192.0.2.2", "twice"),
                       ("0.0.0.0", "cannot be a source")]:
        with pytest.raises(ValueError, match="MXQ_SOURCE_ADDRESSES") as ei:
            Settings.from_env({"MXQ_SOURCE_ADDRESSES": bad})
        assert words in str(ei.value)


def test_shaping_pool_rule_is_checked_against_the_pools():
    p = Policy.parse("default=20c; gmail.com=5c,pool=bulk; example.com=2/m")
    assert p.for_domain("gmail.com").pool == "bulk" and p.for_domain("example.com").pool is None
    assert "pool=bulk" in p.describe()
    check_pools(p, {"MXQ_SOURCE_ADDRESSES": "192.0.2.1; bulk: 192.0.2.2"})
    with pytest.raises(ValueError, match="bulk"):
        check_pools(p, {"MXQ_SOURCE_ADDRESSES": "192.0.2.1"})
    with pytest.raises(ValueError, match="pool=NAME"):
        Policy.parse("gmail.com=pool=no good")


# ------------------------------------------------------------------------------- the pipeline

def test_pipeline_sends_from_the_pool_its_shaping_rule_names(pipeline, dns_server, servers, v6):
    bulk, main = "bulk.sources.test", "main.sources.test"
    dns_server.add({bulk: {"MX": [[10, f"mx.{bulk}"]]}, f"mx.{bulk}": {"AAAA": ["fd00:25::1"]},
                    main: {"MX": [[10, f"mx.{main}"]]}, f"mx.{main}": {"A": [NET + "4"]}})
    srv_bulk, srv_main = servers("fd00:25::1"), servers(NET + "4")
    p = pipeline(MXQ_SOURCE_ADDRESSES=f"{NET}77=main.client.test; bulk: fd00:25::88=bulk.client.test",
                 MXQ_SHAPING=f"{bulk}=pool=bulk")
    p.worker(concurrency=1)
    p.beat()
    ids = tasks.submit_many([
        tasks.Item(b"From: a@src.test\r\nSubject: pooled\r\n\r\nhi\r\n", sender="a@src.test", recipients=[f"x@{bulk}"]),
        tasks.Item(b"From: a@src.test\r\nSubject: main\r\n\r\nhi\r\n", sender="a@src.test", recipients=[f"y@{main}"]),
    ])
    p.wait_done(ids, timeout=60)
    assert [tasks.status(j)["recipients"][0]["state"] for j in ids] == ["delivered", "delivered"]
    assert peers(srv_bulk) == [("fd00:25::88", "bulk.client.test")]
    assert peers(srv_main) == [(NET + "77", "main.client.test")]

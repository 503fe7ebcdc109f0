"""MTA-STS (RFC 8461): parsing, discovery and the HTTPS fetch against real servers.

Servers: the sandbox DNS server process and the sandbox HTTPS policy server
(``mxq.sandbox.https``) on 127.0.181.x:443 with a trustme CA, in the test
session's private network namespace.  Names are under ``sts.test``.
Delivery under a policy (enforce/testing) is in tests/test_mtasts_delivery.py.
"""

from __future__ import annotations

import ssl
import time

import pytest

from mxq.sandbox.https import Reply, issue_context, policy_text, start_policy_server
from mxq.sandbox.smtpd import make_tls
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.mtasts import (FETCH_ERROR, MTASTS, POLICY_INVALID, WEBPKI_INVALID, MemoryPolicyCache, Policy,
                                PolicyError, fetch_policy, mx_matches, parse_txt)
from mxq.workers.mx import Resolver

IP = "127.0.181."


# -- pure logic ------------------------------------------------------------------------------------

def test_parse_txt_rfc_8461_section_3_1():
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=x1; ext=foo"]) == "x1"      # others ignored, extensions ok
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None               # two policy records: none
    assert parse_txt(["v=STSv1; id="]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None                      # at most 32 characters
    assert parse_txt(["v=STSv1; id=a-b"]) is None                              # letters and digits only
    assert parse_txt(["id=x; v=STSv1"]) is None                                # v= must come first


def test_policy_parse_and_limits():
    p = Policy.parse("version: STSv1\nmode: enforce\r\nmx: MX1.a.test.\nmx:\t*.b.test\nmax_age: 86400\n"
                     "ext_field: whatever\n", "id1")
    assert (p.id, p.mode, p.mx, p.max_age) == ("id1", "enforce", ("mx1.a.test", "*.b.test"), 86400)
    assert p.lines == ("version: STSv1", "mode: enforce", "mx: MX1.a.test.", "mx:\t*.b.test", "max_age: 86400",
                       "ext_field: whatever")
    assert Policy.parse(policy_text("testing", "mx.a.test", max_age=99999999999 // 10)).max_age == 31557600
    assert Policy.parse("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()
    for bad in ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
                "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",                   # no mx
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",
                "version: STSv1\nmode: enforce\nmode: testing\nmx: a.test\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: mx*.a.test\nmax_age: 1\n",    # wildcard not a whole label
                "<html>hello</html>\n"):
        with pytest.raises(PolicyError) as e:
            Policy.parse(bad)
        assert e.value.result_type == POLICY_INVALID


def test_mx_matching_rfc_8461_section_4_1():
    assert mx_matches("mx.a.test", "mx.a.test") and mx_matches("MX.A.test.", "mx.a.test")
    assert mx_matches("mx1.a.test", "*.a.test")
    assert not mx_matches("a.test", "*.a.test")                 # the wildcard stands for one label...
    assert not mx_matches("x.mx1.a.test", "*.a.test")           # ...exactly one
    assert not mx_matches("mx.b.test", "mx.a.test")
    assert not mx_matches("evilmx.a.test", "mx.a.test")


# -- against real servers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """One test CA; its certificate for the policy hosts of the domains below."""
    return make_tls("mta-sts.ok.sts.test", "mta-sts.id.sts.test", "mta-sts.slow.sts.test",
                    "mta-sts.big.sts.test", "mta-sts.html.sts.test", "mta-sts.moved.sts.test",
                    "mta-sts.gone.sts.test", "mta-sts.trickle.sts.test", "mta-sts.bad.sts.test", "mta-sts.gone2.sts.test",
                    "mta-sts.slowhead.sts.test", "mta-sts.cut.sts.test", "mta-sts.dnsdown.sts.test",
                    directory=tmp_path_factory.mktemp("sts-ca"))


@pytest.fixture(scope="module")
def web(tls):
    srv = start_policy_server(IP + "10", tls.server_context)
    yield srv
    srv.stop()


@pytest.fixture
def resolver(dns_server):
    return Resolver(Settings(dns_servers=parse_dns_servers(dns_server.address)))


def serve(dns_server, domain, txt="v=STSv1; id=1;", ip=IP + "10"):
    records = {f"mta-sts.{domain}": {"A": [ip]}}
    if txt is not None:
        records[f"_mta-sts.{domain}"] = {"TXT": [txt] if isinstance(txt, str) else txt}
    dns_server.add(records)


def test_fetch_resolves_through_mxq_dns_and_verifies(dns_server, web, tls, resolver):
    serve(dns_server, "ok.sts.test")
    web.set("ok.sts.test", policy_text("enforce", "mx.ok.sts.test"))
    text = fetch_policy("ok.sts.test", resolver, context=tls.client_context)
    assert "mode: enforce" in text
    assert ("mta-sts.ok.sts.test", "/.well-known/mta-sts.txt") in web.requests
    # The name is not in the system's resolver at all: it was resolved by the sandbox DNS server.
    assert dns_server.queries("mta-sts.ok.sts.test", "A") >= 1


def test_fetch_failures_are_classified(dns_server, web, tls, resolver):
    for d in ("html", "moved", "gone", "big", "bad"):
        serve(dns_server, f"{d}.sts.test")
    web.set("html.sts.test", Reply(policy_text("enforce", "mx.a.test"), content_type="text/html"))
    web.set("moved.sts.test", Reply("", status=301, location="https://elsewhere.sts.test/policy"))
    web.set("big.sts.test", "version: STSv1\n" + "x: y\n" * 20000)
    cases = {"html": POLICY_INVALID, "moved": FETCH_ERROR, "gone": FETCH_ERROR, "big": POLICY_INVALID}
    for d, want in cases.items():
        with pytest.raises(PolicyError) as e:
            fetch_policy(f"{d}.sts.test", resolver, context=tls.client_context)
        assert e.value.result_type == want, (d, e.value)
    assert "301" in str(pytest.raises(PolicyError, fetch_policy, "moved.sts.test", resolver,
                                      context=tls.client_context).value)
    # Only the policy URL was asked for: the redirect was not followed.
    assert not [h for h, _ in web.requests if "elsewhere" in h]
    # A certificate that does not verify (another CA): sts-webpki-invalid.
    other = make_tls("mta-sts.bad.sts.test")
    with pytest.raises(PolicyError) as e:
        fetch_policy("bad.sts.test", resolver, context=other.client_context)
    assert e.value.result_type == WEBPKI_INVALID
    # No address for the policy host: a fetch error.
    dns_server.add({"_mta-sts.noaddr.sts.test": {"TXT": ["v=STSv1; id=1"]}})
    with pytest.raises(PolicyError) as e:
        fetch_policy("noaddr.sts.test", resolver, context=tls.client_context)
    assert e.value.result_type == FETCH_ERROR


def test_fetch_is_bounded_in_time_even_when_the_body_trickles(dns_server, web, tls, resolver):
    serve(dns_server, "slow.sts.test")
    serve(dns_server, "trickle.sts.test")
    web.set("slow.sts.test", Reply(policy_text("enforce", "mx.a.test"), delay=5))
    web.set("trickle.sts.test", Reply(policy_text("enforce", "mx.a.test"), trickle=0.05))
    for d in ("slow", "trickle"):
        t0 = time.monotonic()
        with pytest.raises(PolicyError) as e:
            fetch_policy(f"{d}.sts.test", resolver, context=tls.client_context, timeout=1.0)
        assert e.value.result_type == FETCH_ERROR and "timed out" in e.value.detail
        assert time.monotonic() - t0 < 2.0


def test_fetch_is_bounded_in_time_when_the_headers_trickle(dns_server, web, tls, resolver):
    """A policy host that sends its status line and headers one byte every 50 ms: every read returns
    in time, so only a deadline on the whole fetch (not on each read) ends it."""
    serve(dns_server, "slowhead.sts.test")
    web.set("slowhead.sts.test", Reply(policy_text("enforce", "mx.a.test"), trickle_headers=0.05))
    t0 = time.monotonic()
    with pytest.raises(PolicyError) as e:
        fetch_policy("slowhead.sts.test", resolver, context=tls.client_context, timeout=1.0)
    assert e.value.result_type == FETCH_ERROR and "timed out" in e.value.detail
    assert time.monotonic() - t0 < 2.0


def test_a_policy_cut_short_is_not_a_policy(dns_server, web, tls, resolver):
    """The connection closes before the Content-Length the server announced: the text that did arrive
    ("mx: mx.a.test" and a shorter max_age) would parse; it must be a fetch error instead."""
    serve(dns_server, "cut.sts.test")
    text = policy_text("enforce", "mx.a.test", "mx.b.test", max_age=86400)
    cut = text.index("max_age: 86400") + len("max_age: 8640")
    web.set("cut.sts.test", Reply(text, truncate=cut))
    with pytest.raises(PolicyError) as e:
        fetch_policy("cut.sts.test", resolver, context=tls.client_context, timeout=2.0)
    assert e.value.result_type == FETCH_ERROR and "before" in e.value.detail


def test_fetch_refused_certificate_of_other_name(dns_server, tls, resolver):
    """The policy host's certificate is valid but for another name: sts-webpki-invalid."""
    serve(dns_server, "wrongname.sts.test", ip=IP + "11")
    with start_policy_server(IP + "11", issue_context(tls.ca, "www.wrongname.sts.test"),
                             {"wrongname.sts.test": policy_text("enforce", "mx.a.test")}):
        with pytest.raises(PolicyError) as e:
            fetch_policy("wrongname.sts.test", resolver, context=tls.client_context)
    assert e.value.result_type == WEBPKI_INVALID and "mta-sts.wrongname.sts.test" in e.value.detail


def test_lookup_caches_by_id_and_max_age(dns_server, web, tls, resolver):
    serve(dns_server, "id.sts.test", txt="v=STSv1; id=one;")
    web.set("id.sts.test", policy_text("testing", "mx.id.sts.test", max_age=100))
    now = [1000.0]
    cache = MemoryPolicyCache(clock=lambda: now[0])
    sts = MTASTS(resolver, cache, tls_context=tls.client_context, clock=lambda: now[0])

    def fetches():
        return sum(1 for h, _ in web.requests if h == "mta-sts.id.sts.test")

    before = fetches()
    got = sts.lookup("id.sts.test")
    assert got.mode == "testing" and got.policy.id == "one" and got.policy.mx == ("mx.id.sts.test",)
    assert sts.lookup("id.sts.test").policy == got.policy and fetches() == before + 1   # cached
    # A new id in DNS means a new policy (resolvers cache TXT: use a fresh one).
    sts.resolver = Resolver(resolver.settings)
    dns_server.add({"_mta-sts.id.sts.test": {"TXT": ["v=STSv1; id=two;"]}})
    web.set("id.sts.test", policy_text("enforce", "mx.id.sts.test", max_age=100))
    got = sts.lookup("id.sts.test")
    assert (got.mode, got.policy.id) == ("enforce", "two") and fetches() == before + 2
    # The TXT record removed: the cached policy stays in force until max_age...
    sts.resolver = Resolver(resolver.settings)
    dns_server.remove("_mta-sts.id.sts.test")
    assert sts.lookup("id.sts.test").mode == "enforce" and fetches() == before + 2
    # ... and is gone after it.
    now[0] += 101
    assert sts.lookup("id.sts.test").policy is None


def test_lookup_failure_is_remembered_and_the_cached_policy_stays(dns_server, web, tls, resolver):
    serve(dns_server, "gone2.sts.test", txt="v=STSv1; id=a;")
    web.set("gone2.sts.test", policy_text("enforce", "mx.gone2.sts.test"))
    now = [5000.0]
    cache = MemoryPolicyCache(clock=lambda: now[0])
    sts = MTASTS(resolver, cache, tls_context=tls.client_context, clock=lambda: now[0])
    assert sts.lookup("gone2.sts.test").mode == "enforce"
    # A new id, and the policy host now fails: the cached policy stays in force.
    sts.resolver = Resolver(resolver.settings)
    dns_server.add({"_mta-sts.gone2.sts.test": {"TXT": ["v=STSv1; id=b;"]}})
    web.set("gone2.sts.test", Reply("oops", status=500))
    asked = len(web.requests)
    got = sts.lookup("gone2.sts.test")
    assert got.mode == "enforce" and got.policy.id == "a"
    assert len(web.requests) == asked + 1
    # No cached policy and a failing host: no policy, the failure named; not asked again for 5 minutes.
    fresh = MTASTS(Resolver(resolver.settings), MemoryPolicyCache(clock=lambda: now[0]),
                   tls_context=tls.client_context, clock=lambda: now[0])
    got = fresh.lookup("gone2.sts.test")
    assert got.policy is None and got.failure == FETCH_ERROR and "HTTP 500" in got.detail
    asked = len(web.requests)
    assert fresh.lookup("gone2.sts.test").failure == FETCH_ERROR and len(web.requests) == asked
    now[0] += 301
    fresh.lookup("gone2.sts.test")
    assert len(web.requests) == asked + 1


def test_a_txt_lookup_that_fails_is_not_repeated_by_every_delivery(dns_server, web, tls, resolver):
    """The domain's DNS never answers for ``_mta-sts`` (its MX lookups work): the first lookup waits for the
    DNS deadline; later ones within five minutes do not wait again (RFC 2308 lets a server failure be
    remembered that long) -- a cached policy stays in force meanwhile, and after it the TXT is asked again."""
    serve(dns_server, "dnsdown.sts.test", txt="v=STSv1; id=d1;")
    web.set("dnsdown.sts.test", policy_text("enforce", "mx.dnsdown.sts.test"))
    now = [1000.0]
    cache = MemoryPolicyCache(clock=lambda: now[0])
    sts = MTASTS(resolver, cache, tls_context=tls.client_context, clock=lambda: now[0], timeout=1.0)
    assert sts.lookup("dnsdown.sts.test").mode == "enforce"
    dns_server.add({"_mta-sts.dnsdown.sts.test": {"TIMEOUT": True}})
    sts.resolver = Resolver(resolver.settings)            # the TXT answer is no longer cached
    t0 = time.monotonic()
    assert sts.lookup("dnsdown.sts.test").mode == "enforce"   # the cached policy, after the DNS deadline
    first = time.monotonic() - t0
    assert first >= 0.5
    t0 = time.monotonic()
    for _ in range(3):
        assert sts.lookup("dnsdown.sts.test").mode == "enforce"
    assert time.monotonic() - t0 < 0.3, "every lookup waited for the DNS again"
    asked = dns_server.queries("_mta-sts.dnsdown.sts.test", "TXT")
    now[0] += 301
    sts.lookup("dnsdown.sts.test")
    assert dns_server.queries("_mta-sts.dnsdown.sts.test", "TXT") > asked     # asked again after 5 minutes


def test_no_txt_record_means_no_policy_and_no_fetch(dns_server, web, tls, resolver):
    asked = len(web.requests)
    sts = MTASTS(resolver, MemoryPolicyCache(), tls_context=tls.client_context)
    got = sts.lookup("nothing.sts.test")
    assert got.policy is None and got.failure is None and len(web.requests) == asked
    assert sts.lookup("[127.0.0.1]").policy is None


def test_fetch_obeys_the_destination_policy(dns_server, web, tls, resolver):
    """The policy host's name is the recipient domain's choice, like its MX: the same policy applies."""
    from mxq.workers.destinations import DestinationPolicy

    serve(dns_server, "ok.sts.test")
    web.set("ok.sts.test", policy_text("enforce", "mx.ok.sts.test"))
    asked = len(web.requests)
    with pytest.raises(PolicyError) as e:
        fetch_policy("ok.sts.test", resolver, context=tls.client_context, destinations=DestinationPolicy())
    assert e.value.result_type == FETCH_ERROR and "loopback" in e.value.detail and len(web.requests) == asked
    allowed = DestinationPolicy.parse(IP + "0/24")
    assert "mode: enforce" in fetch_policy("ok.sts.test", resolver, context=tls.client_context, destinations=allowed)

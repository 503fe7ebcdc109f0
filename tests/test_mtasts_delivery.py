"""Delivery under MTA-STS (RFC 8461) and the TLS-RPT counts it leaves (RFC 8460).

Servers, all real, in the test session's private network namespace: the sandbox DNS server, the
sandbox HTTPS policy server (127.0.181.50:443, certificate from a test CA that ``SSL_CERT_FILE``
makes trusted), and scripted aiosmtpd exchanges on 127.0.181.5x-8x:25 with STARTTLS and
certificates from the same CA -- or for another name, or from a CA nobody trusts.  Domains are
under ``dsts.test``.
"""

from __future__ import annotations

import json

import pytest

from mxq.sandbox.https import Reply, policy_text, start_policy_server
from mxq.sandbox.smtpd import Behaviour, make_tls, start_server
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import deliver
from mxq.workers.message import prepare
from mxq.workers.mtasts import MTASTS, MemoryPolicyCache
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.timeouts import Timeouts
from mxq.workers.tlsrpt import MemoryTLSReport, day_of, report

from tests.dns_gate import Gate

IP = "127.0.181."
WEB = IP + "50"
FAST = Timeouts(connect=1, greeting=2, command=2, data_init=2, data_block=2, data_final=2)
MESSAGE = b"From: <s@src.dsts.test>\r\nSubject: sts\r\n\r\nHello.\r\n"
DOMAINS = ("enf1", "enf2", "enf3", "enf4", "enf5", "enf6", "enf7", "enf8", "tst1", "tst2", "fail", "none1")


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_tls(*(f"mta-sts.{d}.dsts.test" for d in DOMAINS), directory=tmp_path_factory.mktemp("dsts"))


@pytest.fixture(scope="module")
def web(ca):
    srv = start_policy_server(WEB, ca.server_context)
    yield srv
    srv.stop()


@pytest.fixture
def world(dns_server, web, ca, monkeypatch):
    """``add(domain, mode, policy_mx, exchanges)``: DNS, policy and STARTTLS exchanges for one domain.

    ``exchanges``: ``[(pref, name, ip, cert_names or None (no STARTTLS) or "untrusted")]``.
    """
    monkeypatch.setenv("SSL_CERT_FILE", ca.ca_file)
    started = []

    def add(domain, mode, policy_mx, exchanges, txt="v=STSv1; id=1;"):
        records = {domain: {"MX": [[p, n] for p, n, _, _ in exchanges]},
                   f"mta-sts.{domain}": {"A": [WEB]}}
        if txt:
            records[f"_mta-sts.{domain}"] = {"TXT": [txt]}
        for _, name, ip, _ in exchanges:
            records[name] = {"A": [ip]}
        dns_server.add(records)
        if mode is not None:
            web.set(domain, policy_text(mode, *policy_mx))
        servers = []
        for _, name, ip, cert in exchanges:
            if cert is None:
                tls = None
            elif cert == "untrusted":
                tls = make_tls(name).server_context             # a CA of its own, trusted by nobody
            else:
                from mxq.sandbox.https import issue_context
                tls = issue_context(ca.ca, *cert)
            srv = start_server(ip, 25, Behaviour(hostname=name, starttls=tls))
            started.append(srv)
            servers.append(srv)
        return servers

    yield add
    for s in started:
        s.stop()


@pytest.fixture
def run(dns_server):
    settings = Settings(helo_name="client.dsts.test", dns_servers=parse_dns_servers(dns_server.address),
                        timeouts=FAST)
    counts = MemoryTLSReport()

    def go(*rcpts):
        resolver = Resolver(settings)
        sts = MTASTS(resolver, MemoryPolicyCache())
        env = prepare(MESSAGE, sender="s@src.dsts.test", recipients=list(rcpts))
        return deliver(env, settings=settings, resolver=resolver, mta_sts=sts, tls_report=counts)

    go.counts = counts
    return go


def entry(counts, domain):
    [e] = counts.entries(day_of(), [domain])
    return e


def details(e):
    return sorted((d["result-type"], d.get("receiving-mx-hostname"), n) for d, n in e["details"])


# -- enforce ----------------------------------------------------------------------------------------

def test_enforce_delivers_with_verified_tls_to_a_policy_mx(world, run):
    [mx] = world("enf1.dsts.test", "enforce", ["mx.enf1.dsts.test"],
                 [(10, "mx.enf1.dsts.test", IP + "51", ["mx.enf1.dsts.test"])])
    [r] = run("a@enf1.dsts.test")
    assert r.state is State.DELIVERED and r.exchange == "mx.enf1.dsts.test"
    assert mx.messages[0].tls
    e = entry(run.counts, "enf1.dsts.test")
    assert e["policy"]["policy-type"] == "sts" and e["policy"]["mx-host"] == ["mx.enf1.dsts.test"]
    assert "mode: enforce" in e["policy"]["policy-string"]
    assert (e["ok"], e["fail"]) == (1, 0)


def test_a_new_domains_mta_sts_lookup_runs_beside_its_mx_lookup(world, dns_server):
    # A new destination's policy lookup (its _mta-sts TXT record, then the policy) does not wait
    # for its MX and address lookups to end: the first delivery waits for the longer of the two.
    [mx] = world("enf8.dsts.test", "enforce", ["mx.enf8.dsts.test"],
                 [(10, "mx.enf8.dsts.test", IP + "58", ["mx.enf8.dsts.test"])])
    settings = Settings(helo_name="client.dsts.test", dns_servers=parse_dns_servers(dns_server.address),
                        timeouts=FAST)
    gate = Gate(settings, hold=("MX", "enf8.dsts.test"), until=("TXT", "_mta-sts.enf8.dsts.test"))
    resolver = Resolver(settings, cache=gate)
    counts = MemoryTLSReport()
    sts = MTASTS(resolver, MemoryPolicyCache())
    env = prepare(MESSAGE, sender="s@src.dsts.test", recipients=["h@enf8.dsts.test"])
    [r] = deliver(env, settings=settings, resolver=resolver, mta_sts=sts, tls_report=counts)
    assert gate.overlapped is True              # the TXT lookup started while the MX lookup waited
    assert r.state is State.DELIVERED and mx.messages[0].tls
    e = entry(counts, "enf8.dsts.test")         # the policy was in force for the session
    assert e["policy"]["policy-type"] == "sts" and (e["ok"], e["fail"]) == (1, 0)
    # Known now: the next delivery looks it up in order, in this thread.
    gate.order.clear()
    [r] = deliver(env, settings=settings, resolver=resolver, mta_sts=sts, tls_report=counts)
    assert r.state is State.DELIVERED and gate.order[0] == ("MX", "enf8.dsts.test")
    assert gate.order.index(("TXT", "_mta-sts.enf8.dsts.test")) > gate.order.index(("A", "mx.enf8.dsts.test"))


def test_enforce_skips_an_mx_not_in_the_policy(world, run):
    other, good = world("enf2.dsts.test", "enforce", ["*.good.enf2.dsts.test"],
                        [(10, "mx.other.enf2.dsts.test", IP + "52", ["mx.other.enf2.dsts.test"]),
                         (20, "mx1.good.enf2.dsts.test", IP + "53", ["mx1.good.enf2.dsts.test"])])
    [r] = run("b@enf2.dsts.test")
    assert r.state is State.DELIVERED and r.exchange == "mx1.good.enf2.dsts.test"
    assert other.stats["connections"] == 0 and good.messages[0].tls
    e = entry(run.counts, "enf2.dsts.test")
    assert (e["ok"], e["fail"]) == (1, 1)
    assert details(e) == [("validation-failure", "mx.other.enf2.dsts.test", 1)]
    assert e["details"][0][0]["failure-reason-code"] == "mx-not-in-policy"


def test_enforce_counts_an_unlisted_mx_only_when_delivery_reaches_it(world, run):
    """An unlisted backup MX behind a listed primary that takes the mail is never a session, nor a failure.

    RFC 8460 counts sessions: the unlisted MX counts as a failed one only when the delivery got to
    it in preference order (the primary did not take the mail), not on every delivery to the domain.
    """
    good, _backup = world("enf7.dsts.test", "enforce", ["mx.enf7.dsts.test"],
                          [(10, "mx.enf7.dsts.test", IP + "64", ["mx.enf7.dsts.test"]),
                           (20, "backup.enf7.dsts.test", IP + "65", ["backup.enf7.dsts.test"])])
    [r] = run("n@enf7.dsts.test")
    assert r.state is State.DELIVERED and r.exchange == "mx.enf7.dsts.test" and good.messages[0].tls
    e = entry(run.counts, "enf7.dsts.test")
    assert (e["ok"], e["fail"]) == (1, 0) and details(e) == []
    # The primary refuses connections now: the delivery reaches the backup, which the policy rules out.
    good.stop()
    [r] = run("o@enf7.dsts.test")
    assert r.state is State.DEFERRED
    e = entry(run.counts, "enf7.dsts.test")
    assert (e["ok"], e["fail"]) == (1, 1)
    assert details(e) == [("validation-failure", "backup.enf7.dsts.test", 1)]


def test_enforce_defers_when_no_mx_matches(world, run):
    [mx] = world("enf3.dsts.test", "enforce", ["mx.elsewhere.test"],
                 [(10, "mx.enf3.dsts.test", IP + "54", ["mx.enf3.dsts.test"])])
    [r] = run("c@enf3.dsts.test")
    assert r.state is State.DEFERRED and r.enhanced == "4.7.5"
    assert "MTA-STS policy of enf3.dsts.test" in r.text and "mx.enf3.dsts.test" in r.text
    assert mx.stats["connections"] == 0


def test_enforce_defers_on_a_certificate_that_does_not_match(world, run):
    [mx] = world("enf4.dsts.test", "enforce", ["mx.enf4.dsts.test"],
                 [(10, "mx.enf4.dsts.test", IP + "55", ["www.enf4.dsts.test"])])
    [r] = run("d@enf4.dsts.test")
    assert r.state is State.DEFERRED and r.enhanced == "4.7.5" and r.exchange == "mx.enf4.dsts.test"
    assert "MTA-STS policy of enf4.dsts.test (enforce) requires verified TLS" in r.text
    assert not mx.messages and mx.stats["mail"] == 0            # nothing sent, not even in clear text
    e = entry(run.counts, "enf4.dsts.test")
    assert (e["ok"], e["fail"]) == (0, 1)
    assert details(e) == [("certificate-host-mismatch", "mx.enf4.dsts.test", 1)]
    assert e["details"][0][0]["receiving-ip"] == IP + "55" and e["details"][0][0]["sending-mta-ip"]


def test_enforce_defers_without_starttls_or_with_an_untrusted_certificate(world, run):
    [plain] = world("enf5.dsts.test", "enforce", ["mx.enf5.dsts.test"],
                    [(10, "mx.enf5.dsts.test", IP + "56", None)])
    [untrusted] = world("enf6.dsts.test", "enforce", ["mx.enf6.dsts.test"],
                        [(10, "mx.enf6.dsts.test", IP + "57", "untrusted")])
    r5, r6 = run("e@enf5.dsts.test", "f@enf6.dsts.test")
    assert r5.state is State.DEFERRED and "not offered" in r5.text and not plain.messages
    assert r6.state is State.DEFERRED and r6.enhanced == "4.7.5" and not untrusted.messages
    assert details(entry(run.counts, "enf5.dsts.test")) == [("starttls-not-supported", "mx.enf5.dsts.test", 1)]
    assert details(entry(run.counts, "enf6.dsts.test")) == [("certificate-not-trusted", "mx.enf6.dsts.test", 1)]


# -- testing ----------------------------------------------------------------------------------------

def test_testing_mode_delivers_and_records_the_failures(world, run):
    [bad] = world("tst1.dsts.test", "testing", ["mx.tst1.dsts.test"],
                  [(10, "mx.tst1.dsts.test", IP + "60", ["www.tst1.dsts.test"])])
    [stray] = world("tst2.dsts.test", "testing", ["mx.listed.tst2.dsts.test"],
                    [(10, "mx.stray.tst2.dsts.test", IP + "61", ["mx.stray.tst2.dsts.test"])])
    r1, r2 = run("g@tst1.dsts.test", "h@tst2.dsts.test")
    assert r1.state is State.DELIVERED and r2.state is State.DELIVERED
    assert bad.messages[0].tls                     # still encrypted (opportunistic), just not verified
    e1, e2 = entry(run.counts, "tst1.dsts.test"), entry(run.counts, "tst2.dsts.test")
    assert (e1["ok"], e1["fail"]) == (0, 1)
    assert details(e1) == [("certificate-host-mismatch", "mx.tst1.dsts.test", 1)]
    assert "mode: testing" in e1["policy"]["policy-string"]
    # One session with an MX the policy does not list: one failed session (RFC 8460 counts sessions),
    # not a failure and a success -- even though its certificate is valid for its name.
    assert (e2["ok"], e2["fail"]) == (0, 1)
    assert details(e2) == [("validation-failure", "mx.stray.tst2.dsts.test", 1)]
    assert e2["details"][0][0]["failure-reason-code"] == "mx-not-in-policy"
    assert len(stray.messages) == 1


# -- no policy, or one that cannot be had -------------------------------------------------------------

def test_unavailable_policy_fails_open_and_is_reported(world, web, run):
    [mx] = world("fail.dsts.test", None, [], [(10, "mx.fail.dsts.test", IP + "62", ["mx.fail.dsts.test"])])
    web.set("fail.dsts.test", Reply("gone", status=404))
    [none1] = world("none1.dsts.test", None, [], [(10, "mx.none1.dsts.test", IP + "63", None)], txt=None)
    r1, r2 = run("i@fail.dsts.test", "j@none1.dsts.test")
    assert r1.state is State.DELIVERED and r2.state is State.DELIVERED
    e = entry(run.counts, "fail.dsts.test")
    assert e["policy"] == {"policy-type": "sts", "policy-domain": "fail.dsts.test"}
    assert details(e) == [("sts-policy-fetch-error", "mx.fail.dsts.test", 1)]
    e = entry(run.counts, "none1.dsts.test")
    assert e["policy"] == {"policy-type": "no-policy-found", "policy-domain": "none1.dsts.test"}
    assert details(e) == [("starttls-not-supported", "mx.none1.dsts.test", 1)]


def test_report_json_is_rfc_8460_shaped(world, run):
    world("enf1.dsts.test", "enforce", ["mx.enf1.dsts.test"],
          [(10, "mx.enf1.dsts.test", IP + "51", ["mx.enf1.dsts.test"])])
    world("enf4.dsts.test", "enforce", ["mx.enf4.dsts.test"],
          [(10, "mx.enf4.dsts.test", IP + "55", ["www.enf4.dsts.test"])])
    run("k@enf1.dsts.test", "l@enf4.dsts.test")
    run("m@enf1.dsts.test")
    day = day_of()
    doc = report(day, run.counts.entries(day), organization="Example Sender", contact="tlsrpt@src.dsts.test")
    doc = json.loads(json.dumps(doc))
    assert set(doc) == {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    assert doc["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    by = {p["policy"]["policy-domain"]: p for p in doc["policies"]}
    assert by["enf1.dsts.test"]["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 0}
    assert "failure-details" not in by["enf1.dsts.test"]
    [fd] = by["enf4.dsts.test"]["failure-details"]
    assert fd["result-type"] == "certificate-host-mismatch" and fd["failed-session-count"] == 1
    assert fd["receiving-mx-hostname"] == "mx.enf4.dsts.test" and fd["receiving-ip"] == IP + "55"
    # report-id: unique per day and domain set, and bounded however many domains the report covers
    assert doc["report-id"].startswith(f"{day}T00:00:00Z_2-domains-") and doc["report-id"].endswith("@Example Sender")
    one = report(day, [e for e in run.counts.entries(day) if e["policy"]["policy-domain"] == "enf1.dsts.test"],
                 organization="Example Sender", contact="tlsrpt@src.dsts.test")
    assert one["report-id"] == f"{day}T00:00:00Z_enf1.dsts.test@Example Sender"
    many = [{"policy": {"policy-type": "no-policy-found", "policy-domain": f"d{i}.dsts.test"}, "ok": 1, "fail": 0}
            for i in range(5000)]
    ids = {report(day, many[:n], organization="o", contact="c")["report-id"] for n in (2, 3, 5000)}
    assert len(ids) == 3 and max(len(i) for i in ids) < 80


def test_memory_counts_keep_eight_days():
    from mxq.workers.tlsrpt import PolicyRef
    counts = MemoryTLSReport()
    ref = PolicyRef.none("old.dsts.test")
    counts.record(ref, when=0)                       # 1970-01-01
    counts.record(ref, when=7 * 86400)               # 1970-01-08: the first day is still kept
    assert counts.domains("1970-01-01") == ["old.dsts.test"]
    counts.record(ref, when=8 * 86400)               # 1970-01-09: eight days later, it is gone
    assert counts.domains("1970-01-01") == [] and counts.entries("1970-01-09")[0]["ok"] == 1

"""Port 25 blocked and MTA-STS / TLS-RPT in the pipeline: real ``celery worker`` processes sharing
the state in a real redis-server, the real ``mxq queue`` / ``mxq tlsrpt`` commands, /metrics.

Faults and peers, all real, in the test session's private network namespace: nftables drops every
SYN to 127.0.185.0/24 port 25 (the exchanges); the relay is an aiosmtpd server on 127.0.186.10:587
(STARTTLS + AUTH, test CA trusted through SSL_CERT_FILE); MTA-STS exchanges on 127.0.186.2x:25 and
the HTTPS policy server on 127.0.186.30:443.  Domains under ``tp.test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mxq import tasks
from mxq.sandbox.https import issue_context, policy_text, start_policy_server
from mxq.sandbox.smtpd import Behaviour, make_tls, start_server
from tests.fixtures_infra import free_port, wait_until

from .conftest import IN_PRIVATE_NETNS

pytest_plugins = ["tests.pipeline_fixtures"]

MXQ = str(Path(sys.executable).with_name("mxq"))
NET = "127.0.185."
IP = "127.0.186."
RELAY = "smtp.relay.tp.test"
SENDER = "s@src.tp.test"


def mxq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MXQ, *args], capture_output=True, timeout=60, env=dict(os.environ), stdin=subprocess.DEVNULL)


def message(to: str, tag: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@src.tp.test>\r\n\r\n"
            f"body {tag}\r\n").encode()


def nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def dropped():
    if not IN_PRIVATE_NETNS:
        pytest.skip("needs the private network namespace (root): never touches the host's firewall")
    nft("add", "table", "inet", "mxq_tp_test")
    nft("add", "chain", "inet", "mxq_tp_test", "out", "{ type filter hook output priority 0; }")
    nft("add", "rule", "inet", "mxq_tp_test", "out", "ip", "daddr", NET + "0/24", "tcp", "dport", "25", "drop")
    yield
    nft("delete", "table", "inet", "mxq_tp_test")


@pytest.fixture
def relay(dns_server, tmp_path):
    tls = make_tls(RELAY, directory=tmp_path)
    srv = start_server(IP + "10", 587, Behaviour(hostname=RELAY, starttls=tls.server_context, require_starttls=True,
                                                 auth={"mxq": "relay-secret"}, auth_required=True, keep_content=False))
    dns_server.add({RELAY: {"A": [IP + "10"]}})
    srv.tls = tls
    yield srv
    srv.stop()


def domains(dns_server, first: int, n: int) -> list[str]:
    records, names = {}, []
    for i in range(first, first + n):
        d = f"d{i}.tp.test"
        records[d] = {"MX": [[10, f"mx1.{d}"], [20, f"mx2.{d}"]]}
        records[f"mx1.{d}"] = {"A": [f"{NET}{2 * i}"]}
        records[f"mx2.{d}"] = {"A": [f"{NET}{2 * i + 1}"]}
        names.append(d)
    dns_server.add(records)
    return names


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_blocked_port_25_fleet_wide_mail_goes_through_the_relay_within_seconds(pipeline, dns_server, dropped,
                                                                                 relay):
    metrics_port = free_port()
    p = pipeline(MXQ_RELAY=f"smtp://mxq:relay-secret@{RELAY}", SSL_CERT_FILE=relay.tls.ca_file,
                 MXQ_CONNECT_TIMEOUT="3", MXQ_MTA_STS="off")
    p.worker(concurrency=2)
    p.worker(concurrency=2)
    # Fleet-wide gauges (port 25 state, queue depths) are served by the scheduler only.
    p.beat(MXQ_METRICS_PORT=str(metrics_port), MXQ_METRICS_ADDR="127.0.0.1")
    # The first mail finds out: connects to its exchanges time out (3 s each), the relay takes it.
    first = domains(dns_server, 1, 4)
    t0 = time.monotonic()
    ids = [tasks.submit(message(f"a@{d}", f"first-{d}"), sender=SENDER, recipients=[f"a@{d}"]) for d in first]
    p.wait_done(ids, timeout=60)
    assert time.monotonic() - t0 >= 3
    # From now on the whole fleet knows: later mail goes straight to the relay.
    r = mxq("queue")
    assert r.returncode == 0 and "port 25: BLOCKED" in r.stdout.decode(), r.stdout
    doc = json.loads(mxq("queue", "--json").stdout)
    assert doc["port25"]["kind"] == "timeout" and doc["port25"]["domains"] >= 2
    wait_until(lambda: scrape(metrics_port).get("mxq_port25_blocked") == 1.0, 10, "the metric")
    later = domains(dns_server, 11, 20)
    t0 = time.monotonic()
    ids = [tasks.submit(message(f"b@{d}", f"later-{d}"), sender=SENDER, recipients=[f"b@{d}"]) for d in later]
    p.wait_done(ids, timeout=60)
    took = time.monotonic() - t0
    assert took < 10, took                   # not 20 domains x 2 exchanges x 3 s
    for j in ids:
        rec = tasks.status(j)["recipients"][0]
        assert (rec["state"], rec["relay"], rec["attempts"]) == ("delivered", True, 1), rec
    assert len(relay.messages) == 24
    # Said once in the log, for the whole fleet; the exchanges were not all marked down.
    said = p.logs().count("port 25 appears blocked")
    assert said == 1, said
    client = p.redis.client()
    assert len(list(client.scan_iter(match=f"mxq:down:{NET}*"))) <= 8


def test_mta_sts_policy_fetched_once_for_the_fleet_and_tlsrpt_reports_it(pipeline, dns_server, tmp_path):
    ca = make_tls("mta-sts.enf.tp.test", "mta-sts.tst.tp.test", directory=tmp_path)
    web = start_policy_server(IP + "30", ca.server_context,
                              {"enf.tp.test": policy_text("enforce", "mx.enf.tp.test", max_age=3600),
                               "tst.tp.test": policy_text("testing", "mx.tst.tp.test", max_age=3600)})
    good = start_server(IP + "20", 25, Behaviour(hostname="mx.enf.tp.test",
                                                 starttls=issue_context(ca.ca, "mx.enf.tp.test")))
    wrong = start_server(IP + "21", 25, Behaviour(hostname="mx.tst.tp.test",
                                                  starttls=issue_context(ca.ca, "other.tp.test")))
    dns_server.add({"enf.tp.test": {"MX": [[10, "mx.enf.tp.test"]]}, "mx.enf.tp.test": {"A": [IP + "20"]},
                    "_mta-sts.enf.tp.test": {"TXT": ["v=STSv1; id=e1;"]}, "mta-sts.enf.tp.test": {"A": [IP + "30"]},
                    "tst.tp.test": {"MX": [[10, "mx.tst.tp.test"]]}, "mx.tst.tp.test": {"A": [IP + "21"]},
                    "_mta-sts.tst.tp.test": {"TXT": ["v=STSv1; id=t1;"]}, "mta-sts.tst.tp.test": {"A": [IP + "30"]}})
    try:
        # No connection reuse across tasks (MXQ_CONNECTION_CACHE_TIME=0): a TLS session per message,
        # so the report's session counts are the message counts.
        p = pipeline(SSL_CERT_FILE=ca.ca_file, MXQ_CONNECTION_CACHE_TIME="0")
        p.worker(concurrency=2)
        p.worker(concurrency=2)
        p.beat()
        ids = []
        for i in range(6):       # one by one: several tasks, on both workers
            rcpts = [f"u{i}@enf.tp.test", f"u{i}@tst.tp.test"]
            ids.append(tasks.submit(message(rcpts[0], f"sts-{i}"), sender=SENDER, recipients=rcpts))
            p.wait_done(ids[-1:], timeout=30)
        for j in ids:
            assert {r["state"] for r in tasks.status(j)["recipients"]} == {"delivered"}
        assert all(m.tls for m in good.messages) and len(good.messages) == 6 and len(wrong.messages) == 6
        # One policy fetch per domain for the whole fleet: the cache is in Redis, for max_age.
        assert sorted(h for h, _ in web.requests) == ["mta-sts.enf.tp.test", "mta-sts.tst.tp.test"]
        client = p.redis.client()
        assert 3500 < client.ttl("mxq:sts:enf.tp.test") <= 3600
        # mxq tlsrpt: the day's RFC 8460 report from the fleet's counts.
        r = mxq("tlsrpt", "--organization", "Tp Sender", "--contact", "tlsrpt@src.tp.test")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["organization-name"] == "Tp Sender" and doc["contact-info"] == "tlsrpt@src.tp.test"
        by = {x["policy"]["policy-domain"]: x for x in doc["policies"]}
        assert by["enf.tp.test"]["policy"]["policy-type"] == "sts"
        # TLS-RPT counts sessions, and the servers count theirs: a TLS session each on the good
        # server, a failed handshake each on the wrong one.  Usually one per message (six); a
        # message that found its lane's run still holding the previous message's connection
        # (mail submitted right after the last was recorded) shares that session, as it should.
        ok_sessions, failed_sessions = good.stats["starttls"], wrong.stats["tls_failed"]
        print(f"TLS sessions: {ok_sessions} good, {failed_sessions} failed handshakes, for 6 messages each")
        assert 4 <= ok_sessions <= 6 and 4 <= failed_sessions <= 6
        assert by["enf.tp.test"]["summary"] == {"total-successful-session-count": ok_sessions,
                                                 "total-failure-session-count": 0}
        assert by["tst.tp.test"]["summary"] == {"total-successful-session-count": 0,
                                                 "total-failure-session-count": failed_sessions}
        [fd] = by["tst.tp.test"]["failure-details"]
        assert (fd["result-type"], fd["receiving-mx-hostname"], fd["failed-session-count"]) == (
            "certificate-host-mismatch", "mx.tst.tp.test", failed_sessions)
        only = json.loads(mxq("tlsrpt", "--domain", "enf.tp.test").stdout)
        assert [x["policy"]["policy-domain"] for x in only["policies"]] == ["enf.tp.test"]
        assert mxq("tlsrpt", "--day", "yesterday").returncode == 0
        assert json.loads(mxq("tlsrpt", "--day", "2001-01-01").stdout)["policies"] == []
        assert mxq("tlsrpt", "--day", "someday").returncode == 64
    finally:
        web.stop()
        good.stop()
        wrong.stop()


def test_redis_away_never_stops_delivery(dns_server, tmp_path, monkeypatch):
    """The fleet-wide transport state is an aid: with its Redis gone (connection refused), deliveries
    go on -- port 25 is taken as open, no policy is cached (fetched each time), counts are lost."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from mxq.tasks.hoststatus import RedisPolicyCache, RedisPort25State, RedisTLSReport
    from mxq.workers.config import RelayConfig, Settings, parse_dns_servers
    from mxq.workers.delivery import MemoryHostStatus, deliver_domain
    from mxq.workers.message import prepare
    from mxq.workers.mtasts import MTASTS
    from mxq.workers.mx import Resolver
    from mxq.workers.port25 import Port25
    from mxq.workers.results import State
    from tests.fixtures_infra import free_port as _free

    dead = redis.Redis(port=_free(), socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    ca = make_tls("mta-sts.away.tp.test", directory=tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", ca.ca_file)          # the exchange's certificate is verified (enforce)
    web = start_policy_server(IP + "31", ca.server_context,
                              {"away.tp.test": policy_text("enforce", "mx.away.tp.test")})
    mx = start_server(IP + "22", 25, Behaviour(hostname="mx.away.tp.test",
                                               starttls=issue_context(ca.ca, "mx.away.tp.test")))
    dns_server.add({"away.tp.test": {"MX": [[10, "mx.away.tp.test"]]}, "mx.away.tp.test": {"A": [IP + "22"]},
                    "_mta-sts.away.tp.test": {"TXT": ["v=STSv1; id=a1;"]},
                    "mta-sts.away.tp.test": {"A": [IP + "31"]}})
    try:
        settings = Settings(helo_name="client.tp.test", dns_servers=parse_dns_servers(dns_server.address),
                            relay=RelayConfig.parse("smtp://127.0.0.1:1?tls=none"), relay_mode="fallback")
        resolver = Resolver(settings)
        for i in range(2):
            env = prepare(message(f"x{i}@away.tp.test", f"away-{i}"), sender=SENDER, recipients=[f"x{i}@away.tp.test"])
            [[r]] = deliver_domain("away.tp.test", [env], settings=settings, resolver=resolver,
                                   host_status=MemoryHostStatus(),
                                   mta_sts=MTASTS(resolver, RedisPolicyCache(dead)),
                                   tls_report=RedisTLSReport(dead), port25=Port25(RedisPort25State(dead)))
            assert r.state is State.DELIVERED and not r.relay, r
        assert len(mx.messages) == 2 and all(m.tls for m in mx.messages)   # enforce: verified TLS both times
        assert len(web.requests) == 2                                        # no cache: fetched each time
        assert RedisPort25State(dead).blocked() is None and not RedisPort25State(dead).claim_probe(0, 1)
    finally:
        web.stop()
        mx.stop()


def test_a_policy_cache_whose_redis_does_not_answer_keeps_the_policy_it_knew(redis_server):
    """Redis not answering is not "no policy": a process that knew a domain's policy keeps using
    it while it is valid, and remembers nothing from the failed read (it asks Redis again next
    time).  Before, the failed read was remembered as no policy for MEMORY seconds, and with a
    failed ``_mta-sts`` TXT lookup the domain's mail went without its policy."""
    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from mxq.tasks.hoststatus import RedisPolicyCache
    from mxq.workers.mtasts import Policy

    srv = redis_server()
    client = redis_lib.Redis.from_url(srv.url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                      retry=Retry(NoBackoff(), 0))
    now = [1000.0]
    cache = RedisPolicyCache(client, clock=lambda: now[0])
    pol = Policy.parse(policy_text("enforce", "mx.known.tp.test"), "k1")
    cache.put("known.tp.test", pol, 3600)
    now[0] += RedisPolicyCache.MEMORY + 1             # the memory is old: get() reads Redis
    srv.stop()                                          # Redis away (connection refused)
    assert cache.get("known.tp.test")[0].id == "k1"     # the policy it knew, still valid
    assert cache.get("other.tp.test") is None           # nothing known: nothing to use
    srv.start()
    other = RedisPolicyCache(client, clock=lambda: now[0])  # another worker fetched its policy
    other.put("other.tp.test", Policy.parse(policy_text("testing", "mx.o.tp.test"), "o1"), 3600)
    assert cache.get("other.tp.test")[0].id == "o1"     # the failed read was not remembered
    now[0] += 3600 + 1
    srv.stop()
    assert cache.get("known.tp.test") is None           # past its max_age it is not used
    client.close()


def test_the_policy_cache_reads_redis_once_per_domain_and_half_minute(redis_server):
    """Every delivery run asks for its domain's MTA-STS policy (a domain without one too): a worker
    process keeps what Redis said for RedisPolicyCache.MEMORY seconds (it was one GET and PTTL per
    delivery run); put() updates the memory, refresh() -- what a lookup calls before fetching a
    policy whose id it has not got -- reads Redis again."""
    from mxq.tasks.hoststatus import RedisPolicyCache
    from mxq.workers.mtasts import Policy

    srv = redis_server()
    client = srv.client()
    now = [1000.0]
    a, b = RedisPolicyCache(client, clock=lambda: now[0]), RedisPolicyCache(client, clock=lambda: now[0])

    def calls() -> int:
        stats = client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("get", "pttl"))

    client.config_resetstat()
    for _ in range(50):
        assert a.get("none.tp.test") is None
    assert calls() == 2                                  # one GET and one PTTL for 50 delivery runs
    assert a.get("x.tp.test") is None and calls() == 4                 # no policy yet: remembered
    pol = Policy.parse(policy_text("enforce", "mx.x.tp.test"), "p1")
    b.put("x.tp.test", pol, 3600)                                       # another worker fetched one
    assert b.get("x.tp.test")[0].id == "p1" and calls() == 4          # the writer remembers what it put
    assert a.get("x.tp.test") is None and calls() == 4                 # a: its memory (MEMORY seconds)
    assert a.refresh("x.tp.test")[0].id == "p1" and calls() == 6      # before a fetch: Redis again
    assert a.get("x.tp.test")[0].id == "p1" and calls() == 6
    now[0] += RedisPolicyCache.MEMORY + 1
    assert a.get("none.tp.test") is None and calls() == 8             # forgotten after MEMORY seconds
    client.close()

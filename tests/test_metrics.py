"""Prometheus metrics (``mxq.tasks.metrics``): a real ``celery worker`` (prefork, two children) with
``MXQ_METRICS_PORT`` delivers real mail to real SMTP servers (aiosmtpd, sandbox), and its
``/metrics`` is scraped over HTTP and parsed with prometheus_client's own parser.

Servers: 127.0.53.x:25 in the test session's private network namespace; domains under
``metrics.test``.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mxq import tasks
from mxq.tasks.metrics import parse_port
from tests.fixtures_infra import free_port, wait_until
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.53."
SENDER = "sender@src.metrics.test"
ZONES = {
    "ok.metrics.test": {"MX": [[10, "mx.ok.metrics.test"]]},
    "held.metrics.test": {"MX": [[10, "mx.ok.metrics.test"]]},
    "bounce.metrics.test": {"MX": [[10, "mx.bounce.metrics.test"]]},
    "src.metrics.test": {"MX": [[10, "mx.bounce.metrics.test"]]},
    "grey.metrics.test": {"MX": [[10, "mx.grey.metrics.test"]]},
    "slow.metrics.test": {"MX": [[10, "mx.slow.metrics.test"]]},
    "mx.ok.metrics.test": {"A": [IP + "10"]},
    "mx.bounce.metrics.test": {"A": [IP + "11"]},
    "mx.grey.metrics.test": {"A": [IP + "12"]},
    "mx.slow.metrics.test": {"A": [IP + "13"]},
}


def test_parse_port():
    assert parse_port("9808") == [9808]
    assert parse_port(" 0 ") == [0] and parse_port("auto") == [0]
    assert parse_port("9808+") == list(range(9808, 9908))
    assert parse_port("9808+2") == [9808, 9809, 9810]
    assert parse_port("65535+") == [65535]
    for bad in ("", "http", "70000", "-1", "9808+x"):
        with pytest.raises(ValueError, match="MXQ_METRICS_PORT"):
            parse_port(bad)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics; ``{(sample name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _message(i: int, to: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: metrics {i}\r\n"
            f"Message-ID: <m.{i}.{to}>\r\n\r\nbody {i}\r\n").encode()


def _submit(to: str, i: int = 0) -> str:
    return tasks.submit(_message(i, to), sender=SENDER, recipients=[to])


@pytest.fixture
def servers(dns_server):
    dns_server.add(ZONES)
    quick = dict(keep_content=False, size_limit=None)
    made = {
        "ok": start_server(IP + "10", 25, Behaviour(hostname="mx.ok.metrics.test", **quick)),
        "bounce": start_server(IP + "11", 25, Behaviour(hostname="mx.bounce.metrics.test", **quick)),
        "grey": start_server(IP + "12", 25, Behaviour(hostname="mx.grey.metrics.test", greylist=True, **quick)),
        "slow": start_server(IP + "13", 25, Behaviour(hostname="mx.slow.metrics.test",
                                                      delays={"data_final": 3.0}, **quick)),
    }
    yield made
    for s in made.values():
        s.stop()


def test_worker_metrics_over_http(pipeline, servers, dns_server):
    port = free_port()
    p = pipeline(MXQ_SHAPING="held.metrics.test=1/h", MXQ_RETRY_SCHEDULE="600", MXQ_INTAKE_THRESHOLD="3",
                 MXQ_COMMAND_TIMEOUT="10")
    # No intake queue: a batch stored for mxq.intake stays there, for the intake depth.
    w = p.worker(concurrency=2, queues="mxq.delivery,mxq.notifications",
                 MXQ_METRICS_PORT=str(port), MXQ_METRICS_ADDR="127.0.0.1")
    assert f"mxq metrics: serving http://127.0.0.1:{port}/metrics" in w.log()
    # The fleet-wide queue depths come from one place: the scheduler's own /metrics.
    sport = free_port()
    sched = p.beat(MXQ_METRICS_PORT=str(sport), MXQ_METRICS_ADDR="127.0.0.1")
    wait_until(lambda: f"mxq metrics: serving http://127.0.0.1:{sport}/metrics" in sched.log(), 10,
               "the scheduler's metrics server")
    # The names the resolvers ask for: ZONES, and each domain's MTA-STS policy record (RFC 8461).
    names = list(ZONES) + [f"_mta-sts.{d}" for d, rr in ZONES.items() if "MX" in rr]
    dns_before = sum(dns_server.queries(name) for name in names)

    healthy = [_submit(f"u{i}@ok.metrics.test", i) for i in range(12)]
    bounced = [_submit(f"reject{i}@bounce.metrics.test", i) for i in range(5)]
    grey = [_submit(f"g{i}@grey.metrics.test", i) for i in range(2)]
    held = [_submit(f"h{i}@held.metrics.test", i) for i in range(5)]    # 1/h: one goes, four wait
    stored = tasks.submit_many([tasks.Item(_message(i, f"i{i}@ok.metrics.test"), sender=SENDER)
                                for i in range(4)])                        # > MXQ_INTAKE_THRESHOLD
    p.wait_done(healthy + bounced, timeout=30)
    wait_until(lambda: all(tasks.status(j)["recipients"][0]["state"] == "deferred" for j in grey), 20,
               "the greylisted recipients deferred")
    wait_until(lambda: sum(tasks.status(j)["state"] == "done" for j in held) == 1, 20, "one held message sent")
    # the bounce reports (null sender, to src.metrics.test, served by the bounce server)
    wait_until(lambda: len(servers["bounce"].messages) == 5, 30, "five bounce reports delivered")

    def settled():
        s = scrape(port)
        q = scrape(sport)
        # The held lane's throttled tasks run after the one that sent its message: wait for them too.
        return s if value(q, "mxq_queue_depth", queue="reports") == 0 and \
            value(q, "mxq_queue_depth", queue="leased") == 0 and \
            value(s, "mxq_deliveries_total", domain="src.metrics.test", outcome="delivered") == 5 and \
            (value(s, "mxq_shaping_throttled_total", domain="held.metrics.test", reason="rate") or 0) >= 1 \
            else None

    s = wait_until(settled, 20, "the reports' deliveries recorded and nothing in flight")
    assert value(s, "mxq_deliveries_total", domain="ok.metrics.test", outcome="delivered") == 12
    assert value(s, "mxq_deliveries_total", domain="ok.metrics.test", outcome="bounced") is None
    assert value(s, "mxq_deliveries_total", domain="bounce.metrics.test", outcome="bounced") == 5
    assert value(s, "mxq_deliveries_total", domain="bounce.metrics.test", outcome="delivered") is None
    assert value(s, "mxq_deliveries_total", domain="grey.metrics.test", outcome="deferred") == 2
    assert value(s, "mxq_deliveries_total", domain="held.metrics.test", outcome="delivered") == 1
    assert value(s, "mxq_shaping_throttled_total", domain="held.metrics.test", reason="rate") >= 1
    # One SMTP transaction per message attempted: 12 + 5 (RCPT refused: ended by RSET) + 2 + 1 + 5 reports
    assert value(s, "mxq_smtp_transaction_seconds_count") == 25
    assert value(s, "mxq_delivery_run_seconds_count") >= 5      # at least one run per domain
    # an idle connection stays cached for reuse up to MXQ_CONNECTION_CACHE_TIME (2 s), then closes
    wait_until(lambda: value(scrape(port), "mxq_open_connections", exchange="mx.ok.metrics.test",
                             address=IP + "10:25") == 0, 10, "the cached connections closed")
    # DNS: every query the resolvers sent reached the sandbox DNS server
    queries = value(s, "mxq_dns_queries_total")
    assert queries == sum(dns_server.queries(name) for name in names) - dns_before
    assert value(s, "mxq_dns_cache_misses_total") >= 5 and value(s, "mxq_dns_cache_hits_total") >= 1
    # Queue depths, read from Redis at scrape time, by the scheduler only
    assert value(s, "mxq_queue_depth", queue="ready") is None and value(s, "mxq_redis_up") is None
    q = scrape(sport)
    assert value(q, "mxq_redis_up") == 1
    assert value(q, "mxq_queue_depth", queue="intake") == len(stored) == 4
    assert value(q, "mxq_queue_depth", queue="ready") == 4
    assert value(q, "mxq_ready_depth", lane="held.metrics.test") == 4
    assert value(q, "mxq_queue_depth", queue="deferred") == 2
    assert value(q, "mxq_queue_depth", queue="throttled") == 1
    assert value(q, "mxq_deliveries_total", domain="ok.metrics.test", outcome="delivered") is None

    # A second worker on the same host takes the next free port ("port+"); it exports no queue
    # depth (a sum over the workers would count them twice) and has delivered nothing.
    w2 = p.worker(concurrency=1, queues="mxq.notifications", MXQ_METRICS_PORT=f"{port}+",
                  MXQ_METRICS_ADDR="127.0.0.1")
    m = re.search(r"mxq metrics: serving http://127\.0\.0\.1:(\d+)/metrics", w2.log())
    assert m and int(m.group(1)) != port
    s2 = scrape(int(m.group(1)))
    assert value(s2, "mxq_queue_depth", queue="ready") is None
    assert value(s2, "mxq_deliveries_total", domain="ok.metrics.test", outcome="delivered") is None

    # An open connection, seen while the slow server holds the final dot for 3 s.
    slow = _submit("z@slow.metrics.test")
    wait_until(lambda: servers["slow"].stats["data"] >= 1, 20, "the slow server to receive DATA")
    gauge = dict(exchange="mx.slow.metrics.test", address=IP + "13:25")
    assert value(scrape(port), "mxq_open_connections", **gauge) == 1
    p.wait_done([slow], timeout=20)
    # kept for reuse up to MXQ_CONNECTION_CACHE_TIME, then closed
    wait_until(lambda: value(scrape(port), "mxq_open_connections", **gauge) == 0, 10, "the connection closed")
    assert value(scrape(port), "mxq_deliveries_total", domain="slow.metrics.test", outcome="delivered") == 1


def test_worker_refuses_to_start_on_a_taken_port_or_a_bad_value(pipeline):
    import socket
    p = pipeline()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            p.worker(concurrency=1, MXQ_METRICS_PORT=str(port), MXQ_METRICS_ADDR="127.0.0.1")
        assert f"mxq: MXQ_METRICS_PORT: cannot listen on 127.0.0.1:{port}" in str(e.value)
    finally:
        taken.close()
    with pytest.raises(RuntimeError) as e:
        p.worker(concurrency=1, MXQ_METRICS_PORT="metrics")
    assert "mxq: MXQ_METRICS_PORT must be a port" in str(e.value)

"""Redis faults under load (issue 9): the worker and the scheduler ride them out.

Real pieces: a redis-server with AOF (``appendfsync always``) restarted for
real (SIGTERM, then started again on the same port and directory), a
prefork ``mxq worker`` process and ``mxq scheduler``, an aiosmtpd exchange
that takes a few milliseconds per message (so deliveries are under way at
every restart), the session's DNS server process.
"""

from __future__ import annotations

import collections
import sys

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from tests.fixtures_infra import wait_until

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.49.10"
DOMAINS = [f"r{i}.faults.test" for i in range(20)]
SENDER = "app@src.faults.test"


@pytest.fixture(scope="module")
def exchange(dns_server):
    zone = {"mx.faults.test": {"A": [IP]}}
    zone.update({d: {"MX": [[10, "mx.faults.test"]]} for d in DOMAINS})
    dns_server.add(zone)
    srv = start_server(IP, 25, Behaviour(hostname="mx.faults.test", keep_content=False, size_limit=None,
                                         delays={"data_final": 0.005}))
    yield srv
    srv.stop()


def mxq_worker(p, concurrency: int = 2):
    """``mxq worker`` as a user runs it (Celery's gossip, mingle and heartbeat on: their
    broadcast consumers reconnect too), with the pipeline's environment."""
    from tests.pipeline_fixtures import CeleryProcess

    args = [sys.executable, "-m", "mxq.tasks.cli", "worker", "-c", str(concurrency), "-n", "wf@faults"]
    proc = CeleryProcess(args, p._env({}), p.workdir / "mxq-worker.log", "ready.", "mxq worker")
    p.processes.append(proc)
    return proc.start()


def accepted(server) -> collections.Counter:
    c = collections.Counter()
    for m in server.messages:
        c.update(m.rcpt_tos)
    return c


def message(i: int, to: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: r {i}\r\nMessage-ID: <r.{i}@src.faults.test>\r\n\r\n"
            f"body {i}\r\n").encode()


@pytest.mark.timeout(300)
def test_redis_restarted_five_times_during_a_2000_message_run(pipeline, exchange):
    """Every message delivered, the worker's and the scheduler's main processes never exit."""
    exchange.clear()
    p = pipeline(appendonly=True)
    worker = mxq_worker(p)
    scheduler = p.beat()
    rcpts = [f"u{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(2000)]
    ids = []
    for k in range(0, 2000, 500):
        ids += tasks.submit_many([tasks.Item(message(i, r), sender=SENDER, recipients=[r])
                                  for i, r in enumerate(rcpts[k:k + 500], start=k)])
    restarts = 0
    for n in range(5):
        # each restart while deliveries are under way: a few more messages arrived since the last
        floor = len(exchange.messages) + 40
        wait_until(lambda: len(exchange.messages) >= floor, 60, f"{floor} messages before restart {n + 1}")
        assert len(exchange.messages) < 2000, "the run ended before the restarts: make it slower"
        p.redis.restart()
        restarts += 1
        assert worker.running, f"the worker's main process exited after restart {restarts}:\n{worker.log()[-3000:]}"
    p.wait_done(ids, timeout=180)
    counts = accepted(exchange)
    assert set(counts) == set(rcpts)                                     # nothing lost
    assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)
    assert worker.running, f"the worker's main process exited:\n{worker.log()[-3000:]}"
    assert scheduler.running, f"the scheduler exited:\n{scheduler.log()[-3000:]}"
    assert "Unrecoverable error" not in worker.log()
    duplicates = sum(n - 1 for n in counts.values())
    print(f"5 Redis restarts: {duplicates} of 2000 messages delivered twice")


# ------------------------------------------------------------------ Redis settings checked at start
def _worker_argv() -> list[str]:
    return [sys.executable, "-m", "mxq.tasks.cli", "worker", "-c", "1", "-n", "wcheck@faults"]


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_an_eviction_policy_that_can_drop_mxqs_keys_is_refused(pipeline, policy):
    """Producer, worker and scheduler refuse a Redis whose maxmemory-policy can delete keys, saying why."""
    import subprocess

    from mxq.tasks.store import RedisUnfit

    p = pipeline()
    client = p.redis.client()
    client.config_set("maxmemory-policy", policy)
    with pytest.raises(RedisUnfit, match=f"maxmemory-policy is {policy}.*noeviction"):
        tasks.submit(message(1, "u1@r0.faults.test"), sender=SENDER)
    assert client.keys("mxq:*") == []
    r = subprocess.run(_worker_argv(), env=p._env({}), capture_output=True, timeout=60)
    assert r.returncode != 0
    assert f"refusing to run: Redis maxmemory-policy is {policy}".encode() in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "scheduler", "-s", str(p.workdir / "hb")],
                       env=p._env({}), capture_output=True, timeout=60)
    assert r.returncode == 78 and f"maxmemory-policy is {policy}".encode() in r.stderr


def test_noeviction_without_aof_runs_with_a_warning(pipeline, exchange):
    from tests.pipeline_fixtures import CeleryProcess

    p = pipeline()                                   # noeviction (Redis's default), appendonly no
    w = CeleryProcess(_worker_argv(), p._env({}), p.workdir / "w.log", "ready.", "mxq worker")
    p.processes.append(w)
    w.start()
    assert "Redis runs without AOF (appendonly no)" in w.log()
    job = tasks.submit(message(2, "u2@r1.faults.test"), sender=SENDER)
    p.wait_done([job], timeout=30)

"""Outcomes where users look: a finished job's outcome in Celery's result backend under its job id.

Real redis-server, real ``celery worker`` and ``mxq scheduler`` processes, a real SMTP server and,
for Celery's SQLAlchemy backend, a real PostgreSQL from Debian's packages started by the test
(``initdb`` + ``pg_ctl`` as the postgres user, on a loopback port of the test's namespace).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from celery import Celery

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from tests.fixtures_infra import all_at_once_while_paused, free_port, wait_until

pytest_plugins = ["tests.pipeline_fixtures"]

RCPT = "to.outcome.test"
BOUNCE = "bounce.outcome.test"
MX_IP = "127.0.9.10"


@pytest.fixture(scope="module")
def sink(dns_server):
    dns_server.add({RCPT: {"MX": [[10, "mx." + RCPT]]}, "mx." + RCPT: {"A": [MX_IP]},
                    BOUNCE: {"MX": [[10, "mx." + RCPT]]}})
    server = start_server(MX_IP, 25, Behaviour(hostname="mx." + RCPT))
    yield server
    server.stop()


def message(tag: str) -> bytes:
    return (f"From: app@site.outcome.test\r\nTo: ann@{RCPT}, reject.me@{RCPT}\r\nSubject: {tag}\r\n\r\n"
            f"body {tag}\r\n").encode()


def check_outcome(result: dict, job: str) -> None:
    assert result["job"] == job and result["state"] == "done"
    by = {r["address"]: r for r in result["recipients"]}
    ok, bad = by[f"ann@{RCPT}"], by[f"reject.me@{RCPT}"]
    assert (ok["state"], ok["code"], ok["enhanced"], ok["exchange"], ok["attempts"]) == (
        "delivered", 250, "2.0.0", "mx." + RCPT, 1), ok
    assert (bad["state"], bad["code"], bad["enhanced"], bad["attempts"]) == ("bounced", 550, "5.1.1", 1), bad
    assert ok["text"] and bad["text"]


def test_async_result_get_returns_the_outcome_with_the_redis_backend(pipeline, sink):
    p = pipeline()
    p.worker()
    p.beat()
    job = tasks.submit(message("redis-backend"))
    result = tasks.result(job).get(timeout=30)
    check_outcome(result, job)
    assert result == tasks.status(job)
    # The application's own Celery app on the same backend sees it too (what AsyncResult(job) does there).
    user = Celery("userapp", backend=p.url, set_as_current=False)
    user.conf.accept_content = ["json"]
    check_outcome(user.AsyncResult(job).get(timeout=10), job)
    # Fully suppressed at submission, and dropped by the operator: final too, recorded by the scheduler.
    from mxq.tasks.store import get_store
    from mxq.tasks.suppress import Suppressions
    Suppressions(get_store().r).add(f"gone@{RCPT}", text="no such user")
    sup = tasks.submit(message("sup"), recipients=[f"gone@{RCPT}"])
    assert tasks.result(sup).get(timeout=10)["recipients"][0]["state"] == "suppressed"
    # Nothing in the task results but the jobs: deliver tasks still store no result of their own.
    client = p.redis.client()
    wait_until(lambda: client.zcard("mxq:final") == 0, 20, "every finished job recorded (the report too)")
    keys = {k.decode() for k in client.keys("celery-task-meta-*")}
    assert keys == {f"celery-task-meta-{job}", f"celery-task-meta-{sup}"} | {
        k for k in keys if _is_report(client, k)}, keys
    assert client.ttl(f"celery-task-meta-{job}") > 0           # MXQ_RESULT_TTL
    client.close()


def _is_report(client, key: str) -> bool:
    """The non-delivery report to the sender is a job of its own, with its own outcome."""
    import json
    body = json.loads(client.get(key))
    return body["result"]["recipients"][0]["address"] == "app@site.outcome.test"


def test_an_outcome_lost_by_a_dead_worker_is_recorded_by_the_scheduler(pipeline, sink):
    """The job is final in Redis but no worker recorded it (killed right after the release): the
    scheduler's tick writes it."""
    p = pipeline()
    w = p.worker(MXQ_RESULT_BACKEND="none")     # this worker records nothing
    job = tasks.submit(message("late"))
    p.wait_done([job], timeout=30)
    w.stop()
    client = p.redis.client()
    assert client.zscore("mxq:final", job) is not None and not client.exists(f"celery-task-meta-{job}")
    p.beat()                                   # the scheduler, with the backend on
    check_outcome(tasks.result(job).get(timeout=20), job)
    client.close()


def test_with_the_result_backend_off_final_jobs_do_not_pile_up_in_redis(pipeline, sink):
    """Nobody records outcomes (MXQ_RESULT_BACKEND=none): the scheduler takes a job off mxq:final once
    MXQ_RESULT_TTL is over (before, the set grew by one member per job for ever)."""
    p = pipeline(MXQ_RESULT_BACKEND="none", MXQ_RESULT_TTL="3")
    p.worker()
    p.beat()
    jobs = [tasks.submit(message(f"off{i}")) for i in range(3)]
    p.wait_done(jobs, timeout=30)
    client = p.redis.client()
    assert all(client.zscore("mxq:final", j) is not None for j in jobs)      # final, not recorded
    wait_until(lambda: client.zcard("mxq:final") == 0, 20, "mxq:final trimmed after MXQ_RESULT_TTL")
    assert not any(client.exists(f"celery-task-meta-{j}") for j in jobs)
    client.close()


# ---------------------------------------------------------------- PostgreSQL (Celery's SQLAlchemy backend)
def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server as a child of the test: initdb + pg_ctl as the postgres user."""
    bindir = _pg_bin()
    if bindir is None or os.geteuid() != 0 or not shutil.which("runuser"):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL (Debian's postgresql package) is missing: ops/install-deps installs it")
        pytest.skip("needs Debian's postgresql package and root")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    d = Path(tempfile.mkdtemp(prefix="mxq-pg-", dir="/tmp"))
    shutil.chown(d, "postgres", "postgres")
    port = free_port()

    def pg(*args):
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True,
                              timeout=60)
    r = pg(str(bindir / "initdb"), "-D", str(d / "data"), "-A", "trust", "-U", "mxq")
    assert r.returncode == 0, r.stdout + r.stderr
    r = pg(str(bindir / "pg_ctl"), "-D", str(d / "data"), "-o", f"-k {d} -h 127.0.0.1 -p {port}",
           "-l", str(d / "log"), "-w", "start")
    assert r.returncode == 0, r.stdout + r.stderr + (d / "log").read_text(errors="replace")
    try:
        yield f"db+postgresql+psycopg://mxq@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(d / "data"), "-m", "fast", "stop")
        shutil.rmtree(d, ignore_errors=True)


def test_async_result_get_returns_the_outcome_with_postgresql(pipeline, sink, postgres, monkeypatch):
    from mxq.tasks.app import rebind

    p = pipeline(MXQ_RESULT_BACKEND=postgres)
    rebind(p.url, postgres)
    p.worker()
    p.beat()
    job = tasks.submit(message("postgres"))
    started = time.monotonic()
    result = tasks.result(job).get(timeout=30, interval=0.2)
    check_outcome(result, job)
    assert time.monotonic() - started < 30
    # It is a row in Celery's table, readable with plain SQL.
    import sqlalchemy
    engine = sqlalchemy.create_engine(postgres[len("db+"):])
    with engine.connect() as c:
        row = c.execute(sqlalchemy.text("select status from celery_taskmeta where task_id = :j"), {"j": job}).one()
    engine.dispose()
    assert row.status == "SUCCESS"
    user = Celery("userapp", backend=postgres, set_as_current=False)
    user.conf.accept_content = ["json"]
    user.conf.result_serializer = "json"
    check_outcome(user.AsyncResult(job).get(timeout=10), job)
    wait_until(lambda: p.redis.client().zcard("mxq:final") == 0, 10, "mxq:final drained")


def test_what_recording_outcomes_costs_in_redis_commands(pipeline, sink, monkeypatch):
    """Per finished job: one HMGET (its records), the backend's SETEX and PUBLISH, and a share of
    one claim script per batch; counted with Redis's own command statistics, scripts included."""
    from mxq.tasks import graph
    from mxq.tasks.store import get_store

    p = pipeline()
    monkeypatch.setattr(graph, "_runtime", None)              # this process's runtime, on this Redis
    n = 200
    ids = tasks.submit_many([tasks.Item(f"From: a@site.outcome.test\r\nTo: u{i}@{RCPT}\r\nSubject: {i}\r\n\r\nx\r\n"
                                        .encode()) for i in range(n)])
    client = p.redis.client()
    # Deliver with the worker's recording held back (its own, of whole jobs, too), then count only
    # what the recorders' way costs (jobs of several domains, and those a worker died before writing).
    monkeypatch.setattr("mxq.tasks.outcomes.after_release", lambda store=None: 0)
    monkeypatch.setattr(graph.runtime(), "own_outcomes", False)
    while graph.run_delivery(RCPT)["items"]:
        pass
    assert client.zcard("mxq:final") == n
    client.config_resetstat()
    from mxq.tasks import outcomes
    while outcomes.record(get_store()):
        pass
    stats = client.info("commandstats")
    total = sum(int(v["calls"]) for k, v in stats.items()
                if k not in ("cmdstat_config|resetstat", "cmdstat_info", "cmdstat_hello"))
    assert client.exists(*[f"celery-task-meta-{j}" for j in ids]) == n
    assert total / n <= 3.2, (total / n, {k: v["calls"] for k, v in stats.items()})
    client.close()


def test_a_worker_records_its_whole_jobs_itself_and_a_recorder_takes_what_it_failed(pipeline, sink, monkeypatch):
    """A job whose recipients are all in one work item is recorded by the worker that made it final,
    from the records it wrote (no claim, no read: SET a job, one NUMSUB and one ZREM a chunk), the same
    outcome a recorder writes.  When that write fails (the worker dying after the release would do
    the same) the job waits hidden in mxq:final for outcomes.LEASE, then a recorder writes it."""
    from mxq.tasks import graph, outcomes
    from mxq.tasks.store import get_store

    p = pipeline()
    monkeypatch.setattr(graph, "_runtime", None)              # this process's runtime, on this Redis
    n = 50
    ids = tasks.submit_many([tasks.Item(f"From: a@site.outcome.test\r\nTo: v{i}@{RCPT}\r\nSubject: {i}\r\n\r\nx\r\n"
                                        .encode()) for i in range(n)])
    client = p.redis.client()
    monkeypatch.setattr(graph.runtime(), "own_outcomes", True)
    monkeypatch.setattr("mxq.tasks.outcomes.after_release", lambda store=None: 0)
    client.config_resetstat()
    while graph.run_delivery(RCPT)["items"]:
        pass
    stats = client.info("commandstats")
    assert client.zcard("mxq:final") == 0                     # every one recorded by the worker
    assert client.exists(*[f"celery-task-meta-{j}" for j in ids]) == n
    # One HMGET a job (the claim's) and a few for the dispatches; none to record (the recorders'
    # way reads each job again: 2 a job)
    assert int(stats.get("cmdstat_hmget", {}).get("calls", 0)) < 1.2 * n
    assert "cmdstat_publish" not in stats                     # nobody waits: no PUBLISH (before: one a job)
    for j in ids[:5]:
        assert tasks.result(j).get(timeout=5) == tasks.status(j)         # what a recorder would write
    # The write fails: nothing lost, the jobs wait hidden, then the recorder's way writes them.
    more = tasks.submit_many([tasks.Item(f"From: a@site.outcome.test\r\nTo: w{i}@{RCPT}\r\nSubject: {i}\r\n\r\nx\r\n"
                                         .encode()) for i in range(3)])

    def broken(*_a, **_kw):
        raise ConnectionError("the result backend is away")
    working = outcomes._store_redis
    monkeypatch.setattr("mxq.tasks.outcomes._store_redis", broken)
    monkeypatch.setattr("mxq.tasks.outcomes.LEASE", 2.0)
    while graph.run_delivery(RCPT)["items"]:
        pass
    store = get_store()
    assert client.zcard("mxq:final") == 3 and not any(client.exists(f"celery-task-meta-{j}") for j in more)
    monkeypatch.setattr("mxq.tasks.outcomes._store_redis", working)
    assert outcomes.record(store) == 0                         # hidden: not yet
    wait_until(lambda: outcomes.record(store) > 0 or client.zcard("mxq:final") == 0, 10,
               "the recorder takes the jobs once they are no longer hidden")
    for j in more:
        assert tasks.result(j).get(timeout=5) == tasks.status(j)
    client.close()


def test_a_waiter_is_woken_and_nobody_waiting_costs_no_publish(pipeline, sink, monkeypatch):
    """The worker's write of whole jobs' outcomes PUBLISHes only to channels someone is subscribed to
    (``outcomes._store_redis``: the SETs, then one PUBSUB NUMSUB).  A real ``AsyncResult.get()``
    waiting (Celery's ResultConsumer subscribed, seen by Redis) is woken with the outcome; the jobs
    nobody waits on cost no PUBLISH (before: one a job), and a ``get()`` after the write finds them
    at once.  Then the other order: the outcome written first, the waiter subscribing after."""
    import threading

    from mxq.tasks import graph

    p = pipeline()
    monkeypatch.setattr(graph, "_runtime", None)              # this process's runtime, on this Redis
    monkeypatch.setattr("mxq.tasks.outcomes.after_release", lambda store=None: 0)
    n = 20
    ids = tasks.submit_many([tasks.Item(f"From: a@site.outcome.test\r\nTo: x{i}@{RCPT}\r\nSubject: {i}\r\n\r\nx\r\n"
                                        .encode()) for i in range(n)])
    client = p.redis.client()
    monkeypatch.setattr(graph.runtime(), "own_outcomes", True)
    got: dict = {}

    def wait_for(job):
        try:
            got[job] = tasks.result(job).get(timeout=30)
        except Exception as e:                                  # noqa: BLE001 -- reported below
            got[job] = e

    waiter = threading.Thread(target=wait_for, args=(ids[7],), daemon=True)
    waiter.start()
    channel = f"celery-task-meta-{ids[7]}"
    wait_until(lambda: dict(client.pubsub_numsub(channel)).get(channel.encode()) == 1, 10,
               "the waiter subscribed to its job's channel")
    assert not client.exists(channel)                           # it waits: nothing written yet
    client.config_resetstat()
    while graph.run_delivery(RCPT)["items"]:
        pass
    stats = client.info("commandstats")
    waiter.join(20)
    assert not waiter.is_alive() and got[ids[7]] == tasks.status(ids[7]), got
    assert client.zcard("mxq:final") == 0 and client.exists(*[f"celery-task-meta-{j}" for j in ids]) == n
    assert int(stats["cmdstat_publish"]["calls"]) == 1, stats.get("cmdstat_publish")   # the waiter's alone
    started = time.monotonic()
    for j in ids[:3]:
        assert tasks.result(j).get(timeout=5) == tasks.status(j)
    assert time.monotonic() - started < 2                       # read at once, not woken by a PUBLISH
    client.close()


def test_a_task_whose_jobs_its_worker_recorded_claims_nothing_from_final(pipeline, sink, monkeypatch):
    """After its chunks a delivery task records what waits in mxq:final (``outcomes.after_release``):
    when its worker wrote every job it made final itself (whole jobs, the common case) nothing waits,
    and one ZRANGEBYSCORE says so instead of ``claim_final``'s script (before: run by every task).
    A job of two domains, made final by the second domain's task, is still recorded by that task."""
    from mxq.tasks import graph
    from mxq.tasks.store import Store

    p = pipeline()
    monkeypatch.setattr(graph, "_runtime", None)              # this process's runtime, on this Redis
    claims = []
    claim_final = Store.claim_final

    def counted(self, **kw):
        claims.append(kw)
        return claim_final(self, **kw)

    monkeypatch.setattr(Store, "claim_final", counted)
    ids = tasks.submit_many([tasks.Item(f"From: a@site.outcome.test\r\nTo: y{i}@{RCPT}\r\nSubject: {i}\r\n\r\nx\r\n"
                                        .encode()) for i in range(10)])
    monkeypatch.setattr(graph.runtime(), "own_outcomes", True)
    client = p.redis.client()
    while graph.run_delivery(RCPT)["items"]:
        pass
    assert client.exists(*[f"celery-task-meta-{j}" for j in ids]) == 10 and client.zcard("mxq:final") == 0
    assert claims == []
    both = tasks.submit(f"From: a@site.outcome.test\r\nTo: z@{RCPT}, z@{BOUNCE}\r\nSubject: two\r\n\r\nx\r\n".encode())
    graph.run_delivery(RCPT)
    assert not client.exists(f"celery-task-meta-{both}")       # not final yet: nothing to record
    graph.run_delivery(BOUNCE)
    assert claims and client.exists(f"celery-task-meta-{both}") and client.zcard("mxq:final") == 0
    assert tasks.result(both).get(timeout=5) == tasks.status(both)
    client.close()


def test_more_outcome_writes_at_once_than_the_backend_has_connections_all_land(pipeline, monkeypatch):
    """A gevent worker's connections finishing together (the bench's inflight stage: 1,000 sink
    replies within a moment) write their jobs' outcomes at once, through the one result backend of
    the process's thread (Celery keeps ``app.backend`` per thread; a gevent worker's greenlets all
    run in one).  Celery's Redis backend has redis-py's default pool (100 connections, then
    ``MaxConnectionsError``), and the outcomes it refused waited ``LEASE`` (60 s) for a recorder:
    49 in one bench run.  150 writes sharing one backend while Redis is paused 0.5 s: every one
    lands now."""
    import types

    from mxq.tasks import outcomes
    from mxq.tasks.app import app
    from mxq.tasks.store import get_store

    p = pipeline()
    monkeypatch.setattr(app, "_local", types.SimpleNamespace())    # one backend for every thread
    client = p.redis.client()
    store = get_store()
    assert outcomes.record_known(store, [("warm-up", {"job": "warm-up"})]) == 1     # (the backend's client)
    n = 150
    written, errors = all_at_once_while_paused(       # Redis busy: every write waits 0.5 s
        client, n, lambda i: outcomes.record_known(store, [(f"burst{i}", {"job": f"burst{i}", "state": "done"})]))
    assert not errors
    assert written == [1] * n
    assert client.exists(*[f"celery-task-meta-burst{i}" for i in range(n)]) == n
    client.close()


def test_one_writer_gathers_the_outcomes_connections_hand_over_while_it_writes(pipeline, monkeypatch):
    """A gevent worker's connections hand their jobs' outcomes to one writer (``outcomes.Writer``):
    what 150 connections hand over together, while Redis is paused 0.5 s under the first write,
    lands in a few writes (script calls), not 150; every outcome is in the backend once ``flush``
    returns, and the jobs are off ``mxq:final``."""
    import types

    from mxq.tasks import outcomes
    from mxq.tasks.app import app
    from mxq.tasks.store import get_store

    p = pipeline()
    monkeypatch.setattr(app, "_local", types.SimpleNamespace())    # one backend for every thread
    client = p.redis.client()
    store = get_store()
    assert outcomes.record_known(store, [("warm-up", {"job": "warm-up"})]) == 1     # scripts loaded
    n = 150
    client.zadd("mxq:final", {f"handed{i}": 1.0 for i in range(n)})
    writer = outcomes.Writer(store)
    calls = []
    real = outcomes.record_known
    monkeypatch.setattr(outcomes, "record_known",
                        lambda st, batch, app=None: calls.append(len(batch)) or real(st, batch, app))
    handed, errors = all_at_once_while_paused(
        client, n, lambda i: writer.add([(f"handed{i}", {"job": f"handed{i}", "state": "done"})]))
    assert not errors and handed == [None] * n                      # add() never waits for Redis
    assert writer.flush(10.0)
    assert sum(calls) == n and len(calls) <= 3, calls
    assert client.exists(*[f"celery-task-meta-handed{i}" for i in range(n)]) == n
    assert client.zcard("mxq:final") == 0
    assert writer.flush(0.1)                                        # nothing held: at once
    client.close()


def test_a_result_backend_that_runs_no_scripts_gets_the_outcomes_and_wakes_the_waiter(redis_server, caplog):
    """The outcomes of a batch go to a Redis result backend in one script call (``_STORE``).  A
    backend Redis whose user may not run scripts (an ACL without ``@scripting``) gets the same
    keys, values and expiry, and its waiters the same PUBLISH, as plain commands -- from the first
    refusal on, with one warning, not a failed write every time."""
    import logging

    import redis as redis_lib

    from mxq.tasks import outcomes

    srv = redis_server()
    admin = srv.client()
    admin.execute_command("ACL", "SETUSER", "noscript", "on", ">pw", "~*", "&*", "+@all", "-@scripting")
    url = srv.url.replace("redis://", "redis://noscript:pw@", 1)
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        redis_lib.Redis.from_url(url).eval("return 1", 0)            # the user runs no script
    app = Celery("noscript-backend", broker="memory://", backend=url)
    app.conf.result_expires = 3600
    listener = admin.pubsub()
    listener.subscribe("celery-task-meta-waited")
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    with caplog.at_level(logging.WARNING, logger="mxq.outcomes"):
        outcomes._write(app, [("waited", {"job": "waited", "state": "done"}),
                              ("alone", {"job": "alone", "state": "done"})])
        outcomes._write(app, [("later", {"job": "later", "state": "done"})])
    woken = listener.get_message(timeout=5)
    assert woken and woken["channel"] == b"celery-task-meta-waited"
    for job in ("waited", "alone", "later"):
        meta = app.backend.get_task_meta(job)
        assert meta["status"] == "SUCCESS" and meta["result"] == {"job": job, "state": "done"}
        assert 0 < admin.ttl(f"celery-task-meta-{job}") <= 3600
    assert listener.get_message(timeout=0.2) is None                  # nobody waits on the others
    refusals = [r for r in caplog.records if "refuses scripts" in r.getMessage()]
    assert len(refusals) == 1
    listener.close()
    admin.close()

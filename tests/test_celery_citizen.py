"""mxq inside someone else's Celery: never the current app, prefixed queues, distinct nodes, a
quiet Flower.  Real redis-server, real ``mxq worker`` / ``mxq scheduler`` / ``mxq flower``
processes, and an application's own Celery app in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.fixtures_infra import free_port, wait_until
from tests.test_flower import AUTH, alive, child, http

ROOT = Path(__file__).resolve().parent.parent
MXQ = str(Path(sys.executable).with_name("mxq"))

APP_SCRIPT = r'''
import json, sys
from celery import Celery, current_app, shared_task

order = sys.argv[1]
if order == "mxq-first":
    import mxq.tasks
user = Celery("userapp", broker=sys.argv[2])      # the application's own app, same Redis database
user.conf.task_always_eager = False

@shared_task(name="userapp.record")
def record(x):
    return x

import mxq.tasks
job = mxq.tasks.submit(b"From: a@app.citizen.test\r\nTo: b@nowhere.citizen.test\r\nSubject: x\r\n\r\nhi\r\n")
from mxq.tasks.app import app as mxq_app
record.delay(1)                                   # after a submission, as in a Django view
print(json.dumps({
    "current": current_app.main, "mxq_is_current": current_app._get_current_object() is mxq_app,
    "record_app": record._get_current_object().app.main,
    "mxq_tasks_in_user_app": sorted(t for t in user.tasks if t.startswith("mxq.")),
    "user_tasks_in_mxq_app": sorted(t for t in mxq_app.tasks if t.startswith("userapp.")),
    "job": job,
}))
'''


def test_mxq_never_becomes_the_applications_celery_app(redis_server, tmp_path):
    srv = redis_server()
    (tmp_path / "app.py").write_text(APP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_")}
    env["MXQ_REDIS_URL"] = srv.url
    client = srv.client()
    for order in ("user-first", "mxq-first"):
        client.flushdb()
        p = subprocess.run([sys.executable, str(tmp_path / "app.py"), order, srv.url], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=60)
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.splitlines()[-1])
        assert out["current"] == "userapp" and not out["mxq_is_current"], out
        assert out["record_app"] == "userapp"
        assert out["mxq_tasks_in_user_app"] == [], out         # mxq's tasks are not shared
        # The application's task went to its own queue; mxq's wake-up to mxq's prefixed queue.
        assert client.llen("celery") == 1
        assert json.loads(client.lindex("celery", 0))["headers"]["task"] == "userapp.record"
        assert client.llen("mxq.delivery") == 1
        assert json.loads(client.lindex("mxq.delivery", 0))["headers"]["task"] == "mxq.deliver"
        assert not client.exists("delivery") and not client.exists("intake")
        assert client.exists(f"mxq:job:{out['job']}")
    client.close()


def test_two_workers_on_one_host_are_two_nodes_and_flower_stays_readable(redis_server, tmp_path):
    """Two plain ``mxq worker`` (no --hostname) are two nodes in Flower; ``mxq scheduler`` ticks
    without a task a second in Flower's list; a batch's intake task shows counts, not ids."""
    redis = redis_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # MXQ_DNS_SERVERS: a server that does not exist, whatever an earlier test's session-wide DNS
    # server left in the environment -- with it, gone.citizen.test is NXDOMAIN, bounces, and the
    # report's own deliver task (lane "!r") joins the list below.
    env = {**os.environ, "MXQ_REDIS_URL": redis.url, "MXQ_INTAKE_THRESHOLD": "2", "MXQ_CONNECT_TIMEOUT": "2",
           "MXQ_COMMAND_TIMEOUT": "2", "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}", "MXQ_DNS_SERVERS": "127.0.0.1:9"}
    logs = {n: tmp_path / f"{n}.log" for n in ("w1", "w2", "scheduler", "flower")}
    with child([MXQ, "worker", "--pool", "solo"], env, logs["w1"]) as w1, \
         child([MXQ, "worker", "--pool", "solo"], env, logs["w2"]) as w2, \
         child([MXQ, "scheduler"], env, logs["scheduler"]) as sched, \
         child([MXQ, "flower", "--address=127.0.0.1", f"--port={port}"], env, logs["flower"]) as flower:
        procs = [(w1, logs["w1"]), (w2, logs["w2"]), (sched, logs["scheduler"]), (flower, logs["flower"])]

        def workers():
            for proc, log in procs:
                alive(proc, log)
            try:
                code, body = http(base + "/api/workers?refresh=1", timeout=10)
            except OSError:
                return None
            nodes = sorted(json.loads(body or "{}")) if code == 200 else []
            return nodes if len(nodes) == 2 else None
        nodes = wait_until(workers, 60, "two workers in Flower's /api/workers", interval=0.5)
        assert nodes == sorted(f"mxq-{p.pid}@{os.uname().nodename}" for p in (w1, w2)), nodes
        assert "mxq scheduler ready" in logs["scheduler"].read_text()

        r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import mxq.tasks
            m = [b"From: a@app.citizen.test\\r\\nTo: u%d@gone.citizen.test\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n" % i
                 for i in range(3)]
            print(mxq.tasks.submit_many(m))
        """)], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

        def seen():
            try:
                code, body = http(base + "/api/tasks", timeout=15)
            except OSError:             # Flower slow to answer on a loaded machine: ask again
                return None
            data = json.loads(body or "{}") if code == 200 else {}
            names = {t.get("name") for t in data.values()}
            return data if {"mxq.intake", "mxq.deliver"} <= names else None
        data = wait_until(seen, 30, "mxq.intake and mxq.deliver in Flower", interval=0.3)
        started = time.monotonic()
        # Several scheduler ticks have passed by now (one a second): none of them is a task.
        wait_until(lambda: time.monotonic() - started > 3, 5, "three more ticks", interval=0.5)
        code, body = http(base + "/api/tasks", timeout=30)
        assert code == 200, body
        data = json.loads(body)
        names = [t.get("name") for t in data.values()]
        assert "mxq.schedule" not in names, names
        (intake,) = [t for t in data.values() if t["name"] == "mxq.intake"]
        assert intake["args"] == "(3 jobs)", intake
        deliver = [t for t in data.values() if t["name"] == "mxq.deliver"]
        assert deliver and all(t["args"] == "['gone.citizen.test']" for t in deliver), deliver
        # Each worker logs at INFO by default (Celery's task lines among them).
        assert "INFO" in logs["w1"].read_text() + logs["w2"].read_text()


def test_pointing_the_app_away_and_back_keeps_publishing(redis_server, monkeypatch):
    """Django's override_settings(MXQ_REDIS_URL=...) and back: the app is re-pointed twice and
    every publish lands on the Redis configured at that moment (no "Acquire on closed pool")."""
    from mxq.tasks import graph
    from mxq.tasks.app import rebind

    a, b = redis_server(), redis_server()
    ca, cb = a.client(), b.client()
    try:
        for srv, client, n in ((a, ca, 1), (b, cb, 1), (a, ca, 2), (b, cb, 2)):
            monkeypatch.setenv("MXQ_REDIS_URL", srv.url)
            rebind(srv.url)
            assert graph.publish([("back.citizen.test", 1)]) == 1
            assert client.llen("mxq.delivery") == n
    finally:
        ca.close()
        cb.close()


def test_two_default_mxq_workers_are_one_node_per_process_in_flower_and_log_deliveries(
        redis_server, dns_server, tmp_path):
    """``mxq worker`` as users run it (the supervisor: one gevent Celery worker per process,
    ``--processes 2``, no --hostname, no --loglevel), twice on one host: Flower lists the 4
    worker processes under 4 distinct node names, ``mxq-<pid>-<i>@<host>``; a delivery logs its
    Postfix-style line at INFO."""
    from mxq.sandbox.smtpd import Behaviour, start_server

    redis = redis_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dns_server.add({"flower.citizen.test": {"MX": [[10, "mx.flower.citizen.test"]]},
                    "mx.flower.citizen.test": {"A": ["127.0.75.40"]}})
    srv = start_server("127.0.75.40", 25, Behaviour(hostname="mx.flower.citizen.test"))
    env = {k: v for k, v in os.environ.items() if k not in ("MXQ_LOG_LEVEL",)}
    env.update({"MXQ_REDIS_URL": redis.url, "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}",
                "MXQ_HELO_NAME": "client.citizen.test", "MXQ_CONNECT_TIMEOUT": "2"})
    logs = {n: tmp_path / f"{n}.log" for n in ("w1", "w2", "flower")}
    try:
        with child([MXQ, "worker", "--processes", "2", "-c", "20"], env, logs["w1"]) as w1, \
             child([MXQ, "worker", "--processes", "2", "-c", "20"], env, logs["w2"]) as w2, \
             child([MXQ, "flower", "--address=127.0.0.1", f"--port={port}"], env, logs["flower"]) as flower:
            procs = [(w1, logs["w1"]), (w2, logs["w2"]), (flower, logs["flower"])]

            def workers():
                for proc, log in procs:
                    alive(proc, log)
                try:
                    code, body = http(base + "/api/workers?refresh=1", timeout=10)
                except OSError:
                    return None
                nodes = sorted(json.loads(body or "{}")) if code == 200 else []
                return nodes if len(nodes) == 4 else None
            nodes = wait_until(workers, 90, "four worker processes in Flower's /api/workers", interval=0.5)
            host = os.uname().nodename
            assert nodes == sorted(f"mxq-{p.pid}-{i}@{host}" for p in (w1, w2) for i in (1, 2)), nodes

            r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
                import mxq.tasks
                print(mxq.tasks.submit(b"From: a@app.citizen.test\\r\\nTo: u@flower.citizen.test\\r\\n"
                                       b"Subject: x\\r\\n\\r\\nhi\\r\\n"))
            """)], env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            srv.wait_for_messages(1, timeout=30)
            line = "to=<u@flower.citizen.test>"

            def logged():
                text = logs["w1"].read_text(errors="replace") + logs["w2"].read_text(errors="replace")
                return [x for x in text.splitlines() if line in x] or None
            (entry, *_) = wait_until(logged, 15, "the delivery line in a worker's log")
            assert "INFO" in entry and "status=sent" in entry, entry
    finally:
        srv.stop()

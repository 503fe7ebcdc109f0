"""Flower against a real Redis and a real mxq worker.

Starts ``redis-server`` (fixture), ``mxq worker`` and ``mxq flower`` as child
processes with basic auth (as docker-compose.yml runs it), and checks what an
operator sees: the health check, the worker in /api/workers, Prometheus
metrics, and that a relay credential in the worker's environment never shows
up in Flower's task or worker API after a submission.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures_infra import free_port, wait_until

MXQ = str(Path(sys.executable).with_name("mxq"))
SECRET = "s3cretpass"
AUTH = ("ops", "flower-test-pw")


def http(url: str, auth: tuple[str, str] | None = AUTH, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url``; return (status, body) -- HTTP errors are answers too."""
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


@contextlib.contextmanager
def child(argv: list[str], env: dict, log: Path):
    """A child process in its own process group; the whole group is killed at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, bound in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(bound)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def alive(proc: subprocess.Popen, log: Path):
    """Fail fast with the child's log when it died during a wait."""
    if proc.poll() is not None:
        pytest.fail(f"{proc.args[1:3]} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")


def test_flower_sees_worker_and_hides_credentials(redis_server, tmp_path):
    redis = redis_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    node = f"flowertest-{os.getpid()}@localhost"
    env = {**os.environ, "MXQ_REDIS_URL": redis.url,
           "MXQ_RELAY": f"smtp://relayuser:{SECRET}@127.0.0.1:2525", "MXQ_RELAY_MODE": "fallback",
           "MXQ_CONNECT_TIMEOUT": "2", "MXQ_COMMAND_TIMEOUT": "2",
           "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}
    wlog, flog = tmp_path / "worker.log", tmp_path / "flower.log"
    with child([MXQ, "worker", "--pool", "solo", "--hostname", node, "--loglevel", "INFO"], env, wlog) as worker, \
         child([MXQ, "flower", "--address=127.0.0.1", f"--port={port}"], env, flog) as flower:

        def healthy():
            alive(worker, wlog)
            alive(flower, flog)
            with contextlib.suppress(OSError):
                return http(base + "/healthcheck", auth=None, timeout=1)[0] == 200
        wait_until(healthy, 40, "Flower's /healthcheck", interval=0.1)

        # Basic auth is enforced on the API...
        assert http(base + "/api/workers", auth=None)[0] == 401
        assert http(base + "/api/workers", auth=("ops", "wrong"))[0] == 401

        # ...and with it the running worker is listed (Flower asks the workers over the broker).
        def listed():
            alive(worker, wlog)
            code, body = http(base + "/api/workers?refresh=1", timeout=10)
            return code == 200 and node in json.loads(body or "{}")
        wait_until(listed, 40, f"{node} in /api/workers", interval=0.5)

        code, metrics = http(base + "/metrics", auth=None)
        assert code == 200
        assert "flower_" in metrics

        # A submission: its tasks show up in Flower, and no credential with them.
        r = subprocess.run([MXQ, "send", "--json", "--from", "alice@origin.test", "--to", "bob@nowhere.test", "-"],
                           input=b"Subject: flower\r\n\r\nhello\r\n", env=env, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)["job"]

        def tasks_seen():
            code, body = http(base + "/api/tasks", timeout=5)
            data = json.loads(body or "{}") if code == 200 else {}
            return [t for t in data.values() if t.get("name") == "mxq.deliver"] and body
        body = wait_until(tasks_seen, 30, "an mxq.deliver task in /api/tasks", interval=0.3)
        tasks = json.loads(body)
        assert SECRET not in body
        assert "relayuser" not in body
        for task_id in list(tasks)[:10]:
            code, info = http(base + f"/api/task/info/{task_id}")
            assert code == 200
            assert SECRET not in info
        code, workers = http(base + "/api/workers?refresh=1", timeout=10)
        assert code == 200 and SECRET not in workers
        # Tasks carry ids only: the job id may appear, the message content never does.
        assert "hello" not in body and job  # content stays in Redis

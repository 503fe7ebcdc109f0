"""Process fixtures for the pipeline tests: real ``celery worker`` and ``celery beat`` processes.

Register with ``pytest_plugins = ["tests.pipeline_fixtures"]`` in a test module.

``pipeline``  -- factory fixture: ``pipeline(**env) -> Pipeline``.  Starts a fresh
                 ``redis-server`` (``appendonly=...`` passed through), points this
                 process's producer API at it (``MXQ_REDIS_URL`` and
                 ``mxq.tasks.app.rebind``), and gives ``Pipeline.worker()`` /
                 ``Pipeline.beat()`` to start Celery processes with the pipeline's
                 environment plus ``env`` (short leases, retry schedule "1", ...).
                 Everything it started is stopped when the test ends.

Each process runs in its own session (process group), so ``kill()`` can
SIGKILL ``mxq worker`` together with its worker processes -- a whole machine
dying, not just one process.  Readiness is a line in the process's log
("celery@... ready.", "beat: Starting..."), waited for with a bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_infra import wait_until

ROOT = Path(__file__).resolve().parent.parent

#: Environment every pipeline process gets unless a test overrides it.
BASE_ENV = {
    "MXQ_LEASE_SECONDS": "3",
    "MXQ_DISPATCH_STALE": "3",
    "MXQ_RETRY_SCHEDULE": "1",
    "MXQ_CONNECT_TIMEOUT": "2",
    "MXQ_COMMAND_TIMEOUT": "5",
    "MXQ_TASK_SOFT_LIMIT": "60",
    "MXQ_TASK_HARD_LIMIT": "90",
    "MXQ_HELO_NAME": "client.pipeline.test",
    "MXQ_TLS": "opportunistic",
}


class CeleryProcess:
    """One ``celery`` process (worker or beat) with its log file."""

    def __init__(self, args: list[str], env: dict[str, str], logfile: Path, ready: str, name: str):
        self.args, self.env, self.logfile, self.ready, self.name = args, env, logfile, ready, name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "CeleryProcess":
        """Start and wait (bounded) for the readiness line in the log."""
        offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        needle, count = self.ready if isinstance(self.ready, tuple) else (self.ready, 1)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.log()[offset:].count(needle) >= count

        wait_until(ready, timeout, f"{self.name} to log {needle!r} ({count} process(es))", interval=0.05)
        return self

    def log(self) -> str:
        """Everything the process (and its children) wrote so far."""
        try:
            return self.logfile.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        """True while the main process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and prefork children) at once."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL the group if it is still there after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)     # children that outlived their parent
        if self.proc.poll() is None:
            self.proc.wait(10)


class Pipeline:
    """A Redis server plus the Celery processes of one test."""

    def __init__(self, redis, workdir: Path, env: dict[str, str]):
        self.redis = redis
        self.workdir = workdir
        self.env = env
        self.processes: list[CeleryProcess] = []
        self._n = 0

    @property
    def url(self) -> str:
        """The Redis URL (broker, state, results)."""
        return self.redis.url

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def worker(self, *, concurrency: int = 2, queues: str = "mxq.intake,mxq.delivery,mxq.notifications",
               loglevel: str = "INFO", pool: str | None = None, **extra: str) -> CeleryProcess:
        """Start ``mxq worker`` on ``queues``; return it once every process logged ``ready.``.

        ``concurrency``: worker processes (``mxq worker --processes``: one gevent pool each, at
        its default deliveries in flight), as a machine with that many cores runs by default.
        ``pool``: ``prefork`` (or another) runs one plain Celery worker of that pool with
        ``concurrency`` children instead.
        """
        self._n += 1
        name = f"w{self._n}"
        common = ["-Q", queues, "-n", f"{name}@pipeline", "-l", loglevel,
                  "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if pool is None:
            args = [sys.executable, "-m", "mxq.tasks.cli", "worker", "--processes", str(concurrency), *common]
            ready = ("ready.", concurrency)
        else:
            args = [sys.executable, "-m", "celery", "-A", "mxq.tasks", "worker", "-P", pool, "-c", str(concurrency),
                    *common]
            ready = ("ready.", 1)
        p = CeleryProcess(args, self._env(extra), self.workdir / f"{name}.log", ready, f"worker {name}")
        self.processes.append(p)
        return p.start()

    def beat(self, **extra: str) -> CeleryProcess:
        """Start ``mxq scheduler`` (the tick every second, in a loop of its own; was Celery beat)."""
        args = [sys.executable, "-m", "mxq.tasks.cli", "scheduler", "-l", "INFO",
                "-s", str(self.workdir / "scheduler-heartbeat")]
        p = CeleryProcess(args, self._env(extra), self.workdir / "beat.log", "mxq scheduler ready", "scheduler")
        self.processes.append(p)
        return p.start()

    def wait_done(self, job_ids: list[str], timeout: float) -> None:
        """Wait (bounded) until every job is done (see ``wait_jobs_done``)."""
        client = self.redis.client()
        try:
            wait_jobs_done(client, job_ids, timeout)
        finally:
            client.close()

    def logs(self) -> str:
        """Every Celery process's log, concatenated."""
        return "\n".join(p.log() for p in self.processes)

    def stop(self) -> None:
        """Stop every process this pipeline started."""
        for p in reversed(self.processes):
            p.stop()


@pytest.fixture
def pipeline(redis_server, tmp_path, monkeypatch):
    """Factory: ``pipeline(appendonly=False, **env) -> Pipeline`` on a fresh redis-server."""
    import mxq.tasks.app as _  # noqa: F401  (the module, for rebind)
    from mxq.tasks.app import rebind

    made: list[Pipeline] = []

    def make(appendonly: bool = False, **env: str) -> Pipeline:
        srv = redis_server(appendonly=appendonly)
        full = dict(BASE_ENV, MXQ_REDIS_URL=srv.url, **env)
        for k, v in full.items():
            monkeypatch.setenv(k, v)
        rebind(srv.url)
        p = Pipeline(srv, tmp_path, full)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def wait_jobs_done(client, job_ids: list[str], timeout: float) -> None:
    """Wait (bounded) until every job's ``left`` count is 0; raise TimeoutError naming how many are left."""
    deadline = time.monotonic() + timeout
    left = list(job_ids)
    while True:
        pipe = client.pipeline(transaction=False)
        for j in left:
            pipe.hget(f"mxq:job:{j}", "left")
        left = [j for j, n in zip(left, pipe.execute()) if n != b"0"]
        if not left:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{len(left)} of {len(job_ids)} jobs not done after {timeout:g} s, e.g. {left[:3]}")
        time.sleep(0.1)

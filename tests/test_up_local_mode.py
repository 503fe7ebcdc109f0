"""``mxq up`` as the local, single-machine mode (issue 9, finding 10): it supervises its children
and keeps its Redis data (AOF) in a data directory that outlives the run.

A real ``mxq up`` process (embedded redis-server, ``mxq worker``, ``mxq scheduler``), the
session's DNS server process and aiosmtpd exchanges; children are killed with SIGKILL, as a
crash would.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from tests.fixtures_infra import wait_until

MXQ = str(Path(sys.executable).with_name("mxq"))
OK_IP, LATE_IP = "127.0.51.10", "127.0.51.11"
SENDER = "app@src.up.test"


@pytest.fixture(scope="module")
def exchanges(dns_server):
    dns_server.add({"ok.up.test": {"MX": [[10, "mx.ok.up.test"]]}, "mx.ok.up.test": {"A": [OK_IP]},
                    "late.up.test": {"MX": [[10, "mx.late.up.test"]]}, "mx.late.up.test": {"A": [LATE_IP]}})
    ok = start_server(OK_IP, 25, Behaviour(hostname="mx.ok.up.test"))
    yield ok
    ok.stop()


class Up:
    """One ``mxq up`` process; its stderr in a file, read as it goes."""

    def __init__(self, tmp: Path, data: Path, n: int):
        self.err = tmp / f"up{n}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_") or k in (
            "MXQ_TEST_NETNS", "MXQ_DNS_SERVERS", "MXQ_ALLOW_PRIVATE_DESTINATIONS", "MXQ_HELO_NAME")}
        env.update(MXQ_RETRY_SCHEDULE="1", MXQ_LEASE_SECONDS="5", MXQ_CONNECT_TIMEOUT="2")
        with open(self.err, "wb") as f:
            self.proc = subprocess.Popen([MXQ, "up", "--no-flower", "--concurrency", "2", "--data-dir", str(data),
                                          "--log-dir", str(tmp / f"logs{n}")],
                                         stdout=subprocess.DEVNULL, stderr=f, env=env, start_new_session=True)

    def text(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60, after: int = 0) -> re.Match:
        def found():
            if self.proc.poll() is not None:
                raise AssertionError(f"mxq up exited ({self.proc.returncode}):\n{self.text()}")
            return re.compile(pattern).search(self.text(), after)
        return wait_until(found, timeout, f"mxq up to say {pattern!r}", interval=0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(10)


def _point_at(url: str, monkeypatch):
    from mxq.tasks.app import rebind
    monkeypatch.setenv("MXQ_REDIS_URL", url)
    rebind(url)


def _delivered(job: str, timeout: float = 40) -> None:
    wait_until(lambda: tasks.status(job)["recipients"][0]["state"] == "delivered", timeout, f"job {job} delivered")


def _kill(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)          # the child's whole group, as a crash of that program


@pytest.mark.timeout(300)
def test_up_restarts_crashed_children_and_keeps_queued_mail_across_runs(tmp_path, exchanges, monkeypatch):
    data = tmp_path / "data"
    up = Up(tmp_path, data, 1)
    late = None
    try:
        up.wait_for("up; Ctrl-C stops everything")
        url = up.wait_for(r"redis (redis://127\.0\.0\.1:(\d+)/0)").group(1)
        assert (data / "redis").is_dir()
        _point_at(url, monkeypatch)
        _delivered(tasks.submit(b"Subject: 1\r\n\r\nx\r\n", sender=SENDER, recipients=["a@ok.up.test"]))

        # A second mxq up on the same data directory is refused (two Redis on one AOF).
        r = subprocess.run([MXQ, "up", "--no-flower", "--data-dir", str(data)], capture_output=True, timeout=60,
                           env=dict(os.environ, MXQ_REDIS_URL=""))
        assert r.returncode != 0 and b"is using the data directory" in r.stderr

        for name in ("worker", "scheduler", "redis"):
            mark = len(up.text())
            pid = int(re.findall(rf"{name} [^\n]*\bpid (\d+)", up.text())[-1])
            _kill(pid)
            up.wait_for(rf"{name} \(pid {pid}\) exited with status -9; starting it again", after=mark)
            up.wait_for(rf"{name} [^\n]*ready[^\n]*\(pid (?!{pid}\b)\d+", after=mark)
            # mail still flows (and the worker and scheduler reconnect to a restarted Redis)
            _delivered(tasks.submit(f"Subject: {name}\r\n\r\nx\r\n".encode(), sender=SENDER,
                                    recipients=[f"after.{name}@ok.up.test"]), timeout=60)

        # Mail for an exchange that is down is queued (deferred) when mxq up stops ...
        job = tasks.submit(b"Subject: late\r\n\r\nx\r\n", sender=SENDER, recipients=["b@late.up.test"])
        wait_until(lambda: tasks.status(job)["recipients"][0]["state"] == "deferred", 30, "the first attempt")
        assert up.stop() == 0
        # ... and delivered by the next mxq up on the same data directory once the exchange is up.
        late = start_server(LATE_IP, 25, Behaviour(hostname="mx.late.up.test"))
        up = Up(tmp_path, data, 2)
        up.wait_for("up; Ctrl-C stops everything")
        assert up.wait_for(r"redis (redis://127\.0\.0\.1:(\d+)/0)").group(1) == url       # the same port
        _delivered(job, timeout=60)
        assert [m.rcpt_tos for m in late.messages] == [["b@late.up.test"]]
    finally:
        up.stop()
        if late is not None:
            late.stop()


def test_a_child_that_keeps_exiting_is_given_up_on(tmp_path, monkeypatch):
    """A worker that cannot run (here: a Redis whose eviction policy mxq refuses, set after the
    start) is restarted MAX_RESTARTS times, then mxq up stops everything and exits 70."""
    from mxq.tasks import up as up_module

    data = tmp_path / "data"
    up = Up(tmp_path, data, 1)
    try:
        up.wait_for("up; Ctrl-C stops everything")
        url = up.wait_for(r"redis (redis://127\.0\.0\.1:(\d+)/0)").group(1)
        import redis
        client = redis.Redis.from_url(url)
        client.config_set("maxmemory-policy", "allkeys-lru")
        pid = int(re.findall(r"worker [^\n]*\bpid (\d+)", up.text())[-1])
        _kill(pid)
        assert up.proc.wait(up_module.RESTART_WINDOW + 60) == 70
        text = up.text()
        assert f"exited {up_module.MAX_RESTARTS + 1} times within" in text and "not starting it again" in text
        assert "stopping redis" in text
    finally:
        up.stop()

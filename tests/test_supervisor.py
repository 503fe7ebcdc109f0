"""``mxq worker``: one gevent worker process per core under a supervisor (``mxq.tasks.supervisor``).

The command line it builds, and the real thing on a real Redis: the processes
it starts, their node names, a child killed and restarted, a warm shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from mxq.tasks.supervisor import DEFAULT_CONCURRENCY, node_names, plan
from tests.fixtures_infra import wait_until

pytest_plugins = ["tests.pipeline_fixtures"]


def test_defaults_one_gevent_process_per_core_with_a_thousand_deliveries_each():
    children, names = plan([], cpus=2)
    assert len(children) == 2
    for argv, name in zip(children, names):
        assert argv[:4] == ["-P", "gevent", "-c", str(DEFAULT_CONCURRENCY)] and argv[4:6] == ["-n", name]
    assert names[0] != names[1] and all(n.endswith("@" + socket.gethostname()) for n in names)


def test_options_processes_concurrency_names_and_the_rest_passed_through():
    children, names = plan(["--processes", "3", "-c", "50", "-n", "w@box", "-l", "debug", "-Q", "delivery"])
    assert names == ["w-1@box", "w-2@box", "w-3@box"]
    assert children[2] == ["-P", "gevent", "-c", "50", "-n", "w-3@box", "-l", "debug", "-Q", "delivery"]
    assert plan(["--concurrency=7", "--hostname=x", "--processes=1"])[0] == [
        ["-P", "gevent", "-c", "7", "-n", f"x@{socket.gethostname()}"]]
    assert plan(["-P", "prefork", "-c", "4"]) is None          # another pool: a plain celery worker
    assert plan(["-P", "gevent"], cpus=1)[0][0][:2] == ["-P", "gevent"]
    with pytest.raises(ValueError):
        plan(["--processes", "0"])
    assert node_names(None, 2, pid=7) == [f"mxq-7-1@{socket.gethostname()}", f"mxq-7-2@{socket.gethostname()}"]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(k) for k in (task / "children").read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_the_supervisor_runs_restarts_and_stops_its_worker_processes(pipeline):
    from mxq.tasks.app import app

    p = pipeline()
    w = p.worker(concurrency=2)                 # mxq worker --processes 2 -n w1@pipeline ...
    # both processes are up (they logged "ready.")
    kids = _children(w.proc.pid)
    assert len(kids) == 2 and all("-P gevent" in _cmdline(k) for k in kids)
    nodes = ["w1-1@pipeline", "w1-2@pipeline"]
    # a worker process dies on its own right after it got ready: the supervisor starts it again (only
    # a process that never got ready ends the worker: a configuration error must not loop)
    os.kill(kids[0], signal.SIGKILL)
    wait_until(lambda: len(_children(w.proc.pid)) == 2 and kids[0] not in _children(w.proc.pid), 20,
               "the killed process replaced")
    wait_until(lambda: len(app.control.ping(destination=nodes, timeout=0.5)) == 2, 30, "both processes again")
    assert "mxq worker: a worker process exited with status" in w.log()
    # SIGTERM to the supervisor alone: a warm shutdown of every process, then it exits 0
    now = _children(w.proc.pid)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0
    assert not any(Path(f"/proc/{k}").exists() for k in now)
    assert "Warm shutdown" in w.log() or "warm shutdown" in w.log().lower()


def test_a_worker_process_that_exits_before_it_is_ready_ends_the_worker_with_its_status(pipeline):
    """A configuration error must not loop: Celery refuses an option, every process exits at once."""
    import subprocess
    import sys

    p = pipeline()
    r = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "worker", "--processes", "2",
                        "--no-such-celery-option"], env=p._env({}), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])          # click's usage error, passed on
    assert "exited with status 2 before it was ready; stopping" in r.stderr
    assert "restarting" not in r.stderr


def test_a_supervisor_killed_with_sigkill_leaves_no_worker_process_behind(pipeline):
    """Its children get SIGTERM when it dies (PR_SET_PDEATHSIG): `mxq up` or a container runtime
    that restarts a killed `mxq worker` never ends up with the old processes still consuming."""
    p = pipeline()
    w = p.worker(concurrency=2)
    kids = _children(w.proc.pid)
    assert len(kids) == 2
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(10)

    def gone():
        for k in kids:
            try:
                if Path(f"/proc/{k}/stat").read_text().split(") ", 1)[1][0] != "Z":
                    return False
            except FileNotFoundError:
                pass
        return True
    wait_until(gone, 30, "the orphaned worker processes to exit")

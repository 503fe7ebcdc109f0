"""The pipeline's command line: ``mxq send``, ``mxq status``, ``mxq up``.

Every command runs as a real subprocess (the installed ``mxq`` entry point)
against a real redis-server and a real Celery worker (tests/pipeline_fixtures.py),
delivering to real SMTP servers (aiosmtpd, ``mxq.sandbox.smtpd``) found
through the session's DNS server process.  ``mxq up`` runs in a nested
private network namespace, so its sandbox (127.0.0.x:25, :53) cannot clash
with anything else in the test session.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxq import tasks
from tests.fixtures_infra import wait_until
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

MXQ = str(Path(sys.executable).with_name("mxq"))
IP = "127.0.45."
OK = "ok.cli.test"          # one exchange that accepts; local parts reject* get 550 5.1.1
DEAD = "dead.cli.test"      # its exchange refuses connections: always deferred

MESSAGE = (b"From: Alice <alice@src.cli.test>\r\n"
           b"To: someone@" + OK.encode() + b"\r\n"
           b"Subject: cli test\r\n\r\nHello.\r\n")


@pytest.fixture(scope="module")
def sink(dns_server):
    dns_server.add({OK: {"MX": [[10, "mx." + OK]]}, "mx." + OK: {"A": [IP + "10"]},
                    DEAD: {"MX": [[10, "mx." + DEAD]]}, "mx." + DEAD: {"A": [IP + "9"]}})
    server = start_server(IP + "10", 25, Behaviour(hostname="mx." + OK))
    yield server
    server.stop()


def mxq(*args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``mxq`` entry point with this process's environment (the pipeline's)."""
    return subprocess.run([MXQ, *args], input=input, capture_output=True, timeout=timeout, env=dict(os.environ))


def mxq_keys(client) -> list[bytes]:
    """mxq's job state in Redis (Celery's own keys excluded)."""
    return sorted(k for k in client.keys("mxq:*") if not k.startswith((b"mxq:dispatch", b"mxq:pending")))


def test_send_json_prints_job_id_and_status_json_shape(pipeline, sink):
    p = pipeline()
    r = mxq("send", "--json", "-", input=MESSAGE)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"job"} and re.fullmatch(r"[0-9a-f]{32}", out["job"])
    job = out["job"]
    # No worker yet: the job is stored and queued.
    r = mxq("status", "--json", job)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert set(status) == {"job", "state", "recipients"}
    assert status["job"] == job and status["state"] == "queued"
    [rcpt] = status["recipients"]
    assert rcpt["address"] == f"someone@{OK}" and rcpt["state"] == "queued"
    assert {"domain", "code", "enhanced", "text", "exchange", "attempts"} <= set(rcpt)

    # A worker delivers it; the plain table says so.
    p.worker(concurrency=1)
    wait_until(lambda: tasks.status(job)["state"] == "done", 30, "the job to be delivered")
    r = mxq("status", job)
    assert r.returncode == 0
    text = r.stdout.decode()
    assert f"job {job}" in text and "state done" in text
    assert re.search(rf"^someone@{re.escape(OK)}\s+delivered\s+2\.0\.0\s+1\s+250", text, re.M), text


def test_send_wait_exit_statuses(pipeline, sink, tmp_path):
    p = pipeline()
    p.worker(concurrency=2)
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE)

    # Delivered: 0, and stdout (not a terminal) holds the job id then the status table only.
    r = mxq("send", "--wait", "--timeout", "30", str(eml))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert re.fullmatch(r"[0-9a-f]{32}", lines[0])
    assert lines[1].startswith(f"job {lines[0]}  state done")
    assert "\r" not in r.stdout.decode() and "[#" not in r.stdout.decode()   # no progress bar off a tty
    assert any(m.rcpt_tos == [f"someone@{OK}"] for m in sink.messages)

    # Bounced (550 5.1.1 from the server): 69, with --json the whole status.
    r = mxq("send", "--wait", "--json", "--timeout", "30", "--to", f"reject.me@{OK}", str(eml))
    assert r.returncode == 69, r.stderr
    status = json.loads(r.stdout)
    assert status["recipients"][0]["state"] == "bounced"
    assert status["recipients"][0]["code"] == 550

    # Delivered and bounced together: still 69.
    r = mxq("send", "--wait", "--timeout", "30", "--to", f"ann@{OK},reject.too@{OK}", str(eml))
    assert r.returncode == 69

    # Deferred (refused connection, next try in 60 s) when the bound runs out: 75.
    started = time.monotonic()
    r = mxq("send", "--wait", "--timeout", "3", "--to", f"bob@{DEAD}", str(eml))
    assert r.returncode == 75, r.stderr
    assert time.monotonic() - started < 20
    assert "deferred" in r.stdout.decode() or "queued" in r.stdout.decode()


def test_send_wait_progress_on_a_terminal(pipeline, sink):
    """On a tty, --wait redraws a progress line with per-state counts."""
    pipeline().worker(concurrency=1)
    master, slave = pty.openpty()
    proc = subprocess.Popen([MXQ, "send", "--wait", "--timeout", "30", "-"], stdin=subprocess.PIPE,
                            stdout=slave, stderr=subprocess.PIPE, env=dict(os.environ))
    os.close(slave)
    proc.stdin.write(MESSAGE)
    proc.stdin.close()
    out = b""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:         # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(10) == 0, proc.stderr.read()
    text = out.decode(errors="replace")
    assert re.search(r"\[#{30}\] 1/1 final  delivered 1", text), text
    assert "state done" in text


def test_invalid_input_is_65_and_stores_nothing(pipeline, sink, tmp_path):
    p = pipeline()
    client = p.redis.client()
    cases = [
        ("send", "--to", "bad address@x.test", "-"),                 # malformed recipient
        ("send", "--to", "a@b.test\r\nRCPT TO:<x@y.test>", "-"),     # CR/LF injection
        ("send", "--notify", "NEVER,SUCCESS", "-"),                   # invalid NOTIFY
        ("send", "--envid", "é" * 3, "-"),                            # ENVID must be ASCII
    ]
    for args in cases:
        r = mxq(*args, input=MESSAGE)
        assert r.returncode == 65, (args, r.stdout, r.stderr)
        assert b"invalid input" in r.stderr
    r = mxq("send", "-", input=b"From: a@src.cli.test\r\nSubject: no recipients\r\n\r\nbody\r\n")
    assert r.returncode == 65 and b"no recipients" in r.stderr
    r = mxq("send", "-", input=b"To: a@" + OK.encode() + b"\r\nX: " + b"y" * 2000 + b"\r\n\r\nb\r\n")
    assert r.returncode == 65
    assert mxq_keys(client) == []
    assert not any(k.startswith(b"mxq:ready") for k in client.keys("*"))

    r = mxq("send", str(tmp_path / "missing.eml"))
    assert r.returncode == 66
    r = mxq("status", "0" * 32)
    assert r.returncode == 66 and b"no such job" in r.stderr
    r = mxq("status", "not-a-job!")
    assert r.returncode == 66
    r = mxq("send", "--bogus-option", "-", input=MESSAGE)
    assert r.returncode == 64


def test_worker_scheduler_flower_commands():
    """The pass-through commands build the Celery command lines they promise."""
    from mxq.tasks.cli import flower_argv, scheduler_argv, worker_argv
    w = worker_argv(["-c", "3"])
    assert w[:5] == [sys.executable, "-m", "celery", "-A", "mxq.tasks"] and w[5] == "worker"
    queues = w[w.index("-Q") + 1].split(",")
    # every queue the app declares, each with mxq's prefix
    assert set(queues) == {q.name for q in tasks.app.conf.task_queues}
    assert set(queues) == {"mxq.intake", "mxq.delivery", "mxq.notifications"}
    assert w[-2:] == ["-c", "3"]
    assert "-Q" not in worker_argv(["-Q", "mxq.delivery"])[:-2]        # the caller's -Q wins
    assert w[w.index("--hostname") + 1] == f"mxq-{os.getpid()}@%h"      # a node name of its own
    assert w[w.index("--loglevel") + 1] == "INFO"                        # delivery lines by default
    assert "--hostname" not in worker_argv(["-n", "a@b"]) and "--loglevel" not in worker_argv(["-l", "debug"])
    s = scheduler_argv(["--schedule", "/x"])
    assert s == [sys.executable, "-m", "mxq.tasks.cli", "scheduler", "--schedule", "/x"]
    f = flower_argv(["--port=6000"])
    assert f[5] == "flower" and "--address=127.0.0.1" in f and "--port=6000" in f and "--port=5555" not in f
    for sub in ("worker", "scheduler", "flower", "up", "send", "status"):
        r = mxq(sub, "--help")
        assert r.returncode == 0 and sub.encode() in r.stdout
    r = mxq("up", "--demo")                                    # the demo mails sandbox domains
    assert r.returncode == 64 and b"--demo needs --sandbox" in r.stderr
    r = mxq("status", "abc", "--unknown")                      # only worker/scheduler/flower pass options on
    assert r.returncode == 64


# ---------------------------------------------------------------- mxq up

def _netns_argv(*args: str) -> list[str]:
    """Run ``mxq ARGS`` in a fresh network namespace of its own (nested in the session's)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mxq up --sandbox needs root and unshare(1) for a private network namespace")
    script = 'ip link set lo up && exec "$0" "$@"'
    return ["unshare", "--net", "--", "sh", "-c", script, MXQ, *args]


def _clean_env() -> dict:
    """The environment without the test pipeline's Redis: ``mxq up`` starts its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_") or k == "MXQ_TEST_NETNS"}
    return env


def test_up_sandbox_demo_end_to_end():
    started = time.monotonic()
    proc = subprocess.Popen(_netns_argv("up", "--sandbox", "--demo", "--flower-port", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_clean_env(), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"mxq up --sandbox --demo did not finish in 100 s:\n{stdout.decode()}\n{stderr.decode()}")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    out, err = r.stdout.decode(), r.stderr.decode()
    # Null MX, an unknown user and NXDOMAIN bounce by design: 69.
    assert r.returncode == 69, (out, err)
    from mxq.sandbox.stack import DEMO_EXPECTED
    for addr, want in DEMO_EXPECTED.items():
        final = "delivered" if want == "deferred" else want       # greylisting: retried, delivered
        assert re.search(rf"^{re.escape(addr)}\s+{final}\b", out, re.M), (addr, out)
        assert re.search(rf"^  ok\s+{re.escape(addr)}\s", out, re.M), out
    assert "WRONG" not in out
    assert "non-delivery reports (RFC 3464) delivered to demo@healthy.test about: " \
           "eve@nullmx.test, gus@missing.test, nobody@bounce.test" in out
    assert "flower http://127.0.0.1:" in err and "stopped" in err
    assert time.monotonic() - started < 100


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, group by group (mxq up's children have sessions
    of their own, so killing one group would not reach them)."""
    for k in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(k), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_stops_every_child_on_signal(tmp_path, sig):
    log = tmp_path / "up.err"
    kids: set[int] = set()
    with open(log, "wb") as err:
        proc = subprocess.Popen([MXQ, "up", "--flower-port", "0", "--concurrency", "2",
                                 "--data-dir", str(tmp_path / "data")], stdout=subprocess.DEVNULL,
                                stderr=err, env=_clean_env(), start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or b"Ctrl-C stops everything" in log.read_bytes(), 60,
                   "mxq up to be ready")
        assert proc.poll() is None, log.read_text()
        kids = _descendants(proc.pid)
        # redis, worker (+ 2 pool processes), scheduler, flower at least
        assert len(kids) >= 6, kids
        proc.send_signal(sig)
        assert proc.wait(30) == 0, log.read_text()
        text = log.read_text()
        for name in ("flower", "scheduler", "worker", "redis"):
            assert f"stopping {name}" in text
        # mxq up returned only after reaping its children; their own children (the worker's
        # pool, reparented to init if anything went wrong) must be gone too.
        leftover = [k for k in kids if _alive(k)]
        assert not leftover, (leftover, text)
    finally:
        # Whatever happened, leave nothing behind.
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait(10)
        for k in kids:
            if _alive(k):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(k), signal.SIGKILL)


def test_send_without_redis_or_with_bad_settings():
    """No Redis: 75 for valid input (retry later), still 65 for bad input; bad MXQ_* setting: 78."""
    from tests.fixtures_infra import free_port
    env = {**os.environ, "MXQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    r = subprocess.run([MXQ, "send", "-"], input=MESSAGE, capture_output=True, timeout=30, env=env)
    assert r.returncode == 75, r.stderr
    assert b"cannot reach Redis" in r.stderr and b"Traceback" not in r.stderr
    r = subprocess.run([MXQ, "send", "--to", "not an address", "-"], input=MESSAGE, capture_output=True,
                       timeout=30, env=env)
    assert r.returncode == 65, r.stderr
    r = subprocess.run([MXQ, "status", "0" * 32], capture_output=True, timeout=30, env=env)
    assert r.returncode == 75 and b"cannot reach Redis" in r.stderr
    # (Settings that mxq.tasks.app reads at import, such as MXQ_RETRY_SCHEDULE, fail before
    # mxq's main() runs: a traceback, status 1.  Those belong to the app module.)
    for name, value in (("MXQ_MAX_MESSAGE_SIZE", "lots"),):
        r = subprocess.run([MXQ, "send", "-"], input=MESSAGE, capture_output=True, timeout=30,
                           env={**env, name: value})
        assert r.returncode == 78, r.stderr
        assert name.encode() in r.stderr


def test_exit_status_and_finality_of_every_state():
    """Pure logic: suppressed and dropped are final non-deliveries (69), like bounced and expired."""
    from mxq.tasks.cli import exit_status, is_final, progress_line

    def job(*states):
        return {"job": "j", "state": "x", "recipients": [{"address": f"r{i}@a.test", "state": s}
                                                         for i, s in enumerate(states)]}
    assert exit_status(job("delivered", "delivered")) == 0
    assert exit_status(job("delivered", "deferred")) == 75
    assert exit_status(job("queued")) == 75
    assert exit_status(job()) == 75
    for failed in ("bounced", "expired", "suppressed", "dropped"):
        assert exit_status(job("delivered", failed)) == 69
        assert exit_status(job("deferred", failed)) == 69
        assert is_final(job("delivered", failed))
    assert not is_final(job("delivered", "deferred"))
    assert not is_final(job())
    assert progress_line(job("delivered", "deferred", "bounced", "queued"), width=8) == \
        "[####....] 2/4 final  bounced 1  deferred 1  delivered 1  queued 1"


def test_malformed_pipeline_setting_is_exit_78_not_a_traceback():
    """`import mxq.tasks` survives a bad MXQ_* value; pipeline commands report it, a worker refuses to start."""
    import subprocess
    import sys
    env = dict(os.environ, MXQ_RETRY_SCHEDULE="soon")
    r = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "status", "nojob"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78, r.stderr
    assert "MXQ_RETRY_SCHEDULE" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "--help"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "deliver" in r.stdout
    r = subprocess.run([sys.executable, "-m", "celery", "-A", "mxq.tasks", "worker", "--pool", "solo"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "MXQ_RETRY_SCHEDULE" in r.stderr

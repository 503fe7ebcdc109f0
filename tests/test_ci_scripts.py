"""Infrastructure: the CI and ops scripts, the Redis fixture, and the demo sandbox (mxq.sandbox.stack).

- ``ops/test`` must fail when tests fail *and* when no test was collected,
  and print pytest's summary line; ``.ci/run`` must run it.
- ``redis_server`` must really persist with ``appendonly`` and really not
  without, across ``restart()`` on the same port.
- The sandbox must do what its plan (and the README's demo) promises, domain
  by domain, against mxq's own resolver, session and ``deliver()``.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxq.workers.config import Settings
from mxq.workers.errors import DNSError, NullMX, SMTPConnectError, SMTPTimeoutError
from mxq.workers.mx import Resolver
from mxq.sandbox import stack
from mxq.workers.session import SMTPSession
from mxq.workers.timeouts import Timeouts

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ops/install-deps", "ops/test", "ops/demo", ".ci/run"]


# --------------------------------------------------------------------------- scripts

@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_bash_with_valid_syntax(script):
    path = ROOT / script
    if not path.exists():
        pytest.skip(f"{script} does not exist yet")
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=10)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    assert "ops/test" in ci
    readme = (ROOT / "README.md").read_text()
    assert "ops/test" in readme and "ops/demo" in readme


def _ops_test(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``ops/test`` on a throw-away test folder (outside tests/, so no conftest servers start)."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = dict(os.environ, MXQ_SKIP_APT="1")
    return subprocess.run(["bash", str(ROOT / "ops/test"), "-q", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def deps_installed():
    """ops/test runs ops/install-deps first; only exercise it when that is a no-op here."""
    # Inside the test session's network namespace pip cannot reach PyPI, so an
    # install that is not already current cannot be done from here.
    stamp = ROOT / ".venv/.mxq-install-stamp"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        pytest.skip("the venv is not ops/install-deps' install of this pyproject.toml (run the suite through ops/test)")


def test_install_deps_is_quiet_and_quick_when_done(deps_installed):
    start = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "ops/install-deps")], env=dict(os.environ, MXQ_SKIP_APT="1"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "pip install" not in r.stderr
    assert time.monotonic() - start < 10


def test_ops_test_passes_and_prints_the_summary(deps_installed, tmp_path):
    r = _ops_test(tmp_path, {"test_ok.py": "def test_ok():\n    assert True\n"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ops/test: 1 passed in" in r.stdout


def test_ops_test_fails_when_a_test_fails(deps_installed, tmp_path):
    r = _ops_test(tmp_path, {"test_bad.py": "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ops/test: 1 failed, 1 passed in" in r.stdout
    assert "ops/test: FAILED" in r.stderr


def test_ops_test_fails_when_no_test_is_collected(deps_installed, tmp_path):
    r = _ops_test(tmp_path, {"README": "nothing here\n"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no tests were collected" in r.stderr


# --------------------------------------------------------------------------- Redis fixture

def test_redis_appendonly_survives_restart_on_same_port(redis_server):
    server = redis_server(appendonly=True)
    port, url = server.port, server.url
    c = server.client()
    c.set("mxq:test", "kept")
    c.close()
    server.restart()
    assert (server.port, server.url) == (port, url)
    c = server.client()
    assert c.get("mxq:test") == b"kept"
    c.close()


def test_redis_without_persistence_forgets_on_restart(redis_server):
    server = redis_server()
    c = server.client()
    c.set("mxq:test", "gone")
    c.close()
    server.restart()
    c = server.client()
    assert c.get("mxq:test") is None and c.ping()
    c.close()


def test_redis_kill_then_start(redis_server):
    server = redis_server()
    server.kill()
    assert not server.running
    c = server.client(socket_connect_timeout=0.5)
    with pytest.raises(Exception):
        c.ping()
    server.start()
    assert c.ping()
    c.close()


# --------------------------------------------------------------------------- the sandbox

BASE = "127.0.9."      # away from 127.0.0.x, which other test modules use


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The sandbox on 127.0.9.x (DNS on 127.0.9.10:53, SMTP on :25, relay on :587)."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox binds port 25 and 53: needs root (in the test session's private netns)")
    sb = stack.start_sandbox(tmp_path_factory.mktemp("sandbox"), base_ip=BASE)
    yield sb
    sb.stop()


@pytest.fixture
def settings(sandbox):
    """Engine settings from the sandbox's environment, with tight timeouts for the silent exchange."""
    env = dict(sandbox.env, MXQ_CONNECT_TIMEOUT="2", MXQ_COMMAND_TIMEOUT="1")
    return Settings.from_env(env)


def test_sandbox_env_points_at_its_servers(sandbox):
    env = sandbox.env
    assert env["MXQ_DNS_SERVERS"] == f"{BASE}10:53"
    assert env["MXQ_SMTP_PORT"] == "25"
    assert Path(env["SSL_CERT_FILE"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    Settings.from_env(env)    # every value is one the engine accepts


def test_sandbox_dns_serves_the_plan(sandbox, settings):
    r = Resolver(settings)
    assert [(x.name, x.addresses) for x in r.exchanges("healthy.test")] == [("mx.healthy.test", [f"{BASE}11"])]
    assert [(x.preference, x.name) for x in r.exchanges("deadfirst.test")] == [
        (10, "mx1.deadfirst.test"), (20, "mx2.deadfirst.test")]
    with pytest.raises(NullMX):
        r.exchanges("nullmx.test")
    with pytest.raises(DNSError) as info:
        r.exchanges("missing.test")
    assert info.value.reply.enhanced == "5.1.2"


def _session(ip: str, settings: Settings, **kw) -> SMTPSession:
    return SMTPSession(ip, 25, helo_name="client.sandbox.test", timeouts=settings.timeouts, **kw)


def test_healthy_accepts_over_tls_and_spools_to_workdir(sandbox, settings):
    with _session(f"{BASE}11", settings) as s:
        res = s.send_message("a@app.test", ["ann@healthy.test"], b"Subject: spool\r\n\r\nhi\r\n")
        assert s.tls_active
    assert res.delivered == ["ann@healthy.test"]
    spooled = list((sandbox.mail_dir / "healthy.test").glob("*.eml"))
    assert any(b"Subject: spool" in p.read_bytes() for p in spooled)
    assert any(m.rcpt_tos == ["ann@healthy.test"] for m in sandbox.messages("healthy.test"))


def test_greylist_defers_first_then_accepts(sandbox, settings):
    with _session(f"{BASE}12", settings) as s:
        first = s.send_message("a@app.test", ["gil@greylist.test"], b"Subject: g\r\n\r\n.\r\n")
        again = s.send_message("a@app.test", ["gil@greylist.test"], b"Subject: g\r\n\r\n.\r\n")
    assert first.recipients["gil@greylist.test"].code == 450
    assert first.recipients["gil@greylist.test"].enhanced == "4.7.1"
    assert again.delivered == ["gil@greylist.test"]


def test_deadfirst_and_slowfirst_primary_exchanges_fail(sandbox, settings):
    with pytest.raises(SMTPConnectError):
        _session(f"{BASE}13", settings).connect()
    s = _session(f"{BASE}15", settings)
    with pytest.raises(SMTPTimeoutError):
        s.connect()
    s.disconnect()


def test_bounce_refuses_some_recipients(sandbox, settings):
    with _session(f"{BASE}17", settings) as s:
        res = s.send_message("a@app.test", ["nobody@bounce.test", "full@bounce.test", "fay@bounce.test"],
                             b"Subject: b\r\n\r\nx\r\n")
    codes = {a: (r.code, r.enhanced) for a, r in res.recipients.items()}
    assert codes == {"nobody@bounce.test": (550, "5.1.1"), "full@bounce.test": (552, "5.2.2"),
                     "fay@bounce.test": (250, "2.1.5")}
    assert res.delivered == ["fay@bounce.test"]


def test_relay_requires_starttls_and_auth_with_a_verified_certificate(sandbox, settings):
    import ssl
    ctx = ssl.create_default_context(cafile=sandbox.env["SSL_CERT_FILE"])
    with SMTPSession(f"{BASE}30", stack.RELAY_PORT, helo_name="client.sandbox.test", tls="required",
                     tls_context=ctx, server_hostname=f"smtp.{stack.RELAY_DOMAIN}",
                     timeouts=settings.timeouts) as s:
        s.connect()
        assert s.tls_active
        assert s.authenticate(stack.RELAY_USER, stack.RELAY_PASSWORD).code == 235
        res = s.send_message("a@app.test", ["far@elsewhere.test"], b"Subject: r\r\n\r\nx\r\n")
    assert res.delivered == ["far@elsewhere.test"]
    assert sandbox.messages(stack.RELAY_DOMAIN)[-1].auth_user == stack.RELAY_USER


def test_demo_recipients_get_the_planned_outcomes(sandbox, settings):
    """What ops/demo shows: one deliver() run over DEMO_RECIPIENTS gives each domain's planned state."""
    delivery = pytest.importorskip("mxq.workers.delivery")
    from mxq.workers.envelope import Envelope, Recipient
    env = Envelope(sender="demo@app.test", recipients=[Recipient(a) for a in stack.DEMO_RECIPIENTS],
                   content=b"Subject: demo\r\n\r\nhello\r\n")
    results = {r.address: r for r in delivery.deliver(env, settings=settings, resolver=Resolver(settings))}
    assert {a: r.state.value for a, r in results.items()} == stack.DEMO_EXPECTED
    assert results["cat@deadfirst.test"].exchange == "mx2.deadfirst.test"
    assert results["dan@slowfirst.test"].exchange == "mx2.slowfirst.test"
    assert results["eve@nullmx.test"].enhanced == "5.1.10"
    assert results["gus@missing.test"].enhanced == "5.1.2"


def test_stack_command_line_writes_env_file_and_stops_on_sigterm(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("binds port 25: needs root")
    env_file = tmp_path / "env"
    proc = subprocess.Popen([sys.executable, "-m", "mxq.sandbox.stack", "--workdir", str(tmp_path / "w"),
                             "--base-ip", "127.0.8.", "--env-file", str(env_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not env_file.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no env file within 20 s"
            time.sleep(0.05)
        text = env_file.read_text()
        assert "export MXQ_DNS_SERVERS=127.0.8.10:53\n" in text
        with SMTPSession("127.0.8.11", 25, helo_name="c.test", timeouts=Timeouts(connect=2, greeting=5)) as s:
            assert s.connect().code == 220
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "mx.healthy.test" in out


@pytest.mark.parametrize("args", [[], ["--deliver"]], ids=["pipeline", "deliver"])
def test_ops_demo_runs_the_main_job_with_planned_outcomes(deps_installed, args):
    """The README's main-job command, end to end (it enters a network namespace of its own).

    Default: ``mxq up --sandbox --demo`` (the pipeline); ``--deliver``: ``mxq deliver`` (the engine).
    """
    if os.geteuid() != 0:
        pytest.skip("ops/demo's network namespace needs root (or unprivileged user namespaces)")
    r = subprocess.run(["bash", str(ROOT / "ops/demo"), *args], cwd=ROOT, env=dict(os.environ, MXQ_SKIP_APT="1"),
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for address in stack.DEMO_EXPECTED:
        assert re.search(rf"^ +ok +{re.escape(address)} ", r.stdout, re.M), address
    assert "WRONG" not in r.stdout
    assert ("mxq up --sandbox --demo" if not args else "mxq deliver") in r.stdout

"""The ``mxq`` command on click: --version, shell completion, sysexits for usage errors, one table
style, and what a process without the optional extras (flower, dkim, metrics) gets.

The "missing extra" cases run real subprocesses in which those packages cannot be imported (a
``sitecustomize`` on ``PYTHONPATH`` refuses them), against a real ``redis-server``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mxq.tables import RECIPIENT_HEADER, render

ROOT = Path(__file__).resolve().parent.parent
MXQ = str(Path(sys.executable).with_name("mxq"))
MESSAGE = "From: a@app.extras.test\nTo: b@nowhere.extras.test\nSubject: x\n\nhi\n"


def mxq(*args, env=None, input=None, timeout=60):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_")}
    e.update(env or {})
    return subprocess.run([MXQ, *args], capture_output=True, text=True, env=e, timeout=timeout, input=input)


def test_version_help_and_usage_errors_are_sysexits():
    from mxq import __version__
    p = mxq("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"mxq {__version__}"
    assert mxq("--help").returncode == 0 and mxq("-h").returncode == 0
    for args in (["nosuchcommand"], ["status"], ["status", "a", "b"], ["send", "--bogus", "-"],
                 ["queue", "--oldest", "many"], ["suppress"], ["completion", "tcsh"], ["scheduler", "-l", "loud"]):
        p = mxq(*args)
        assert p.returncode == 64, (args, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr
    for sub in ("deliver", "send", "status", "worker", "scheduler", "flower", "up", "queue", "suppress",
                "config", "completion"):
        p = mxq(sub, "--help")
        assert p.returncode == 0 and f"Usage: mxq {sub}" in p.stdout, (sub, p.stderr)


def test_shell_completion_scripts_and_completing():
    for shell in ("bash", "zsh", "fish"):
        p = mxq("completion", shell)
        assert p.returncode == 0 and "_MXQ_COMPLETE" in p.stdout, (shell, p.stderr)
    # What the bash script asks for: the commands starting with "q", then queue's actions.
    env = {"_MXQ_COMPLETE": "bash_complete", "COMP_WORDS": "mxq q", "COMP_CWORD": "1"}
    p = mxq(env=env)
    assert "plain,queue" in p.stdout.split(), p.stdout
    env = {"_MXQ_COMPLETE": "bash_complete", "COMP_WORDS": "mxq queue f", "COMP_CWORD": "2"}
    assert "plain,flush" in mxq(env=env).stdout.split()


def test_one_table_style():
    lines = render(RECIPIENT_HEADER, [("ann@a.test", "delivered", "2.0.0", 1, "250 2.0.0 ok [mx.a.test 192.0.2.1]"),
                                      ("bob@longer-domain.test", "deferred", "4.7.1", 12, "450 4.7.1 \x1b[31mlater")])
    assert lines[0].split() == list(RECIPIENT_HEADER)
    # text left-aligned, numbers right-aligned, two spaces between columns, control characters made safe
    assert lines[1] == "ann@a.test              delivered  2.0.0      1  250 2.0.0 ok [mx.a.test 192.0.2.1]"
    assert lines[2] == "bob@longer-domain.test  deferred   4.7.1     12  450 4.7.1 ?[31mlater"
    assert render(("A", "B"), [("x" * 50, "y" * 50)], width=40)[1] == ("x" * 50 + "  " + "y" * 50)[:39] + "…"


def test_the_base_dependencies_are_small_and_the_extras_named():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(meta["dependencies"]).lower()
    for heavy in ("flower", "dkimpy", "pynacl", "prometheus", "django", "flask"):
        assert heavy not in base, heavy
    extras = meta["optional-dependencies"]
    assert {"django", "flask", "flower", "metrics", "dkim"} <= set(extras)
    assert any("flower" in d for d in extras["flower"]) and any("prometheus" in d for d in extras["metrics"])
    assert any("dkimpy" in d for d in extras["dkim"]) and any("pynacl" in d for d in extras["dkim"])
    assert meta["license"] == {"text": "MIT"} and "MIT License" in (ROOT / "LICENSE").read_text()


BLOCKER = '''
import sys
BLOCKED = ("flower", "dkim", "nacl", "prometheus_client")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
'''

SUBMIT = '''
import json, sys
import mxq.tasks, mxq.contrib.django, mxq.contrib.flask
job = mxq.tasks.submit(sys.stdin.read())
print(json.dumps({"job": job, "loaded": sorted(m for m in ("flower", "dkim", "nacl", "prometheus_client")
                                                 if m in sys.modules)}))
'''


@pytest.fixture
def without_extras(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(tmp_path)}


def test_a_process_without_the_extras_submits_and_says_which_extra_a_feature_needs(
        without_extras, redis_server, tmp_path):
    srv = redis_server()
    env = dict(without_extras, MXQ_REDIS_URL=srv.url)
    e = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_")}
    p = subprocess.run([sys.executable, "-c", SUBMIT], input=MESSAGE, capture_output=True, text=True,
                       env={**e, **env}, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["loaded"] == [] and srv.client().exists(f"mxq:job:{out['job']}")

    (tmp_path / "keys.json").write_text('{"app.extras.test": {"selector": "s", "key": "k.pem"}}')
    p = mxq("send", "-", env=dict(env, MXQ_DKIM=str(tmp_path / "keys.json")), input=MESSAGE)
    assert p.returncode == 78 and "MXQ_DKIM" in p.stderr and "pip install 'mxq[dkim]'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr

    p = mxq("flower", env=env)
    assert p.returncode == 69 and "pip install 'mxq[flower]'" in p.stderr

    p = mxq("worker", "--pool", "solo", env=dict(env, MXQ_METRICS_PORT="9808"))
    assert p.returncode == 78 and "MXQ_METRICS_PORT" in p.stderr and "pip install 'mxq[metrics]'" in p.stderr

    p = mxq("config", env=dict(env, MXQ_METRICS_PORT="9808"))
    assert p.returncode == 78 and "mxq[metrics]" in p.stderr

    # deliver (the engine alone) needs none of them
    p = mxq("deliver", "--help", env=env)
    assert p.returncode == 0

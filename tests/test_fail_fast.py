"""Fail fast: with Redis unreachable a submission fails within MXQ_SUBMIT_TIMEOUT (default 2 s).

Two real faults: nothing listening (connection refused at once) and SYNs dropped by nftables
inside the test session's private network namespace (every connect attempt hangs).  Through the
producer API, ``mxq send``, a Django project's ``send_mail`` (with and without
``fail_silently``) and Flask's ``Mxq.send``.  Timed bounds are the requirement here: the
submission must give up within the setting, plus a margin for a loaded machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import IN_PRIVATE_NETNS
from tests.fixtures_infra import free_port

ROOT = Path(__file__).resolve().parent.parent
MXQ = str(Path(sys.executable).with_name("mxq"))
MESSAGE = b"From: a@app.fast.test\r\nTo: b@to.fast.test\r\nSubject: x\r\n\r\nhi\r\n"
MARGIN = 1.5        #: seconds allowed beyond the timeout (process start, a loaded machine)
DROPPED = "127.0.0.77"


@pytest.fixture
def refused():
    """A Redis URL where nothing listens: every connect is refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def dropped():
    """A Redis URL whose SYNs nftables drops (inside the test's own network namespace)."""
    if not IN_PRIVATE_NETNS or not shutil.which("nft"):
        pytest.skip("needs nftables in the test session's private network namespace (root)")
    table = f"mxqfast{uuid.uuid4().hex[:8]}"
    rules = [["add", "table", "inet", table],
             ["add", "chain", "inet", table, "out", "{ type filter hook output priority 0; }"],
             ["add", "rule", "inet", table, "out", "ip", "daddr", DROPPED, "tcp", "dport", "6379", "drop"]]
    for r in rules:
        subprocess.run(["nft", *r], check=True, capture_output=True, timeout=10)
    try:
        yield f"redis://{DROPPED}:6379/0"
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=10)


def timed(fn):
    started = time.monotonic()
    try:
        return fn(), time.monotonic() - started
    except Exception as e:          # the error is the result
        return e, time.monotonic() - started


@pytest.mark.parametrize("fault", ["refused", "dropped"])
@pytest.mark.parametrize("timeout", [None, "0.5"])
def test_submit_fails_within_the_timeout(fault, timeout, request, monkeypatch):
    import mxq.tasks
    from mxq.tasks.app import rebind

    url = request.getfixturevalue(fault)
    monkeypatch.setenv("MXQ_REDIS_URL", url)
    if timeout:
        monkeypatch.setenv("MXQ_SUBMIT_TIMEOUT", timeout)
    else:
        monkeypatch.delenv("MXQ_SUBMIT_TIMEOUT", raising=False)
    rebind(url)
    bound = float(timeout or 2) + MARGIN
    for call in (lambda: mxq.tasks.submit(MESSAGE), lambda: mxq.tasks.submit_many([MESSAGE, MESSAGE])):
        err, took = timed(call)
        assert isinstance(err, mxq.tasks.Unavailable), err
        assert took < bound, (fault, took)
        text = str(err)
        assert "MXQ_SUBMIT_TIMEOUT" in text and "cannot reach Redis" in text, text
        import redis
        assert isinstance(err, redis.exceptions.ConnectionError)      # what callers already catch


def test_mxq_send_exits_75_within_the_timeout(dropped):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_")}
    env.update(MXQ_REDIS_URL=dropped, MXQ_SUBMIT_TIMEOUT="1")
    started = time.monotonic()
    p = subprocess.run([MXQ, "send", "-"], input=MESSAGE, capture_output=True, env=env, timeout=60)
    took = time.monotonic() - started
    assert p.returncode == 75 and b"cannot reach Redis" in p.stderr and b"Traceback" not in p.stderr, p.stderr
    assert took < 1 + MARGIN + 2.0, took          # + the interpreter's start-up (Celery, click)


DJANGO = r'''
import json, sys, time
import django
django.setup()
from django.core import mail
# What the first send imports (Celery, the task graph: about a second, more on a loaded machine)
# is not what MXQ_SUBMIT_TIMEOUT bounds; a web process has it imported after its first request.
import mxq.contrib.django, mxq.tasks.graph
out = {}
t = time.monotonic()
out["silent"] = mail.send_mail("s", "b", "a@app.fast.test", ["b@to.fast.test"], fail_silently=True)
out["silent_took"] = time.monotonic() - t
t = time.monotonic()
try:
    mail.send_mail("s", "b", "a@app.fast.test", ["b@to.fast.test"])
    out["error"] = None
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
out["loud_took"] = time.monotonic() - t
print(json.dumps(out))
'''

FLASK = r'''
import json, time
from email.message import EmailMessage
from flask import Flask
from mxq.contrib.flask import Mxq
app = Flask("fast")
app.config["MXQ_REDIS_URL"] = __import__("sys").argv[1]
mail = Mxq(app)
import mxq.tasks.graph          # (imported by the first send: not what the timeout bounds)
m = EmailMessage(); m["From"] = "a@app.fast.test"; m["To"] = "b@to.fast.test"; m.set_content("x")
t = time.monotonic()
job = mail.send(m, fail_silently=True)
print(json.dumps({"job": job, "took": time.monotonic() - t}))
'''


@pytest.mark.parametrize("fault", ["refused", "dropped"])
def test_django_send_mail_and_flask_return_within_the_timeout(fault, request, tmp_path):
    url = request.getfixturevalue(fault)
    (tmp_path / "fast_settings.py").write_text(textwrap.dedent(f'''
        SECRET_KEY = "x"
        INSTALLED_APPS = []
        EMAIL_BACKEND = "mxq.contrib.django.EmailBackend"
        MXQ_REDIS_URL = {url!r}
    '''))
    (tmp_path / "dj.py").write_text(DJANGO)
    (tmp_path / "fl.py").write_text(FLASK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_")}
    env.update(DJANGO_SETTINGS_MODULE="fast_settings", PYTHONPATH=str(tmp_path))
    import json
    p = subprocess.run([sys.executable, str(tmp_path / "dj.py")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["silent"] == 0 and out["silent_took"] < 2 + MARGIN, out
    assert out["error"].startswith("Unavailable: cannot reach Redis") and out["loud_took"] < 2 + MARGIN, out
    p = subprocess.run([sys.executable, str(tmp_path / "fl.py"), url], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["job"] is None and out["took"] < 2 + MARGIN, out

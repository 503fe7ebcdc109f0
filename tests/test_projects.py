"""mxq inside real projects, built by the tests as their users would build them.

Django: ``django-admin startproject`` + ``manage.py startapp tasks`` (a Django app named
``tasks``, with a ``@shared_task``, next to mxq installed), the project's own Celery app on the
same Redis database, ``runserver`` serving ``path("mxq/", include("mxq.contrib.django.urls"))``,
django-celery-results in INSTALLED_APPS.  Flask: a top-level ``tasks.py`` Celery app as in
Celery's tutorial, ``mxq worker`` started from that directory, the blueprint served by
``flask run``.  Everything real: redis-server, Celery workers, ``mxq worker`` and ``mxq
scheduler``, the sandbox DNS server, an SMTP server, HTTP servers for the webhooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mxq.sandbox.smtpd import Behaviour, start_server
from tests.fixtures_infra import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MXQ = str(Path(sys.executable).with_name("mxq"))
SECRET = "project-webhook-secret"
RCPT = "to.projects.test"
MX_IP = "127.0.10.10"


@pytest.fixture(scope="module")
def sink(dns_server):
    dns_server.add({RCPT: {"MX": [[10, "mx." + RCPT]]}, "mx." + RCPT: {"A": [MX_IP]}})
    server = start_server(MX_IP, 25, Behaviour(hostname="mx." + RCPT))
    yield server
    server.stop()


class Procs:
    """Child processes of one test, each in its own process group, all stopped at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def check(self) -> None:
        for name, p, log in self.procs:
            if p.poll() is not None:
                raise AssertionError(f"{name} exited {p.returncode}:\n{log.read_text(errors='replace')[-3000:]}")

    def wait_log(self, name: str, needle: str, timeout: float = 60) -> None:
        def seen():
            self.check()
            return needle in self.log(name)
        wait_until(seen, timeout, f"{name} to log {needle!r}", interval=0.1)

    def stop(self) -> None:
        for _, p, _ in reversed(self.procs):
            for sig, bound in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(bound)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def procs(tmp_path):
    made = Procs(tmp_path)
    yield made
    made.stop()


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MXQ_", "DJANGO_", "CELERY_"))}
    env.update(MXQ_DNS_SERVERS=os.environ["MXQ_DNS_SERVERS"], MXQ_HELO_NAME="client.projects.test",
               MXQ_CONNECT_TIMEOUT="2", MXQ_COMMAND_TIMEOUT="5", MXQ_RETRY_SCHEDULE="1",
               MXQ_LEASE_SECONDS="3", MXQ_DISPATCH_STALE="3", MXQ_ALLOW_PRIVATE_DESTINATIONS="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def post(url: str, body: bytes, headers: dict) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def forged(url: str, recipient: str) -> int:
    """A well-formed event signed with the wrong secret."""
    from mxq.tasks.webhooks import sign
    body = json.dumps({"id": "f" * 32, "job": "0" * 32, "recipient": recipient, "state": "delivered"}).encode()
    ts = str(int(time.time()))
    return post(url, body, {"Content-Type": "application/json", "X-Mxq-Timestamp": ts,
                            "X-Mxq-Signature": "sha256=" + sign("wrong-secret", ts, body)})


# ---------------------------------------------------------------- Django
DJ_CELERY = '''
import os
from celery import Celery
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
'''

DJ_TASKS = '''
from celery import shared_task

@shared_task(name="tasks.record")
def record(path, text):
    with open(path, "a") as f:
        f.write(text + "\\n")
    return text
'''

DJ_APPS = '''
import json
from django.apps import AppConfig
from django.conf import settings


class TasksConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "tasks"

    def ready(self):
        from mxq.contrib.django.signals import tracking

        def on_event(sender, event, **kwargs):
            with open(settings.EVENTS_FILE, "a") as f:
                f.write(json.dumps({"type": event.event_type, "recipient": event.recipient,
                                    "job": event.message_id, "id": event.event_id,
                                    "response": event.mta_response}) + "\\n")
        tracking.connect(on_event, weak=False, dispatch_uid="tasks-mxq-events")
'''

DJ_SEND = '''
import json, os, sys
from django.core import mail
from django.db import transaction
from django.test.utils import override_settings
from tasks.tasks import record
from celery import current_app
from mxq.tasks.store import get_store

out = {}
m = mail.EmailMessage("Hello", "Body of the project mail.", "app@site.projects.test",
                      ["ann@to.projects.test", "reject.me@to.projects.test"])
out["sent"] = m.send()
out["job"] = m.mxq_job_id
record.delay(sys.argv[1], "ran")            # the project's own task, after a send
out["current_app"] = current_app.main
r = get_store().r

# MXQ_ON_COMMIT: stored when the transaction commits, nothing for a rolled-back one.
with override_settings(MXQ_ON_COMMIT=True):
    with transaction.atomic():
        c = mail.EmailMessage("Commit", "on commit", "app@site.projects.test", ["cat@to.projects.test"])
        c.send()
        out["inside"] = bool(r.exists("mxq:job:" + c.mxq_job_id))
    out["after_commit"] = bool(r.exists("mxq:job:" + c.mxq_job_id))
    out["commit_job"] = c.mxq_job_id
    try:
        with transaction.atomic():
            b = mail.EmailMessage("Rollback", "rolled back", "app@site.projects.test", ["dan@to.projects.test"])
            b.send()
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    out["rolled_back_stored"] = bool(r.exists("mxq:job:" + b.mxq_job_id))
print(json.dumps(out))
'''

DJ_RESULT = '''
import json, sys
from django_celery_results.models import TaskResult
t = TaskResult.objects.get(task_id=sys.argv[1])
print(json.dumps({"status": t.status, "result": json.loads(t.result)}))
'''


def test_a_django_project_with_its_own_tasks_app(tmp_path, procs, sink, redis_server):
    sink.clear()
    srv = redis_server()
    proj = tmp_path / "site"
    proj.mkdir()
    env = base_env()
    r = subprocess.run([PY, "-m", "django", "startproject", "proj", str(proj)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([PY, "manage.py", "startapp", "tasks"], cwd=proj, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr               # the name "tasks" is free: mxq installs only mxq
    (proj / "proj" / "celery.py").write_text(DJ_CELERY)
    (proj / "proj" / "__init__.py").write_text("from .celery import app as celery_app\n")
    (proj / "tasks" / "tasks.py").write_text(DJ_TASKS)
    (proj / "tasks" / "apps.py").write_text(DJ_APPS)
    port = free_port()
    events_file = tmp_path / "events.jsonl"
    settings = proj / "proj" / "settings.py"
    settings.write_text(settings.read_text().replace("'django.contrib.staticfiles',", "'django.contrib.staticfiles',\n    'tasks',\n    'django_celery_results',")
                        .replace('"django.contrib.staticfiles",', '"django.contrib.staticfiles",\n    "tasks",\n    "django_celery_results",')
                        + textwrap.dedent(f'''
        ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
        EMAIL_BACKEND = "mxq.contrib.django.EmailBackend"
        MXQ_REDIS_URL = {srv.url!r}              # only here: the environment has none
        MXQ_WEBHOOK_SECRET = {SECRET!r}
        CELERY_BROKER_URL = {srv.url!r}          # the project's own Celery: the same Redis database
        CELERY_RESULT_BACKEND = "django-db"
        EVENTS_FILE = {str(events_file)!r}
    '''))
    assert "'tasks'" in settings.read_text() or '"tasks"' in settings.read_text()
    urls = proj / "proj" / "urls.py"
    urls.write_text(urls.read_text().replace("from django.urls import path", "from django.urls import include, path")
                    .replace("urlpatterns = [", 'urlpatterns = [\n    path("mxq/", include("mxq.contrib.django.urls")),'))
    r = subprocess.run([PY, "manage.py", "migrate", "-v", "0"], cwd=proj, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr

    hook = f"http://127.0.0.1:{port}/mxq/events/"
    procs.start("web", [PY, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], env, proj)
    # mxq's own processes, started in the project directory: its outcomes go to django-celery-results.
    mxq_env = dict(env, MXQ_REDIS_URL=srv.url, MXQ_WEBHOOK_URL=hook, MXQ_WEBHOOK_SECRET=SECRET,
                   MXQ_RESULT_BACKEND="django-db", DJANGO_SETTINGS_MODULE="proj.settings")
    procs.start("mxq-worker", [MXQ, "worker", "--pool", "solo"], mxq_env, proj)
    procs.start("mxq-scheduler", [MXQ, "scheduler"], mxq_env, proj)
    procs.start("user-worker", [PY, "-m", "celery", "-A", "proj", "worker", "--pool", "solo", "-n", "user@%h",
                                "-l", "INFO", "--without-gossip", "--without-mingle"], env, proj)
    procs.wait_log("mxq-worker", "ready.")
    procs.wait_log("user-worker", "ready.")
    procs.wait_log("mxq-scheduler", "mxq scheduler ready")
    procs.wait_log("web", "Quit the server with")

    marker = tmp_path / "marker.txt"
    (proj / "send.py").write_text(DJ_SEND)
    r = subprocess.run([PY, "manage.py", "shell", "-c", f"import sys; sys.argv = ['send', {str(marker)!r}]; "
                        "exec(open('send.py').read())"], cwd=proj, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["sent"] == 1 and out["current_app"] == "proj"
    assert out["inside"] is False and out["after_commit"] is True and out["rolled_back_stored"] is False, out
    job = out["job"]

    # The project's task ran on the project's worker; mxq's worker never saw it.
    wait_until(lambda: marker.exists() and marker.read_text() == "ran\n", 30, "the project's task to run")
    # The mail went through mxq: delivered once, the other recipient bounced.
    wait_until(lambda: [m for m in sink.messages if b"Body of the project mail." in m.content], 30, "the mail")
    wait_until(lambda: len(events(events_file)) >= 3, 30, "the tracking signal for every recipient event")
    assert [m.rcpt_tos for m in sink.messages if b"Body of the project mail." in m.content] == \
        [["ann@to.projects.test"]]
    procs.check()
    for name in ("mxq-worker", "user-worker"):
        assert "unregistered task" not in procs.log(name).lower(), procs.log(name)[-2000:]
    assert "tasks.record" not in procs.log("mxq-worker")
    assert "mxq.deliver" not in procs.log("user-worker")

    # One signal per recipient event (ann delivered, reject.me bounced, cat delivered), signed.
    got = sorted((e["recipient"], e["type"]) for e in events(events_file) if e["job"] in (job, out["commit_job"]))
    assert got == [("ann@to.projects.test", "delivered"), ("cat@to.projects.test", "delivered"),
                   ("reject.me@to.projects.test", "bounced")], events(events_file)
    bounced = [e for e in events(events_file) if e["type"] == "bounced"][0]
    assert bounced["response"].startswith("550 5.1.1")
    # A wrong signature is refused and sends nothing (the answer comes after the signal would have run).
    assert forged(hook, "mallory@to.projects.test") == 403
    assert not [e for e in events(events_file) if e["recipient"] == "mallory@to.projects.test"]

    # The outcome in django-celery-results (what Django's admin lists).
    (proj / "result.py").write_text(DJ_RESULT)

    def stored():
        q = subprocess.run([PY, "manage.py", "shell", "-c", f"import sys; sys.argv = ['r', {job!r}]; "
                            "exec(open('result.py').read())"], cwd=proj, env=env, capture_output=True, text=True,
                           timeout=60)
        return json.loads(q.stdout.splitlines()[-1]) if q.returncode == 0 and q.stdout.strip() else None
    res = wait_until(stored, 30, "the job's outcome in django-celery-results", interval=0.5)
    assert res["status"] == "SUCCESS"
    states = {x["address"]: x["state"] for x in res["result"]["recipients"]}
    assert states == {"ann@to.projects.test": "delivered", "reject.me@to.projects.test": "bounced"}


# ---------------------------------------------------------------- Flask
FL_TASKS = '''
import os
from celery import Celery

celery = Celery("tasks", broker=os.environ["USER_BROKER"])

@celery.task(name="tasks.add")
def add(x, y):
    with open(os.environ["MARKER"], "a") as f:
        f.write(f"{x + y}\\n")
    return x + y
'''

FL_APP = '''
import json, os
from email.message import EmailMessage
from flask import Flask, jsonify
from mxq.contrib.flask import Mxq, tracking, webhook_blueprint
from tasks import add

app = Flask(__name__)
app.config["MXQ_REDIS_URL"] = os.environ["APP_REDIS"]
app.config["MXQ_WEBHOOK_SECRET"] = os.environ["APP_SECRET"]
mail = Mxq(app)
app.register_blueprint(webhook_blueprint, url_prefix="/mxq")


@tracking.connect
def on_event(sender, event, **extra):
    with open(os.environ["EVENTS_FILE"], "a") as f:
        f.write(json.dumps({"type": event.event_type, "recipient": event.recipient, "job": event.message_id}) + "\\n")


@app.post("/signup")
def signup():
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "hello@site.projects.test", "flask-ann@to.projects.test", "Welcome"
    m.set_content("Welcome from the Flask project.")
    job = mail.send(m)
    add.delay(2, 3)
    return jsonify(job=job)
'''


def test_a_flask_project_with_a_top_level_tasks_module(tmp_path, procs, sink, redis_server):
    sink.clear()
    srv = redis_server()
    proj = tmp_path / "flaskapp"
    proj.mkdir()
    (proj / "tasks.py").write_text(FL_TASKS)
    (proj / "app.py").write_text(FL_APP)
    port = free_port()
    marker, events_file = tmp_path / "marker.txt", tmp_path / "events.jsonl"
    hook = f"http://127.0.0.1:{port}/mxq/events/"
    env = base_env(USER_BROKER=srv.url, MARKER=str(marker), EVENTS_FILE=str(events_file), APP_REDIS=srv.url,
                   APP_SECRET=SECRET)
    procs.start("web", [PY, "-m", "flask", "--app", "app", "run", "--port", str(port), "--no-reload"], env, proj)
    # mxq worker from the project's directory, where `tasks` is the project's module.
    mxq_env = dict(env, MXQ_REDIS_URL=srv.url, MXQ_WEBHOOK_URL=hook, MXQ_WEBHOOK_SECRET=SECRET)
    procs.start("mxq-worker", [MXQ, "worker", "--pool", "solo"], mxq_env, proj)
    procs.start("mxq-scheduler", [MXQ, "scheduler"], mxq_env, proj)
    procs.start("user-worker", [PY, "-m", "celery", "-A", "tasks", "worker", "--pool", "solo", "-n", "user@%h",
                                "-l", "INFO", "--without-gossip", "--without-mingle"], env, proj)
    procs.wait_log("mxq-worker", "ready.")
    procs.wait_log("user-worker", "ready.")
    procs.wait_log("web", "Running on")
    banner = procs.log("mxq-worker")
    assert "mxq.deliver" in banner and "tasks.add" not in banner, banner[:3000]     # mxq's app, not tasks.py

    def signup():
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/signup", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except OSError:
            return None
    job = wait_until(signup, 30, "the Flask app to answer /signup", interval=0.3)["job"]
    wait_until(lambda: marker.exists() and marker.read_text() == "5\n", 30, "the project's task to run")
    wait_until(lambda: [m for m in sink.messages if b"Welcome from the Flask project." in m.content], 30, "the mail")
    wait_until(lambda: events(events_file), 30, "the tracking signal")
    assert [(e["recipient"], e["type"], e["job"]) for e in events(events_file)] == [
        ("flask-ann@to.projects.test", "delivered", job)]
    assert forged(hook, "mallory@to.projects.test") == 403
    procs.check()
    assert "unregistered task" not in (procs.log("mxq-worker") + procs.log("user-worker")).lower()
    assert [e["recipient"] for e in events(events_file)] == ["flask-ann@to.projects.test"]

"""The Flask extension (mxq.contrib.flask.Mxq) in a real Flask app whose views send mail, against
the real pipeline: redis-server, a ``celery worker`` process, the sandbox DNS server and an SMTP
server receiving the mail.  Requests go through ``app.test_client()``.

Names: recipients in ``to.flask.test`` (exchange 127.0.5.10:25), senders in ``site.flask.test``.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from flask import Flask, jsonify, request

from mxq import tasks
from mxq.contrib.flask import Mxq
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

RCPT = "to.flask.test"
MX_IP = "127.0.5.10"
DEAD_REDIS = "redis://127.0.0.1:1/0"      # nothing listens there: using it would fail


@pytest.fixture(scope="module")
def sink(dns_server):
    dns_server.add({RCPT: {"MX": [[10, "mx.to.flask.test"]]}, "mx.to.flask.test": {"A": [MX_IP]}})
    server = start_server(MX_IP, 25, Behaviour(hostname="mx.to.flask.test"))
    yield server
    server.stop()


@pytest.fixture
def mx(sink):
    sink.clear()
    return sink


def welcome(to: str, name: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Site <hello@site.flask.test>"
    msg["To"] = to
    msg["Subject"] = f"Welcome, {name}"
    msg.set_content(f"Hello {name}, welcome aboard.\n")
    return msg


def make_app(redis_url: str, factory: bool = False) -> tuple[Flask, Mxq]:
    """A small application: POST /signup sends a welcome mail, POST /invite sends a batch."""
    app = Flask("mxq_flask_test")
    app.config.update(TESTING=True, MXQ_REDIS_URL=redis_url)
    if factory:
        mail = Mxq()
        mail.init_app(app)
    else:
        mail = Mxq(app)

    @app.post("/signup")
    def signup():
        msg = welcome(request.form["email"], request.form["name"])
        job = mail.send(msg)
        return jsonify(job=job, attr=msg.mxq_job_id)

    @app.post("/invite")
    def invite():
        msgs = [welcome(a, "friend") for a in request.form.getlist("email")]
        try:
            jobs = mail.send_many(msgs)
        except tasks.InvalidMessage as e:
            return jsonify(error=e.reason), 422
        return jsonify(jobs=jobs)

    @app.post("/quiet")
    def quiet():
        msgs = [welcome(a, "friend") for a in request.form.getlist("email")]
        return jsonify(jobs=mail.send_many(msgs, fail_silently=True))

    return app, mail


def stored_jobs(p) -> list:
    client = p.redis.client()
    try:
        return [k.decode().split(":")[-1] for k in client.keys("mxq:job:*")]
    finally:
        client.close()


def test_view_sends_mail_through_the_pipeline(pipeline, mx, monkeypatch):
    p = pipeline()
    p.worker()
    monkeypatch.setenv("MXQ_REDIS_URL", DEAD_REDIS)      # app.config must win over the environment
    app, _ = make_app(p.url)
    client = app.test_client()
    r = client.post("/signup", data={"email": f"Ann <ann@{RCPT}>", "name": "Ann"})
    assert r.status_code == 200
    job = r.get_json()["job"]
    assert job and r.get_json()["attr"] == job
    r = client.post("/invite", data={"email": [f"b{i}@{RCPT}" for i in range(3)]})
    assert r.status_code == 200 and len(r.get_json()["jobs"]) == 3

    monkeypatch.setenv("MXQ_REDIS_URL", p.url)
    ids = [job] + r.get_json()["jobs"]
    assert sorted(stored_jobs(p)) == sorted(ids)
    p.wait_done(ids, timeout=30)
    assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)
    (ann,) = [m for m in mx.messages if b"Hello Ann" in m.content]
    assert ann.mail_from == "hello@site.flask.test" and ann.rcpt_tos == [f"ann@{RCPT}"]
    parsed = email.message_from_bytes(ann.content, policy=email.policy.default)
    assert parsed["Subject"] == "Welcome, Ann" and parsed["Message-ID"] and parsed["Date"]
    assert sorted(r for m in mx.messages if b"Hello friend" in m.content for r in m.rcpt_tos) == \
        [f"b{i}@{RCPT}" for i in range(3)]


def test_invalid_message_in_a_batch_queues_nothing(pipeline, mx):
    p = pipeline()
    app, mail = make_app(p.url, factory=True)
    client = app.test_client()
    r = client.post("/invite", data={"email": [f"ok@{RCPT}", "broken@@address", f"ok2@{RCPT}"]})
    assert r.status_code == 422 and r.get_json()["error"].startswith("item 1: ")
    assert stored_jobs(p) == []
    r = client.post("/quiet", data={"email": [f"ok@{RCPT}", "broken@@address"]})
    assert r.status_code == 200 and r.get_json()["jobs"] == []
    assert stored_jobs(p) == []
    with app.app_context():
        no_rcpt = EmailMessage()
        no_rcpt["From"] = "a@site.flask.test"
        no_rcpt.set_content("x")
        with pytest.raises(tasks.InvalidMessage, match="no recipients"):
            mail.send(no_rcpt)
        assert mail.send(no_rcpt, fail_silently=True) is None
        # explicit envelope, bytes content (no attribute to carry the id: only returned)
        job = mail.send(b"From: a@site.flask.test\r\nSubject: raw\r\n\r\nraw\r\n", recipients=[f"raw@{RCPT}"])
    assert stored_jobs(p) == [job]
    assert app.extensions["mxq"] is mail


def test_outside_app_context_uses_the_bound_app(pipeline, monkeypatch):
    p = pipeline()
    monkeypatch.setenv("MXQ_REDIS_URL", DEAD_REDIS)
    app, mail = make_app(p.url)
    job = mail.send(welcome(f"c@{RCPT}", "C"))          # no app context: Mxq(app)'s config
    assert stored_jobs(p) == [job]
    # mxq.tasks.status() in the app's context reads app.config's Redis too (the environment's is dead)
    with app.app_context():
        from mxq import settings as registry
        assert registry.current().origin("MXQ_REDIS_URL") == "Flask app.config"
        assert tasks.status(job)["recipients"][0]["address"] == f"c@{RCPT}"
    with pytest.raises(RuntimeError, match="not initialised"):
        Mxq().send(welcome(f"c@{RCPT}", "C"))


def test_malformed_setting_fails_at_init(monkeypatch):
    app = Flask("bad")
    app.config["MXQ_RETRY_SCHEDULE"] = "soon"
    with pytest.raises(ValueError, match="MXQ_RETRY_SCHEDULE"):
        Mxq(app)

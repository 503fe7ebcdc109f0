"""The tracking receivers: ``mxq.contrib.tracking_event`` (pure), Django's view and Flask's blueprint
in process (Django's RequestFactory, Flask's test client).  The whole path -- a real worker POSTing
to a real project's server -- is in tests/test_projects.py.
"""

from __future__ import annotations

import json
import time

import django
import pytest
from django.conf import settings

from mxq.contrib import Refused, TrackingEvent, tracking_event
from mxq.tasks.webhooks import sign

if not settings.configured:      # the same settings as tests/test_django.py (one configuration per process)
    settings.configure(
        EMAIL_BACKEND="mxq.contrib.django.EmailBackend",
        DEFAULT_FROM_EMAIL="Web Site <webmaster@site.django.test>",
        SERVER_EMAIL="server@site.django.test",
        ADMINS=[("Ops", "ops@to.django.test")],
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()

from django.test import RequestFactory  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

SECRET = "tracking-secret"
BODY = {"id": "a" * 32, "job": "b" * 32, "recipient": "ann@x.test", "domain": "x.test", "state": "bounced",
        "code": 550, "enhanced": "5.1.1", "text": "no such user", "exchange": "mx.x.test", "ip": "192.0.2.1",
        "relay": False, "attempts": 2, "next_attempt": None, "timestamp": 1767225600.25}


def signed(body: dict, secret: str = SECRET, ts: int | None = None) -> tuple[bytes, dict]:
    raw = json.dumps(body).encode()
    ts = int(time.time()) if ts is None else ts
    return raw, {"X-Mxq-Timestamp": str(ts), "X-Mxq-Signature": "sha256=" + sign(secret, ts, raw),
                 "Content-Type": "application/json"}


def test_a_valid_event_and_every_way_to_be_refused():
    raw, headers = signed(BODY)
    ev = tracking_event(raw, headers, secret=SECRET)
    assert isinstance(ev, TrackingEvent)
    assert (ev.event_type, ev.recipient, ev.message_id, ev.event_id, ev.attempts) == (
        "bounced", "ann@x.test", "b" * 32, "a" * 32, 2)
    assert ev.mta_response == "550 5.1.1 no such user" and ev.description == "bounced: 550 5.1.1 no such user [mx.x.test]"
    assert ev.timestamp.isoformat() == "2026-01-01T00:00:00.250000+00:00" and ev.esp_event == BODY
    cases = [(raw, headers, "wrong", 403),                                   # another secret
             (raw, headers, "", 403),                                        # no secret set: refuse everything
             (raw + b" ", headers, SECRET, 403),                             # body changed after signing
             (*signed(BODY, ts=int(time.time()) - 3600), SECRET, 403),       # replayed an hour later
             (raw, {"X-Mxq-Timestamp": headers["X-Mxq-Timestamp"]}, SECRET, 403),   # unsigned
             (*signed({"hello": 1}), SECRET, 400)]                           # signed, but not an event
    for body, hdrs, secret, status in cases:
        with pytest.raises(Refused) as e:
            tracking_event(body, hdrs, secret=secret)
        assert e.value.status == status, (hdrs, secret, e.value.reason)


def test_django_view_sends_the_signal_once_per_event():
    from mxq.contrib.django.signals import tracking
    from mxq.contrib.django.views import tracking_webhook

    got = []

    def receiver(sender, event, **kw):
        got.append(event)
    tracking.connect(receiver)
    rf = RequestFactory()

    def request(raw, headers):
        meta = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items() if k != "Content-Type"}
        return tracking_webhook(rf.post("/mxq/events/", data=raw, content_type="application/json", **meta))
    try:
        with override_settings(MXQ_WEBHOOK_SECRET=SECRET):
            raw, headers = signed(BODY)
            assert request(raw, headers).status_code == 200
            assert request(*signed(BODY)).status_code == 200          # the same event POSTed again
            assert [e.event_id for e in got] == ["a" * 32]
            assert request(*signed(dict(BODY, id="c" * 32, state="delivered"))).status_code == 200
            assert [e.event_type for e in got] == ["bounced", "delivered"]
            assert request(*signed(dict(BODY, id="d" * 32), secret="wrong")).status_code == 403
            assert tracking_webhook(rf.get("/mxq/events/")).status_code == 405
        assert request(*signed(dict(BODY, id="e" * 32))).status_code == 403    # no secret in settings
        assert len(got) == 2
    finally:
        tracking.disconnect(receiver)


def test_flask_blueprint_sends_the_blinker_signal_once_per_event():
    from flask import Flask

    from mxq.contrib.flask import Mxq, tracking, webhook_blueprint

    app = Flask("tracking_test")
    app.config.update(MXQ_WEBHOOK_SECRET=SECRET, MXQ_REDIS_URL="redis://127.0.0.1:1/0")
    Mxq(app)
    app.register_blueprint(webhook_blueprint, url_prefix="/mxq")
    got = []

    def receiver(sender, event, **kw):
        got.append((sender, event))
    tracking.connect(receiver)
    try:
        client = app.test_client()
        raw, headers = signed(dict(BODY, id="f" * 32))
        assert client.post("/mxq/events/", data=raw, headers=headers).status_code == 200
        assert client.post("/mxq/events/", data=raw, headers=headers).status_code == 200     # again: no signal
        assert client.post("/mxq/events/", data=raw, headers=dict(headers, **{"X-Mxq-Signature": "sha256=00"})
                           ).status_code == 403
        assert client.get("/mxq/events/").status_code == 405
        assert [(s is app, e.event_id) for s, e in got] == [(True, "f" * 32)]
    finally:
        tracking.disconnect(receiver)

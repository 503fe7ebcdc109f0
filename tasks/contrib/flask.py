"""Flask integration: ``Mxq(app)`` queues mail in mxq's pipeline from views.

::

    from email.message import EmailMessage
    from flask import Flask
    from mxq.contrib.flask import Mxq

    app = Flask(__name__)
    app.config["MXQ_REDIS_URL"] = "redis://127.0.0.1:6379/0"   # else the environment variable
    mail = Mxq(app)            # or mail = Mxq(); mail.init_app(app) in an app factory

    @app.post("/signup")
    def signup():
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "hello@example.test", "ann@example.test", "Welcome"
        msg.set_content("Welcome aboard.")
        job = mail.send(msg)       # the job id, also on msg.mxq_job_id
        return {"job": job}

Messages are ``email.message.EmailMessage`` objects (or bytes / str message
text); the envelope comes from the headers (sender: ``Sender`` else
``From``; recipients: ``To``, ``Cc`` and ``Bcc``; Bcc is stripped from the
content) unless ``sender=`` / ``recipients=`` are given.  Configuration:
every ``MXQ_*`` variable of ``mxq.tasks.settings`` may be set in ``app.config``,
which wins over the environment (see ``mxq.contrib``); the application in
the current app context is used, else the one given to ``Mxq(app)``.

``send_many(messages)`` is all or nothing: every message is validated before
any is stored.  An invalid message raises ``mxq.tasks.InvalidMessage`` (nothing
queued); ``fail_silently=True`` returns None (``send``) or ``[]``
(``send_many``) instead, as it does when Redis is unreachable (given up
after ``MXQ_SUBMIT_TIMEOUT``, 2 s; ``mxq.tasks.Unavailable`` otherwise).

Delivery events: register the blueprint and connect to the blinker signal::

    from mxq.contrib.flask import tracking, webhook_blueprint
    app.register_blueprint(webhook_blueprint, url_prefix="/mxq")    # POST /mxq/events/

    @tracking.connect
    def on_event(app, event, **extra):        # event: mxq.contrib.TrackingEvent
        ...

mxq's workers POST there with ``MXQ_WEBHOOK_URL=https://app.example.com/mxq/events/``; the
view checks the signature with the app's ``MXQ_WEBHOOK_SECRET`` (403 and no signal when it
does not match or no secret is set), sends ``tracking`` once per event (``sender`` the app),
and answers 200.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

from . import config_from, submit_all

__all__ = ["Mxq", "tracking", "webhook_blueprint"]


class Mxq:
    """The mxq extension for a Flask application (``app.extensions["mxq"]``)."""

    def __init__(self, app=None):
        self.app = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app) -> None:
        """Register with ``app``; its ``app.config`` ``MXQ_*`` keys configure mxq (checked here)."""
        if self.app is None:
            self.app = app
        app.extensions["mxq"] = self
        from mxq.tasks.settings import PipelineSettings
        PipelineSettings.from_env(config_from(app.config))   # a malformed MXQ_* value fails at start

    def _context(self):
        """The app context to submit in: the current one, else one of the app given to ``Mxq``."""
        from flask import has_app_context

        if has_app_context():
            return contextlib.nullcontext()
        if self.app is None:
            raise RuntimeError("Mxq is not initialised: call Mxq(app) or init_app(app), or send in an app context")
        return self.app.app_context()

    def send(self, message, *, sender: str | None = None, recipients: Sequence[str] | None = None,
             fail_silently: bool = False) -> str | None:
        """Queue one message; return its job id (also set as ``message.mxq_job_id`` when possible)."""
        from mxq import tasks

        ids = self._submit([message], [tasks.Item(message, sender=sender, recipients=recipients)], fail_silently)
        return ids[0] if ids else None

    def send_many(self, messages: Iterable, *, fail_silently: bool = False) -> list[str]:
        """Queue several messages in one all-or-nothing batch; return their job ids in order.

        Each is a message or a ``mxq.tasks.Item`` (for its own sender, recipients, dsn, ...).
        """
        messages = list(messages)
        return self._submit(messages, messages, fail_silently) or []

    def _submit(self, messages: list, items: list, fail_silently: bool) -> list[str] | None:
        from mxq import tasks

        with self._context():         # in this app's context the registry reads its config (mxq.settings)
            ids = submit_all(items, fail_silently=fail_silently)
        if ids:
            for m, job in zip(messages, ids):
                if isinstance(m, tasks.Item):
                    m = m.message
                try:
                    m.mxq_job_id = job
                except AttributeError:   # bytes and str messages cannot carry it
                    pass
        return ids


# ---------------------------------------------------------------- tracking: blueprint and blinker signal
def _make_blueprint():
    from blinker import Namespace
    from flask import Blueprint, current_app, request

    from . import Refused, tracking_event

    signals = Namespace()
    signal = signals.signal("mxq-tracking", doc="one mxq recipient event (event=mxq.contrib.TrackingEvent)")
    bp = Blueprint("mxq", __name__)
    seen: dict[str, None] = {}              # recent event ids (this process): a re-POSTed event is not sent twice

    @bp.post("/events/")
    def events():
        app = current_app._get_current_object()
        secret = app.config.get("MXQ_WEBHOOK_SECRET")
        if secret is None:
            from mxq import settings as registry
            secret = registry.value("MXQ_WEBHOOK_SECRET")
        try:
            event = tracking_event(request.get_data(), request.headers, secret=secret or "")
        except Refused as e:
            app.logger.warning("mxq webhook refused (%d): %s", e.status, e.reason)
            return e.reason, e.status, {"Content-Type": "text/plain"}
        if event.event_id in seen:
            return "duplicate event, already handled", 200, {"Content-Type": "text/plain"}
        signal.send(app, event=event)
        seen[event.event_id] = None
        while len(seen) > 10000:
            seen.pop(next(iter(seen)))
        return "ok", 200, {"Content-Type": "text/plain"}

    return bp, signal


#: The blueprint with ``POST /events/`` (register it with ``url_prefix="/mxq"``) and the blinker
#: signal ``tracking`` it sends: ``sender`` the app, ``event`` a ``mxq.contrib.TrackingEvent``.
webhook_blueprint, tracking = _make_blueprint()

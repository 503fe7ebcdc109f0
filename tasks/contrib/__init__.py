"""Framework integrations: ``mxq.contrib.django`` (an ``EMAIL_BACKEND``) and ``mxq.contrib.flask`` (``Mxq``).

Both hand mail to mxq's pipeline and share what is here: Flask's ``send_many``
with ``mxq.tasks.submit_many`` (validate every message first, then store the
whole batch: all or nothing), Django's ``send_messages`` message by message as
Django's own backends send (in parts, see ``mxq.contrib.django``).

Configuration: the settings registry (``mxq.settings``) reads the
framework's ``MXQ_*`` values itself -- Django's settings as soon as they are
configured, the Flask app's ``app.config`` once ``Mxq`` is registered -- and
they win over the environment for every setting in this process, including
``mxq.tasks.status()`` and what the Celery app connects to.  Values may be
strings, numbers, booleans or (for ``MXQ_RETRY_SCHEDULE``) a list of seconds.

Limits: the Celery app is one per process, so one process sends to one
Redis at a time (a second configuration with another ``MXQ_REDIS_URL``
re-points it: fine for tests, not for two apps serving requests at once).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, Mapping

from mxq import settings as registry
from mxq.workers.errors import InvalidInput

log = logging.getLogger("mxq.contrib")

_bind_lock = threading.Lock()


def config_from(source: Mapping[str, object] | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``MXQ_*`` values that are set -- the environment, overridden by ``source``'s ``MXQ_*``
    entries -- as environment text (lists become comma lists; None and "" are unset)."""
    env = os.environ if env is None else env
    layers = [("environment", env), ("framework", source or {})]
    return registry.Config(layers).env()


def pipeline_settings(config: Mapping[str, str] | None = None):
    """``PipelineSettings`` (of ``config`` alone, else this process's registry), with this
    process's Celery app pointed at its Redis."""
    from mxq.tasks.app import bind
    from mxq.tasks.settings import PipelineSettings

    s = PipelineSettings.from_env(config)
    with _bind_lock:
        bind(s)
    return s


def submit_all(items: Iterable, config: Mapping[str, str] | None = None, *,
               fail_silently: bool = False, later=None) -> list[str] | None:
    """``mxq.tasks.submit_many(items)`` (settings: ``config``, else the registry's); None instead of
    an error when ``fail_silently``.

    All or nothing: an invalid item raises ``mxq.tasks.InvalidMessage`` (its
    ``reason`` names the item) before anything is stored.  With
    ``fail_silently`` that error, and Redis being unreachable, are logged
    (logger ``mxq.contrib``) and None is returned; a malformed ``MXQ_*``
    setting raises ``ValueError`` either way.
    """
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    from mxq.tasks.producer import prepare_many, store_prepared, submit_many

    settings = pipeline_settings(config)     # a bad MXQ_* setting raises ValueError, silent or not
    try:
        if later is None:       # validated and stored in one go (a large batch: staged as it is checked)
            return submit_many(items, settings=settings)
        jobs = prepare_many(list(items))
    except InvalidInput as e:
        if not fail_silently:
            raise
        log.warning("mail not submitted (fail_silently): %s", e.reason)
        return None
    except (RedisError, OperationalError) as e:
        if not fail_silently:
            raise
        log.warning("mail not submitted (fail_silently): %s", e)
        return None

    def store():
        try:
            return store_prepared(jobs, settings=settings)
        except (RedisError, OperationalError) as e:
            if not fail_silently:
                raise
            log.warning("mail not submitted (fail_silently): %s", e)
            return None

    later(store)                # e.g. Django's transaction.on_commit (MXQ_ON_COMMIT): ids known now
    return [j.id for j in jobs]


# ---------------------------------------------------------------- tracking (mxq's signed webhooks)
import dataclasses  # noqa: E402
import datetime  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TrackingEvent:
    """One recipient event from mxq's webhook (``mxq.tasks.webhooks``), as a receiver sees it.

    Named after django-anymail's ``AnymailTrackingEvent`` where they mean the same: ``event_type``
    (the recipient's new state: ``delivered``, ``bounced``, ``deferred``, ``expired``,
    ``suppressed``, ``dropped``), ``timestamp`` (an aware datetime), ``event_id`` (stable across
    retries of the POST), ``message_id`` (the mxq job id: ``message.mxq_job_id``),
    ``recipient``, ``mta_response`` (the server's reply: code, enhanced status, text) and
    ``description``; plus mxq's own fields and the decoded body as ``esp_event``.
    """

    event_type: str
    timestamp: datetime.datetime | None
    event_id: str
    message_id: str
    recipient: str
    domain: str | None
    code: int | None
    enhanced: str | None
    text: str
    exchange: str | None
    ip: str | None
    relay: bool
    attempts: int
    next_attempt: datetime.datetime | None
    esp_event: dict

    @property
    def mta_response(self) -> str:
        """``550 5.1.1 text``, as the receiving server said it."""
        return " ".join(str(x) for x in (self.code, self.enhanced, self.text) if x)

    @property
    def description(self) -> str:
        """A line for people: ``bounced: 550 5.1.1 ... [mx.example.com]``."""
        where = f" [{self.exchange}]" if self.exchange else ""
        return f"{self.event_type}: {self.mta_response}{where}".strip()


class Refused(Exception):
    """The request is not a valid signed mxq event: ``status`` (400 or 403) and why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _when(value) -> datetime.datetime | None:
    if value in (None, ""):
        return None
    try:
        return datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc)
    except (TypeError, ValueError, OverflowError):
        return None


def tracking_event(body: bytes, headers: Mapping[str, str], *, secret: str | None = None,
                   now: float | None = None) -> TrackingEvent:
    """Check one webhook request and return its event; ``Refused`` when it is not a valid one.

    ``secret``: ``MXQ_WEBHOOK_SECRET`` (default: this process's setting, ``mxq.settings``).
    Without a secret nothing is accepted: an unsigned endpoint would take events from anyone.
    The signature and the timestamp (at most 300 s off) are checked with
    ``mxq.tasks.webhooks.verify``.
    """
    import json

    from mxq.tasks.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

    if secret is None:
        secret = registry.value("MXQ_WEBHOOK_SECRET")
    if not secret:
        raise Refused(403, "MXQ_WEBHOOK_SECRET is not set in this process: unsigned events are refused")
    lower = {k.lower(): v for k, v in headers.items()}
    if not verify(secret, body, lower.get(TIMESTAMP_HEADER.lower()), lower.get(SIGNATURE_HEADER.lower()), now=now):
        raise Refused(403, "bad or missing X-Mxq-Signature, or X-Mxq-Timestamp too far off")
    try:
        ev = json.loads(body)
        if not isinstance(ev, dict) or not ev.get("id") or not ev.get("state"):
            raise ValueError("not an mxq event")
        return TrackingEvent(
            event_type=str(ev["state"]), timestamp=_when(ev.get("timestamp")), event_id=str(ev["id"]),
            message_id=str(ev.get("job") or ""), recipient=str(ev.get("recipient") or ""),
            domain=ev.get("domain"), code=ev.get("code"), enhanced=ev.get("enhanced"), text=ev.get("text") or "",
            exchange=ev.get("exchange"), ip=ev.get("ip"), relay=bool(ev.get("relay")),
            attempts=int(ev.get("attempts") or 0), next_attempt=_when(ev.get("next_attempt")), esp_event=ev)
    except (ValueError, TypeError) as e:
        raise Refused(400, f"not an mxq event: {e}") from None

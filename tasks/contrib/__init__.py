"""Framework integrations: ``mxq.contrib.django`` (an ``EMAIL_BACKEND``) and ``mxq.contrib.flask`` (``Mxq``).

Both hand mail to mxq's pipeline with ``mxq.tasks.submit_many`` (validate every
message first, then store the whole batch with one Redis script: all or
nothing) and share what is here: reading ``MXQ_*`` settings from the
framework's configuration with the environment as fallback, and pointing
this process's Celery app at the configured Redis.

Configuration precedence, per variable: the framework's setting
(``settings.MXQ_REDIS_URL`` in Django, ``app.config["MXQ_REDIS_URL"]`` in
Flask), else the environment variable of the same name, else mxq's default
(see ``mxq.tasks.settings``).  Values may be strings, numbers or (for
``MXQ_RETRY_SCHEDULE``) a list of seconds.

Limits: the Celery app is one per process, so one process sends to one
Redis at a time (a second configuration with another ``MXQ_REDIS_URL``
re-points it: fine for tests, not for two apps serving requests at once).
``MXQ_MAX_MESSAGE_SIZE`` is read from the environment only (the producer
reads it there).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, Mapping

from mxq.workers.errors import InvalidInput

log = logging.getLogger("mxq.contrib")

_bind_lock = threading.Lock()


def _as_env_value(value) -> str:
    """A setting's value as the environment would spell it (lists become comma lists)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def config_from(source: Mapping[str, object] | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``MXQ_*`` configuration: the environment, overridden by ``source``'s ``MXQ_*`` entries.

    ``source`` is any mapping (Flask's ``app.config``, or the dict
    ``mxq.contrib.django`` builds from Django's settings); entries whose
    value is None are ignored, so a framework default of None falls back to
    the environment.
    """
    env = os.environ if env is None else env
    merged = {k: v for k, v in env.items() if k.startswith("MXQ_")}
    for k, v in (source or {}).items():
        if isinstance(k, str) and k.startswith("MXQ_") and v is not None:
            merged[k] = _as_env_value(v)
    return merged


def pipeline_settings(config: Mapping[str, str]):
    """``PipelineSettings`` for ``config``, with this process's Celery app pointed at its Redis."""
    from mxq.tasks.app import app, rebind
    from mxq.tasks.settings import PipelineSettings

    s = PipelineSettings.from_env(config)
    if app.conf.broker_url != s.redis_url:
        with _bind_lock:
            if app.conf.broker_url != s.redis_url:
                rebind(s.redis_url)
    return s


def submit_all(items: Iterable, config: Mapping[str, str], *, fail_silently: bool = False) -> list[str] | None:
    """``mxq.tasks.submit_many(items)`` with ``config``; None instead of an error when ``fail_silently``.

    All or nothing: an invalid item raises ``mxq.tasks.InvalidMessage`` (its
    ``reason`` names the item) before anything is stored.  With
    ``fail_silently`` that error, and Redis being unreachable, are logged
    (logger ``mxq.contrib``) and None is returned; a malformed ``MXQ_*``
    setting raises ``ValueError`` either way.
    """
    from mxq import tasks
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    settings = pipeline_settings(config)     # a bad MXQ_* setting raises ValueError, silent or not
    try:
        return tasks.submit_many(list(items), settings=settings)
    except (InvalidInput, RedisError, OperationalError) as e:
        if not fail_silently:
            raise
        log.warning("mail not submitted (fail_silently): %s", getattr(e, "reason", e))
        return None

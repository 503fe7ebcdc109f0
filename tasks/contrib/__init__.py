"""Framework integrations: ``mxq.contrib.django`` (an ``EMAIL_BACKEND``) and ``mxq.contrib.flask`` (``Mxq``).

Both hand mail to mxq's pipeline with ``mxq.tasks.submit_many`` (validate every
message first, then store the whole batch with one Redis script: all or
nothing) and share what is here.

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
               fail_silently: bool = False) -> list[str] | None:
    """``mxq.tasks.submit_many(items)`` (settings: ``config``, else the registry's); None instead of
    an error when ``fail_silently``.

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

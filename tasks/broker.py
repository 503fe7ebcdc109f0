"""The worker's broker transport: kombu's Redis transport, kept alive when Redis is full.

Contract: a worker process goes on running while Redis refuses writes at ``maxmemory``
(noeviction), and every task message it has taken off a queue is run.

Why: Celery's consumer takes a task message off its queue with BRPOP (which Redis allows
when full), then records it in the transport's unacked index (ZADD + HSET in MULTI/EXEC).
When Redis is full that write is refused, and the refusal (``OutOfMemoryError``, a
``ResponseError``: not one of the connection errors Celery recovers from) ended the worker
process ("Unrecoverable error: OutOfMemoryError") with the message already popped.  Redis 7
also refuses every command queued in MULTI when full, the acknowledgement's ZREM + HDEL
included, although both are allowed on their own.

Here (``QoS``):

- a message that cannot be recorded in the unacked index is kept in this process only
  and its task runs.  If the process dies before the task ends, the message is not
  restored, and nothing is lost: mxq's tasks name a lane (or the jobs to split), the work
  is in mxq's own state, and the scheduler re-dispatches lanes and intakes nobody worked
  on for ``MXQ_DISPATCH_STALE`` (``mxq.tasks.store``'s tick);
- an acknowledgement refused in MULTI is done again without the transaction.

The worker logs "Redis is full" and counts ``mxq_redis_full_total`` either way.
Importing this module (the task graph does, so every worker does) makes
``mxq.tasks.app.MxqCelery.connection_for_read`` use this transport for ``redis://`` and
``rediss://`` brokers (what the worker consumes through); publishing is unchanged.
"""

from __future__ import annotations

import logging
import ssl as _ssl
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from . import metrics
from .app import MxqCelery

log = logging.getLogger("mxq.tasks.broker")


def is_full(e: BaseException | None) -> bool:
    """Whether ``e`` (or what it was raised from) is Redis refusing a write at maxmemory."""
    import redis

    seen = 0
    while e is not None and seen < 5:          # kombu wraps the broker's errors in its own
        if isinstance(e, redis.exceptions.OutOfMemoryError) or "used memory > 'maxmemory'" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def say_full(what: str) -> None:
    """Say (log and metrics) that Redis is full and what this worker does about it."""
    logging.getLogger("mxq.tasks").warning(
        "Redis is full (maxmemory reached, writes refused): %s; claiming no new work until memory frees, "
        "work in hand is released", what)
    metrics.redis_full()


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS whose bookkeeping writes never end the worker when Redis is full."""

    def append(self, message, delivery_tag):
        try:
            super().append(message, delivery_tag)
        except Exception as e:
            if not is_full(e):
                raise
            log.warning("Redis is full (maxmemory reached, writes refused): task message %s kept in this "
                        "process only (not in the broker's unacked index); it runs now", delivery_tag)
            metrics.redis_full()
            virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag):
        try:
            super().ack(delivery_tag)
        except Exception as e:
            if not is_full(e):
                raise
            # ZREM and HDEL are allowed when Redis is full; in MULTI (kombu's pipeline) they are not.
            with self.channel.conn_or_acquire() as client:
                (client.pipeline(transaction=False).zrem(self.unacked_index_key, delivery_tag)
                 .hdel(self.unacked_key, delivery_tag).execute())
            virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``QoS`` above."""

    Channel = Channel


def connection_options(url: str, use_ssl) -> dict:
    """The keyword arguments that make a Celery connection to ``url`` use ``Transport``.

    Empty for a broker that is not plain Redis (``redis://``, ``rediss://``).  For
    ``rediss://`` without TLS options, kombu's own default (no certificate check) is kept:
    kombu sets it only when the transport is named by the URL's scheme.
    """
    scheme = urlsplit(url or "").scheme
    if scheme not in ("redis", "rediss"):
        return {}
    kw: dict = {"transport": Transport}
    if scheme == "rediss" and not use_ssl and "ssl_" not in url:
        kw["ssl"] = {"ssl_cert_reqs": _ssl.CERT_NONE}
    return kw


MxqCelery.read_options = staticmethod(connection_options)

"""The exchanges' failure memory in Redis, shared by every worker.

Implements the engine's ``mxq.workers.delivery.HostStatus`` protocol: an
exchange that timed out or refused is marked down with ``SET EX`` (the key
expires by itself when the time is up), and every worker skips it meanwhile
instead of each paying the connect timeout again.  Key:
``mxq:down:{ip}:{port}``, value: the reason (never a credential: reasons are
connection failures).
"""

from __future__ import annotations

import math

import redis

KEY = "mxq:down:{ip}:{port}"


class RedisHostStatus:
    """``HostStatus`` backed by Redis keys with a TTL.

    Redis being unreachable must not stop delivery: ``is_down`` then answers
    False (try the exchange) and ``mark_down`` forgets, because the failure
    memory is an optimisation, not state anything depends on.
    """

    def __init__(self, client: redis.Redis):
        self.r = client

    def is_down(self, ip: str, port: int) -> bool:
        """True while the exchange at ``ip:port`` is marked down."""
        try:
            return bool(self.r.exists(KEY.format(ip=ip, port=port)))
        except redis.exceptions.RedisError:
            return False

    def mark_down(self, ip: str, port: int, seconds: float, reason: str = "") -> None:
        """Mark ``ip:port`` down for ``seconds`` (at least one second) with ``reason``."""
        try:
            self.r.set(KEY.format(ip=ip, port=port), (reason or "down")[:200],
                       ex=max(1, math.ceil(seconds)))
        except redis.exceptions.RedisError:
            pass

    def reason(self, ip: str, port: int) -> str | None:
        """Why ``ip:port`` is marked down, or None when it is not."""
        v = self.r.get(KEY.format(ip=ip, port=port))
        return v.decode("utf-8", "replace") if v is not None else None

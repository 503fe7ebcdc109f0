"""The webhook lane's sender slots: its script (``mxq.tasks.webhook_lane`` calls ``WebhookSlots``).

Part of the store layer; the key is ``mxq.tasks.store.keys.WEBHOOK_SENDERS``.
"""

from __future__ import annotations

from .keys import WEBHOOK_SENDERS

# ARGV: now, token, expiry, limit.  Takes (or renews) a sender slot; 1 when held.
_SLOT = r"""
local k, now, token, expiry, limit = KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
if redis.call('ZSCORE', k, token) or redis.call('ZCARD', k) < limit then
  redis.call('ZADD', k, expiry, token)
  redis.call('PEXPIRE', k, math.ceil((expiry - now) * 1000) + 1000)
  return 1
end
return 0
"""


class WebhookSlots:
    """At most ``limit`` webhook senders at once, fleet-wide (a zset of slot tokens -> expiry)."""

    def __init__(self, client):
        self._slot = client.register_script(_SLOT)

    def take(self, token: str, *, now: float, expiry: float, limit: int) -> bool:
        """Take (or renew) ``token``'s slot until ``expiry``; True when it holds one."""
        return self._slot(keys=[WEBHOOK_SENDERS], args=[now, token, expiry, limit]) == 1

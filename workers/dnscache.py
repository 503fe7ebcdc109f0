"""A TTL cache for DNS answers: in-process, optionally backed by Redis shared by all workers.

Read-through order: this process's cache, then Redis (when a client is
given), then DNS (the caller's job: on a miss it resolves and calls ``put``).

- Keys: ``(rtype, name)`` with ``name`` the lower-case A-label form without
  the trailing dot; in Redis ``mxq:dns:<rtype>:<name>`` holding JSON
  ``{"status": ..., "records": [...], "ttl": n}`` with ``EXPIRE`` = the TTL,
  so Redis itself forgets stale answers.  A Redis hit is copied into the
  process cache for the key's *remaining* lifetime (``PTTL``), never longer.
- TTLs: positive answers are kept for the record TTL clamped to
  ``[settings.dns_min_ttl, settings.dns_max_ttl]``.  Negative answers
  (NXDOMAIN, NODATA) are kept for the RFC 2308 negative TTL -- the smaller
  of the SOA record's TTL and its ``minimum`` -- clamped to
  ``[dns_min_ttl, dns_negative_ttl]``, or for ``dns_negative_ttl`` when the
  answer carried no SOA.  ``dns_negative_ttl`` is thus the ceiling for
  negative caching (like Unbound's ``cache-max-negative-ttl``).  A TTL of 0
  after clamping is not cached at all.
- Failures (SERVFAIL, timeouts) are NOT cached, not even briefly: they are
  transient by definition, the delivery that hit one is deferred and retried
  on the queue's schedule (minutes later), and the retry must ask DNS again
  rather than replay a stale failure.  Within one delivery batch the
  resolver asks once per name anyway (the pipeline groups a domain's
  messages), so there is no thundering herd worth trading correctness for.
- Redis errors never break resolution (an interrupt registered with
  ``mxq.workers.errors.register_interrupt`` is not an error: it goes through): the failing Redis call is skipped
  (the answer comes from DNS), the first failure of an outage is logged as a
  warning, and Redis is not tried again for ``redis_retry`` seconds, so a dead
  Redis costs one failed call per retry period rather than one per lookup.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import Settings
from .errors import reraise_interrupt

log = logging.getLogger("mxq.dns")

OK, NXDOMAIN, NODATA = "ok", "nxdomain", "nodata"
REDIS_PREFIX = "mxq:dns:"

# KEYS: the answer's key, a lock; ARGV: the lock's value, its life in ms.  {answer, its PTTL} when
# Redis has it; else {nil, 1} when the lock was free and is now taken, {nil, 0} when it is held.
_GET_OR_LOCK = """
local v = redis.call('GET', KEYS[1])
if v then
  local t = redis.call('PTTL', KEYS[1])
  if t > 0 then return {v, t} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
"""


#: Connections one ``quick_client`` opens at most.
QUICK_CONNECTIONS = 64


def quick_client(url: str, *, wait: float = 1.0, queue: float = 5.0, connections: int = QUICK_CONNECTIONS):
    """A redis-py client for state that is only an optimisation (this cache; in a worker also the
    exchanges' failure memory, MTA-STS policies, TLS-RPT counts, port 25's state): one try, ``wait``
    seconds at most to connect and for a reply, no retries, so Redis trouble never stalls a
    delivery for long (the callers carry on without the state).

    At most ``connections`` connections; a command waits up to ``queue`` seconds for one when all
    are busy (a local queue, not Redis trouble: a dead Redis's connections fail and come back at
    once).  redis-py's default pool opens 100 and then raises ``MaxConnectionsError`` at once: a
    gevent worker starting 100 new destinations took that for Redis being away, resolved without
    the shared cache for 30 s, and names were asked 2-5 times (the bench's backlog stage,
    2026-12-04).
    """
    import redis as redis_lib   # only when asked for: library users may not run Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis_lib.BlockingConnectionPool.from_url(url, max_connections=connections, timeout=queue,
                                                     socket_timeout=wait, socket_connect_timeout=wait,
                                                     retry=Retry(NoBackoff(), 0))
    return redis_lib.Redis(connection_pool=pool)


@dataclass(frozen=True)
class CachedAnswer:
    """One DNS answer as cached: ``status`` (ok | nxdomain | nodata), ``records``, ``ttl`` seconds.

    ``records`` is JSON-shaped: addresses as strings for A/AAAA,
    ``[preference, exchange]`` pairs for MX (exchange without the trailing
    dot, ``"."`` for a null MX).  ``negative_ttl`` is the RFC 2308 TTL the
    answer's SOA gave (None without an SOA); ``DNSCache.put`` uses it for
    negative answers.
    """

    status: str
    records: list = field(default_factory=list)
    ttl: int = 0
    negative_ttl: int | None = None

    @property
    def negative(self) -> bool:
        """NXDOMAIN or NODATA."""
        return self.status != OK

    def to_json(self) -> str:
        """The Redis value."""
        return json.dumps({"status": self.status, "records": self.records, "ttl": self.ttl})

    @classmethod
    def from_json(cls, value: str | bytes) -> "CachedAnswer":
        """Parse a Redis value (raises ValueError/KeyError/TypeError when malformed)."""
        d = json.loads(value)
        if d["status"] not in (OK, NXDOMAIN, NODATA) or not isinstance(d["records"], list):
            raise ValueError(f"malformed cached DNS answer: {value!r}")
        return cls(status=d["status"], records=d["records"], ttl=int(d["ttl"]))


class DNSCache:
    """Thread-safe TTL cache of ``CachedAnswer`` by ``(rtype, name)``; see the module docstring.

    ``redis``: a redis-py client shared by all workers (None: in-process only).
    ``clock``: monotonic seconds for the in-process expiry and the Redis
    back-off (injectable so tests can expire entries without sleeping).
    ``max_entries``: the in-process cache drops its least recently used entry
    beyond this size.
    """

    def __init__(self, settings: Settings | None = None, *, redis: Any = None,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000,
                 redis_retry: float = 30.0):
        self.settings = settings if settings is not None else Settings()
        self.redis = redis
        self.clock = clock
        self.max_entries = max_entries
        self.redis_retry = redis_retry
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[float, CachedAnswer]] = OrderedDict()
        self._redis_down_until: float | None = None   # None: Redis believed up
        self._get_or_lock = None                      # the script of get_or_lock, registered when first used
        self.stats = {"hits": 0, "redis_hits": 0, "misses": 0, "redis_errors": 0}

    # ----------------------------------------------------------------- TTLs

    def ttl_for(self, answer: CachedAnswer) -> int:
        """How long ``answer`` may be cached, per the clamping rules above."""
        s = self.settings
        if answer.negative:
            if answer.negative_ttl is None:
                return max(0, s.dns_negative_ttl)
            return max(0, min(max(answer.negative_ttl, s.dns_min_ttl), s.dns_negative_ttl))
        return max(0, min(max(answer.ttl, s.dns_min_ttl), s.dns_max_ttl))

    # ----------------------------------------------------------------- read

    def get(self, rtype: str, name: str) -> CachedAnswer | None:
        """The cached answer for ``(rtype, name)``, or None (a miss: ask DNS, then ``put``)."""
        hit = self.local(rtype, name)
        if hit is not None:
            return hit
        found = self._redis_get(rtype, name)
        if found is not None:
            return self._redis_hit(rtype, name, *found)
        with self._lock:
            self.stats["misses"] += 1
        return None

    def _redis_hit(self, rtype: str, name: str, answer: CachedAnswer, remaining: float) -> CachedAnswer:
        """An answer Redis had, kept in this process for its ``remaining`` seconds, and counted."""
        self._store((rtype, name), answer, remaining)
        with self._lock:
            self.stats["hits"] += 1
            self.stats["redis_hits"] += 1
        return answer

    def local(self, rtype: str, name: str) -> CachedAnswer | None:
        """The answer this process holds for ``(rtype, name)``, or None (Redis is not asked)."""
        key = (rtype, name)
        now = self.clock()
        with self._lock:
            item = self._entries.get(key)
            if item is not None:
                if item[0] > now:
                    self._entries.move_to_end(key)
                    self.stats["hits"] += 1
                    return item[1]
                del self._entries[key]
        return None

    def peek(self, rtype: str, name: str) -> bool:
        """Does this process hold an unexpired answer for ``(rtype, name)``?  (Nothing counted or moved.)"""
        with self._lock:
            item = self._entries.get((rtype, name))
            return item is not None and item[0] > self.clock()

    def get_or_lock(self, rtype: str, name: str, lock: str, owner: str, ms: int) -> tuple[CachedAnswer | None, bool]:
        """One round trip for a caller that resolves a name once across processes (a single flight):
        the answer from Redis when it is there (copied into this process), else take ``lock``
        (SET NX, ``ms`` milliseconds, value ``owner``) when nobody holds it.

        Returns ``(answer, False)``, ``(None, True)`` when the lock is the caller's (it resolves,
        and ``put(..., release=lock)`` lets go in the same round trip as the answer's write), or
        ``(None, False)`` when another holds it.  Raises what redis-py raises (Redis away or full:
        the caller resolves without it).
        """
        if self._get_or_lock is None:
            self._get_or_lock = self.redis.register_script(_GET_OR_LOCK)
        value, got = self._get_or_lock(keys=[self.redis_key(rtype, name), lock], args=[owner, ms])
        self._redis_ok()
        if value is None:
            with self._lock:
                self.stats["misses"] += 1
            return None, bool(got)
        return self._redis_hit(rtype, name, CachedAnswer.from_json(value), int(got) / 1000.0), False

    # ----------------------------------------------------------------- write

    def put(self, rtype: str, name: str, answer: CachedAnswer, *, release: str | None = None) -> CachedAnswer:
        """Cache ``answer`` (in-process and in Redis) for its clamped TTL; return it with that TTL.

        ``release``: a key to delete in the same round trip (the lock of ``get_or_lock``)."""
        ttl = self.ttl_for(answer)
        answer = CachedAnswer(answer.status, answer.records, ttl, answer.negative_ttl)
        if ttl > 0:
            self._store((rtype, name), answer, float(ttl))
        if ttl > 0 or release:
            self._redis_set(rtype, name, answer if ttl > 0 else None, ttl, release)
        return answer

    def clear(self) -> None:
        """Forget everything this process cached (Redis is left alone)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _store(self, key: tuple[str, str], answer: CachedAnswer, seconds: float) -> None:
        expires = self.clock() + seconds
        with self._lock:
            self._entries[key] = (expires, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    # ----------------------------------------------------------------- Redis

    @staticmethod
    def redis_key(rtype: str, name: str) -> str:
        """``mxq:dns:<rtype>:<name>``."""
        return f"{REDIS_PREFIX}{rtype}:{name}"

    def _redis_usable(self) -> bool:
        if self.redis is None:
            return False
        until = self._redis_down_until
        return until is None or self.clock() >= until

    def _redis_get(self, rtype: str, name: str) -> tuple[CachedAnswer, float] | None:
        if not self._redis_usable():
            return None
        try:
            pipe = self.redis.pipeline(transaction=False)
            key = self.redis_key(rtype, name)
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = pipe.execute()
        except Exception as e:   # redis-py raises RedisError subclasses and OSError; none may stop delivery
            reraise_interrupt(e)
            self._redis_failed(e)
            return None
        self._redis_ok()
        if value is None or pttl is None or pttl <= 0:
            return None
        try:
            return CachedAnswer.from_json(value), pttl / 1000.0
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed DNS cache entry %s", self.redis_key(rtype, name))
            return None

    def _redis_set(self, rtype: str, name: str, answer: CachedAnswer | None, ttl: int, release: str | None) -> None:
        if not self._redis_usable():
            return
        try:
            pipe = self.redis.pipeline(transaction=False)       # one round trip either way
            if answer is not None:
                pipe.set(self.redis_key(rtype, name), answer.to_json(), ex=ttl)
            if release is not None:
                pipe.delete(release)
            pipe.execute()
        except Exception as e:   # see _redis_get
            reraise_interrupt(e)
            self._redis_failed(e)
            return
        self._redis_ok()

    def _redis_failed(self, exc: BaseException) -> None:
        with self._lock:
            self.stats["redis_errors"] += 1
            first = self._redis_down_until is None
            self._redis_down_until = self.clock() + self.redis_retry
        if first:
            log.warning("Redis DNS cache unavailable, resolving without it (retrying in %gs): %s",
                        self.redis_retry, exc)

    def _redis_ok(self) -> None:
        if self._redis_down_until is not None:
            with self._lock:
                self._redis_down_until = None
            log.info("Redis DNS cache available again")

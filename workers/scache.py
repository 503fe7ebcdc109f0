"""Reuse of SMTP connections across deliveries: Postfix's scache and its smtp_connection_* limits.

A delivery that is done with a healthy connection gives it to a
``SessionCache`` instead of closing it; the next delivery to the same
server takes it and skips the TCP handshake, the greeting, EHLO and
STARTTLS.  One cache per process (the pipeline makes it; a library user may
pass one to ``mxq.workers.delivery.deliver_domain``).

What a connection can be reused for is its ``key`` (``delivery.route_key``):
the server's address and port, the TLS policy and, when the certificate was
verified, the name it was verified for, the HELO name, and for a relay the
login.  Two domains whose MX records point at one server share its
connections, as with Postfix's connection cache by address.

Limits (``ReuseLimits``, Postfix's names in brackets):

- ``idle``: seconds a connection waits in the cache before it is closed
  (``smtp_connection_cache_time_limit``, 2 s);
- ``time``: seconds after it was opened past which a connection is not
  reused for another transaction (``smtp_connection_reuse_time_limit``,
  300 s);
- ``count``: transactions per connection (``smtp_connection_reuse_count_limit``;
  Postfix's default is no limit, mxq's 100: some large providers close or
  throttle connections that carry more), 0 for no limit.

A cached connection is checked before it is handed out
(``SMTPSession.reusable``: no transaction open, no reply owed, and the
server has neither closed it nor said anything since its last reply); one
that fails anyway on its first command is retried by the delivery on a new
connection without counting as a failure of the server.

``tag``: an opaque value the owner attaches to a connection it gives back
(the pipeline: which domain's concurrency slot the connection holds);
``on_close(tag)`` is called whenever the cache itself closes a connection
(idle time over, a limit reached, found dead, ``close_all``), never when it
hands one out.  This module never imports Celery or ``tasks``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

log = logging.getLogger("mxq.scache")

__all__ = ["ReuseLimits", "Connection", "SessionCache", "View"]


@dataclass(frozen=True)
class ReuseLimits:
    """How long and how much one connection may be reused (see the module docstring)."""

    idle: float = 2.0
    time: float = 300.0
    count: int = 100

    def __post_init__(self):
        if self.idle < 0 or self.time <= 0 or self.count < 0:
            raise ValueError("connection reuse limits must be positive (count: 0 for no limit)")


@dataclass(eq=False)
class Connection:
    """A session with its reuse accounting: when it was opened, transactions carried, owner tag."""

    session: object
    key: Hashable
    opened: float = field(default_factory=time.monotonic)
    transactions: int = 0
    tag: object = None
    idle_since: float = 0.0

    def spent(self, limits: ReuseLimits, now: float | None = None) -> bool:
        """True once the connection has carried ``limits.count`` transactions or is older than ``limits.time``."""
        now = time.monotonic() if now is None else now
        return bool(limits.count and self.transactions >= limits.count) or now - self.opened >= limits.time


class SessionCache:
    """Idle SMTP connections of one process, by key; thread-safe (and greenlet-safe under gevent).

    ``max_idle``: at most this many idle connections are kept (the oldest
    idle one is closed to make room).  ``clock``: injectable for tests.
    """

    def __init__(self, limits: ReuseLimits | None = None, *, on_close: Callable[[object], None] | None = None,
                 max_idle: int = 10000, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or ReuseLimits()
        self.on_close = on_close
        self.max_idle = max_idle
        self.clock = clock
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[Connection]] = {}
        self._count = 0
        self.hits = self.misses = self.closed = 0
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()

    def __len__(self) -> int:
        return self._count

    def take(self, key: Hashable) -> Connection | None:
        """An idle, healthy connection for ``key`` (the most recently used), or None."""
        while True:
            with self._lock:
                stack = self._idle.get(key)
                if not stack:
                    self.misses += 1
                    return None
                conn = stack.pop()
                if not stack:
                    del self._idle[key]
                self._count -= 1
            if not conn.spent(self.limits, self.clock()) and conn.session.reusable:
                with self._lock:
                    self.hits += 1
                return conn
            self._close(conn, "no longer reusable")

    def put(self, conn: Connection) -> bool:
        """Keep ``conn`` for reuse; True if kept.

        A connection that is not reusable or past a limit is closed instead
        (without ``on_close``: the caller still owns its tag and is told by the
        False).
        """
        now = self.clock()
        if self.limits.idle <= 0 or conn.spent(self.limits, now) or not conn.session.reusable:
            self._close(conn, "not kept", notify=False)
            return False
        conn.idle_since = now
        evict = None
        with self._lock:
            self._idle.setdefault(conn.key, []).append(conn)
            self._count += 1
            if self._count > self.max_idle:
                evict = self._pop_oldest()
        if evict is not None:
            self._close(evict, "cache full")
        self._ensure_reaper()
        return True

    def expire(self, now: float | None = None) -> int:
        """Close the connections idle for longer than ``limits.idle`` (or past a limit); return how many."""
        now = self.clock() if now is None else now
        gone: list[Connection] = []
        with self._lock:
            for key in list(self._idle):
                stack = self._idle[key]
                keep = []
                for c in stack:
                    if now - c.idle_since < self.limits.idle and not c.spent(self.limits, now):
                        keep.append(c)
                    else:
                        gone.append(c)
                if len(keep) != len(stack):
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
            self._count -= len(gone)
        for c in gone:
            self._close(c, "idle")
        return len(gone)

    def close_all(self) -> None:
        """Close every idle connection (QUIT) and stop the reaper."""
        self._stop.set()
        with self._lock:
            gone = [c for stack in self._idle.values() for c in stack]
            self._idle.clear()
            self._count = 0
        for c in gone:
            self._close(c, "cache closed")

    def idle_for(self, key: Hashable) -> int:
        """How many idle connections the cache holds for ``key``."""
        with self._lock:
            return len(self._idle.get(key, ()))

    # -- internals -------------------------------------------------------------------------------

    def _pop_oldest(self) -> Connection | None:
        oldest_key, oldest = None, None
        for key, stack in self._idle.items():
            if stack and (oldest is None or stack[0].idle_since < oldest.idle_since):
                oldest_key, oldest = key, stack[0]
        if oldest is None:
            return None
        self._idle[oldest_key].pop(0)
        if not self._idle[oldest_key]:
            del self._idle[oldest_key]
        self._count -= 1
        return oldest

    def _close(self, conn: Connection, why: str, notify: bool = True) -> None:
        try:
            conn.session.disconnect()
        except Exception:  # noqa: BLE001 -- disconnect never raises; belt and braces
            pass
        with self._lock:
            self.closed += 1
        if notify and self.on_close is not None:
            try:
                self.on_close(conn.tag)
            except Exception:  # noqa: BLE001 -- the owner's bookkeeping must not break the cache
                log.exception("connection cache: on_close failed (%s)", why)

    def _ensure_reaper(self) -> None:
        if self._reaper is not None and self._reaper.is_alive():
            return
        with self._lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._stop.clear()
            self._reaper = threading.Thread(target=self._reap, name="mxq-scache", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        interval = max(0.05, min(0.5, self.limits.idle / 4 or 0.5))
        while not self._stop.wait(interval):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 -- keep reaping
                log.exception("connection cache: expiry failed")
            if self._count == 0:
                with self._lock:
                    if self._count == 0:
                        self._reaper = None
                        return


class View:
    """A ``SessionCache`` as one owner sees it: connections it gives back carry ``tag``.

    ``on_adopt(old_tag)``: called when ``take`` hands out a cached connection
    given back under another tag (the pipeline moves the connection's
    concurrency slot then).  With ``hold``, connections given back stay with
    this view (the owner's next delivery takes them first, and nobody else can)
    until ``release()`` hands the most recent one to the cache and closes the
    others; without it they go to the cache at once.  This is what
    ``deliver_domain(sessions=...)`` takes.
    """

    def __init__(self, cache: SessionCache, tag: object = None,
                 on_adopt: Callable[[object], None] | None = None, *, hold: bool = False):
        self.cache, self.tag, self.on_adopt, self.hold = cache, tag, on_adopt, hold
        self._held: dict[Hashable, Connection] = {}
        self.given = 0
        self.taken = 0

    @property
    def limits(self) -> ReuseLimits:
        return self.cache.limits

    def take(self, key: Hashable) -> Connection | None:
        """A connection for ``key``: one this view holds, else one from the cache, else None."""
        conn = self._held.pop(key, None)
        if conn is not None:
            if not conn.spent(self.cache.limits) and conn.session.reusable:
                return conn
            conn.session.disconnect()
        conn = self.cache.take(key)
        if conn is not None:
            self.taken += 1
            if conn.tag != self.tag and self.on_adopt is not None:
                self.on_adopt(conn.tag)
            conn.tag = self.tag
        return conn

    def give(self, conn: Connection) -> bool:
        """The owner is done with ``conn`` for now; True if it is kept (held, or in the cache)."""
        conn.tag = self.tag
        if self.hold:
            old = self._held.pop(conn.key, None)
            if old is not None and old is not conn:
                old.session.disconnect()
            conn.idle_since = self.cache.clock()
            self._held[conn.key] = conn
            return True
        kept = self.cache.put(conn)
        if kept:
            self.given += 1
        return kept

    def release(self) -> bool:
        """Hand the most recently held connection to the cache (the others are closed); True if it was kept."""
        held = list(self._held.values())
        self._held.clear()
        if not held:
            return False
        last = max(held, key=lambda c: c.idle_since)
        for c in held:
            if c is not last:
                c.session.disconnect()
        kept = self.cache.put(last)
        if kept:
            self.given += 1
        return kept

    def close(self) -> None:
        """Close every held connection (QUIT)."""
        held = list(self._held.values())
        self._held.clear()
        for c in held:
            c.session.disconnect()

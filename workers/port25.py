"""Is outbound port 25 blocked?  Detection, fallback to the relay, and re-probes.

Many networks (clouds, ISPs, corporate LANs) drop or refuse outbound
connections to port 25.  With a relay in ``fallback`` mode mxq would pay a
full connect timeout on every exchange of every domain before relaying;
``Port25`` notices the pattern and sends mail straight to the relay instead.

Detection: every failed TCP connect to an exchange's SMTP port is recorded
with its kind -- ``timeout`` (SYNs dropped), ``refused`` (RST) or
``unreachable`` (ICMP host unreachable or administratively prohibited;
not a network this host has no route to, such as IPv6 on a v4-only host)
-- its address and its domain.  Port 25 is concluded *blocked*
when, within ``window`` seconds (300), connects of **one** kind failed to at
least ``exchanges`` distinct addresses (3) of at least ``domains`` distinct
domains (2), no connect to the SMTP port succeeded since, and the relay
worked (a session with it got through the greeting, TLS and AUTH) within
the same window.  Any successful connect to the SMTP port wipes the
evidence.  The one caller whose record concluded it logs a warning, once
for the whole fleet; ``blocked()`` is then the state (``since``, ``kind``,
counts), shown by ``mxq queue`` and the ``mxq_port25_blocked`` metric.

Before that, while the evidence is there but the relay has not been seen
working within the window (deliveries across the fleet all still waiting on
their exchanges), a run whose own connect just failed that way is
``suspected()``: it tries the relay at once rather than its remaining
exchanges, and when the relay works that concludes it -- so the first wave
of mail pays one connect timeout, not one per exchange.

While blocked, delivery skips the exchanges (the MX lookup still runs, so a
non-existent domain still bounces) and gives the pending recipients to the
relay at once: no connect timeout at all.  Every ``probe_interval`` seconds
(300; ``MXQ_PORT25_PROBE_INTERVAL``) one caller fleet-wide wins
``claim_probe()`` and tries a plain TCP connect to the exchange it was
about to skip, in a background thread (no delivery waits for it); when it
connects, the state is cleared (logged once) and the next deliveries go to
the exchanges again.

This is a state of its own, distinct from the per-address failure memory
(``HostStatus``, ``mxq:down:*``) and from any per-destination "dead"
state: a blocked port 25 is a property of *our* network, so nothing here
marks a destination down, and while port 25 is blocked no exchange is
tried, so nothing is marked down either.

Storage: a ``Port25State``.  ``MemoryPort25State`` here (in process; the
plain engine makes one per ``deliver()`` call unless given one), and
``mxq.tasks.hoststatus.RedisPort25State`` for the pipeline (fleet-wide,
atomic Lua).  Nothing here holds a secret.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

log = logging.getLogger("mxq.port25")

__all__ = ["Port25", "Port25State", "MemoryPort25State", "Thresholds", "failure_kind"]

TIMEOUT, REFUSED, UNREACHABLE = "timeout", "refused", "unreachable"
KINDS = (TIMEOUT, REFUSED, UNREACHABLE)


@dataclass(frozen=True)
class Thresholds:
    """When failures mean "blocked", and how often to look again (seconds)."""

    exchanges: int = 3          #: distinct exchange addresses that failed the same way...
    domains: int = 2            #: ... belonging to at least this many distinct domains
    window: float = 300.0       #: ... within this many seconds (the relay worked within it too)
    probe_interval: float = 300.0   #: while blocked, one direct connect attempt per interval, fleet-wide
    state_ttl: float = 86400.0  #: a blocked state nobody re-confirms is forgotten after this long


class Port25State(Protocol):
    """Where the evidence and the verdict live; every method is atomic and never raises for storage trouble.

    ``failure`` records one failed connect and returns the new state when
    this very call concluded "blocked" (else None); ``suspected`` returns
    what ``conclude`` would say of the evidence in the window if the relay
    had worked (None: not enough of it); ``relay_ok`` notes that
    the relay worked and may conclude likewise; ``success`` wipes the
    evidence and the state, returning the state it cleared (None when not
    blocked); ``blocked`` returns the state or None; ``claim_probe`` is true
    for one caller per ``interval``; ``refresh`` keeps a confirmed state
    alive for ``ttl`` more seconds.
    """

    def failure(self, kind: str, ip: str, domain: str, now: float, t: Thresholds) -> dict | None: ...

    def relay_ok(self, now: float, t: Thresholds) -> dict | None: ...

    def suspected(self, now: float, t: Thresholds) -> dict | None: ...

    def success(self) -> dict | None: ...

    def blocked(self) -> dict | None: ...

    def claim_probe(self, now: float, interval: float) -> bool: ...

    def refresh(self, ttl: float) -> None: ...


def conclude(events: list[tuple[str, str, str, float]], relay_at: float | None, now: float,
             t: Thresholds) -> dict | None:
    """The verdict on ``events`` (``(kind, ip, domain, when)``): the state to set, or None.

    The pure rule both state stores apply (the Redis one in Lua, the same way).
    """
    if relay_at is None or relay_at < now - t.window:
        return None
    for kind in KINDS:
        ips = {ip for k, ip, _, w in events if k == kind and w >= now - t.window}
        doms = {d for k, _, d, w in events if k == kind and w >= now - t.window}
        if len(ips) >= t.exchanges and len(doms) >= t.domains:
            return {"since": now, "kind": kind, "exchanges": len(ips), "domains": len(doms)}
    return None


class MemoryPort25State:
    """In-process ``Port25State`` (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], tuple[str, str, str, float]] = {}   # (kind, ip) -> event
        self._relay_at: float | None = None
        self._state: dict | None = None
        self._state_until = 0.0
        self._probe_until = 0.0

    def _conclude(self, now: float, t: Thresholds) -> dict | None:
        if self._state is not None and self._state_until > now:
            return None
        self._events = {k: e for k, e in self._events.items() if e[3] >= now - t.window}
        state = conclude(list(self._events.values()), self._relay_at, now, t)
        if state is not None:
            self._state, self._state_until = state, now + t.state_ttl
            self._probe_until = now + t.probe_interval      # the first probe after one interval
        return state

    def failure(self, kind: str, ip: str, domain: str, now: float, t: Thresholds) -> dict | None:
        with self._lock:
            self._events[(kind, ip)] = (kind, ip, domain, now)
            return self._conclude(now, t)

    def relay_ok(self, now: float, t: Thresholds) -> dict | None:
        with self._lock:
            self._relay_at = now
            return self._conclude(now, t)

    def suspected(self, now: float, t: Thresholds) -> dict | None:
        with self._lock:
            return conclude(list(self._events.values()), now, now, t)

    def success(self) -> dict | None:
        with self._lock:
            state = self.blocked_locked()
            self._events.clear()
            self._state = None
            return state

    def blocked_locked(self) -> dict | None:
        if self._state is not None and self._state_until <= self.clock():
            self._state = None
        return dict(self._state) if self._state is not None else None

    def blocked(self) -> dict | None:
        with self._lock:
            return self.blocked_locked()

    def claim_probe(self, now: float, interval: float) -> bool:
        with self._lock:
            if now < self._probe_until:
                return False
            self._probe_until = now + interval
            return True

    def refresh(self, ttl: float) -> None:
        with self._lock:
            if self._state is not None:
                self._state_until = self.clock() + ttl


#: connect() errors that say this host has no route to the address's network (or no address of its
#: family): a property of our routing table, not of port 25 -- an AAAA-only exchange seen from a host
#: without IPv6 fails this way at once, and that must not conclude "port 25 blocked".
_NO_ROUTE = (errno.ENETUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def failure_kind(exc: BaseException) -> str | None:
    """The kind of a failed TCP connect (``timeout``, ``refused``, ``unreachable``), or None.

    None for anything after the TCP connect succeeded (a greeting timeout,
    a 4xx greeting, TLS): such a failure says port 25 is open.  None too for
    a network this host has no route to (``ENETUNREACH``, ``ENETDOWN``,
    ``EADDRNOTAVAIL``, ``EAFNOSUPPORT``): every port fails there.  Connect
    failures are the ``4.4.1`` ones ``SMTPSession`` raises; the cause chain
    tells the kind.
    """
    reply = getattr(exc, "reply", None)
    if reply is None or reply.enhanced != "4.4.1":
        return None
    e, seen = exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return REFUSED
        if isinstance(e, (TimeoutError, socket.timeout)):
            return TIMEOUT
        if isinstance(e, OSError) and e.errno in _NO_ROUTE:
            return None             # no route to that network at all (e.g. IPv6 on a v4-only host): any port fails
        if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.EACCES, errno.EPERM, errno.EHOSTDOWN):
            return UNREACHABLE
        e = e.__cause__ or e.__context__
    return None


@dataclass
class Port25:
    """Port 25 detection for delivery runs (see the module docstring).

    ``state``: where the evidence lives (``MemoryPort25State()`` by default);
    ``relay``: the relay's name for log lines; ``clock``: ``time.time``.
    """

    state: Port25State = field(default_factory=MemoryPort25State)
    thresholds: Thresholds = field(default_factory=Thresholds)
    relay: str = "the relay"
    clock: Callable[[], float] = time.time

    def blocked(self) -> dict | None:
        """The blocked state (``since``, ``kind``, ``exchanges``, ``domains``), or None."""
        return self.state.blocked()

    def connect_failed(self, exc: BaseException, ip: str, domain: str) -> None:
        """Record a failed connect to an exchange (ignored unless it is a TCP connect failure)."""
        kind = failure_kind(exc)
        if kind is None:
            self.connected(ip)            # TCP got through: port 25 is open
            return
        state = self.state.failure(kind, ip, domain, self.clock(), self.thresholds)
        if state is not None:
            self._announce(state)

    def connected(self, ip: str) -> None:
        """A TCP connect to an exchange's SMTP port worked: no longer blocked, evidence wiped."""
        cleared = self.state.success()
        if cleared is not None:
            log.warning("port 25 reachable again: connected to %s; delivering to exchanges directly", ip)

    def suspected(self) -> dict | None:
        """Enough failed connects for "blocked", the relay not seen working yet: worth trying the relay now."""
        return self.state.suspected(self.clock(), self.thresholds)

    def relay_worked(self) -> None:
        """The relay accepted a session: with enough evidence this concludes "blocked"."""
        state = self.state.relay_ok(self.clock(), self.thresholds)
        if state is not None:
            self._announce(state)

    def _announce(self, state: dict) -> None:
        t = self.thresholds
        log.warning("port 25 appears blocked: connections to %d exchanges of %d domains failed the same way "
                    "(%s) within %g s while %s works; sending through %s without trying exchanges, "
                    "re-probing port 25 every %g s", state["exchanges"], state["domains"], state["kind"],
                    t.window, self.relay, self.relay, t.probe_interval)

    def maybe_probe(self, ip: str, port: int, timeout: float, *, wait: bool = False) -> threading.Thread | None:
        """While blocked: if this caller wins the probe slot, try ``ip:port`` in a background thread.

        Returns the thread (``wait=True`` joins it first), or None when
        another caller has the slot.
        """
        if not self.state.claim_probe(self.clock(), self.thresholds.probe_interval):
            return None
        th = threading.Thread(target=self._probe, args=(ip, port, timeout), name="mxq-port25-probe", daemon=True)
        th.start()
        if wait:
            th.join()
        return th

    def _probe(self, ip: str, port: int, timeout: float) -> None:
        try:
            socket.create_connection((ip, port), timeout).close()
        except OSError as e:
            log.info("port 25 probe to %s:%d failed (%s): still sending through %s", ip, port,
                     "timed out" if isinstance(e, (TimeoutError, socket.timeout)) else (e.strerror or e),
                     self.relay)
            self.state.refresh(self.thresholds.state_ttl)
            return
        self.connected(ip)

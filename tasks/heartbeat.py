"""Lease heartbeats: a task holding a batch renews its lease (and its connection slot) while it runs.

``Heartbeat`` is what a delivery, report or webhook task holds around its
batches; the renewals of a process run on one shared thread (``_Beater``),
all that are due in one pipelined round trip (``Store.renew_many``).  A
heartbeat whose renewal finds the lease taken back, or that has not gone
through for two thirds of a lease, is lost (``Heartbeat.stopped``): the batch
starts no new transaction.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from .store import Store

log = logging.getLogger("mxq.tasks")


def _pid() -> int:
    return os.getpid()


class _Beater:
    """One daemon thread per process that renews every registered lease when it is due.

    Starting and joining a thread per task cost about 5% of a delivery
    task's time (profiled); the registrations are cheap.  Made lazily per
    process id, so a prefork child gets its own (threads do not survive fork).
    """

    def __init__(self):
        self.pid = _pid()
        self._cond = threading.Condition()
        self._beats: dict[int, list] = {}        # id(Heartbeat) -> [heartbeat, next due (monotonic)]
        self._thread = threading.Thread(target=self._run, name="mxq-heartbeat", daemon=True)
        self._thread.start()

    def add(self, hb: "Heartbeat") -> None:
        with self._cond:
            self._beats[id(hb)] = [hb, time.monotonic() + hb.interval]
            self._cond.notify()

    def remove(self, hb: "Heartbeat") -> None:
        with self._cond:
            self._beats.pop(id(hb), None)
            while hb.beating:                    # never return while its renewal is under way
                self._cond.wait(0.5)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [e for e in self._beats.values() if e[1] <= now]
                if not due:
                    nxt = min((e[1] for e in self._beats.values()), default=now + 60.0)
                    self._cond.wait(max(0.0, nxt - now))
                    continue
                for e in due:
                    e[1] = now + e[0].interval
                    e[0].beating = True
            try:
                _beat_all([hb for hb, _ in due])
            finally:
                with self._cond:
                    for hb, _ in due:
                        hb.beating = False
                    self._cond.notify_all()


def _beat_all(hbs: list["Heartbeat"]) -> None:
    """Renew the leases and slots of ``hbs`` in one pipelined round trip per store, then their ``also``.

    One round trip per heartbeat was too slow once a gevent worker runs
    hundreds of connections: a full round of renewals took longer than a
    lease, and live batches were put back and sent twice.
    """
    by_store: dict[int, tuple[Store, list[Heartbeat]]] = {}
    for hb in hbs:
        by_store.setdefault(id(hb.store), (hb.store, []))[1].append(hb)
    for store, group in by_store.values():
        try:
            asked = time.monotonic()
            lost = store.renew_many([hb.token for hb in group if hb.token],
                                    slots=[hb.slot for hb in group if hb.slot])
        except Exception as e:          # Redis away for a while: the next beat tries again
            log.warning("lease renewal failed: %s", e)
        else:
            for hb in group:
                if hb.token and hb.token in lost:
                    hb.lost = True
                    log.warning("batch %s lost its lease (taken back by the scheduler): it starts nothing more",
                                hb.token)
                else:
                    hb.renewed = asked
    for hb in hbs:
        if hb.also is not None:
            try:
                hb.also()
            except Exception as e:
                log.warning("lease renewal failed: %s", e)


_beater: _Beater | None = None
_beater_lock = threading.Lock()


def _the_beater() -> _Beater:
    global _beater
    with _beater_lock:
        if _beater is None or _beater.pid != _pid():
            _beater = _Beater()
        return _beater


class Heartbeat:
    """Renews the lease of the batch ``token`` every third of the lease while a task runs.

    ``slot``: ``(lane, token)`` of a concurrency slot renewed with it (a delivery task's);
    ``also``: called at every beat too.  ``token`` may change while the
    heartbeat runs (a delivery task's next chunk); "" renews no lease.
    The renewals run on one shared thread per process (see ``_Beater``), all
    that are due in one round trip; leaving the ``with`` block waits for a
    renewal under way to finish.
    """

    def __init__(self, store: Store, token: str, also=None, slot: tuple[str, str] | None = None):
        self.store, self.token, self.also, self.slot = store, token, also, slot
        self.interval = max(store.settings.lease_seconds / 3.0, 0.2)
        self.beating = False
        self.renewed = time.monotonic()     # when the last renewal was asked for (and went through)
        self.lost = False                   # a renewal found the lease gone

    def stopped(self) -> bool:
        """True once the heartbeat is lost: a renewal found the lease taken back, or none went through
        for two thirds of a lease (the lease may run out before the next).  The batch then starts no
        new transaction: what it has not sent would be sent by another worker too."""
        return self.lost or time.monotonic() - self.renewed > self.store.settings.lease_seconds * 2 / 3

    def beat(self) -> None:
        """Renew the lease and slot (and call ``also``) once; Redis errors are logged, never raised."""
        _beat_all([self])

    def __enter__(self):
        self._beater = _the_beater()
        self._beater.add(self)
        return self

    def __exit__(self, *exc):
        self._beater.remove(self)

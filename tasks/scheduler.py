"""The scheduler: what ``mxq.schedule`` does every second.

One tick is one atomic Redis script (``Store.tick``):

1. work items whose lease expired (their worker died or hung) go back to the
   FRONT of their ready list -- after a SIGKILL, the dead worker's recipients
   are being delivered again one lease (``MXQ_LEASE_SECONDS``) later;
2. deferred items that are due go to the back of their ready list (there are
   no countdown or ETA tasks anywhere: the deferred queue is a ZSET by due time);
3. lanes with ready work but no task activity for ``MXQ_DISPATCH_STALE``
   seconds get tasks again (Celery on Redis can lose a task outright:
   kombu#305, celery#7950);
4. jobs stored for intake whose ``mxq.intake`` never ran get it again;
5. a large submission staged and never committed (its producer died) is
   removed an hour later (``Store.unstage``).

Then the tasks it asked for are published.  Because each step is a single
script that moves what it takes, ticks from several beat instances or
workers at once do the same work once; a tick is idempotent.

``mxq scheduler`` runs ``run_forever()``: the tick in a loop of its own, once a
second, not a Celery task (Flower's task list is not flooded with a tick a
second).  Run one; a second is harmless (each step is one atomic script).
``mxq.schedule`` is the same tick as a task, for anyone who calls it.
"""

from __future__ import annotations

import logging
import threading
import time

from . import dispatch, outcomes
from .store import get_store

log = logging.getLogger("mxq.scheduler")

INTAKE_CHUNK = 200


def tick(now: float | None = None) -> dict:
    """Run one scheduler step and publish the tasks it needs; return what it did."""
    store = get_store()
    now = store.now() if now is None else now     # Redis's clock, read once for the step
    t = store.tick(now=now)
    recorded = outcomes.after_release(store)     # outcomes no worker recorded (one died, or a drop)
    try:
        store.trim_final(now)                     # final past MXQ_RESULT_TTL: nothing to record
        store.unstage(now)                        # large submissions staged and never committed
    except Exception as e:                        # noqa: BLE001 -- the next tick tries again
        log.warning("could not trim mxq:final or staged submissions: %s", e)
    published = dispatch.publish(t.dispatch)
    for k in range(0, len(t.intake), INTAKE_CHUNK):
        dispatch.intake(t.intake[k:k + INTAKE_CHUNK])
        published += 1
    if t.requeued or t.moved or published:
        log.info("schedule: requeued=%d due=%d published=%d intake=%d",
                 t.requeued, t.moved, published, len(t.intake))
    return {"requeued": t.requeued, "due": t.moved, "published": published, "intake": len(t.intake),
            "recorded": recorded}


def run_forever(interval: float = 1.0, stop: threading.Event | None = None, on_tick=None) -> None:
    """Tick every ``interval`` seconds until ``stop`` is set; Redis errors are logged, not fatal.

    ``on_tick(ok)`` runs after each tick (``mxq scheduler`` touches its heartbeat file there).
    """
    stop = stop or threading.Event()
    while not stop.is_set():
        started = time.monotonic()
        ok = True
        try:
            tick()
        except Exception as e:          # Redis restarting: the next tick catches up
            ok = False
            log.warning("scheduler tick failed: %s", e)
        if on_tick is not None:
            on_tick(ok)
        stop.wait(max(0.0, interval - (time.monotonic() - started)))

"""Wake-up tasks: publishing mxq's Celery tasks, by name, from any module.

A store script answers which lanes need how many tasks (``[(lane, count),
...]``); ``publish`` sends them: ``mxq.deliver(lane)`` for a delivery lane,
``mxq.notify`` for the report lane, ``mxq.webhook`` for the webhook lane.
``intake`` sends ``mxq.intake(job_ids)``.  The tasks' code is in
``mxq.tasks.graph``; they are sent by name through mxq's own Celery app (the
routes of ``mxq.tasks.app`` choose the queue), so the producer, the scheduler
and the webhook sender publish without importing the task graph.  A task only
names a lane or jobs: a lost one costs time, never mail (the scheduler
re-dispatches quiet lanes and stalled intakes).
"""

from __future__ import annotations

import threading

from .app import app, readable_args
from .broker import is_full, say_full
from .store import REPORT_LANE
from .webhooks import WEBHOOK_LANE

#: A producer publishes at most this many wake-up tasks itself; more go out
#: as one ``mxq.fanout`` task, so a batch to 500 domains is one publish.
FANOUT_DIRECT = 8

#: Tasks publishing at once in one process (a gevent worker runs hundreds of tasks; the
#: broker transport's connection pool is bounded: mxq.tasks.app's max_connections).
PUBLISHERS = 16
_publishing = threading.BoundedSemaphore(PUBLISHERS)


def send(name: str, args: list | None = None, **options):
    """Publish one mxq task by name (Flower shows its arguments as ``readable_args`` says)."""
    shown = readable_args(name, args)
    if shown is not None:
        options.setdefault("argsrepr", shown)
    return app.send_task(name, args=args, ignore_result=True, **options)


def intake(job_ids: list[str]):
    """Publish ``mxq.intake(job_ids)``: split these stored jobs into their lanes."""
    return send("mxq.intake", [list(job_ids)])


def publish(dispatch: list[tuple[str, int]], *, fan_out: bool = False) -> int:
    """Publish the tasks a store script asked for: ``[(lane, count), ...]``; return how many.

    With ``fan_out`` (producers), more than ``FANOUT_DIRECT`` tasks are
    handed to one ``mxq.fanout`` task that publishes them from a worker.
    Losing it loses nothing: the lanes' ready work is in Redis, and the
    scheduler re-dispatches quiet lanes.  Redis full: what could not be
    published is said (``say_full``) and left to the scheduler.
    """
    if not dispatch:
        return 0
    if fan_out and sum(n for _, n in dispatch) > FANOUT_DIRECT:
        send("mxq.fanout", [[[lane, n] for lane, n in dispatch]])
        return 1
    n = 0
    try:
        with _publishing, app.producer_or_acquire() as producer:
            for lane, count in dispatch:
                for _ in range(count):
                    if lane == REPORT_LANE:
                        send("mxq.notify", producer=producer)
                    elif lane == WEBHOOK_LANE:
                        send("mxq.webhook", producer=producer)
                    else:
                        send("mxq.deliver", [lane], producer=producer)
                    n += 1
    except Exception as e:
        if not is_full(e):
            raise
        # The lanes' work is in Redis: the scheduler publishes for quiet lanes once there is room.
        say_full(f"{sum(c for _, c in dispatch) - n} task(s) not published")
    return n

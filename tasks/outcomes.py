"""Final job outcomes in Celery's result backend: ``AsyncResult(job_id).get()`` returns them.

When a job becomes final -- every recipient delivered, bounced, expired,
suppressed or dropped -- the store script that wrote its last record also
adds the job to ``mxq:final`` (``mxq.tasks.store``), in the same atomic step,
so a worker dying a moment later loses nothing.  ``record()`` claims jobs from
there under a short lease (two recorders never write the same job at once; a
dead recorder's claim comes back), writes each job's outcome to the Celery
app's result backend under the job id, state ``SUCCESS``, and lets the jobs go.
It runs in the worker whose batch made a job final when another recorder's
read is needed (``Writer``), and, as a safety net, at every scheduler tick.

The common case needs no claim and no read: a delivery whose work item holds
every recipient of its job (one domain) knows the job's final records, so the
release script hides the job in ``mxq:final`` for ``LEASE`` seconds (held)
and the worker's ``Writer`` writes that outcome itself, then lets the job go;
a worker dying before that leaves the job to a recorder after the lease.

The value is what ``mxq.tasks.status(job_id)`` returns for a finished job::

    {"job": ID, "state": "done",
     "recipients": [{"address", "domain", "state", "code", "enhanced", "text", "exchange", "ip",
                     "relay", "attempts", "first_attempt", "last_attempt", "next_attempt"}, ...]}

(``state`` per recipient: delivered, bounced, expired, suppressed or dropped.)

The backend is ``MXQ_RESULT_BACKEND``, else ``MXQ_REDIS_URL``: any Celery
result backend -- Redis, Celery's SQLAlchemy backend
(``db+postgresql+psycopg://...``), ``django-db`` (django-celery-results, with
``DJANGO_SETTINGS_MODULE`` set for the worker).  ``none`` turns this off.
Results are kept ``MXQ_RESULT_TTL`` seconds (Celery's ``result_expires``).

Reading, from any process::

    import mxq.tasks
    mxq.tasks.result(job_id).get(timeout=60)        # mxq's app's AsyncResult
    # or with the application's own Celery app on the same backend:
    AsyncResult(job_id, app=my_celery_app).get(timeout=60)
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("mxq.outcomes")

#: Seconds a claimed job stays hidden from other recorders.
LEASE = 60.0
#: Jobs one call records at most.
BATCH = 200


def enabled(app=None) -> bool:
    """False when the result backend is off (``MXQ_RESULT_BACKEND=none``)."""
    if app is None:
        from .app import app
    backend = str(app.conf.result_backend or "")
    return backend.lower() not in ("", "none", "disabled")


def _django_ready(app) -> None:
    """django-celery-results' backend needs Django set up (a worker started with
    ``DJANGO_SETTINGS_MODULE``): do it once, here, where the backend is first used."""
    if not str(app.conf.result_backend or "").startswith("django-"):
        return
    import django
    from django.apps import apps
    if not apps.ready:
        django.setup()


def record(store=None, app=None, *, limit: int = BATCH, now: float | None = None) -> int:
    """Write the outcomes of jobs that became final to the result backend; return how many.

    Raises what the backend raises (a database away): the claimed jobs then
    come back after ``LEASE`` seconds and are written by a later call.
    """
    from .store import get_store, status_of

    if app is None:
        from .app import app
    if not enabled(app):
        return 0
    store = store or get_store()
    now = store.now() if now is None else now
    claimed = store.claim_final(limit=limit, lease=LEASE, now=now)
    if not claimed:
        return 0
    write(app, [(job, status_of(job, *found)) for job, found in claimed if found is not None])
    store.forget_final([job for job, _ in claimed])      # expired ones too: nothing left to say
    return len(claimed)


def write(app, outcomes: list[tuple[str, dict]]) -> None:
    """Store ``[(job, status)]`` in ``app``'s result backend (state ``SUCCESS``); raises what it raises."""
    from celery import states

    if not outcomes:
        return
    _django_ready(app)
    backend = app.backend
    if _is_redis(backend):
        _store_redis(backend, outcomes)
    else:
        for job, outcome in outcomes:
            backend.store_result(job, outcome, states.SUCCESS)


def _is_redis(backend) -> bool:
    from celery.backends.redis import RedisBackend
    return isinstance(backend, RedisBackend) and type(backend).__name__ in ("RedisBackend", "SentinelBackend")


def _store_redis(backend, outcomes: list[tuple[str, dict]]) -> None:
    """What ``RedisBackend.store_result`` writes -- the same key, value and expiry, and the
    PUBLISH that wakes ``AsyncResult.get()`` -- for a whole batch in one round trip, two commands
    a job (``store_result`` costs a GET, MULTI, SETEX, PUBLISH and EXEC each).  A job's outcome
    is final, so there is no earlier success to protect from being overwritten."""
    from celery import states

    if not outcomes:
        return
    pipe = backend.client.pipeline(transaction=False)
    for job, outcome in outcomes:
        meta = backend._get_result_meta(result=outcome, state=states.SUCCESS, traceback=None, request=None)
        meta["task_id"] = job
        key, value = backend.get_key_for_task(job), backend.encode(meta)
        if backend.expires:
            pipe.set(key, value, ex=int(backend.expires))
        else:
            pipe.set(key, value)
        pipe.publish(key, value)
    pipe.execute()


def after_release(store=None) -> int:
    """``record()`` for a worker after its batch: never raises (the scheduler catches up)."""
    try:
        return record(store)
    except Exception as e:          # the backend (or Redis) away: the jobs stay in mxq:final
        log.warning("job outcomes not recorded in the result backend yet: %s", e)
        return 0


class Writer:
    """A worker process's outcome writer: held jobs written in batches, shared ones recorded.

    Delivery tasks hand it the outcomes of jobs their release held for them
    (``add``: ``Store.finish``'s ``Finals.held`` with each job's
    ``Outcome.status``) and the number of jobs made final for any recorder
    (``shared``).  One background thread (a greenlet under gevent) gathers
    what arrives within ``DELAY`` seconds from every task of the process and
    writes it: the held outcomes in one backend round trip (Redis: a pipeline
    of SET and PUBLISH per job), then one ZREM; ``record()`` once if any were
    shared.  ``flush()`` waits until what was added so far is written (a task
    calls it before it ends, so its jobs' outcomes are in the backend by
    then, as before).  A write that fails is logged and left: held jobs come
    back to every recorder when their hold is over, shared ones at the next
    scheduler tick.
    """

    DELAY = 0.01
    #: ``flush`` waits at most this long (a backend that hangs must not hold the task forever).
    FLUSH_WAIT = 10.0

    def __init__(self, store, app=None):
        self.store, self.app = store, app
        self.hold = LEASE if enabled(app) else 0.0
        self._cond = threading.Condition()
        self._held: list[tuple[str, dict]] = []
        self._shared = 0
        self._added = self._written = 0
        self._thread: threading.Thread | None = None

    def add(self, held: list[tuple[str, dict]], shared: int = 0) -> None:
        if not held and not shared:
            return
        with self._cond:
            self._held.extend(held)
            self._shared += shared
            self._added += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mxq-outcomes", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything added so far is written (or tried); False on timeout."""
        deadline = time.monotonic() + (self.FLUSH_WAIT if timeout is None else timeout)
        with self._cond:
            target = self._added
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._written >= self._added:
                    self._cond.wait()
            time.sleep(self.DELAY)          # what arrives meanwhile goes in the same write
            with self._cond:
                held, shared, upto = self._held, self._shared, self._added
                self._held, self._shared = [], 0
            try:
                self.write(held, shared)
            finally:
                with self._cond:
                    self._written = upto
                    self._cond.notify_all()

    def write(self, held: list[tuple[str, dict]], shared: int) -> None:
        if held:
            try:
                write(self.app or _app(), held)
                self.store.forget_final([job for job, _ in held])
            except Exception as e:      # the backend (or Redis) away: the jobs come back after the hold
                log.warning("%d job outcome(s) not recorded in the result backend yet: %s", len(held), e)
        if shared:
            after_release(self.store)


def _app():
    from .app import app
    return app

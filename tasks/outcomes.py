"""Final job outcomes in Celery's result backend: ``AsyncResult(job_id).get()`` returns them.

When a job becomes final -- every recipient delivered, bounced, expired,
suppressed or dropped -- the store script that wrote its last record also
adds the job to ``mxq:final`` (``mxq.tasks.store``), in the same atomic step,
so a worker dying a moment later loses nothing.  ``record()`` claims jobs from
there under a short lease (two recorders never write the same job at once; a
dead recorder's claim comes back), writes each job's outcome to the Celery
app's result backend under the job id, state ``SUCCESS``, and lets the jobs go.
It runs after every delivery batch in the worker that ran it
(``after_release``) and, as a safety net, at every scheduler tick.

A job whose recipients were all in one work item (one domain: the common
case) is recorded by the delivery worker that made it final, right after
the release and without a claim or a read (``record_known``): the release
wrote every record from what the worker holds, and put the job in
``mxq:final`` hidden from the recorders for ``LEASE`` seconds, so a
worker dying before it wrote the outcome leaves it to them.

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
import weakref

log = logging.getLogger("mxq.outcomes")

#: Seconds a claimed job stays hidden from other recorders.
LEASE = 60.0
#: Jobs one call records at most.
BATCH = 200
#: Writes to the result backend one process makes at once; more wait their turn (``_write``).
#: Celery's Redis backend has redis-py's default pool: 100 connections, then ``MaxConnectionsError``
#: at once.  A gevent worker's connections finishing together (1,000 replies of the bench's
#: inflight stage within a moment) wrote that many outcomes at once, and the ones refused waited
#: ``LEASE`` for a recorder (49 in one run); they now hand them to one ``Writer``, and the bound
#: holds for every other caller (recorders, threads and prefork processes).  A database backend's
#: pool is smaller still.
WRITERS = 32
_writers = threading.BoundedSemaphore(WRITERS)


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
    if not store.final_due(now):
        return 0
    claimed = store.claim_final(limit=limit, lease=LEASE, now=now)
    if not claimed:
        return 0
    _write(app, [(job, status_of(job, *found)) for job, found in claimed if found is not None])
    store.forget_final([job for job, _ in claimed])      # expired ones too: nothing left to say
    return len(claimed)


def record_known(store, outcomes: list[tuple[str, dict]], app=None) -> int:
    """Write outcomes a delivery worker holds whole (``status_of`` dicts of jobs it has just made
    final, hidden in ``mxq:final`` for it: ``Store.finish(hide=LEASE)``), then let the jobs go.

    No claim and no read: the worker wrote every record of these jobs in the same release.
    Never raises: a job whose outcome could not be written stays in ``mxq:final`` and a recorder
    takes it once it is no longer hidden (``LEASE``).  Returns how many were written.
    """
    if not outcomes:
        return 0
    if app is None:
        from .app import app
    try:
        _write(app, outcomes)
        store.forget_final([job for job, _ in outcomes])
    except Exception as e:          # the backend (or Redis) away: recorded after LEASE
        log.warning("job outcomes not recorded in the result backend yet: %s", e)
        return 0
    return len(outcomes)


class Writer:
    """``record_known`` for a process with many connections: one writer thread (a greenlet under
    gevent) writes what its connections hand over, everything handed over meanwhile in one call.

    ``add`` returns at once; the writer wakes at once (no delay added to an
    idle process) and writes what it holds with one ``record_known`` -- one
    script call to a Redis backend and one ``ZREM`` of ``mxq:final`` -- while
    what is handed over during that write waits for the next (group commit).
    In a gevent worker whose connections finish together (a slow
    destination's replies arrive on the same tick) each connection wrote its
    one or two outcomes with its own two round trips: 11% of the worker's CPU
    in the bench's slow stage (docs/DESIGN.md, "2026-12-06").  Nothing is at
    risk meanwhile: the jobs are in ``mxq:final``, hidden for ``LEASE`` (the
    release that made them final put them there), and a recorder takes any a
    dead process never wrote.  ``flush`` waits (bounded) until what was handed
    over is written.
    """

    def __init__(self, store, app=None):
        self.store, self.app = store, app
        self._cond = threading.Condition()
        self._held: list[tuple[str, dict]] = []
        self._busy = False              # a write is under way (its outcomes are out of _held)
        self._thread: threading.Thread | None = None

    def add(self, outcomes: list[tuple[str, dict]]) -> None:
        """Hand ``outcomes`` (``[(job, status)]``, as ``record_known`` takes) to the writer."""
        if not outcomes:
            return
        with self._cond:
            self._held.extend(outcomes)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mxq-outcomes", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over is written (or given up on); False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._held or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held:
                    self._cond.wait()
                batch, self._held = self._held, []
                self._busy = True
            try:
                record_known(self.store, batch, self.app)       # never raises an Exception
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _write(app, outcomes: list[tuple[str, dict]]) -> None:
    """Store ``[(job, status)]`` in ``app``'s result backend (state ``SUCCESS``); raises what it raises.

    At most ``WRITERS`` at once in a process (the rest wait for their turn)."""
    from celery import states

    if not outcomes:
        return
    _django_ready(app)
    backend = app.backend
    with _writers:
        if _is_redis(backend):
            _store_redis(backend, outcomes)
        else:
            for job, outcome in outcomes:
                backend.store_result(job, outcome, states.SUCCESS)


def _is_redis(backend) -> bool:
    from celery.backends.redis import RedisBackend
    return isinstance(backend, RedisBackend) and type(backend).__name__ in ("RedisBackend", "SentinelBackend")


# KEYS: the outcomes' keys (a job's key is also the channel its waiters subscribe to); ARGV[1]:
# seconds they live (0: for ever), ARGV[2..]: their values.  Every SET, then one PUBSUB NUMSUB of
# the channels, and a PUBLISH to those someone is subscribed to; returns how many were.
_STORE = """
local ex = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if ex > 0 then redis.call('SET', key, ARGV[i + 1], 'EX', ex) else redis.call('SET', key, ARGV[i + 1]) end
end
local subs = redis.call('PUBSUB', 'NUMSUB', unpack(KEYS))
local woken = 0
for i = 2, #subs, 2 do
  if tonumber(subs[i]) > 0 then
    redis.call('PUBLISH', subs[i - 1], ARGV[i / 2 + 1])
    woken = woken + 1
  end
end
return woken
"""
#: Outcomes one script call writes at most (a script's arguments are unpacked on Lua's stack).
_STORE_CHUNK = 500
_scripts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # backend client -> its _STORE
_PLAIN = object()       # in _scripts: that client's Redis runs no scripts (_store_plain instead)


def _store_redis(backend, outcomes: list[tuple[str, dict]]) -> None:
    """What ``RedisBackend.store_result`` writes -- the same key, value and expiry, and the
    PUBLISH that wakes ``AsyncResult.get()`` -- for a whole batch, in one script call
    (``_STORE``), without a PUBLISH for a job nobody waits on (``store_result`` costs a GET,
    MULTI, SETEX, PUBLISH and EXEC each).  A job's outcome is final, so there is no earlier
    success to protect from being overwritten.

    The script SETs every key, then counts each key's channel's subscribers (one ``PUBSUB
    NUMSUB``) and PUBLISHes to those someone is subscribed to, in one atomic step: no wake-up is
    lost that a PUBLISH after each SET would have given.  Celery's ``ResultConsumer`` SUBSCRIBEs
    to the key's channel and then reads the key (``on_wait_for_pending``): a waiter whose
    SUBSCRIBE Redis ran before the script gets its PUBLISH; one whose SUBSCRIBE ran after it
    reads the key after subscribing and finds the outcome.  Pattern subscribers are not
    counted: Celery's result consumer uses SUBSCRIBE only.  One command and one integer reply
    for the batch: redis-py packed a SET a job and parsed every reply and NUMSUB's list in
    Python: 23.5 us of CPU a job before, 15.5 us now (15 outcomes a call, measured in one process).
    A Redis that runs no scripts for this client (an ACL without ``@scripting``) gets the same
    writes as plain commands (``_store_plain``), from the first refusal on.
    tests/test_outcomes.py::test_a_waiter_is_woken_and_nobody_waiting_costs_no_publish,
    ::test_a_result_backend_that_runs_no_scripts_gets_the_outcomes_and_wakes_the_waiter."""
    from celery import states

    if not outcomes:
        return
    client = backend.client
    script = _scripts.get(client)
    if script is None:
        script = _scripts[client] = client.register_script(_STORE)
    # Celery's meta of a success (status, traceback, children, date_done and what the app's
    # configuration adds), made once for the batch: every outcome in it is written now, and
    # building it per job (the app's clock made timezone-aware, its configuration looked up) took
    # 0.11 s of a 1.74 s profiled delivery run of 3,000 messages.
    base = backend._get_result_meta(result=None, state=states.SUCCESS, traceback=None, request=None)
    expires = int(backend.expires) if backend.expires else 0
    for i in range(0, len(outcomes), _STORE_CHUNK):
        keys, values = [], []
        for job, outcome in outcomes[i:i + _STORE_CHUNK]:
            meta = dict(base)
            meta["result"], meta["task_id"] = outcome, job
            keys.append(backend.get_key_for_task(job))
            values.append(backend.encode(meta))
        if script is not _PLAIN:
            try:
                script(keys=keys, args=[expires, *values])
                continue
            except Exception as e:
                if not _scripts_refused(e):
                    raise
                log.warning("the result backend's Redis refuses scripts (%s): outcomes written with "
                            "plain commands", e)
                script = _scripts[client] = _PLAIN
        _store_plain(client, keys, values, expires)


def _scripts_refused(e: Exception) -> bool:
    """Is ``e`` a Redis that runs no scripts for this client (an ACL without ``@scripting``, EVAL
    renamed or disabled), not a failure of this write (Redis full, away)?"""
    from redis.exceptions import NoPermissionError, ResponseError

    text = str(e).lower()
    return isinstance(e, NoPermissionError) or (isinstance(e, ResponseError) and (
        "noperm" in text or "no permissions" in text or "unknown command" in text))


def _store_plain(client, keys: list[str], values: list, expires: int) -> None:
    """``_STORE`` without a script, for a Redis that runs none: every SET and one ``PUBSUB
    NUMSUB`` in one round trip, then a PUBLISH to the channels someone is subscribed to.  No
    wake-up is lost: a waiter whose SUBSCRIBE Redis ran before the NUMSUB is counted, one after
    it reads the key after subscribing and finds the outcome."""
    pipe = client.pipeline(transaction=False)
    for key, value in zip(keys, values):
        if expires:
            pipe.set(key, value, ex=expires)
        else:
            pipe.set(key, value)
    pipe.pubsub_numsub(*keys)
    subscribed = pipe.execute()[-1]
    waited = [(key, value) for key, value, (_, n) in zip(keys, values, subscribed) if int(n)]
    if waited:
        pipe = client.pipeline(transaction=False)
        for key, value in waited:
            pipe.publish(key, value)
        pipe.execute()


def after_release(store=None) -> int:
    """``record()`` for a worker after its batch: never raises (the scheduler catches up)."""
    try:
        return record(store)
    except Exception as e:          # the backend (or Redis) away: the jobs stay in mxq:final
        log.warning("job outcomes not recorded in the result backend yet: %s", e)
        return 0

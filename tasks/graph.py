"""The task graph: intake, delivery, notifications and the scheduler tick.

Tasks carry ids only (a domain, job ids): never message content, addresses
or credentials.  The work itself lives in Redis (``mxq.tasks.store``); a task is
a wake-up call for a lane, so a lost, duplicated or late task costs
nothing but time.

::

    submit / submit_many ──(one script: store + split by domain)──► mxq:ready:{domain}
          │  (batches > MXQ_INTAKE_THRESHOLD: stored, then)             ▲
          └──► mxq.intake(job_ids)  [intake] ──(split)──────────────────┘
                                                                        │ publish one
    mxq.deliver(domain)  [delivery] ◄───────────────────────────────────┘ per K items
          (a producer publishing more than 8 wake-ups sends one mxq.fanout(lanes)
           [intake] instead, which starts 16 of them itself and publishes the rest: graph.fan)
      claim up to K items of the domain under a lease (heartbeat renews it)
      deliver_domain(domain, envelopes) over one connection per exchange
      release: write each recipient's state (final never overwritten),
               deferred items -> mxq:deferred (due = now + MXQ_RETRY_SCHEDULE step),
               bounced/expired (or first delay with NOTIFY=DELAY) -> report lane,
               more ready items -> publish more mxq.deliver
    mxq.notify()  [notifications]: claim report items, group by job and event,
               mxq.tasks.notify.send_reports(...) submits the RFC 3464 report as a new job
    mxq scheduler (a loop, not a task; mxq.schedule does the same): one atomic script --
               expired leases -> front of their lane, due deferred -> back of
               their lane, quiet lanes with ready work -> tasks re-published,
               stalled intake -> mxq.intake re-published

Queues: ``mxq.intake``, ``mxq.delivery``, ``mxq.notifications`` (see ``mxq.tasks.app``).
Retries: only Redis connection errors (``TRANSIENT_REDIS_ERRORS``), a few
times with a short back-off; never a blanket autoretry, never a long
countdown (the deferred queue is a Redis ZSET, not ETA tasks).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import uuid
from collections import defaultdict

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init, worker_ready, worker_shutting_down

from mxq.workers.envelope import DSN, Envelope, Recipient
from mxq.workers.errors import register_interrupt, reraise_interrupt
from mxq.workers.results import RecipientResult

# The engine's modules are imported with this task module, when the worker starts (before it
# says it is ready), not by a process's first task: loading dnspython and the engine took about
# 80 ms of the first task in each new worker process, on the way to its first deliveries.
from mxq.workers.config import Settings
from mxq.workers.delivery import RunStats, deliver_domain
from mxq.workers.dnscache import quick_client
from mxq.workers.mtasts import MTASTS
from mxq.workers.mx import Resolver
from mxq.workers.port25 import Port25, Thresholds
from mxq.workers.scache import SessionCache, View

from . import green, metrics, qmgr, shaping
from . import outcomes as job_outcomes
from .app import DELIVERY, app, only_ours
from .broker import is_full as _is_full       # Redis refusing a write at maxmemory
from .broker import say_full as redis_full
from .dispatch import publish
from .heartbeat import Heartbeat
from .hoststatus import RedisHostStatus, RedisPolicyCache, RedisPort25State, RedisTLSReport
from .settings import PipelineSettings
from .store import (FINAL_STATES, REPORT_LANE, TRANSIENT_REDIS_ERRORS, Claimed, Grant, Outcome, Store,
                    check_on_start, get_store, keys, status_of)
from .store import items as workitems
from .webhooks import WEBHOOK_LANE
from . import webhook_lane  # noqa: F401 -- registers mxq.webhook (the webhook lane's task)

log = logging.getLogger("mxq.tasks")

# The soft time limit is a plain Exception raised wherever the task happens to
# be: the engine (and dnspython under it) must let it through, not classify it
# as a failed exchange or lookup.
register_interrupt(SoftTimeLimitExceeded)

_RETRY = dict(autoretry_for=TRANSIENT_REDIS_ERRORS, max_retries=3, retry_backoff=1,
              retry_backoff_max=8, retry_jitter=True)


def _literals_inline(**_kw) -> None:
    """A gevent worker resolves address literals without its thread pool (``mxq.tasks.green``)."""
    green.install()


def _say_resolver(**_kw) -> None:
    """Said once logging is set up (it is not yet at ``worker_init``)."""
    inner = green.installed()
    if inner is not None:
        log.info("gevent resolver: address literals answered in the caller, names by %s.%s",
                 type(inner).__module__, type(inner).__qualname__)


# First: the checks below already open Redis connections.
worker_init.connect(only_ours(_literals_inline), weak=False)
worker_ready.connect(only_ours(_say_resolver), weak=False)


# A worker refuses to start with a bad MXQ_SHAPING or MXQ_METRICS_PORT, and
# serves /metrics from its main process when MXQ_METRICS_PORT is set.
worker_init.connect(only_ours(shaping.check_on_worker_init), weak=False)


def _check_redis_on_worker_init(**_kw) -> None:
    """A worker refuses to start on a Redis whose eviction policy can delete mxq's keys."""
    check_on_start(PipelineSettings.from_env().redis_url)


worker_init.connect(only_ours(_check_redis_on_worker_init), weak=False)

#: Set when this worker process begins its warm shutdown (SIGTERM: ``podman stop``, ``mxq up``,
#: the supervisor): each connection finishes the chunk under way, records it, and claims no more,
#: so the process ends within one chunk's time and sends nothing twice.
STOPPING = threading.Event()


def _on_shutting_down(**_kw) -> None:
    STOPPING.set()


worker_shutting_down.connect(only_ours(_on_shutting_down), weak=False)
metrics.connect_signals()


# ---------------------------------------------------------------- per-process runtime
class Runtime:
    """What a worker process needs, made once per process (after the prefork fork).

    The engine's ``Settings`` (with any relay credentials) is read here, from
    the worker's environment, and stays in this process.
    """

    def __init__(self):
        self.pid = _pid()
        self.ps = PipelineSettings.from_env()
        self.store: Store = get_store(self.ps)
        self.engine = Settings.from_env()
        # The failure memory and the DNS cache are optimisations: a short timeout
        # and no retries, so Redis trouble never stalls a delivery on them.
        quick = quick_client(self.ps.redis_url)
        self.resolver = Resolver(self.engine, cache=_shared_dns_cache(self.engine, quick))
        self.hosts = RedisHostStatus(quick)
        # Fleet-wide transport state (mxq.tasks.hoststatus): MTA-STS policies, TLS-RPT counts, and
        # whether port 25 is blocked (tracked only when a fallback relay exists to act on it).
        self.mta_sts = MTASTS(self.resolver, RedisPolicyCache(quick), timeout=self.engine.mta_sts_timeout,
                              destinations=self.engine.destinations) if self.engine.mta_sts else None
        self.tls_report = RedisTLSReport(quick)
        self.port25 = None
        if self.engine.relay is not None and self.engine.relay_mode == "fallback":
            self.port25 = Port25(RedisPort25State(quick),
                                 Thresholds(probe_interval=self.engine.port25_probe_interval),
                                 relay=self.engine.relay.name)
        # Traffic shaping (MXQ_SHAPING): slots live as long as a batch lease and
        # are renewed by the same heartbeat.
        self.shaper = shaping.Shaper(self.store.r, shaping.Policy.from_env(), slot_ttl=self.ps.lease_seconds,
                                     dest=self.store.dest)
        # Session observers for every delivery run of this process (metrics when enabled).
        self.observers = metrics.session_observers()
        # The destination scheduling policy every dispatch reads (mxq.tasks.qmgr).
        self.store.publish_policy(qmgr.redis_policy(self.shaper.policy, self.ps))
        # Connection reuse (mxq.workers.scache): a cached connection keeps the concurrency
        # slot of the domain it last served, so it never idles more than half a slot's life.
        reuse = self.engine.reuse
        if reuse.idle > self.ps.lease_seconds / 2:
            reuse = dataclasses.replace(reuse, idle=self.ps.lease_seconds / 2)
        self.scache = SessionCache(reuse, on_close=self.closed)
        # Outcomes of whole jobs go to the result backend from the release (or record) that made
        # them final (record_own).
        self.own_outcomes = job_outcomes.enabled()
        self.recorder = qmgr.Recorder(self.store, publish, owner=self)
        # Messages this process holds claimed beyond one per connection (qmgr.Budget).
        self.budget = qmgr.Budget(qmgr.LOCAL_MESSAGES)
        # A gevent worker opens a lane's further connections inside the task (graph._Lane).
        self.local_spawn = _green()
        # ... and its hundreds of connections hand their outcomes to one writer (outcomes.Writer);
        # a process of one connection at a time writes them itself, before the task returns.
        self.outcome_writer = job_outcomes.Writer(self.store) if self.local_spawn and self.own_outcomes else None
        if self.outcome_writer is not None:
            atexit.register(self.outcome_writer.flush, 2.0)
        self.local_lock = threading.Lock()
        self.local_active = 0
        # How late a task that is ready gets its turn in this process (seconds, smoothed).
        self.lag = 0.0
        _settle_gc()
        threading.Thread(target=self._watch_lag, name="mxq-lag", daemon=True).start()

    def _watch_lag(self, period: float = 0.05) -> None:
        """Measure the scheduling lag: how much later than asked a short sleep returns."""
        while True:
            t = time.monotonic()
            time.sleep(period)
            late = max(0.0, time.monotonic() - t - period)
            self.lag = 0.8 * self.lag + 0.2 * late

    def busy(self) -> bool:
        """Do this process's ready tasks wait for their turn (its lag above ``qmgr.MAX_LAG``)?"""
        return self.lag >= qmgr.MAX_LAG

    def closed(self, tag) -> None:
        """The connection cache closed a connection: the slot it held is free."""
        if tag:
            try:
                publish(self.shaper.release(*tag))
            except Exception as e:  # noqa: BLE001 -- the slot expires with its ttl
                log.warning("giving back the slot of a closed connection failed: %s", e)

    def record_own(self, outcomes: list[Outcome], jobs: list[str]) -> None:
        """The outcomes of ``jobs``, made final by a release or record of ``outcomes`` that hold every
        record of each, to the result backend now (through this process's ``outcome_writer`` when it
        has one): no claim, no read (``mxq.tasks.outcomes``)."""
        whole = _whole_outcomes(outcomes, jobs)
        if self.outcome_writer is not None:
            self.outcome_writer.add(whole)
        else:
            job_outcomes.record_known(self.store, whole)

    def adopted(self, tag) -> None:
        """A task took a cached connection that held another task's slot: that slot is free (and the
        lane is dispatched: an earlier task may have been refused for want of it)."""
        self.closed(tag)


def _green() -> bool:
    """True in a gevent worker (threads are greenlets: cheap, and the engine cooperates)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


def _pid() -> int:
    import os
    return os.getpid()


def _shared_dns_cache(settings, client):
    """A ``mxq.workers.dnscache.DNSCache`` on ``client`` whose misses are resolved by one worker at a time.

    Two workers missing the same name at once (two tasks of a new domain
    starting together) would both ask DNS: the first takes a lock
    (``mxq:dnslock:{type}:{name}``, SET NX, 2 s; in the round trip that found
    no answer in Redis: ``DNSCache.get_or_lock``) and resolves, and its
    answer's write lets go of the lock in one round trip; the others wait
    for its answer to appear in Redis (polling every 5 ms, at most the lock's
    life), then ask DNS themselves only if none came (a failure is not
    cached).  So a name and type is asked once per TTL across every worker.
    Within a process, tasks missing the same name at once (a new destination's
    connections opened together) wait for the first one's answer in memory
    instead of each polling Redis.
    """
    import json as _json

    from mxq.workers.dnscache import CachedAnswer, DNSCache

    class SharedLookups(DNSCache):
        """``DNSCache`` with one DNS lookup per name and type across processes (see above)."""

        LOCK = keys.DNSLOCK_PREFIX
        WAIT = 2.0

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._flights: dict[tuple[str, str], tuple[threading.Event, float]] = {}

        def get(self, rtype: str, name: str):
            hit = self.local(rtype, name)
            if hit is not None or not self._redis_usable():
                return hit
            key = (rtype, name)
            with self._lock:
                flight = self._flights.get(key)
                if flight is None or flight[1] < time.monotonic():
                    self._flights[key] = (threading.Event(), time.monotonic() + self.WAIT)
                    flight = None
            if flight is not None:
                # Another task of this process is resolving it: its answer lands in memory (or,
                # if none came in time, the other workers' way: through Redis).
                flight[0].wait(max(0.0, flight[1] - time.monotonic()))
                with self._lock:
                    item = self._entries.get(key)
                if item is not None and item[0] > self.clock():
                    return item[1]
            answer = self._shared(rtype, name)
            if answer is not None:
                self._landed(key)
            return answer

        def _landed(self, key) -> None:
            with self._lock:
                flight = self._flights.pop(key, None)
            if flight is not None:
                flight[0].set()

        def _shared(self, rtype: str, name: str):
            lock = f"{self.LOCK}{rtype}:{name}"
            key = self.redis_key(rtype, name)

            def cached():
                pipe = self.redis.pipeline(transaction=False)
                pipe.get(key)
                pipe.pttl(key)
                pipe.exists(lock)
                value, pttl, locked = pipe.execute()
                if value is not None and pttl and pttl > 0:
                    answer = CachedAnswer.from_json(value)
                    self._store((rtype, name), answer, pttl / 1000.0)
                    return answer, True
                return None, bool(locked)

            try:
                # One round trip: Redis's answer, or the lock when nobody holds it.
                answer, ours = self.get_or_lock(rtype, name, lock, str(_pid()), int(self.WAIT * 1000))
                if answer is not None or ours:
                    return answer               # None: ours to resolve; put() lets go
                deadline = time.monotonic() + self.WAIT
                while time.monotonic() < deadline:
                    time.sleep(0.005)
                    answer, locked = cached()
                    if answer is not None:
                        return answer
                    if not locked:
                        break                   # let go without an answer (a failure): ask ourselves
            except (ValueError, KeyError, TypeError, _json.JSONDecodeError):
                return None
            except Exception as e:              # Redis trouble never stops a lookup
                reraise_interrupt(e)
                return None
            return None

        def put(self, rtype: str, name: str, answer):
            # The answer's write lets go of the lock in the same round trip (a failed write: the
            # lock expires by itself).
            stored = super().put(rtype, name, answer, release=f"{self.LOCK}{rtype}:{name}")
            self._landed((rtype, name))
            return stored

    return SharedLookups(settings, redis=client)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


#: The delivery process's cyclic garbage collector (``_settle_gc``): a collection of the youngest
#: generation after this many allocations (Python's default 700), the older ones after 10 of the
#: younger's each (as by default).
GC_THRESHOLDS = (10000, 10, 10)


def _settle_gc() -> None:
    """Set up the garbage collector of a process that delivers (once, with its ``Runtime``).

    What is alive by then -- modules, Celery, the app, the engine's settings -- is moved out of
    every later collection (``gc.freeze``), and collections start after ``GC_THRESHOLDS[0]``
    allocations.  A worker process delivering to instant exchanges allocates a few hundred objects
    a message (records, replies, outcomes; nearly none in cycles): with Python's defaults it ran
    about 30 collections a second, 0.1-0.2 s of CPU per process in the timed part of the bench's
    loopback stage (4-6% of its work), most of it in the older generations' collections walking
    the same long-lived objects again (docs/DESIGN.md, 2026-12-05 evening).
    """
    import gc
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def runtime() -> Runtime:
    """This process's ``Runtime``: one, made by the first task that needs it.

    Made under a lock: ``Runtime()`` talks to Redis, and in a gevent worker
    the hundreds of tasks a new process receives at once each made their own
    while the first one's waited on the network -- each with its own session
    cache, claimed-mail budget and lag watcher (which kept it alive for good).
    """
    global _runtime
    rt = _runtime
    if rt is None or rt.pid != _pid():
        with _runtime_lock:
            rt = _runtime
            if rt is None or rt.pid != _pid():
                rt = _runtime = Runtime()
    return rt


# ---------------------------------------------------------------- Redis full (maxmemory)
#: Seconds a delivery task that found Redis full waits for memory to free before it gives up
#: (the scheduler re-publishes its lane later); checked every REDIS_FULL_POLL seconds.
REDIS_FULL_WAIT = 20.0
REDIS_FULL_POLL = 0.5


def _room(store: Store, wait: float) -> bool:
    """Wait (at most ``wait`` seconds) until Redis takes writes again; True when it does."""
    deadline = time.monotonic() + wait
    while True:
        try:
            mem = store.r.info("memory")
            limit = int(mem.get("maxmemory") or 0)
            if not limit or int(mem.get("used_memory") or 0) < limit:
                return True
        except Exception as e:          # noqa: BLE001 -- Redis away: keep waiting, bounded
            reraise_interrupt(e)
        if time.monotonic() + REDIS_FULL_POLL > deadline:
            return False
        time.sleep(REDIS_FULL_POLL)


def _acquire(rt: "Runtime", domain: str, token: str) -> Grant | None:
    """``Shaper.acquire`` for a delivery task; None when Redis is full and stays full (the task
    then returns: nothing was taken, and the scheduler re-publishes the lane)."""
    for attempt in (1, 2):
        try:
            return rt.shaper.acquire(domain, token, rt.ps.batch_size, now=rt.store.now())
        except Exception as e:
            if not _is_full(e):
                raise
            redis_full(f"deliver {domain}: nothing claimed")
            if attempt == 2 or not _room(rt.store, REDIS_FULL_WAIT):
                return None
    return None


# ---------------------------------------------------------------- delivery
def _pending(item: Claimed) -> list[tuple[str, dict]]:
    return [(i, r) for i, r in zip(item.indexes, item.records) if r is not None and r["state"] not in FINAL_STATES]


def _envelope(item: Claimed, pending: list[tuple[str, dict]]) -> Envelope:
    m = item.meta
    dsn = DSN(ret=m.get("ret") or None, envid=m.get("envid") or None) if (m.get("ret") or m.get("envid")) else None
    rcpts = [Recipient(r["address"], notify=tuple(r["notify"]) if r.get("notify") else None,
                       orcpt=r.get("orcpt")) for _, r in pending]
    size = int(m.get("size") or 0) or None
    return Envelope(sender=m.get("sender", ""), recipients=rcpts, content=item.content, dsn=dsn,
                    eightbit=m.get("eightbit") == "1", smtputf8=m.get("smtputf8") == "1", size=size, id=item.job)


def _wants(sender: str, notify_kw, action: str) -> bool:
    try:
        from . import notify as reports
    except ImportError:             # reports not available: queue every event, notify.py decides
        return True
    return reports.wants_report(sender, notify_kw, action)


def _updated(rec: dict, result: dict | None, *, sender: str, now: float, deadline: float,
             ps: PipelineSettings, tried: bool = True, not_before: float | None = None
             ) -> tuple[dict, str, float | None]:
    """A recipient's new record after one run: ``(record, report event, due)``.

    ``result`` is the engine's ``RecipientResult.to_dict()``, or None when the
    recipient was not attempted (its lifetime ran out before).  A deferral
    past the lifetime becomes ``expired`` (with the last reason); otherwise
    the next attempt is due after the retry schedule's step for this run
    (and not before ``not_before``), but never later than the end of the
    lifetime, so the last attempt happens at the deadline.  ``tried=False``:
    nothing was sent (a dead destination's mail deferred without a
    connection): the state and reason change, the attempt counts and the
    last exchange stay.
    """
    rec = dict(rec)
    if result is not None and not tried:
        for f in ("state", "code", "enhanced", "text", "scope"):
            rec[f] = result.get(f)
    elif result is not None:
        for f in ("state", "code", "enhanced", "text", "exchange", "ip", "relay", "scope"):
            rec[f] = result.get(f)
        rec["first_attempt"] = rec.get("first_attempt") or now
        rec["last_attempt"] = now
        rec["runs"] = int(rec.get("runs") or 0) + 1
        # attempts: delivery runs that tried this recipient (the engine's own
        # count, exchanges tried within one run, is summed in "exchanges").
        rec["attempts"] = rec["runs"]
        rec["exchanges"] = int(rec.get("exchanges") or 0) + int(result.get("attempts") or 0)
    else:
        rec["state"] = "deferred"
    if rec["state"] not in FINAL_STATES:
        rec["state"] = "deferred"          # the engine's "queued" (never tried) counts as a deferral
    event, due = "", None
    rec["next_attempt"] = None
    if rec["state"] == "deferred":
        if now >= deadline:
            rec["state"] = "expired"
            if not rec.get("text"):
                rec["text"] = "delivery time expired"
            if not rec.get("enhanced"):
                rec["enhanced"] = "4.4.7"
        else:
            due = now + ps.backoff(max(1, int(rec.get("runs") or 1)))
            if not_before is not None:
                due = max(due, not_before)
            due = min(due, deadline)
            rec["next_attempt"] = due
            if not rec.get("delay_reported") and rec.get("notify") and "DELAY" in rec["notify"] \
                    and _wants(sender, rec["notify"], "delayed"):
                rec["delay_reported"] = True
                event = "delayed"
    if rec["state"] in ("bounced", "expired") and _wants(sender, rec.get("notify"), "failed"):
        event = rec["state"]
    return rec, event, due


_RESULT_FIELDS = ("address", "domain", "code", "enhanced", "text", "exchange", "ip", "relay", "attempts", "scope")


def _result_dict(r) -> dict:
    """``RecipientResult.to_dict()`` without ``dataclasses.asdict``'s deep copy (10% of a
    delivery task's CPU, profiled): the fields are plain values."""
    if isinstance(r, RecipientResult):
        d = {f: getattr(r, f) for f in _RESULT_FIELDS}
        d["state"] = r.state.value if hasattr(r.state, "value") else r.state
        return d
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


def _results_for(env: Envelope, results: list) -> list[dict | None]:
    """The engine's results for ``env``'s recipients, in the envelope's order."""
    as_dicts = [_result_dict(r) for r in results]
    if len(as_dicts) == len(env.recipients) and all(
            d["address"].lower() == rc.address.lower() for d, rc in zip(as_dicts, env.recipients)):
        return as_dicts
    by_addr = {d["address"].lower(): d for d in as_dicts}
    return [by_addr.get(rc.address.lower()) for rc in env.recipients]


def _whole_outcomes(outcomes: list[Outcome], jobs: list[str]) -> list[tuple[str, dict]]:
    """``[(job, status)]`` of ``jobs`` (made final by a release) from ``outcomes`` that hold every
    record of each (``Outcome.whole``): what ``mxq.tasks.status`` returns for them."""
    wanted = set(jobs)
    out = []
    for o in outcomes:
        job = workitems.job_of(o.wid)
        if job in wanted and o.whole:
            wanted.discard(job)
            out.append((job, status_of(job, {"left": "0"}, {int(i): rec for i, rec, _ in o.updates})))
    return out


def run_delivery(domain: str) -> dict:
    """One connection's worth of ``domain``'s mail (``mxq.tasks.qmgr``): claim, deliver, record, repeat.

    Traffic shaping and the destination's window come first
    (``mxq.tasks.shaping``): a concurrency slot and a token per message, or the
    work stays on its ready list, the lane goes to ``mxq:throttled`` for the
    scheduler, and the task returns at once (it never sleeps waiting).  A
    dead destination's task defers the ready mail instead (no connection);
    the first task after its dead period is its probe.  Then the task takes
    chunks of the lane's ready mail over one connection until the lane is
    empty, the destination fails, or half the soft time limit has passed.
    Redis full (maxmemory): nothing is claimed (the claim and acquire scripts
    are refused whole); the task says so, waits up to ``REDIS_FULL_WAIT`` for
    memory, and returns if there is none (the scheduler re-publishes the lane).
    Returns counts for the task's result/logs (no addresses, no content).
    """
    rt = runtime()
    token = uuid.uuid4().hex
    grant = _acquire(rt, domain, token)
    if grant is None:
        return {"items": 0, "redis_full": 1}
    if not grant.granted:
        if _refused(domain, grant):
            return {"items": 0, "throttled": 1}
        return {"items": 0}
    if grant.mode == "drain":
        counts = _drain(rt, domain, token, grant)
    else:
        counts = _Lane(rt, domain).run(token, grant)
    if counts.get("items"):
        job_outcomes.after_release(rt.store)    # finished jobs to Celery's result backend (mxq.tasks.outcomes)
    metrics.dns(rt.resolver)
    if counts.get("items"):
        metrics.outcomes(domain, counts)
        log.info("deliver %s: %s", domain, ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return dict(counts)


def _refused(domain: str, grant: Grant) -> bool:
    """Count and log a refused acquire; True unless the lane was merely empty."""
    if grant.reason == "empty":
        return False
    if grant.reason == "suspended":
        log.info("deliver %s: suspended by the operator (mxq queue resume %s), no connection", domain, domain)
        return True
    metrics.throttled(domain, grant.reason)
    log.info("deliver %s: held back by %s (%s), looked at again in %.2f s", domain,
             "a dead destination's probe" if grant.reason == "dead" else "shaping", grant.reason, grant.wait)
    return True


class _Lane:
    """One ``mxq.deliver`` task: its connection to the lane, and the lane's further connections it runs here.

    When the lane's dispatch wants more connections (its window grew, its
    mail is slow) and this is a gevent worker with room, the task opens them
    itself, each a ``_Connection`` with a slot of its own (taken through the
    same acquire a published task makes, so every limit and count is the
    same), up to ``qmgr.CONNECTIONS_PER_TASK`` per task and
    ``qmgr.LOCAL_CONNECTIONS`` per process; what it cannot take is published
    as tasks for any worker.  This saves a Celery task (about 2-3 ms of CPU:
    publish, receive, events, ack) per connection.  The task returns when
    all its connections are done.
    """

    def __init__(self, rt: Runtime, domain: str):
        self.rt, self.domain = rt, domain
        self.local = 0                      # this task's connections running
        self.threads: list[threading.Thread] = []
        self.conns: list[_Connection] = []
        self.conns_counts: list[dict] = []
        self.deadline = time.monotonic() + rt.ps.soft_time_limit / 2
        self.speculated = False
        # A connection is started and listed in one step (spawn), so join() never sees one not started
        # yet -- another connection of this task may be opening one meanwhile -- and none after it.
        self.spawning = threading.Lock()
        self.joined = False

    def run(self, token: str, grant: Grant) -> dict:
        first = self.start(token, grant)
        try:
            first.run()
        finally:
            first.close()
            self.done()
            self.join()
        counts: dict[str, int] = defaultdict(int)
        for c in [c.counts for c in self.conns] + self.conns_counts:
            for k, v in c.items():
                counts[k] += v
        return counts

    def join(self) -> None:
        """Wait for every connection this task opened, and those they open meanwhile; then it opens no more."""
        while True:
            with self.spawning:
                if not self.threads:
                    self.joined = True
                    return
                t = self.threads.pop()
            t.join()

    def start(self, token: str, grant: Grant) -> "_Connection":
        with self.rt.local_lock:
            self.rt.local_active += 1
            self.local += 1
        conn = _Connection(self.rt, self.domain, token, grant, lane=self)
        self.conns.append(conn)
        return conn

    def done(self) -> None:
        with self.rt.local_lock:
            self.rt.local_active -= 1
            self.local -= 1

    def publish(self, dispatch: list[tuple[str, int]], *, slow: bool = False) -> None:
        """Publish ``dispatch``, opening the wanted connections of this lane here when there is room.

        ``slow``: the lane is slow beyond doubt (``qmgr.slow_beyond_doubt``):
        its connections are opened here even when this process is busy.  A
        busy process otherwise publishes them as tasks for a less busy one;
        for a slow lane that only added a task's cost (publish, receive,
        trace: 2-3 ms of CPU and several Redis round trips) and its wait in
        the queue to every connection, while the process that took the task
        was as busy: of 43 runs of the bench's slow stage, the 15 that
        published 42-93 tasks took a median 4.74 s and include the three
        slowest (5.9-6.2 s); the 15 that published none (2-3 tasks), 4.44 s.
        """
        rest = []
        for lane, n in dispatch:
            if lane == self.domain and n > 0:
                n -= self.spawn(n, force=slow)
            if n > 0:
                rest.append((lane, n))
        publish(rest)

    def spawn(self, n: int, *, force: bool = False) -> int:
        """Open up to ``n`` more connections of the lane in this process (gevent, room, not busy); how many.

        ``force``: even in a busy process (``speculate`` has judged the lane slow by its own rule).
        """
        if not (self.rt.local_spawn and time.monotonic() < self.deadline and (force or not self.rt.busy())
                and not STOPPING.is_set()):
            return 0
        with self.rt.local_lock:
            k = max(0, min(n, qmgr.CONNECTIONS_PER_TASK - self.local,
                           qmgr.LOCAL_CONNECTIONS - self.rt.local_active))
            self.local += k                 # reserved; start() counts them again
            self.rt.local_active += k
        started = 0
        for _ in range(k):
            with self.spawning:
                if self.joined:             # the task is over (a late speculation)
                    break
                t = threading.Thread(target=self.extra, name="mxq-conn", daemon=True)
                t.start()
                self.threads.append(t)
            started += 1
        if started < k:
            with self.rt.local_lock:
                self.local -= k - started
                self.rt.local_active -= k - started
        return started

    def speculate(self, window: int) -> None:
        """A first chunk of a lane of unknown latency waits on a silent server: open the window now.

        Postfix opens a destination's initial concurrency at once; mxq learns
        a lane's seconds per message from its first delivery, and spreads its
        mail when that is in (``qmgr``).  A destination that has owed the
        first chunk a reply for ``qmgr.SPECULATE_SILENCE`` is slow (an instant
        one answers within milliseconds): the lane gets up to its window of
        connections here without waiting for the verdict, so the first
        second of a slow destination is not spent on one connection.  Each
        takes its slot through the same acquire (the window holds
        fleet-wide); once per task, whatever this process's lag (the silence
        is the server's, ``_Connection.watch``).
        """
        if self.speculated:
            return
        self.speculated = True
        if not self.rt.local_spawn or time.monotonic() >= self.deadline:
            return
        try:
            ready = self.rt.store.ready_count(self.domain)
        except Exception as e:  # noqa: BLE001 -- an optimisation: the verdict's dispatch spreads anyway
            log.warning("deliver %s: reading the ready mail failed: %s", self.domain, e)
            return
        want = min(ready, max(0, window - self.local))
        if want > 0:
            # The server is slow whatever this process's lag: the connections are opened even in a
            # busy process (spawn's busy rule refused them in a process starting hundreds of
            # destinations at once -- its lag is high exactly then -- and the lane stayed on one
            # connection until its first verdict: 599-800 of 1,000 deliveries in flight in the
            # bench's inflight stage).
            self.spawn(want, force=True)

    def extra(self) -> None:
        """One more connection of the lane (a thread: a greenlet under gevent), as a published task would."""
        with self.rt.local_lock:            # the reservation made in publish(); start() counts it
            self.rt.local_active -= 1
            self.local -= 1
        try:
            token = uuid.uuid4().hex
            grant = _acquire(self.rt, self.domain, token)
            if grant is None:
                return
            if not grant.granted:
                _refused(self.domain, grant)
                return
            if grant.mode != "deliver":
                if grant.mode == "drain":           # declared dead meanwhile
                    self.conns_counts.append(_drain(self.rt, self.domain, token, grant))
                return
            conn = self.start(token, grant)
            try:
                conn.run()
            finally:
                conn.close()
                self.done()
        except Exception:  # noqa: BLE001 -- like a task that failed: the leases bring its work back
            log.exception("deliver %s: a connection failed", self.domain)


class _Connection:
    """A connection (slot) to ``domain`` taking chunks of its ready mail (see ``_Lane``)."""

    def __init__(self, rt: Runtime, domain: str, token: str, grant: Grant, lane: _Lane):
        self.rt, self.domain, self.token, self.grant, self.lane = rt, domain, token, grant, lane
        self.ps = rt.ps
        self.probe = grant.mode == "probe"
        self.latency = grant.latency
        #: messages this connection's own answers measured, while its latency is its own (None: the
        #: lane's latency came with the grant)
        self.measured: int | None = 0 if grant.latency is None else None
        limits = rt.shaper.policy.for_domain(domain)
        self.tokens = grant.granted if limits.rate else None      # rate tokens left to use
        self.single = limits.concurrency == 1                     # one connection: chunks never overdue
        self.sessions = View(rt.scache, tag=(domain, token) if grant.slot else None, on_adopt=rt.adopted,
                             hold=True)
        self.deadline = lane.deadline
        self.counts: dict[str, int] = defaultdict(int)
        self.hb: Heartbeat | None = None     # while run() runs: the lease heartbeat (stop when lost)

    def run(self) -> dict:
        with Heartbeat(self.rt.store, "", slot=(self.domain, self.token) if self.grant.slot else None) as hb:
            self.hb = hb
            seq = 0
            while not hb.stopped():         # a lost heartbeat: no more chunks
                k = 1 if self.probe else qmgr.chunk_size(self.latency, self.ps.batch_size, self.measured,
                                                           silent=self.lane.speculated)
                if self.tokens is not None:
                    k = min(k, self.tokens)
                    if k <= 0:
                        break
                # Room in the process for the chunk beyond its first message (qmgr.Budget): waits
                # while the process holds its fill of claimed mail (no lease held meanwhile).
                hb.token = ""
                k = self.rt.budget.take(k, self.deadline - time.monotonic(), stop=self.stop)
                if k <= 0:
                    break
                seq += 1
                batch = f"{self.token}.{seq}"
                hb.token = batch
                try:
                    items = self.rt.store.claim(self.domain, batch, limit=k, checked=seq == 1)   # (acquired just now)
                    hb.renewed = time.monotonic()       # the claim wrote a fresh lease
                except Exception as e:
                    self.rt.budget.give(k - 1)
                    if not _is_full(e):
                        raise
                    redis_full(f"deliver {self.domain}: no next chunk")     # refused whole: nothing taken
                    break
                held = max(0, len(items) - 1)
                self.rt.budget.give(k - 1 - held)       # what the claim did not get
                if self.tokens is not None:
                    self.tokens -= len(items)
                if not items:
                    break
                n = len(items)
                try:
                    status, stats = self.chunk(batch, items)
                finally:
                    items = None            # not held (content and records) while waiting for room
                    self.rt.budget.give(held)
                if status in ("dead", "error") or stats.failed or stats.dns_transient:
                    break                   # the destination (or the engine) is in trouble: no more now
                self.probe = False          # a probe that got this far revived it
                if n < k or time.monotonic() >= self.deadline:
                    break                   # the lane was empty (what came since gets a task at close)
                if STOPPING.is_set():
                    break                   # warm shutdown: the rest waits on its list for another worker
        return self.counts

    def stop(self) -> bool:
        """Should a connection waiting for room give up (its heartbeat lost, a warm shutdown)?"""
        return (self.hb is not None and self.hb.stopped()) or STOPPING.is_set()

    def close(self) -> None:
        """The held connection goes to the process cache keeping the slot (parked); else the slot is given back.

        Either way the task no longer counts as running, and the lane's ready
        work (if any came meanwhile) gets tasks.
        """
        kept = self.sessions.release()
        if self.tokens:
            self.rt.shaper.refund(self.domain, self.tokens)
        if self.grant.slot:
            self.lane.publish(self.rt.shaper.release(self.domain, self.token, park=kept),
                              slow=qmgr.slow_beyond_doubt(self.rt.lag, self.latency))

    def chunk(self, batch: str, items: list[Claimed]) -> tuple[str, RunStats]:
        """Deliver one claimed chunk over the task's connection, record it, release it."""
        rt, ps, domain = self.rt, self.ps, self.domain
        counts = self.counts
        counts["items"] += len(items)
        plan = []               # (item, pending, envelope)
        outcomes = []
        for it in items:
            pending = _pending(it)
            if pending:
                plan.append((it, pending, _envelope(it, pending)))
            else:
                outcomes.append(Outcome(it.wid))        # nothing left to do (a stale copy)
        stats = RunStats()
        results: list[list] | None = None
        recorded: set[int] = set()
        early: dict[int, list] = {}         # final replies in while the chunk was young: not recorded yet
        started = time.monotonic()
        eager = self.progressive(len(plan))

        def record(n: int, res: list) -> None:
            it, pending, env = plan[n]
            recorded.add(n)
            rt.recorder.add(batch, domain, self.outcome(it, pending, _results_for(env, res), rt.store.now()))

        def done(n: int, res: list) -> None:
            # The message's final reply is in: record it now, while the chunk goes on -- once the
            # chunk has run RECORD_AFTER (a destination that became slow after its latency was
            # learned: the whole chunk would otherwise wait for its release, and a crash resend it).
            if not eager and time.monotonic() - started < qmgr.RECORD_AFTER:
                early[n] = res
                return
            for m in sorted(early):
                record(m, early.pop(m))
            record(n, res)

        if plan:
            watch = self.watch(stats)
            try:
                results = deliver_domain(domain, [env for _, _, env in plan], settings=rt.engine,
                                         resolver=rt.resolver, host_status=rt.hosts, deadline=self.deadline,
                                         observers=rt.observers,
                                         source_pool=rt.shaper.policy.for_domain(domain).pool,
                                         mta_sts=rt.mta_sts, tls_report=rt.tls_report, port25=rt.port25,
                                         sessions=self.sessions, on_done=done,
                                         stats=stats, ignore_down=self.probe,
                                         stop=self.stopper(len(plan), started, stats))
                metrics.run_seconds(time.monotonic() - started)
            except Exception as e:
                if not isinstance(e, SoftTimeLimitExceeded):
                    # An engine bug must not lose mail: a transient local failure, so the
                    # recipients follow the retry schedule.
                    log.exception("deliver_domain failed for %d message(s) of %s", len(plan), domain)
                    results = None
                else:
                    self.interrupted(batch, plan, recorded, outcomes, "the task's soft time limit was reached", early)
                    raise
            except BaseException as e:      # gevent's Timeout (the hard time limit), GreenletExit, ...
                self.interrupted(batch, plan, recorded, outcomes, f"the task was stopped ({type(e).__name__})", early)
                raise
            finally:
                if watch is not None:
                    watch.set()
        now = rt.store.now()
        for n, (it, pending, env) in enumerate(plan):
            if n in recorded:
                continue
            if results is not None:
                per = _results_for(env, results[n])
            else:
                per = [{"state": "deferred", "code": None, "enhanced": "4.3.0",
                        "text": "internal error in the delivery engine", "attempts": 0}] * len(pending)
            outcomes.append(self.outcome(it, pending, per, now))
        late, written = rt.recorder.take(batch)
        fb = qmgr.feedback(stats, [_results_for(env, results[n]) for n, (_, _, env) in enumerate(plan)]
                           if results is not None else None, probe=self.token if self.probe else "",
                           lag=rt.lag)
        # A process whose tasks wait for their turn asks for no more connections to this lane,
        # unless the lane is slow beyond doubt (qmgr.spread): its measured time per message may
        # be its own delays, and more connections would add work, not throughput.  This task
        # goes on with the lane's mail, and what is left when it ends gets a task then.
        mine: list[str] | None = [] if rt.own_outcomes else None
        first = self.latency is None and not self.probe
        applied, dispatch, status = rt.store.finish(batch, domain, late + outcomes, fb if plan else None,
                                                    now=now, spread=qmgr.spread(rt.lag, fb.latency, first),
                                                    mine=mine, hide=job_outcomes.LEASE)
        if mine:
            # Jobs this release made final whose every record is in hand: their outcomes go to the
            # result backend now, without the recorders' claim and read (mxq.tasks.outcomes).
            rt.record_own(late + outcomes, mine)
        counts["written"] += written + len(applied)
        if results is not None and stats.transactions and fb.latency:
            self.latency = qmgr.smooth(self.latency, fb.latency, stats.transactions)
            if self.measured is not None:
                self.measured += stats.transactions
        self.lane.publish(dispatch, slow=qmgr.slow_beyond_doubt(rt.lag, self.latency))
        if status == "dead":
            log.warning("deliver %s: destination declared dead (%s)", domain, fb.why or "connection failures")
        if plan and results is None:
            status = "error"
        return status, stats

    def watch(self, stats: RunStats) -> threading.Event | None:
        """While this chunk of a lane of unknown latency runs, ``_Lane.speculate`` once its server is silent.

        What counts is the server's silence on what it was sent last
        (``SMTPSession.silence`` of the run's connection, ``stats.session``,
        which the engine fills in as it goes): from the moment the read of
        the reply began, only while none of it has arrived, past
        ``qmgr.SPECULATE_SILENCE``.  The run's set-up (DNS, the MTA-STS
        policy, the handshake) does not count: a new destination's took 0.3-1
        s by itself in a busy process (the bench's loopback stage, 100 new
        domains at once), and counting it opened the window of every instant
        destination.  Nor does this process's delay in reading a reply that is
        in (a worker starting 100 instant destinations at once on 2 busy cores
        had its first transactions wait 0.25 s that way), nor in sending its
        next command: an instant server is never silent for long however busy
        the worker is, so no allowance for the process's lag is needed.
        Before (until 2026-12-05) the watch counted the chunk's time since it
        connected, less its set-up, and a busy process waited for ten times
        its lag: in the bench's slow stage the worker starting 50 new
        destinations was that busy, and most lanes got their window only with
        their first verdict, a whole round trip (1 s) later.  Returns the
        event that stops the watch (set it when the chunk is over), or None
        when there is nothing to watch.
        """
        if self.latency is not None or self.probe or self.lane.speculated or not self.rt.local_spawn:
            return None
        over = threading.Event()
        lane, window = self.lane, self.grant.window

        def run():
            while not over.wait(qmgr.SPECULATE_SILENCE / 5):
                session = stats.session
                if session is not None and session.silence >= qmgr.SPECULATE_SILENCE:
                    lane.speculate(window)
                    return

        threading.Thread(target=run, name="mxq-speculate", daemon=True).start()
        return over

    def stopper(self, k: int, started: float, stats: RunStats):
        """The engine's ``stop()`` for a chunk of ``k`` messages started at ``started`` (None: nothing to stop it).

        It stops when the lease heartbeat is lost, and when the chunk is
        overdue (``qmgr.overdue``; ``stats``: the run's, as the engine fills
        them in) on a lane that may have more than
        one connection: the engine then starts no new transaction, and the
        messages it did not try come back ``queued`` (not an attempt), so
        ``outcome`` puts them back due at once for the lane's other
        connections.  A lane limited to one connection keeps its chunk: no
        other connection could take the rest sooner.
        """
        hb = self.hb
        limit = None if self.single else qmgr.overdue_after(self.latency, k)
        if limit is None:
            return hb.stopped if hb is not None else None

        def stop() -> bool:
            if hb is not None and hb.stopped():
                return True
            if qmgr.overdue(time.monotonic() - started, stats.transactions, limit):
                self.counts["overdue"] += 1
                return True
            return False
        return stop

    def progressive(self, n: int) -> bool:
        """Record this chunk's messages one by one as their final replies arrive (``qmgr.Recorder``)?

        Only when the chunk takes a while: a fast destination's chunk is over
        (and recorded whole) sooner than a recording would be written.
        """
        return n > 1 and (self.latency is None or self.latency * n >= qmgr.RECORD_AFTER)

    def outcome(self, it: Claimed, pending: list[tuple[str, dict]], per: list[dict | None], now: float) -> Outcome:
        """The ``Outcome`` of one work item from its recipients' results (counted in ``counts``)."""
        counts, ps = self.counts, self.ps
        deadline = float(it.meta.get("created") or now) + ps.max_lifetime
        out = Outcome(it.wid, idem=it.meta.get("idem", ""))
        if it.meta.get("n") and it.meta.get("left") and len(it.indexes) == int(it.meta["n"]):
            out.left = int(it.meta["left"])     # the whole job: 'left' written with the records
        dues = []
        for (idx, rec), res in zip(pending, per):
            if res is None:
                res = {"state": "deferred", "enhanced": "4.3.0", "text": "no result from the engine"}
            elif res.get("state") == "queued" and now < deadline:
                # Not attempted (the task's time was up, or its chunk was overdue: stopper): the
                # record stays, and the release puts the item back at the front of its lane at
                # once (past its lifetime it expires below).
                counts["not_attempted"] += 1
                dues.append(now)
                continue
            new, event, due = _updated(rec, res, sender=it.meta.get("sender", ""), now=now,
                                       deadline=deadline, ps=ps)
            out.updates.append((idx, new, event))
            counts[new["state"]] += 1
            if due is not None:
                dues.append(due)
        out.due = min(dues) if dues else None
        out.whole = out.left is not None and len(out.updates) == int(it.meta["n"])
        return out

    def interrupted(self, batch: str, plan: list, recorded: set[int], outcomes: list[Outcome], why: str,
                    early: dict[int, list] | None = None) -> None:
        """Out of time (or stopped) mid-chunk: every message not recorded yet is recorded deferred, with why.

        Transactions that were under way may have been delivered: those are
        sent again (they were in flight); nothing else is.
        """
        now = self.rt.store.now()
        for n, (it, pending, env) in enumerate(plan):
            if early and n in early:        # its final reply had come: what it said
                outcomes.append(self.outcome(it, pending, _results_for(env, early[n]), now))
            elif n not in recorded:
                per = [{"state": "deferred", "code": None, "enhanced": "4.3.0",
                        "text": f"delivery interrupted: {why}", "attempts": 1}] * len(pending)
                outcomes.append(self.outcome(it, pending, per, now))
        late, _ = self.rt.recorder.take(batch)
        try:
            _, dispatch = self.rt.store.release(batch, self.domain, late + outcomes, now=now)
            publish(dispatch)
        except Exception:  # noqa: BLE001 -- the lease brings the items back
            log.exception("deliver %s: recording an interrupted chunk failed", self.domain)


def _drain(rt: Runtime, domain: str, token: str, grant: Grant) -> dict:
    """A dead destination: record its ready mail deferred (no connection), due after its dead period."""
    counts: dict[str, int] = defaultdict(int)
    result = qmgr.suspended_result(grant.why, grant.enhanced)
    seq = 0
    while True:
        seq += 1
        batch = f"{token}.{seq}"
        try:
            items = rt.store.claim(domain, batch, limit=rt.ps.batch_size, checked=seq == 1)
        except Exception as e:
            if not _is_full(e):
                raise
            redis_full(f"deliver {domain}: nothing claimed")
            break
        if not items:
            break
        counts["items"] += len(items)
        now = rt.store.now()
        outcomes = []
        for it in items:
            out = Outcome(it.wid, idem=it.meta.get("idem", ""))
            deadline = float(it.meta.get("created") or now) + rt.ps.max_lifetime
            dues = []
            for idx, rec in _pending(it):
                new, event, due = _updated(rec, result, sender=it.meta.get("sender", ""), now=now,
                                           deadline=deadline, ps=rt.ps, tried=False,
                                           not_before=now + grant.dead_wait)
                out.updates.append((idx, new, event))
                counts[new["state"]] += 1
                if due is not None:
                    dues.append(due)
            out.due = min(dues) if dues else None
            outcomes.append(out)
        applied, dispatch = rt.store.release(batch, domain, outcomes, now=now)
        counts["written"] += len(applied)
        counts["suspended"] += len(items)
        publish(dispatch)
    return counts


@app.task(name="mxq.deliver", acks_late=True, reject_on_worker_lost=True, ignore_result=True, **_RETRY)
def deliver(domain: str) -> dict:
    """A connection's worth of ``domain``'s ready mail (``run_delivery``; chunks of up to ``MXQ_BATCH_SIZE``)."""
    return run_delivery(domain)


# ---------------------------------------------------------------- intake
@app.task(name="mxq.intake", acks_late=True, reject_on_worker_lost=True, ignore_result=True, **_RETRY)
def intake(job_ids: list[str]) -> int:
    """Split stored jobs into their domain lanes and start their deliveries (``fan``); idempotent."""
    dispatch = runtime().store.intake(list(job_ids))
    return fan(dispatch)


@app.task(name="mxq.fanout", acks_late=True, reject_on_worker_lost=True, ignore_result=True, **_RETRY)
def fanout(dispatch: list) -> int:
    """The wake-up tasks of a producer's large batch, ``[[lane, count], ...]``: started (``fan``)."""
    return fan([(str(lane), int(n)) for lane, n in dispatch])


def fan(dispatch: list[tuple[str, int]]) -> int:
    """Start the delivery runs ``dispatch`` asks for: ``qmgr.FAN_CHUNK`` of them here, the rest in fanouts.

    A gevent worker runs the first ``FAN_CHUNK`` of the delivery lanes'
    wanted runs in this task, each ``run_delivery(lane)`` in a greenlet of its
    own (what an ``mxq.deliver`` task would run, with the same acquire, slots
    and counts), and publishes the rest in ``mxq.fanout`` tasks of
    ``FAN_CHUNK`` runs each (``publish(fan_out=True)``: a few runs go as
    ``mxq.deliver`` tasks), which any worker process waiting for work takes
    and starts the same way: the runs spread over the processes as tasks do.
    Why: publishing and receiving a task is a few serial Redis round trips,
    and in a gevent process busy delivering each waits its turn behind every
    ready greenlet.  The bench's loopback stage (100 new domains in the
    first batch) took 0.78 s to publish the first fanout's 100 tasks, the
    workers received 100-200 tasks a second, and half the domains had their
    first delivery only after 1 s (docs/DESIGN.md, issue 8).
    Not gevent, a warm shutdown, or a worker that does not consume
    ``mxq.delivery`` (``-Q``): every run is published as an ``mxq.deliver``
    task, as before.  Returns the runs started or published.
    """
    rt = runtime()
    if not rt.local_spawn or STOPPING.is_set() or not _delivers():
        return publish(dispatch)
    tasks_only = (REPORT_LANE, WEBHOOK_LANE)        # lanes of other tasks: always published
    runs = [lane for lane, n in dispatch if lane not in tasks_only for _ in range(n)]
    with rt.local_lock:
        keep = max(0, min(qmgr.FAN_CHUNK, len(runs), qmgr.LOCAL_CONNECTIONS - rt.local_active))
        rt.local_active += keep             # reserved; each run's _Lane.start counts itself
    here = runs[:keep]
    n = publish([(lane, k) for lane, k in dispatch if lane in tasks_only])
    for i in range(keep, len(runs), qmgr.FAN_CHUNK):
        group: dict[str, int] = defaultdict(int)
        for lane in runs[i:i + qmgr.FAN_CHUNK]:
            group[lane] += 1
        n += publish(list(group.items()), fan_out=True)
    threads = []
    for lane in here:
        t = threading.Thread(target=_run_here, args=(rt, lane), name="mxq-lane", daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return len(here) + n


def _delivers() -> bool:
    """Does this worker take delivery tasks (its ``-Q``: a worker of other roles delivers nothing)?"""
    try:
        return DELIVERY in app.amqp.queues.consume_from
    except Exception:  # noqa: BLE001 -- not a worker's app: publish, as before
        return False


def _run_here(rt: Runtime, lane: str) -> None:
    """One delivery run started by ``fan`` in this process (as an ``mxq.deliver`` task would run it)."""
    with rt.local_lock:
        rt.local_active -= 1                # the reservation made in fan(); _Lane.start counts the run
    try:
        run_delivery(lane)
    except TRANSIENT_REDIS_ERRORS as e:
        # A task would be retried: publish one (its lane's mail is in Redis; a lost one costs time).
        log.warning("deliver %s: %s; published as a task", lane, e)
        try:
            publish([(lane, 1)])
        except Exception as e2:  # noqa: BLE001 -- the scheduler re-dispatches quiet lanes
            log.warning("deliver %s: publishing failed too: %s", lane, e2)
    except Exception:  # noqa: BLE001 -- like a task that failed: the leases bring its work back
        log.exception("deliver %s: the run failed", lane)


# ---------------------------------------------------------------- notifications
def run_notify() -> int:
    """Claim report items, send one report per job and event; return reports submitted."""
    from . import notify as reports
    from .producer import submit

    rt = runtime()
    store = rt.store
    token = uuid.uuid4().hex
    wids = store.claim(REPORT_LANE, token, limit=100)
    if not wids:
        return 0
    sent = 0
    with Heartbeat(store, token):
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for wid in wids:
            job, idx, event = workitems.report(wid)
            groups[(job, event)].append(idx)
        for (job, event), idxs in groups.items():
            found = store.job(job)
            content = store.content(job)
            if found is None or content is None:
                log.warning("report for job %s skipped: the job has expired", job)
                continue
            meta, records = found
            message = reports.message_from_meta(job, meta, content, max_lifetime=rt.ps.max_lifetime)
            chosen = [records[i] for i in sorted(set(idxs)) if i in records]
            key = f"report:{job}:{event}:{','.join(str(i) for i in sorted(set(idxs)))}"

            def submit_once(content_, *, _key=key, **kw):
                # The same report items give the same key: a redelivered notify
                # task finds the report already submitted.
                return submit(content_, idempotency_key=_key, **kw)

            action = "delayed" if event == "delayed" else "failed"
            try:
                # >>> the one call site into mxq.tasks.notify (owned by the notifications helper) <<<
                if reports.send_reports(message, chosen, action=action, submit=submit_once):
                    sent += 1
            except TRANSIENT_REDIS_ERRORS:
                raise               # the lease brings the items back; the report key dedupes
            except Exception:
                # A report that cannot be built now never will be: log it and let
                # the items go, rather than retrying a poison item forever.
                log.exception("report for job %s (%s) could not be sent", job, event)
        _, dispatch = store.release(token, REPORT_LANE, [Outcome(w) for w in wids])
    publish(dispatch)
    return sent


@app.task(name="mxq.notify", acks_late=True, reject_on_worker_lost=True, ignore_result=True, **_RETRY)
def notify() -> int:
    """Send the delivery status reports waiting on the report lane."""
    return run_notify()


# ---------------------------------------------------------------- scheduler
@app.task(name="mxq.schedule", ignore_result=True, **_RETRY)
def schedule() -> dict:
    """One scheduler tick (beat runs it every second); idempotent, safe to run concurrently."""
    from .scheduler import tick
    return tick()

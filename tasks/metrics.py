"""Prometheus metrics from the workers: ``MXQ_METRICS_PORT``.

When ``MXQ_METRICS_PORT`` is set, each ``celery worker`` serves ``/metrics``
(Prometheus text format) over HTTP from its *main* process.  The prefork
children, which do the deliveries, record into prometheus_client's
multiprocess mode: each child writes its counters to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` and the main process adds them up at scrape
time.  mxq makes that folder itself (a fresh temporary one per worker, set
in the environment before the pool forks, removed at shutdown); a
``PROMETHEUS_MULTIPROC_DIR`` you set is used instead, and is emptied at
start, so it must belong to that one worker.  The same works for the
``solo``, ``threads`` and ``gevent`` pools (one process).  ``mxq worker``
runs one gevent worker process per core (``mxq.tasks.supervisor``): there
the supervisor makes the folder and serves ``/metrics`` for all of them.

=========================  ==========================================================
variable                   meaning
=========================  ==========================================================
``MXQ_METRICS_PORT``       ``9808``: that port (the worker does not start if it is
                           taken); ``9808+``: the first free port from 9808 up (at most
                           100 tried; ``9808+N``: at most N+1), so several workers on one
                           host need no port each; ``0`` or ``auto``: any free port.
                           The port chosen is logged: ``mxq metrics: serving
                           http://ADDR:PORT/metrics``
``MXQ_METRICS_ADDR``       address to listen on (default ``0.0.0.0``; ``127.0.0.1``
                           keeps it on the host)
=========================  ==========================================================

Flower's own ``/metrics`` (Celery task events) is untouched; these are
mxq's.  The series (``domain`` labels are lanes: IDNA A-label, lower case;
at most ``MAX_DOMAIN_LABELS`` distinct domains per process, the rest are
counted under ``_other``, so a flood of one-off domains cannot blow up the
series count):

``mxq_deliveries_total{domain, outcome}``  counter
    recipients by the state a delivery run left them in: ``delivered``,
    ``bounced``, ``deferred``, ``expired`` (one count per recipient per run).
``mxq_delivery_run_seconds``  histogram
    one ``deliver_domain`` call: a batch of up to ``MXQ_BATCH_SIZE`` messages
    of one domain, walking its exchanges (DNS included).
``mxq_smtp_transaction_seconds``  histogram
    one SMTP transaction (the latency of one message's attempt on one
    connection): from MAIL FROM to the reply to the final dot, or to the RSET
    or disconnect that ended it (a transaction whose every recipient was
    refused ends with RSET).
``mxq_open_connections{exchange, address}``  gauge
    SMTP connections open now, by exchange name and ``ip:port`` (summed over
    the worker's live processes).
``mxq_dns_queries_total``, ``mxq_dns_cache_hits_total``, ``mxq_dns_cache_misses_total``  counters
    from the engine's ``Resolver.stats`` (hits include those served by the
    shared Redis cache).
``mxq_shaping_throttled_total{domain, reason}``  counter
    deliver tasks that found the domain at its limit (``concurrency`` or
    ``rate``) and returned without work (``mxq.tasks.shaping``).
The fleet-wide gauges below (queue depths, read from Redis) come from one
place, ``mxq scheduler`` (one per deployment), which serves them on its own
``MXQ_METRICS_PORT``; workers never export them, so a sum over every scraped
target counts each queued item once:

``mxq_queue_depth{queue}``  gauge, read from Redis at scrape time
    ``intake`` (jobs stored, not yet split), ``ready`` (work items on every
    delivery lane's ready list), ``deferred`` (``mxq:deferred``: work items
    waiting for their next attempt), ``leased`` (batches in flight), ``throttled`` (lanes held
    back by shaping), ``reports`` (delivery status reports waiting),
    ``webhooks`` (webhook events waiting, ``mxq.tasks.webhooks``), ``held``
    (work items on hold: ``mxq queue hold``).  A suspended domain's ready mail
    (``mxq queue suspend``) counts in ``ready`` and ``mxq_ready_depth``.
``mxq_ready_depth{lane}``  gauge, read from Redis at scrape time
    ready work items per delivery lane (the ``MAX_LANE_LABELS`` deepest).
``mxq_redis_up``  gauge
    1 when the scrape could read Redis, else 0 (and no depth is reported).
``mxq_port25_blocked``  gauge, read from Redis at scrape time
    1 while the fleet has concluded that outbound port 25 is blocked and
    sends mail straight to the relay (``mxq.workers.port25``), else 0.

A child killed outright (SIGKILL) leaves its last ``mxq_open_connections``
in the folder until the worker restarts; its counters stay counted, as
they should.

The engine is observed, not patched: ``session_observers()`` gives the
worker's delivery runs a ``SessionMetrics`` observer (``mxq.workers.events``)
that counts open connections and times transactions from the sessions'
events.  Only in worker processes, only when metrics are on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Mapping

from mxq import settings as mxq_settings

from .store import keys

log = logging.getLogger("mxq.metrics")

MAX_DOMAIN_LABELS = 1000
MAX_LANE_LABELS = 200
OUTCOMES = ("delivered", "bounced", "deferred", "expired")
DEFAULT_ADDR = "0.0.0.0"
PORT_SPAN = 100

_lock = threading.Lock()
_instruments = None
_domains: set[str] = set()
_dns_seen: dict[tuple[int, int], dict] = {}
_server = None            # (httpd, thread, port) in the worker's main process
#: Set by ``mxq worker``'s supervisor in its worker processes (``mxq.tasks.supervisor.CHILD_ENV``).
CHILD_ENV = "_MXQ_WORKER_CHILD"
_made_dir: str | None = None


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """True when ``MXQ_METRICS_PORT`` is set (metrics are recorded and served)."""
    return mxq_settings.load(env).is_set("MXQ_METRICS_PORT")


def require_client() -> None:
    """ConfigError naming MXQ_METRICS_PORT when prometheus_client (the ``mxq[metrics]`` extra) is missing."""
    import importlib.util
    try:
        found = importlib.util.find_spec("prometheus_client") is not None
    except ImportError:
        found = False
    if not found:
        raise mxq_settings.ConfigError("MXQ_METRICS_PORT", "is set but prometheus_client is not installed: "
                                                           "pip install 'mxq[metrics]'")


def parse_port(value: str) -> list[int]:
    """The ports to try for ``MXQ_METRICS_PORT``, in order (``[0]``: any free port).

    ``"9808"`` -> ``[9808]``; ``"9808+"`` -> 9808..9907; ``"9808+3"`` -> 9808..9811;
    ``"0"``/``"auto"`` -> ``[0]``.  Raises ValueError with the reason.
    """
    v = (value or "").strip().lower()
    if v in ("0", "auto"):
        return [0]
    base, plus, extra = v.partition("+")
    try:
        first = int(base)
        span = (int(extra) + 1 if extra else PORT_SPAN) if plus else 1
    except ValueError:
        raise ValueError(f"MXQ_METRICS_PORT must be a port (9808), a first port (9808+ or 9808+N), "
                         f"or 0/auto, not {value!r}") from None
    if not 1 <= first <= 65535 or span < 1:
        raise ValueError(f"MXQ_METRICS_PORT must be a port from 1 to 65535 (or 0/auto), not {value!r}")
    return list(range(first, min(first + span, 65536)))


def _domain_label(domain: str) -> str:
    with _lock:
        if domain in _domains:
            return domain
        if len(_domains) < MAX_DOMAIN_LABELS:
            _domains.add(domain)
            return domain
    return "_other"


class _Instruments:
    """The metric objects (made after the multiprocess folder is known)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.deliveries = Counter("mxq_deliveries", "Recipients by the state a delivery run left them in",
                                  ["domain", "outcome"])
        self.run = Histogram("mxq_delivery_run_seconds",
                             "One deliver_domain call: a batch of one domain over its exchanges",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.transaction = Histogram("mxq_smtp_transaction_seconds",
                                     "One SMTP transaction: MAIL FROM to the final reply (or RSET/disconnect)",
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.connections = Gauge("mxq_open_connections", "SMTP connections open now",
                                 ["exchange", "address"], multiprocess_mode="livesum")
        self.dns_queries = Counter("mxq_dns_queries", "DNS queries sent by the engine's resolver")
        self.dns_hits = Counter("mxq_dns_cache_hits", "DNS cache hits (memory or the shared Redis cache)")
        self.dns_misses = Counter("mxq_dns_cache_misses", "DNS cache misses")
        self.throttled = Counter("mxq_shaping_throttled",
                                 "Deliver tasks that found their domain at its limit and returned",
                                 ["domain", "reason"])
        self.redis_full = Counter("mxq_redis_full",
                                  "Times a worker found Redis full (maxmemory, writes refused) and claimed "
                                  "nothing or published nothing (it backs off until memory frees)")


def instruments() -> _Instruments:
    """This process's metric objects (made on first use)."""
    global _instruments
    if _instruments is None:
        with _lock:
            if _instruments is None:
                _instruments = _Instruments()
    return _instruments


# ---------------------------------------------------------------- recording (worker processes)
def outcomes(domain: str, counts: Mapping[str, int]) -> None:
    """Count a delivery run's recipients by state (``counts``: state -> n; other keys ignored)."""
    if not enabled():
        return
    m, d = instruments(), _domain_label(domain)
    for state in OUTCOMES:
        n = counts.get(state, 0)
        if n:
            m.deliveries.labels(d, state).inc(n)


def throttled(domain: str, reason: str) -> None:
    """Count a deliver task held back by shaping."""
    if enabled():
        instruments().throttled.labels(_domain_label(domain), reason).inc()


def redis_full() -> None:
    """Count a worker finding Redis full (``mxq.tasks.broker.say_full``)."""
    if enabled():
        instruments().redis_full.inc()


def run_seconds(seconds: float) -> None:
    """Observe one ``deliver_domain`` call's duration."""
    if enabled():
        instruments().run.observe(seconds)


def dns(resolver) -> None:
    """Count what ``resolver.stats`` (queries, hits, misses) gained since the last call for it.

    One snapshot per resolver, under a lock, so concurrent tasks of a
    ``threads`` pool sharing a resolver never count the same lookup twice.
    """
    if not enabled():
        return
    m = instruments()
    now = resolver.stats
    with _lock:
        key = (os.getpid(), id(resolver))         # a forked child starts from nothing
        last = _dns_seen.get(key, {})
        _dns_seen[key] = now
    for key, counter in (("queries", m.dns_queries), ("hits", m.dns_hits), ("misses", m.dns_misses)):
        delta = now.get(key, 0) - last.get(key, 0)
        if delta > 0:
            counter.inc(delta)


class SessionMetrics:
    """A session observer (``mxq.workers.events``) that counts open connections and times transactions.

    ``mxq_open_connections`` goes up at ``Connected`` and down at ``Closed``;
    a transaction starts when its MAIL command goes out and ends at the
    reply to its final dot, at a refused MAIL, at the RSET that abandons
    it, or when the connection closes.  Pipelined transactions overlap on
    the wire (the next MAIL goes out before the previous dot's reply is
    read), so the starts queue up per session, first in, first out.
    One instance serves every session of a process; thread-safe.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._conns: dict[int, object] = {}            # id(session) -> its gauge child
        self._starts: dict[int, list[float]] = {}      # id(session) -> MAIL times not yet ended

    def _end(self, key: int, all_: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            starts = self._starts.get(key)
            if not starts:
                return
            ended = list(starts) if all_ else [starts.pop(0)]
            if all_:
                starts.clear()
        m = instruments()
        for t in ended:
            m.transaction.observe(now - t)

    def __call__(self, event) -> None:
        kind = event.kind
        key = id(event.session)
        if kind == "command":
            if event.verb == "MAIL":
                with self._lock:
                    self._starts.setdefault(key, []).append(time.monotonic())
        elif kind == "reply":
            phase = event.phase
            if phase == "dot" or phase == "rset" or (phase == "mail" and event.reply.code != 250):
                self._end(key)
        elif kind == "connected":
            s = event.session
            gauge = instruments().connections.labels(s.server_hostname, f"{s.host}:{s.port}")
            gauge.inc()
            with self._lock:
                self._conns[key] = gauge
        elif kind == "closed":
            self._end(key, all_=True)
            with self._lock:
                gauge = self._conns.pop(key, None)
                self._starts.pop(key, None)
            if gauge is not None:
                gauge.dec()


_observer: SessionMetrics | None = None


def session_observers() -> tuple:
    """The session observers a worker process passes to the engine: ``(SessionMetrics,)`` when metrics are on."""
    global _observer
    if not enabled():
        return ()
    with _lock:
        if _observer is None:
            _observer = SessionMetrics()
    return (_observer,)


# ---------------------------------------------------------------- scrape-time gauges
class RedisCollector:
    """Queue depths read from Redis at each scrape (a prometheus_client custom collector)."""

    def __init__(self, redis_url: str):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # A scrape must answer quickly even with Redis away: one try, short timeouts.
        self.r = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=1.0,
                                      retry=Retry(NoBackoff(), 0))

    def depths(self) -> tuple[dict[str, int], dict[str, int]]:
        """``({queue: depth}, {lane: ready items})``; raises redis errors."""
        p = self.r.pipeline(transaction=False)
        for cmd, key in (("zcard", keys.INTAKE), ("zcard", keys.DEFERRED), ("zcard", keys.LEASE),
                         ("zcard", keys.THROTTLED), ("llen", keys.ready("!r")), ("llen", keys.ready("!w"))):
            getattr(p, cmd)(key)
        # mxq:dispatch holds exactly the lanes with ready work (see mxq.tasks.store);
        # lanes starting with "!" are not domains (reports, webhooks).
        p.zrange(keys.DISPATCH, 0, -1)
        p.zcard(keys.HELD)
        p.smembers(keys.SUSPENDED)         # suspended lanes: ready work, but no activity
        intake, deferred, leased, throttled_, reports, hooks, lanes, held, suspended = p.execute()
        lanes = sorted({x.decode("utf-8", "replace") for x in [*lanes, *suspended] if not x.startswith(b"!")})
        p = self.r.pipeline(transaction=False)
        for lane in lanes:
            p.llen(keys.ready(lane))
        ready = {lane: int(n) for lane, n in zip(lanes, p.execute()) if n}
        queues = {"intake": int(intake), "ready": sum(ready.values()), "deferred": int(deferred),
                  "leased": int(leased), "throttled": int(throttled_), "reports": int(reports),
                  "webhooks": int(hooks), "held": int(held)}
        return queues, ready

    def collect(self):
        """Yield the gauges (called by prometheus_client at every scrape)."""
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("mxq_redis_up", "1 when this scrape could read mxq's state in Redis")
        try:
            queues, ready = self.depths()
        except Exception as e:          # Redis away: say so, report no stale depth
            log.warning("metrics: cannot read queue depths from Redis: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        q = GaugeMetricFamily("mxq_queue_depth", "Items in mxq's queues in Redis", labels=["queue"])
        for name, n in queues.items():
            q.add_metric([name], n)
        yield q
        lanes = GaugeMetricFamily("mxq_ready_depth", "Ready work items per delivery lane", labels=["lane"])
        for lane, n in sorted(ready.items(), key=lambda kv: -kv[1])[:MAX_LANE_LABELS]:
            lanes.add_metric([lane], n)
        yield lanes
        from .hoststatus import RedisPort25State
        p25 = GaugeMetricFamily("mxq_port25_blocked", "1 while outbound port 25 is concluded blocked and mail "
                                                      "goes straight to the relay (fleet-wide)")
        p25.add_metric([], 1 if RedisPort25State(self.r).blocked() else 0)
        yield p25


# ---------------------------------------------------------------- serving (worker main process)
def _multiproc_dir() -> str:
    """Set up ``PROMETHEUS_MULTIPROC_DIR`` (ours, fresh; or the user's, emptied)."""
    global _made_dir
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    else:
        path = _made_dir = tempfile.mkdtemp(prefix="mxq-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # prometheus_client picks its value class when first imported; make sure
    # it is the multiprocess one even if something imported it earlier.
    from prometheus_client import values
    values.ValueClass = values.get_value_class()
    return path


def serve(redis_url: str, env: Mapping[str, str] | None = None) -> int:
    """Start the ``/metrics`` server of this worker (main process): its own processes' series,
    not the fleet-wide queue depths (``serve_queue_depths``); return the port.

    Raises ValueError for a bad setting and OSError when no port could be bound.
    """
    from prometheus_client import CollectorRegistry, multiprocess

    c = mxq_settings.load(env)
    ports = parse_port(c["MXQ_METRICS_PORT"] or "")
    addr = c["MXQ_METRICS_ADDR"]
    path = _multiproc_dir()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return _listen(registry, ports, addr)


def serve_queue_depths(redis_url: str, env: Mapping[str, str] | None = None) -> int:
    """``mxq scheduler``'s ``/metrics``: the fleet-wide queue depths (``RedisCollector``), from
    this one process only; return the port.  ValueError / OSError as ``serve``."""
    from prometheus_client import CollectorRegistry

    c = mxq_settings.load(env)
    ports = parse_port(c["MXQ_METRICS_PORT"] or "")
    registry = CollectorRegistry()
    registry.register(RedisCollector(redis_url))
    return _listen(registry, ports, c["MXQ_METRICS_ADDR"])


def _listen(registry, ports: list[int], addr: str) -> int:
    global _server
    from prometheus_client import start_http_server

    error: OSError | None = None
    for port in ports:
        try:
            httpd, thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as e:
            error = e
            continue
        _server = (httpd, thread, httpd.server_port)
        # WARNING: Celery's logging is not set up yet at worker_init, and only
        # warnings reach stderr then; this line is how a human learns an "auto" port.
        log.warning("mxq metrics: serving http://%s:%d/metrics (pid %d)", addr, httpd.server_port, os.getpid())
        return httpd.server_port
    span = f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"
    raise OSError(f"MXQ_METRICS_PORT: cannot listen on {addr}:{span}: {error}")


def stop() -> None:
    """Stop the server and remove the folder mxq made (worker shutdown)."""
    global _server, _made_dir
    if _server is not None:
        httpd, thread, _ = _server
        httpd.shutdown()
        httpd.server_close()
        _server = None
    if _made_dir is not None:
        shutil.rmtree(_made_dir, ignore_errors=True)
        _made_dir = None


# ---------------------------------------------------------------- Celery signal handlers
def on_worker_init(**_kw) -> None:
    """``worker_init`` (main process, before the pool forks): start serving when enabled.

    A bad setting or a taken port stops the worker (``SystemExit``): Celery
    would only log an exception raised from a signal handler.
    """
    if not enabled():
        return
    if os.environ.get(CHILD_ENV) and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One of `mxq worker`'s processes (mxq.tasks.supervisor): the supervisor serves
        # /metrics from the folder it made; this process only records into it.
        from prometheus_client import values
        values.ValueClass = values.get_value_class()
        return
    from .settings import PipelineSettings
    try:
        require_client()
        serve(PipelineSettings.from_env().redis_url)
    except (ValueError, OSError) as e:
        raise SystemExit(f"mxq: {e}") from None


def on_worker_shutdown(**_kw) -> None:
    """``worker_shutdown`` (main process)."""
    if not enabled():
        return
    if os.environ.get(CHILD_ENV):
        on_process_shutdown()
    else:
        stop()


def on_process_shutdown(**_kw) -> None:
    """``worker_process_shutdown`` (a pool child exiting): drop its live gauges."""
    if enabled() and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        try:
            multiprocess.mark_process_dead(os.getpid())
        except OSError:
            pass


def connect_signals() -> None:
    """Connect the handlers above to Celery's worker signals (done by ``mxq.tasks.graph``)."""
    from celery import signals

    from .app import only_ours       # never in the application's own workers
    signals.worker_init.connect(only_ours(on_worker_init), weak=False)
    signals.worker_shutdown.connect(only_ours(on_worker_shutdown), weak=False)
    signals.worker_process_shutdown.connect(only_ours(on_process_shutdown), weak=False)

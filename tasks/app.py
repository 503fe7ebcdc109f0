"""The Celery app: broker, serialization, queues and limits.

``celery -A mxq.tasks worker`` finds it as ``mxq.tasks.app``.  Everything comes from
``PipelineSettings.from_env()`` (``MXQ_REDIS_URL`` and friends); nothing
secret is in this configuration, so Celery's start-up banner and Flower show
no credential (relay credentials are read by the engine's ``Settings`` in the
worker only).

A good citizen in someone else's Celery project: the app is never Celery's
current or default app (``set_as_current=False``; nothing here calls
``set_current``), so an application's own ``@shared_task`` and ``Celery()``
keep their broker whatever mxq does; mxq's tasks are not shared with other
apps (``MxqCelery.task``); its worker signal handlers act only in mxq's own
worker processes (``only_ours``); and every queue and task name carries the
``mxq`` prefix, so an application whose Celery shares the Redis database
never consumes mxq's work, nor mxq its.

One queue per role, so a flood in one cannot starve another:

- ``mxq.intake``        -- ``mxq.intake``: splitting large stored batches by domain;
                           ``mxq.fanout``: publishing a large batch's wake-up tasks
- ``mxq.delivery``      -- ``mxq.deliver``: SMTP delivery, one domain per task
- ``mxq.notifications`` -- ``mxq.notify``: delivery status reports to senders;
                           ``mxq.webhook``: outcome events

The scheduler tick is not a task: ``mxq scheduler`` runs it in its own loop
(``mxq.tasks.scheduler.run_forever``), so Flower's task list shows deliveries,
not a tick a second.  (``mxq.schedule`` stays registered, routed to the intake
queue, for anyone who calls it.)
"""

from __future__ import annotations

import functools
import sys

from celery import Celery, Task, signals
from kombu import Exchange, Queue

from .settings import PipelineSettings

INTAKE, DELIVERY, NOTIFICATIONS = "mxq.intake", "mxq.delivery", "mxq.notifications"
QUEUES = (INTAKE, DELIVERY, NOTIFICATIONS)

ROUTES = {
    "mxq.intake": {"queue": INTAKE},
    "mxq.fanout": {"queue": INTAKE},
    "mxq.deliver": {"queue": DELIVERY},
    "mxq.notify": {"queue": NOTIFICATIONS},
    "mxq.schedule": {"queue": INTAKE},
    "mxq.webhook": {"queue": NOTIFICATIONS},
}


def readable_args(name: str, args) -> str | None:
    """What Flower shows as a task's arguments: the domain of a delivery, counts for batches
    (never hundreds of job ids).  None: Celery's own repr."""
    if not args:
        return None
    first = args[0]
    if name == "mxq.intake" and isinstance(first, (list, tuple)):
        return f"({len(first)} jobs)"
    if name == "mxq.fanout" and isinstance(first, (list, tuple)):
        tasks = sum(int(n) for _, n in first)
        return f"({len(first)} lanes, {tasks} tasks)"
    return None


class MxqTask(Task):
    """mxq's task base: readable arguments in Flower (``readable_args``)."""

    def apply_async(self, args=None, kwargs=None, **options):
        if "argsrepr" not in options:
            shown = readable_args(self.name, args)
            if shown is not None:
                options["argsrepr"] = shown
        return super().apply_async(args, kwargs, **options)


class MxqCelery(Celery):
    """mxq's Celery app class: never made the current app, its tasks never shared with other apps.

    ``@app.task`` defaults to ``shared=False``: a shared task is added to
    every Celery app the process creates, so the application's own app would
    carry ``mxq.deliver`` and friends.
    """

    def __init__(self, *args, **kw):
        kw.setdefault("set_as_current", False)
        kw.setdefault("task_cls", MxqTask)
        super().__init__(*args, **kw)

    def task(self, *args, **opts):
        """``Celery.task`` with ``shared=False`` unless given."""
        opts.setdefault("shared", False)
        return super().task(*args, **opts)

    #: ``(broker url, broker_use_ssl) -> keyword arguments`` for the consuming connection, set by
    #: ``mxq.tasks.broker`` (imported with the task graph, so in every worker): its transport,
    #: with which Redis at maxmemory does not end a worker process.
    read_options = None

    def connection_for_read(self, url=None, **kwargs):
        """The consuming connection (the worker's), with ``read_options``."""
        if self.read_options is not None and not kwargs.get("transport") and not self.conf.broker_transport:
            for k, v in self.read_options(url or self.conf.broker_read_url, self.conf.broker_use_ssl).items():
                kwargs.setdefault(k, v)
        return super().connection_for_read(url, **kwargs)


def backend_url(s: PipelineSettings) -> str:
    """Celery's result backend for ``s``: ``MXQ_RESULT_BACKEND`` (``none``: Celery's disabled
    backend), else the Redis of ``MXQ_REDIS_URL``.  Job outcomes go there (``mxq.tasks.outcomes``)."""
    if s.result_backend == "none":
        return "disabled"
    return s.result_backend or s.redis_url


def make_app(settings: PipelineSettings | None = None) -> Celery:
    """Build the Celery app for ``settings`` (default: the environment)."""
    s = settings or PipelineSettings.from_env()
    app = MxqCelery("mxq", include=["mxq.tasks.graph"])
    app.conf.update(
        broker_url=s.redis_url,
        result_backend=backend_url(s),
        # JSON only: a binary-serialized message would be code execution for whoever can write to Redis.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Tasks report through mxq's own state (mxq.tasks.status); storing every
        # task's return value would only add Redis writes.  The backend stays
        # configured for anyone who asks for a result explicitly.
        task_ignore_result=True,
        result_expires=s.result_ttl,
        # Acknowledge after the task ran, and put a task back when its worker
        # process dies, so a crash never silently drops the wake-up (mxq's
        # leases are what really recover the work; see mxq.tasks.store).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message reserved per process: a long SMTP batch never holds
        # other domains' tasks hostage behind it.
        worker_prefetch_multiplier=1,
        task_soft_time_limit=s.soft_time_limit,
        task_time_limit=s.hard_time_limit,
        # Flower (and `celery events`) need both.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # visibility_timeout: how long a reserved but unacknowledged
            # message stays invisible before the Redis transport hands it to
            # another worker.  It must be longer than the longest a task can
            # run (the hard time limit) plus margin, or a task still running
            # would be delivered twice.  It is no recovery mechanism here:
            # a lost task is recovered by mxq's lease and dispatch bookkeeping
            # within seconds (MXQ_LEASE_SECONDS, MXQ_DISPATCH_STALE), and a
            # redelivered task names only a lane, so a late copy does no harm.
            "visibility_timeout": int(2 * s.hard_time_limit),
            # The transport's connection pool per channel (kombu's default: 10, then it raises
            # MaxConnectionsError).  A gevent worker (mxq.tasks.supervisor) has hundreds of
            # tasks that may publish at once; dispatch.publish lets PUBLISHERS of them at a time.
            "max_connections": 64,
        },
        task_default_queue=DELIVERY,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_routes=ROUTES,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def _settings_or_error() -> tuple[PipelineSettings, str | None]:
    # A malformed MXQ_* value must not crash `import mxq.tasks`: every `mxq`
    # command (even --help and the engine's `mxq deliver`) imports this
    # package first.  The app is built on defaults and the error kept, so
    # the commands that need the settings report it cleanly (exit 78) and
    # a worker or beat refuses to start with it (see _refuse_bad_config).
    try:
        return PipelineSettings.from_env(), None
    except ValueError as e:
        return PipelineSettings(), str(e)


_settings, config_error = _settings_or_error()
app = make_app(_settings)


def is_ours(sender=None) -> bool:
    """True when a Celery signal comes from one of mxq's own worker (or beat) processes.

    ``sender`` is the worker or beat service (it has ``.app``); pool process
    signals have no sender, and there the worker has made its app current.
    """
    owner = getattr(sender, "app", None)
    if owner is None:
        from celery import current_app
        owner = current_app._get_current_object()
    return owner is app


def only_ours(handler):
    """A worker signal handler that runs only in mxq's own workers, never in the application's
    (which may import ``mxq.tasks`` to send mail from its own tasks)."""
    @functools.wraps(handler)
    def wrapper(sender=None, **kw):
        if is_ours(sender):
            return handler(sender=sender, **kw)
        return None
    return wrapper


class _Shared:
    """Stands in for the app's thread-local storage in a gevent worker (see ``_one_backend``)."""


@only_ours
def _one_backend(**_):
    """One result backend per process, not one per task, in a gevent worker.

    Celery keeps ``app.backend`` in a ``threading.local``, which gevent makes
    greenlet-local: every task (a new greenlet) built a new Redis backend and
    connection pool, about 15% of a short task's CPU (profiled).  mxq's tasks
    never wait on results, and the backend's client is safe to share.
    """
    threading = sys.modules.get("threading")
    try:
        from gevent import monkey
    except ImportError:
        return
    if threading is not None and monkey.is_module_patched("threading"):
        app._local = _Shared()


signals.worker_init.connect(_one_backend, weak=False)


@only_ours
def _refuse_bad_config(**_):
    """A worker or scheduler never runs on defaults that replaced a malformed setting."""
    if config_error:
        raise SystemExit(f"mxq: {config_error}")


signals.worker_init.connect(_refuse_bad_config, weak=False)
signals.beat_init.connect(_refuse_bad_config, weak=False)


@only_ours
def _note_ready(**_):
    """Under ``mxq worker`` (``mxq.tasks.supervisor``): tell the supervisor this process got ready."""
    import os
    path = os.environ.get("_MXQ_WORKER_READY_FILE")     # mxq.tasks.supervisor.READY_ENV
    if path:
        try:
            with open(path, "w"):
                pass
        except OSError:
            pass


signals.worker_ready.connect(_note_ready, weak=False)


def bind(settings: PipelineSettings) -> None:
    """Point ``app`` at ``settings``' Redis and result backend unless it already is.

    The app is made when ``mxq.tasks`` is first imported; in a Django or Flask
    process the framework's ``MXQ_REDIS_URL`` may only be known later (or
    change under ``override_settings``), so the producer calls this before
    publishing.
    """
    backend = backend_url(settings)
    if app.conf.broker_url != settings.redis_url or app.conf.result_backend != backend:
        rebind(settings.redis_url, backend)


def rebind(redis_url: str, result_backend: str | None = None) -> None:
    """Point the existing ``app`` at another Redis (tests, or a process that learns the URL late).

    Updates the broker and result backend URLs (the backend: ``result_backend``,
    else ``redis_url``) and lets go of the app's connection and producer pools.
    They are not closed: kombu keeps one pool per URL for the whole process
    (an application's own Celery app on the same URL shares it), and
    pointing back to a URL later must find its pool usable -- closing it made
    the next publish fail with "Acquire on closed pool" (Django's
    ``override_settings`` and back).  ``mxq.tasks.store`` reads
    ``MXQ_REDIS_URL`` through the settings registry on every call.
    """
    app.conf.broker_url = redis_url
    app.conf.result_backend = result_backend or redis_url
    app._pool = None
    app.amqp._producer_pool = None
    if getattr(app._local, "backend", None) is not None:
        del app._local.backend

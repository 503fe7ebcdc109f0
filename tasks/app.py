"""The Celery app: broker, serialization, queues, limits and beat's schedule.

``celery -A mxq.tasks worker`` finds it as ``mxq.tasks.app``.  Everything comes from
``PipelineSettings.from_env()`` (``MXQ_REDIS_URL`` and friends); nothing
secret is in this configuration, so Celery's start-up banner and Flower show
no credential (relay credentials are read by the engine's ``Settings`` in the
worker only).

One queue per role, so a flood in one cannot starve another:

- ``intake``        -- ``mxq.intake``: splitting large stored batches by domain;
                       ``mxq.fanout``: publishing a large batch's wake-up tasks
- ``delivery``      -- ``mxq.deliver``: SMTP delivery, one domain per task
- ``notifications`` -- ``mxq.notify``: delivery status reports to senders
- ``scheduling``    -- ``mxq.schedule``: the scheduler tick, every second (beat)
"""

from __future__ import annotations

from celery import Celery, signals
from kombu import Exchange, Queue

from .settings import PipelineSettings

QUEUES = ("intake", "delivery", "notifications", "scheduling")

ROUTES = {
    "mxq.intake": {"queue": "intake"},
    "mxq.fanout": {"queue": "intake"},
    "mxq.deliver": {"queue": "delivery"},
    "mxq.notify": {"queue": "notifications"},
    "mxq.schedule": {"queue": "scheduling"},
    "mxq.webhook": {"queue": "notifications"},
}


def make_app(settings: PipelineSettings | None = None) -> Celery:
    """Build the Celery app for ``settings`` (default: the environment)."""
    s = settings or PipelineSettings.from_env()
    app = Celery("mxq", include=["mxq.tasks.graph"])
    app.conf.update(
        broker_url=s.redis_url,
        result_backend=s.result_backend or s.redis_url,
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
        },
        task_default_queue="delivery",
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_routes=ROUTES,
        # The scheduler: one tick a second on its own queue.  A tick that
        # waited more than a few seconds is dropped (the next one does the
        # same work), so a stopped worker does not come back to a pile of ticks.
        beat_schedule={
            "mxq-schedule": {
                "task": "mxq.schedule",
                "schedule": 1.0,
                "options": {"queue": "scheduling", "expires": 5},
            },
        },
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


@signals.worker_init.connect
@signals.beat_init.connect
def _refuse_bad_config(**_):
    """A worker or scheduler never runs on defaults that replaced a malformed setting."""
    if config_error:
        raise SystemExit(f"mxq: {config_error}")


def bind(settings: PipelineSettings) -> None:
    """Point ``app`` at ``settings``' Redis and result backend unless it already is.

    The app is made when ``mxq.tasks`` is first imported; in a Django or Flask
    process the framework's ``MXQ_REDIS_URL`` may only be known later (or
    change under ``override_settings``), so the producer calls this before
    publishing.
    """
    backend = settings.result_backend or settings.redis_url
    if app.conf.broker_url != settings.redis_url or app.conf.result_backend != backend:
        rebind(settings.redis_url, backend)


def rebind(redis_url: str, result_backend: str | None = None) -> None:
    """Point the existing ``app`` at another Redis (tests, or a process that learns the URL late).

    Updates the broker and result backend URLs (the backend: ``result_backend``,
    else ``redis_url``) and drops the connection pools made for the old URL.
    ``mxq.tasks.store`` reads ``MXQ_REDIS_URL`` through the settings registry on
    every call, so set that too.
    """
    app.conf.broker_url = redis_url
    app.conf.result_backend = result_backend or redis_url
    pool, app._pool = app._pool, None
    if pool is not None:
        pool.force_close_all()
    app.amqp._producer_pool = None
    if getattr(app._local, "backend", None) is not None:
        del app._local.backend

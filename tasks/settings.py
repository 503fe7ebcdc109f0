"""The pipeline's own ``MXQ_*`` settings (the engine's are ``mxq.workers.config.Settings``).

``PipelineSettings.from_env()`` is the one place ``tasks`` reads its part of
the environment (``MXQ_MAX_MESSAGE_SIZE`` is the engine's: see
``mxq.workers.message.max_message_size_from_env``).  It holds no secret: relay credentials stay in the engine's
``Settings``, which only the worker reads (``Settings.from_env()``) and which
never goes into a task argument, a Redis key or a log line.

| variable | default | meaning |
|---|---|---|
| ``MXQ_REDIS_URL`` | ``redis://127.0.0.1:6379/0`` | broker, mxq's state, Celery's result backend |
| ``MXQ_RETRY_SCHEDULE`` | ``60,300,900,1800,3600,7200,14400`` | seconds between attempts; the last repeats |
| ``MXQ_MAX_LIFETIME`` | 432000 (5 days) | a recipient still deferred this long after submission expires |
| ``MXQ_RESULT_TTL`` | 604800 (7 days) | how long a finished job's state and content are kept |
| ``MXQ_LEASE_SECONDS`` | 45 | lease on in-flight work; renewed every third of it while a task runs |
| ``MXQ_DISPATCH_STALE`` | 60 | a lane with ready work and no task activity this long gets new tasks |
| ``MXQ_BATCH_SIZE`` | 64 | work items (messages of one domain) one ``mxq.deliver`` drains, over one connection per exchange (a batch stops starting transactions at half ``MXQ_TASK_SOFT_LIMIT``; what it did not try is retried at once) |
| ``MXQ_DOMAIN_CONCURRENCY`` | 4 | deliver tasks queued at once for one domain |
| ``MXQ_INTAKE_THRESHOLD`` | 500 | ``submit_many`` batches larger than this are split by ``mxq.intake`` |
| ``MXQ_TASK_SOFT_LIMIT`` | 900 | soft time limit of a task (seconds) |
| ``MXQ_TASK_HARD_LIMIT`` | 960 | hard time limit (the child is killed) |
| ``MXQ_SHAPING`` | ``default=20c`` | per-domain connection and rate limits shared by every worker (read by ``mxq.tasks.shaping``) |
| ``MXQ_METRICS_PORT`` | unset | each worker serves Prometheus ``/metrics`` there (read by ``mxq.tasks.metrics``) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RETRY_SCHEDULE = (60, 300, 900, 1800, 3600, 7200, 14400)


def parse_schedule(value: str) -> tuple[float, ...]:
    """``"60,300,900"`` into ``(60.0, 300.0, 900.0)``; raise ValueError on anything else."""
    try:
        steps = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"MXQ_RETRY_SCHEDULE must be comma-separated seconds, not {value!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise ValueError(f"MXQ_RETRY_SCHEDULE needs at least one positive number of seconds, not {value!r}")
    return steps


@dataclass(frozen=True)
class PipelineSettings:
    """Queue-manager settings; see the module docstring for the variables."""

    redis_url: str = DEFAULT_REDIS_URL
    retry_schedule: tuple[float, ...] = field(default=DEFAULT_RETRY_SCHEDULE)
    max_lifetime: float = 432000
    result_ttl: int = 604800
    lease_seconds: float = 45
    dispatch_stale: float = 60
    #: Large: one Celery task (publish, events, ack, leases, a connection) costs about as
    #: much as a dozen delivered messages (profiled); graph bounds a batch's time instead.
    batch_size: int = 64
    domain_concurrency: int = 4
    intake_threshold: int = 500
    soft_time_limit: float = 900
    hard_time_limit: float = 960

    def backoff(self, deferrals: int) -> float:
        """Seconds to wait after the ``deferrals``-th deferral (1-based); the last step repeats."""
        i = min(max(deferrals, 1), len(self.retry_schedule)) - 1
        return self.retry_schedule[i]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "PipelineSettings":
        """Read the ``MXQ_*`` variables above; raise ValueError naming a bad one."""
        env = os.environ if env is None else env
        kw: dict = {"redis_url": env.get("MXQ_REDIS_URL") or DEFAULT_REDIS_URL}
        if env.get("MXQ_RETRY_SCHEDULE"):
            kw["retry_schedule"] = parse_schedule(env["MXQ_RETRY_SCHEDULE"])
        for name, attr, conv in (
            ("MXQ_MAX_LIFETIME", "max_lifetime", float),
            ("MXQ_RESULT_TTL", "result_ttl", int),
            ("MXQ_LEASE_SECONDS", "lease_seconds", float),
            ("MXQ_DISPATCH_STALE", "dispatch_stale", float),
            ("MXQ_BATCH_SIZE", "batch_size", int),
            ("MXQ_DOMAIN_CONCURRENCY", "domain_concurrency", int),
            ("MXQ_INTAKE_THRESHOLD", "intake_threshold", int),
            ("MXQ_TASK_SOFT_LIMIT", "soft_time_limit", float),
            ("MXQ_TASK_HARD_LIMIT", "hard_time_limit", float),
        ):
            if env.get(name):
                try:
                    kw[attr] = conv(env[name])
                except ValueError:
                    raise ValueError(f"{name} must be a number, not {env[name]!r}") from None
                if kw[attr] <= 0:
                    raise ValueError(f"{name} must be positive, not {env[name]!r}")
        s = cls(**kw)
        if s.hard_time_limit <= s.soft_time_limit:
            raise ValueError("MXQ_TASK_HARD_LIMIT must be larger than MXQ_TASK_SOFT_LIMIT")
        return s

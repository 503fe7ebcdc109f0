"""The pipeline's view of the settings registry: ``PipelineSettings`` (the engine's is
``mxq.workers.config.Settings``).

Every ``MXQ_*`` setting -- name, type, default, doc -- is defined once in
``mxq.settings``; ``PipelineSettings.from_env()`` reads the queue manager's
part of it (the environment, and Django settings / Flask config in their
process).  It holds no secret: relay credentials stay in the engine's
``Settings``, which only the worker reads and which never goes into a task
argument, a Redis key or a log line.  See the README's configuration table
(generated from the registry) for the variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from mxq import settings as registry

DEFAULT_REDIS_URL = registry.REGISTRY["MXQ_REDIS_URL"].default
DEFAULT_RETRY_SCHEDULE = registry.REGISTRY["MXQ_RETRY_SCHEDULE"].default


def parse_schedule(value: str) -> tuple[float, ...]:
    """``"60,300,900"`` into ``(60.0, 300.0, 900.0)``; ValueError (naming MXQ_RETRY_SCHEDULE) on anything else."""
    return registry.REGISTRY["MXQ_RETRY_SCHEDULE"].parse(value)


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
    initial_concurrency: int = 5
    failed_cohort_limit: int = 1
    intake_threshold: int = 20000
    soft_time_limit: float = 900
    hard_time_limit: float = 960
    #: A submission fails within this when Redis is unreachable (``MXQ_SUBMIT_TIMEOUT``).
    submit_timeout: float = 2.0
    #: Celery result backend for final outcomes (``MXQ_RESULT_BACKEND``); None: ``redis_url``.
    result_backend: str | None = None

    def backoff(self, deferrals: int) -> float:
        """Seconds to wait after the ``deferrals``-th deferral (1-based); the last step repeats."""
        i = min(max(deferrals, 1), len(self.retry_schedule)) - 1
        return self.retry_schedule[i]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "PipelineSettings":
        """The queue manager's settings from the registry (``env``: that mapping alone); ValueError naming a bad one."""
        c = registry.load(env)
        s = cls(redis_url=c["MXQ_REDIS_URL"], retry_schedule=c["MXQ_RETRY_SCHEDULE"],
                max_lifetime=c["MXQ_MAX_LIFETIME"], result_ttl=c["MXQ_RESULT_TTL"],
                lease_seconds=c["MXQ_LEASE_SECONDS"], dispatch_stale=c["MXQ_DISPATCH_STALE"],
                batch_size=c["MXQ_BATCH_SIZE"], domain_concurrency=c["MXQ_DOMAIN_CONCURRENCY"],
                initial_concurrency=c["MXQ_INITIAL_CONCURRENCY"], failed_cohort_limit=c["MXQ_FAILED_COHORT_LIMIT"],
                intake_threshold=c["MXQ_INTAKE_THRESHOLD"], soft_time_limit=c["MXQ_TASK_SOFT_LIMIT"],
                hard_time_limit=c["MXQ_TASK_HARD_LIMIT"], submit_timeout=c["MXQ_SUBMIT_TIMEOUT"],
                result_backend=c["MXQ_RESULT_BACKEND"])
        if s.hard_time_limit <= s.soft_time_limit:
            raise registry.ConfigError("MXQ_TASK_HARD_LIMIT", "must be larger than MXQ_TASK_SOFT_LIMIT")
        return s

"""The producer API: ``submit``, ``submit_many`` and ``status``.

Everything is validated first, in the caller's process, with the engine's
``mxq.workers.message.prepare`` (address syntax, CR/LF, headers, size limit
``MXQ_MAX_MESSAGE_SIZE``).  A bad item raises ``InvalidMessage`` (an alias of
``mxq.workers.errors.InvalidInput``, so it also catches ``InvalidAddress``) with
the reason, and nothing is written to Redis or enqueued.

Then the whole batch is stored by ONE Redis script (atomic, one round trip;
a batch over ``mxq.tasks.store.CALL_BYTES`` or ``CALL_JOBS`` is staged in
calls of bounded size first and committed by one script, all or nothing):
each job's hash written whole by one HSET (content once, meta, recipient
records), the idempotency key (SET NX) and -- the intake split done here, in
the storing script, to save a hop -- each job's work items pushed onto their
domain lanes (one RPUSH per lane for the batch).  Deliver tasks are then
published: as many per lane as its destination's window asks for and no
task of it is queued or running for (``dispatch``), or, when that is more
than a few, one ``mxq.fanout`` task that publishes them from a worker.

Batches larger than ``MXQ_INTAKE_THRESHOLD`` (20,000) jobs are stored the
same way but not split: their ids go to ``mxq.intake`` tasks (on the intake
queue) in chunks, so that no commit holds Redis much longer than 0.1 s (a
commit splits 10,000 jobs in ~45 ms), and the split runs on the workers.  The
split is recorded in Redis (``mxq:intake`` until done), so a lost task is
re-published by the scheduler.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import redis

from mxq import settings as registry
from mxq.workers.dkim import signer_from_env
from mxq.workers.envelope import DSN
from mxq.workers.errors import InvalidInput
from mxq.workers.message import max_message_size_from_env, prepare_with_addresses

from . import suppress, webhooks
from .settings import PipelineSettings
from .store import (CALL_JOBS, TRANSIENT_REDIS_ERRORS, JobSpec, Staging, get_store, get_submit_store, idem_key,
                    job_ids, new_job_id, status_of)

log = logging.getLogger("mxq.producer")


class Unavailable(redis.exceptions.ConnectionError):
    """Redis could not be reached within ``MXQ_SUBMIT_TIMEOUT``: the submission failed.

    A ``redis.exceptions.ConnectionError``, so code catching Redis errors keeps
    working.  When only the reply was lost the batch may have been stored:
    submitting again with the same ``idempotency_key`` is always safe.
    """

#: Every bad input ``submit`` refuses: ``except mxq.tasks.InvalidMessage`` catches
#: ``mxq.workers.errors.InvalidMessage`` and ``InvalidAddress`` alike.
InvalidMessage = InvalidInput

INTAKE_CHUNK = 200      #: job ids per ``mxq.intake`` task


@dataclass
class Item:
    """One message of a ``submit_many`` batch (a dict with these keys works too)."""

    message: object
    sender: str | None = None
    recipients: Sequence[str] | None = None
    dsn: DSN | Mapping | None = None
    idempotency_key: str | None = None
    notify: Sequence[str] | None = None


def _dsn(value) -> DSN | None:
    if value is None or isinstance(value, DSN):
        return value
    if isinstance(value, Mapping):
        try:
            return DSN(ret=value.get("ret"), envid=value.get("envid"))
        except ValueError as e:
            raise InvalidMessage(str(e)) from None
    raise InvalidMessage(f"dsn must be a mxq.workers.envelope.DSN or a mapping, not {type(value).__name__}")


def _check_key(key) -> str:
    if key is None:
        return ""
    if not isinstance(key, str) or not key or len(key) > 1000:
        raise InvalidMessage("idempotency_key must be a non-empty string of at most 1000 characters")
    return idem_key(key)


def _content(envelope) -> bytes:
    c = envelope.content
    if isinstance(c, bytes):
        return c
    if isinstance(c, str):
        return c.encode("utf-8")
    return b"".join(c)          # FileContent: stored once in Redis, the file may then go away


def build_job(item: Item, *, max_size: int, now: float, signer=None,
              max_recipients: int | None = None, job_id: str | None = None) -> JobSpec:
    """Validate one item and turn it into a ``JobSpec``; raise ``InvalidMessage``.

    ``signer``: the DKIM signer (``signer_from_env()`` when not given); a batch
    reads it once for all its items.  ``max_recipients``: at most this many
    recipients (default ``MXQ_RECIPIENT_LIMIT``).  ``job_id``: its id (default a new one).
    """
    # A str is always message text, never a file name (a web app passing user text
    # must not be able to queue /etc/passwd): a file is a pathlib.Path or an opened file.
    message = item.message
    try:
        env, addresses = prepare_with_addresses(message, sender=item.sender, recipients=item.recipients,
                                                dsn=_dsn(item.dsn), notify=item.notify, max_size=max_size)
    except InvalidInput:        # already the right type, with its reason (it is a ValueError too)
        raise
    except ValueError as e:     # DSN/NOTIFY values the envelope types refuse
        raise InvalidMessage(str(e)) from None
    limit = recipient_limit() if max_recipients is None else max_recipients
    if len(env.recipients) > limit:
        raise InvalidMessage(f"the message has {len(env.recipients)} recipients, more than the limit of {limit} "
                             "(MXQ_RECIPIENT_LIMIT): split it into several messages")
    # DKIM (MXQ_DKIM): signed once, here at intake, before the content is
    # stored, so every attempt sends the same signed bytes.  A bad key map
    # raises ValueError (a configuration error, not bad input).
    env = (signer if signer is not None else signer_from_env()).sign_envelope(env)
    idem = _check_key(item.idempotency_key)
    records, by_domain = [], {}
    for i, (r, addr) in enumerate(zip(env.recipients, addresses)):
        domain = addr.ascii_domain      # IDNA A-label, lower case (normalize_domain), parsed once by prepare
        by_domain.setdefault(domain, []).append(str(i))
        records.append({"address": r.address, "domain": domain, "state": "queued", "code": None, "scope": None,
                        "enhanced": None, "text": "", "exchange": None, "ip": None, "relay": False,
                        "attempts": 0, "first_attempt": None, "last_attempt": None, "next_attempt": None,
                        "notify": list(r.notify) if r.notify else None, "orcpt": r.orcpt, "runs": 0,
                        "delay_reported": False})
    dsn = env.dsn
    meta = {"sender": env.sender or "", "ret": (dsn.ret or "").upper() if dsn else "",
            "envid": (dsn.envid or "") if dsn else "", "eightbit": "1" if env.eightbit else "0",
            "smtputf8": "1" if env.smtputf8 else "0", "size": str(env.size or 0),
            "created": repr(now), "n": str(len(records)), "left": str(len(records)),
            "domains": ",".join(by_domain), "idem": idem}
    meta.update({f"d:{d}": ",".join(idx) for d, idx in by_domain.items()})
    return JobSpec(id=job_id or new_job_id(), content=_content(env), meta=meta, records=records,
                   domains=list(by_domain), idem=idem)


def recipient_limit() -> int:
    """``MXQ_RECIPIENT_LIMIT``: most recipients of one submitted message."""
    return registry.value("MXQ_RECIPIENT_LIMIT")


def _item(x) -> Item:
    if isinstance(x, Item):
        return x
    if isinstance(x, Mapping):
        unknown = set(x) - {"message", "sender", "recipients", "dsn", "idempotency_key", "notify"}
        if unknown or "message" not in x:
            raise InvalidMessage(f"a batch item needs 'message' and only Item's keys, not {sorted(unknown)}")
        return Item(**x)
    return Item(message=x)


def _mark(jobs: list[JobSpec], store, hooks, s: PipelineSettings) -> None:
    """Suppressed recipients (``mxq.tasks.suppress``) become final here, before storing (one MGET)."""
    if suppress.apply(jobs, store.r):
        for j in jobs:
            if j.meta["left"] == "0":
                j.expire = s.result_ttl
            if hooks.wants("suppressed"):
                now = float(j.meta["created"])
                j.hooks = [webhooks.hook_arg(hooks, j.id, r, now) for r in j.records
                           if r["state"] == "suppressed"]


def _unavailable(e: Exception, s: PipelineSettings) -> Unavailable:
    shown = registry.current().shown("MXQ_REDIS_URL") if s == PipelineSettings.from_env() else "Redis"
    return Unavailable(f"cannot reach Redis ({shown}) within {s.submit_timeout:g} s (MXQ_SUBMIT_TIMEOUT): {e}")


def _wake(jobs: list[JobSpec], ids: list[str], dispatch, split: bool) -> None:
    """Publish the tasks a stored batch needs (deliver tasks, a fanout, or intake tasks)."""
    from .dispatch import intake, publish     # (imported late: the store is usable alone)

    try:
        if split:
            publish(dispatch, fan_out=True)
        else:
            new = [j.id for j, i in zip(jobs, ids) if j.id == i]
            for k in range(0, len(new), INTAKE_CHUNK):
                intake(new[k:k + INTAKE_CHUNK])
    except Exception as e:      # stored: the scheduler publishes for quiet lanes and stalled intake
        log.warning("%d job(s) stored; their tasks could not be published (%s): the scheduler will", len(ids), e)


def _publish(jobs: list[JobSpec], s: PipelineSettings) -> list[str]:
    """Store validated jobs with one script, then publish the tasks they need."""
    from .app import bind

    bind(s)                     # the Celery app on the configured Redis (Django/Flask may set it late)
    hooks = webhooks.current()          # a bad MXQ_WEBHOOK_* setting is refused here (ValueError)
    try:
        # Fail fast: this store's client gives up on an unreachable Redis after MXQ_SUBMIT_TIMEOUT
        # (and, at the process's first use of this Redis, refuses one that can evict: RedisUnfit).
        store = get_submit_store(s)
        _mark(jobs, store, hooks, s)
        split = len(jobs) <= s.intake_threshold
        ids, dispatch = store.submit(jobs, split=split, now=float(jobs[0].meta["created"]))
    except TRANSIENT_REDIS_ERRORS as e:
        raise _unavailable(e, s) from e
    _wake(jobs, ids, dispatch, split)
    return ids


def _publish_stream(first: list[JobSpec], rest: Iterator[JobSpec], s: PipelineSettings) -> list[str]:
    """``_publish`` for a batch of more than ``CALL_JOBS`` jobs, validated as it is staged.

    ``first`` (validated) and the jobs ``rest`` yields as it validates them are staged
    ``CALL_JOBS`` at a time by a thread of the store's (``Staging``) while the next are
    validated, then committed at once: all or nothing as ever -- a bad item (or a failed call)
    takes back what was staged before it raises, and nothing was queued.
    """
    from .app import bind

    bind(s)
    hooks = webhooks.current()
    try:
        store = get_submit_store(s)
        staging = Staging(store, float(first[0].meta["created"]), background=True)
        jobs: list[JobSpec] = []
        try:
            chunk = first
            while chunk:
                _mark(chunk, store, hooks, s)
                staging.add(chunk)
                jobs += chunk
                chunk = list(itertools.islice(rest, CALL_JOBS))
        except BaseException:
            staging.abort()
            raise
        split = len(jobs) <= s.intake_threshold
        ids, dispatch = staging.commit(split=split)
    except TRANSIENT_REDIS_ERRORS as e:
        raise _unavailable(e, s) from e
    _wake(jobs, ids, dispatch, split)
    return ids


def submit_many(items: Iterable, *, settings: PipelineSettings | None = None) -> list[str]:
    """Submit a batch; return the job ids in order (one Redis script, few publishes).

    Each item is an ``Item``, a mapping with ``Item``'s keys, or just a message.
    All-or-nothing: every item is validated before anything is stored; the
    first bad one raises ``InvalidMessage`` whose reason starts with
    ``item N:`` (and whose ``index`` attribute is N), and nothing is enqueued.
    An item whose idempotency key was seen before gets the existing job's id.
    """
    s = settings or PipelineSettings.from_env()
    jobs = _validated(items)
    first = list(itertools.islice(jobs, CALL_JOBS + 1))
    if len(first) <= CALL_JOBS:
        return store_prepared(first, settings=s)
    return _publish_stream(first, jobs, s)       # large: staged while the rest is validated


def prepare_many(items: Iterable) -> list[JobSpec]:
    """The validation half of ``submit_many``: every item checked and built into a job (its id
    assigned), nothing stored.  Raises ``InvalidMessage`` (``item N: ...``) on the first bad one.

    ``store_prepared`` stores them later -- ``MXQ_ON_COMMIT`` in Django validates in the view
    and stores when the transaction commits, with the job ids known at once.
    """
    return list(_validated(items))


class Validator:
    """A batch's validation one item at a time: ``job(item)`` checks an item and builds its job,
    or raises ``InvalidMessage`` with the reason.  What the whole batch shares is read once: the
    size and recipient limits, the DKIM configuration (at the first item), the time."""

    def __init__(self):
        self.max_size = max_message_size_from_env()
        self.limit = recipient_limit()
        self.now = time.time()
        self.signer = None
        self.ids = job_ids()

    def job(self, item, *, job_id: str | None = None) -> JobSpec:
        """``item``'s job (an ``Item``, a mapping of its keys, or a message), with a fresh id -- or
        ``job_id``: the id an earlier submission of it got whose outcome is unknown (a call that
        failed), so that storing it again stores it only if that one was not (``JobSpec.again``)."""
        if self.signer is None:
            self.signer = signer_from_env()
        job = build_job(_item(item), max_size=self.max_size, now=self.now, signer=self.signer,
                        max_recipients=self.limit, job_id=job_id or next(self.ids))
        job.again = job_id is not None
        return job


def _validated(items: Iterable) -> Iterator[JobSpec]:
    """``prepare_many`` one job at a time (``submit_many`` stages the first while it checks the next)."""
    check = Validator()
    for i, x in enumerate(items):
        try:
            job = check.job(x)
        except InvalidInput as e:
            err = type(e)(f"item {i}: {e.reason}")
            err.index = i
            raise err from None
        yield job


def store_prepared(jobs: list[JobSpec], *, settings: PipelineSettings | None = None) -> list[str]:
    """The storing half of ``submit_many``: one Redis script, then the tasks; the job ids."""
    return _publish(jobs, settings or PipelineSettings.from_env()) if jobs else []


def submit(message, sender: str | None = None, recipients: Sequence[str] | None = None,
           dsn: DSN | Mapping | None = None, idempotency_key: str | None = None, *,
           notify: Sequence[str] | None = None) -> str:
    """Submit one message; return its job id.

    ``message``: an ``email.message.EmailMessage``, bytes, str message
    text (always the text itself: ``submit("/etc/passwd")`` is refused as a
    malformed message, it never reads that file), a ``pathlib.Path`` (read
    here, then stored) or an opened file (binary or text mode, read here).
    ``sender`` and ``recipients`` default from the headers as in ``mxq
    deliver`` (``Sender``/``From``; ``To``, ``Cc``, ``Bcc``); ``""`` is the
    null sender.  ``dsn``: RET/ENVID (a ``DSN`` or ``{"ret": ..., "envid":
    ...}``); ``notify``: NOTIFY keywords for every recipient.  The same
    ``idempotency_key`` returns the existing job.  Raises ``InvalidMessage``
    with the reason, having stored and enqueued nothing, on bad input.
    """
    s = PipelineSettings.from_env()
    item = Item(message=message, sender=sender, recipients=recipients, dsn=dsn,
                idempotency_key=idempotency_key, notify=notify)
    job = build_job(item, max_size=max_message_size_from_env(), now=time.time())
    return _publish([job], s)[0]


def status(job_id: str) -> dict:
    """A job's state: ``{"job", "state", "recipients": [...]}``.

    ``state`` is ``queued`` (nothing attempted yet), ``active`` or ``done``
    (every recipient final: delivered, bounced, expired, ``suppressed`` --
    refused at submission because the address bounced permanently before, see
    ``mxq.tasks.suppress`` -- or ``dropped`` by the operator); each recipient
    has ``address, domain, state, code, enhanced, text, exchange, ip, relay,
    attempts, first_attempt, last_attempt, next_attempt``: ``attempts`` counts
    delivery attempts (runs that tried the recipient), times are epoch
    seconds, ``domain`` is the normalised (A-label) domain, ``next_attempt``
    is set while deferred.  A job is kept ``MXQ_RESULT_TTL`` seconds after it is done.
    Raises ``KeyError(job_id)`` for an unknown or expired job.
    """
    if not isinstance(job_id, str) or not job_id.isalnum():
        raise KeyError(job_id)
    found = get_store().job(job_id)
    if found is None:
        raise KeyError(job_id)
    return status_of(job_id, *found)

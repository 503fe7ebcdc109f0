"""A Django email backend that hands mail to mxq's pipeline.

In ``settings.py``::

    EMAIL_BACKEND = "mxq.contrib.django.EmailBackend"
    MXQ_REDIS_URL = "redis://127.0.0.1:6379/0"     # else the MXQ_REDIS_URL environment variable

Then ``send_mail``, ``send_mass_mail``, ``mail_admins``, ``EmailMessage.send()``
and ``EmailMultiAlternatives`` (with attachments) queue their messages in
mxq instead of talking SMTP from the web process.  Every ``MXQ_*`` variable
of ``mxq.tasks.settings`` may be a Django setting; a setting wins over the
environment variable of the same name (see ``mxq.contrib``).

``send_messages(messages)`` returns how many messages were accepted (queued)
and sets ``message.mxq_job_id`` on each (None for a message without
recipients, which is skipped and not counted, as Django's SMTP backend does).
Use ``mxq.tasks.status(message.mxq_job_id)`` to follow delivery.

Message by message, as Django's SMTP backend sends: the messages are built,
validated and queued in order, in parts (one Redis script each) that grow from
``FIRST_PART`` (100) by doubling to ``PART`` (1,000), so delivery starts once
the first 100 are built, while the rest is still being built.  A bad
message (malformed address, header injection, too large) raises
``mxq.tasks.InvalidMessage`` once the messages before it are queued; Redis
unreachable raises ``mxq.tasks.Unavailable``.  Either error says which
messages were queued (they have their ``mxq_job_id``) and which not, and
carries them as positions in the list given: ``queued``, ``not_queued``, and
``unknown`` (the part whose storing failed: maybe queued, maybe not).
Sending the same ``EmailMessage`` objects again after such an error queues
each message at most once: a message of the failed call that was queued, or
may have been, keeps its job id, and the store takes the id as stored if it
is (``JobSpec.again``).  With ``fail_silently=True`` a bad message is
skipped (logged, logger ``mxq.contrib``) and the others are queued; Redis
unreachable stops the call, which returns how many were queued.

The envelope is Django's: sender ``from_email``, recipients ``to``, ``cc``
and ``bcc`` (Bcc never appears in the content: Django leaves it out of the
headers and mxq strips any Bcc field).

``MXQ_ON_COMMIT = True``: messages sent inside a database transaction
(``transaction.atomic``, ``ATOMIC_REQUESTS``) are validated at once -- a bad
one still raises in the view -- and stored when the transaction commits
(``transaction.on_commit``, default database); a rolled-back transaction sends
nothing.  ``message.mxq_job_id`` is set at once either way.  Outside a
transaction they are stored at once.  Such a call is all or nothing: a bad
message raises and none of the call's messages is queued (with
``fail_silently``: 0 is returned).

Redis unreachable: the send gives up within ``MXQ_SUBMIT_TIMEOUT`` (2 s) with
``mxq.tasks.Unavailable``, or returns the count queued before with ``fail_silently=True``.

Delivery events come back through a signal: ``mxq.contrib.django.signals.tracking``,
fed by mxq's signed webhooks through ``path("mxq/", include("mxq.contrib.django.urls"))``.
"""

from __future__ import annotations

import email.utils
import logging
import re

from django.core.mail.backends.base import BaseEmailBackend

from mxq.workers.errors import InvalidAddress, InvalidInput, InvalidMessage
from mxq.workers.message import flatten

try:                                 # Django <= 5.x: the messages are compat32 MIME objects
    from django.core.mail.message import MIMEMixin as _DjangoMIME
except ImportError:                  # pragma: no cover - a Django without it: as_bytes() as it is
    _DjangoMIME = None

from mxq import settings as registry

from .. import pipeline_settings, submit_all
from .rendering import render

__all__ = ["EmailBackend", "mxq_config"]

log = logging.getLogger("mxq.contrib")

#: Messages validated and queued together by ``send_messages`` (one Redis script each:
#: ``mxq.tasks.store.CALL_JOBS``); delivery of a part starts while the next one is built.
PART = 1000
#: The first part's size; each next part is twice the one before, up to ``PART`` (100, 200,
#: 400, 800, then 1,000): the first messages are queued -- and delivered -- once 100 are built
#: (~5 ms), not 1,000 (~50 ms, and the first part's storing before the next part overlaps it).
FIRST_PART = 100


def _part_size(k: int) -> int:
    """How many messages part ``k`` (0, 1, ...) of a call holds: ``FIRST_PART`` doubled ``k`` times, at most ``PART``."""
    return min(PART, FIRST_PART << min(k, 30))


def _on_commit(fn) -> None:
    """Run ``fn`` when the current transaction of the default database commits (now outside one)."""
    from django.db import transaction
    transaction.on_commit(fn)


def mxq_config() -> dict[str, str]:
    """The ``MXQ_*`` values set in this process (Django's ``MXQ_*`` settings over the environment),
    as environment text; ``mxq.settings.current()`` has them typed, with their origin."""
    return registry.current().env()


# "a@b.example" or "Name <a@b.example>" with a plain dot-atom address and a plain name:
# email.utils.getaddresses finds exactly that address in it (tests/test_django.py checks).
_ATOMS = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
_PLAIN = re.compile(rf"[ \t]*(?:({_ATOMS}@{_ATOMS})|[A-Za-z0-9 ]*<({_ATOMS}@{_ATOMS})>)[ \t]*")


def _addr_spec(value, what: str) -> str:
    """The one mailbox address in ``value`` (``"Name <a@b>"`` or ``"a@b"``); InvalidAddress otherwise.

    ``email.utils`` is lenient (it reads ``"not an address"`` as ``not``), so
    the address found must be the whole value or its final ``<...>`` part;
    ``mxq.tasks.submit_many`` then checks its syntax.
    """
    if not isinstance(value, str):
        raise InvalidAddress(f"{what} must be a string, not {type(value).__name__}")
    m = _PLAIN.fullmatch(value)
    if m is not None:                    # the common case, without getaddresses' parser
        return m.group(1) or m.group(2)
    if "\r" in value or "\n" in value:
        raise InvalidAddress(f"{what} contains CR or LF: {value!r}")
    found = [a for _, a in email.utils.getaddresses([value]) if a]
    text = value.strip()
    if len(found) != 1 or not (text == found[0] or text.endswith(f"<{found[0]}>")):
        raise InvalidAddress(f"{what} must be one address (\"a@b.example\" or \"Name <a@b.example>\"), "
                             f"not {value!r}")
    return found[0]


def _as_bytes(msg) -> bytes:
    """``msg.as_bytes()``: through ``mxq.workers.message.flatten`` when it is Django's own ``as_bytes``.

    Django's (``MIMEMixin.as_bytes``) is ``BytesGenerator(fp, mangle_from_=False)``
    flattened with ``linesep="\\n"``; ``flatten`` gives the same bytes without
    refolding every header.  Any other ``as_bytes`` is called as it is.
    """
    if _DjangoMIME is not None and getattr(type(msg), "as_bytes", None) is _DjangoMIME.as_bytes:
        return flatten(msg, linesep="\n")
    return msg.as_bytes()


def _relabel(e: InvalidInput, positions: list[int]) -> InvalidInput:
    """``item N: ...`` (N among the submitted items) as ``message M: ...`` (M in the caller's list)."""
    index = getattr(e, "index", None)
    if index is None or not 0 <= index < len(positions):
        return e
    prefix = f"item {index}: "
    reason = e.reason[len(prefix):] if e.reason.startswith(prefix) else e.reason
    err = type(e)(f"message {positions[index]}: {reason}")
    err.index = positions[index]
    return err


def _spans(positions: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    out, start = [], None
    for i, n in enumerate(positions):
        if start is None:
            start = n
        if i + 1 == len(positions) or positions[i + 1] != n + 1:
            out.append(str(n) if n == start else f"{start}-{n}")
            start = None
    return ", ".join(out)


class _Call:
    """One ``send_messages`` call: its messages' fates, and the error that ends it."""

    def __init__(self, messages: list):
        self.messages = messages
        self.ids: dict[int, str] = {}     # position -> the job id its message was given
        self.queued: list[int] = []       # positions queued (mxq_job_id set)
        self.unknown: list[int] = []      # positions of a part whose storing failed

    def fail(self, e: Exception) -> Exception:
        """``e`` (the same type) with what was queued and what not; every message that was queued,
        or may have been, keeps its job id for a retry (``_RETRY``)."""
        for n in self.queued + self.unknown:
            setattr(self.messages[n], _RETRY, self.ids[n])
        done = set(self.queued) | set(self.unknown)
        not_queued = [n for n in range(len(self.messages)) if n not in set(self.queued)]
        parts = []
        if self.queued:
            parts.append(f"queued (each has its mxq_job_id): message(s) {_spans(self.queued)}")
        if self.unknown:
            parts.append(f"perhaps queued (Redis failed while storing them): message(s) {_spans(self.unknown)}")
        rest = [n for n in not_queued if n not in done]
        if rest:
            parts.append(f"not queued: message(s) {_spans(rest)}")
        note = ("; ".join(parts) + ". Sending the same EmailMessage objects again queues each at most once"
                if self.queued or self.unknown else "nothing was queued")
        reason = getattr(e, "reason", None)
        try:
            err = type(e)(f"{reason if reason is not None else e} -- {note}")
        except Exception:               # noqa: BLE001 -- an error type taking other arguments: as it is
            err = e
        if reason is not None:
            err.index = getattr(e, "index", None)
        err.queued, err.not_queued, err.unknown = list(self.queued), not_queued, list(self.unknown)
        return err


class _Storing:
    """Parts stored in order by a thread of their own while the caller builds the next
    (``add``); a part's Redis error is raised by the next ``add`` or by ``wait``.  The last part
    is stored by the caller (a call of one part -- most calls -- starts no thread)."""

    def __init__(self, messages: list, call: _Call, settings, store_prepared):
        self.messages, self.call, self.settings, self.store_prepared = messages, call, settings, store_prepared
        self.pool = None
        self.pending = None
        self.parts = 0                    # parts handed over so far

    def _store(self, part: list) -> None:
        try:
            ids = self.store_prepared([j for _, j in part], settings=self.settings)
        except BaseException:
            self.call.unknown = [n for n, _ in part]
            raise
        for (n, _), job in zip(part, ids):
            self.messages[n].mxq_job_id = job
            self.call.queued.append(n)

    def add(self, part: list, *, last: bool = False) -> None:
        """Store ``part`` (after the previous one); raise the previous one's error.  ``last``: the
        call's last part, stored now in the caller's thread (its error raised here)."""
        self.wait()
        if not part:
            return
        self.parts += 1
        if last:
            self._store(part)
            return
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mxq-django")
        self.pending = self.pool.submit(self._store, part)

    def wait(self) -> None:
        """Wait for the part being stored; raise its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the part being stored, whatever its outcome (the caller is raising)."""
        try:
            self.wait()
        except BaseException:       # noqa: BLE001 -- the caller's error is the one raised
            pass
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


#: The attribute holding the job id a message got in a call that failed (queued, or perhaps):
#: the next call stores it under that id again, which stores it only if it is not stored.
_RETRY = "_mxq_retry_id"


class EmailBackend(BaseEmailBackend):
    """Django ``EMAIL_BACKEND`` submitting to mxq; see the module docstring."""

    def send_messages(self, email_messages) -> int:
        """Queue ``email_messages`` in order, in growing parts (``_part_size``); return how many were queued."""
        messages = list(email_messages or ())
        if registry.value("MXQ_ON_COMMIT"):
            return self._send_on_commit(messages)
        from kombu.exceptions import OperationalError
        from redis.exceptions import RedisError

        from mxq.tasks.producer import Validator, store_prepared

        settings = pipeline_settings()      # a bad MXQ_* setting raises ValueError, silent or not
        check = Validator()
        call = _Call(messages)
        part: list[tuple[int, object]] = []          # (position, job) validated, not stored yet
        storing = _Storing(messages, call, settings, store_prepared)
        for m in messages:
            m.mxq_job_id = None
        try:
            try:
                for n, m in enumerate(messages):
                    if not m.recipients():
                        continue
                    again = getattr(m, _RETRY, None)
                    try:
                        job = check.job(self._item(m, n), job_id=again)
                    except InvalidInput as e:
                        if not e.reason.startswith(f"message {n}: "):
                            e = type(e)(f"message {n}: {e.reason}")
                        e.index = n
                        if not self.fail_silently:
                            storing.add(part, last=True)
                            raise call.fail(e) from None
                        log.warning("mail not submitted (fail_silently): %s", e.reason)
                        continue
                    call.ids[n] = job.id
                    part.append((n, job))
                    if len(part) >= _part_size(storing.parts):
                        storing.add(part)
                        part = []
                storing.add(part, last=True)
            finally:
                storing.close()
        except (RedisError, OperationalError) as e:
            if self.fail_silently:
                call.fail(e)
                log.warning("mail not submitted (fail_silently): %s; %d message(s) queued before",
                            e, len(call.queued))
                return len(call.queued)
            raise call.fail(e) from e
        for n in call.queued:
            if hasattr(messages[n], _RETRY):
                delattr(messages[n], _RETRY)
        return len(call.queued)

    def _send_on_commit(self, messages: list) -> int:
        """``MXQ_ON_COMMIT``: every message validated now (all or nothing), stored at the commit."""
        items, queued, positions = [], [], []
        try:
            for n, m in enumerate(messages):
                m.mxq_job_id = None
                if not m.recipients():
                    continue
                items.append(self._item(m, n))
                queued.append(m)
                positions.append(n)
        except (InvalidAddress, InvalidMessage):
            if self.fail_silently:
                return 0
            raise
        if not items:
            return 0
        try:
            ids = submit_all(items, fail_silently=self.fail_silently, later=_on_commit)
        except InvalidInput as e:
            # submit_many numbers the items it was given; name the message as the caller knows it.
            raise _relabel(e, positions) from None
        if ids is None:
            return 0
        for m, job in zip(queued, ids):
            m.mxq_job_id = job
        return len(ids)

    @staticmethod
    def _item(message, n: int):
        """The ``mxq.tasks.Item`` for one Django message (content built by Django, envelope from its fields)."""
        from mxq import tasks

        where = f"message {n}"
        try:
            content = render(message)       # Django's bytes for a plain message, without the MIME object
            if content is None:
                content = _as_bytes(message.message())
        except (ValueError, TypeError, UnicodeError) as e:   # BadHeaderError is a ValueError
            raise InvalidMessage(f"{where}: {e}") from None
        sender = _addr_spec(message.from_email, f"{where}: from_email")
        recipients = [_addr_spec(r, f"{where}: recipient") for r in message.recipients()]
        return tasks.Item(message=content, sender=sender, recipients=recipients)

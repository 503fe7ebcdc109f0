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

All or nothing: every message is built and validated before any is stored,
then the batch is stored with one ``mxq.tasks.submit_many``.  A bad message
(malformed address, header injection, too large) raises
``mxq.tasks.InvalidMessage`` and nothing of the batch is queued; with
``fail_silently=True`` that (and Redis being unreachable) returns 0 instead.

The envelope is Django's: sender ``from_email``, recipients ``to``, ``cc``
and ``bcc`` (Bcc never appears in the content: Django leaves it out of the
headers and mxq strips any Bcc field).

``MXQ_ON_COMMIT = True``: messages sent inside a database transaction
(``transaction.atomic``, ``ATOMIC_REQUESTS``) are validated at once -- a bad
one still raises in the view -- and stored when the transaction commits
(``transaction.on_commit``, default database); a rolled-back transaction sends
nothing.  ``message.mxq_job_id`` is set at once either way.  Outside a
transaction they are stored at once.

Redis unreachable: the send gives up within ``MXQ_SUBMIT_TIMEOUT`` (2 s) with
``mxq.tasks.Unavailable``, or returns 0 with ``fail_silently=True``.

Delivery events come back through a signal: ``mxq.contrib.django.signals.tracking``,
fed by mxq's signed webhooks through ``path("mxq/", include("mxq.contrib.django.urls"))``.
"""

from __future__ import annotations

import email.utils
import re

from django.core.mail.backends.base import BaseEmailBackend

from mxq.workers.errors import InvalidAddress, InvalidInput, InvalidMessage
from mxq.workers.message import flatten

try:                                 # Django <= 5.x: the messages are compat32 MIME objects
    from django.core.mail.message import MIMEMixin as _DjangoMIME
except ImportError:                  # pragma: no cover - a Django without it: as_bytes() as it is
    _DjangoMIME = None

from mxq import settings as registry

from .. import submit_all
from .rendering import render

__all__ = ["EmailBackend", "mxq_config"]


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


class EmailBackend(BaseEmailBackend):
    """Django ``EMAIL_BACKEND`` submitting to mxq; see the module docstring."""

    def send_messages(self, email_messages) -> int:
        """Queue ``email_messages`` in one all-or-nothing batch; return how many were queued."""
        messages = list(email_messages or ())
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
            later = _on_commit if registry.value("MXQ_ON_COMMIT") else None
            ids = submit_all(items, fail_silently=self.fail_silently, later=later)
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

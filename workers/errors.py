"""mxq's exceptions, and the one place where failures are classified.

The hierarchy is small and carries data (after aiosmtplib): every
``SMTPError`` has the ``Reply`` that describes it, a ``scope`` and whether it
is transient.  Classes also inherit the stdlib type they are
(``ConnectionError``, ``TimeoutError``, ``ValueError``) so callers can catch
either.

Scope (after Postfix's smtp_trouble.c):

- ``Scope.SITE``      -- the exchange as a whole: connect, greeting, EHLO, TLS,
                         AUTH, lost connection.  Soft: try the next exchange.
- ``Scope.MESSAGE``   -- this transaction: MAIL FROM, DATA, the final dot.
                         Soft: the recipients stay pending for the next exchange;
                         hard: every recipient of the transaction bounces.
- ``Scope.RECIPIENT`` -- one RCPT TO.  Soft: pending; hard: that one bounces.

``classify()`` is the single decision table the delivery layer uses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .reply import Reply


class Scope(str, enum.Enum):
    """What a failure applies to."""

    SITE = "site"
    MESSAGE = "message"
    RECIPIENT = "recipient"


class MxqError(Exception):
    """Base class of every error mxq raises."""


class InvalidInput(MxqError, ValueError):
    """Bad input refused before anything is sent; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InvalidAddress(InvalidInput):
    """A malformed mail address (syntax, length, CR/LF, bad IDN)."""


class InvalidMessage(InvalidInput):
    """A malformed or unacceptable message (no recipients, too large, bad headers)."""


class SMTPError(MxqError):
    """An SMTP failure described by a ``Reply``.

    ``scope`` says what it applies to; ``is_transient()`` whether a later
    attempt may succeed.  ``recipient`` is set for recipient-scope errors.
    """

    default_scope = Scope.SITE

    def __init__(self, reply: Reply, *, scope: Scope | None = None, recipient: str | None = None):
        super().__init__(str(reply))
        self.reply = reply
        self.scope = scope or self.default_scope
        self.recipient = recipient

    @property
    def code(self) -> int | None:
        """The SMTP reply code, None for a local failure."""
        return self.reply.code

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code."""
        return self.reply.enhanced

    @property
    def text(self) -> str:
        """The reply text."""
        return self.reply.text

    def is_transient(self) -> bool:
        """True when a later attempt (or another exchange) may succeed."""
        return self.reply.is_transient()

    def is_permanent(self) -> bool:
        """True when retrying the same thing cannot succeed."""
        return self.reply.is_permanent()


class SMTPConnectError(SMTPError, ConnectionError):
    """The exchange could not be reached (refused, unreachable, TLS-on-connect failed)."""


class SMTPBindError(SMTPConnectError):
    """The local source address could not be used (4.3.5): our configuration, not the exchange."""


class SMTPTimeoutError(SMTPError, TimeoutError):
    """A phase of the session ran past its timeout."""


class SMTPServerDisconnected(SMTPError, ConnectionError):
    """The server closed the connection, or it broke, before the exchange was done."""


class SMTPResponseError(SMTPError):
    """The server answered a command with a 4xx or 5xx reply."""


class SMTPGreetingError(SMTPResponseError):
    """The server's greeting was not 220 (for example 421 or 554)."""


class SMTPHeloError(SMTPResponseError):
    """The server refused EHLO and HELO."""


class SMTPTLSError(SMTPError, ConnectionError):
    """STARTTLS was refused or the TLS handshake or certificate check failed."""


class SMTPAuthError(SMTPResponseError):
    """Authentication failed or no usable mechanism was offered."""


class SMTPNotSupported(SMTPError):
    """The message needs an extension the server lacks (SMTPUTF8, SIZE too small)."""

    default_scope = Scope.MESSAGE


class SMTPSenderRefused(SMTPResponseError):
    """MAIL FROM was refused."""

    default_scope = Scope.MESSAGE


class SMTPRecipientRefused(SMTPResponseError):
    """RCPT TO was refused for ``recipient``."""

    default_scope = Scope.RECIPIENT


class SMTPDataError(SMTPResponseError):
    """DATA or the end of data was refused."""

    default_scope = Scope.MESSAGE


class SMTPProtocolError(SMTPError):
    """The session was used out of order (for example ``add_recipient`` before ``create_message``)."""

    default_scope = Scope.MESSAGE


class DNSError(MxqError):
    """A destination could not be resolved; carries a local ``Reply`` (4.4.3, 5.1.2, 5.1.10)."""

    def __init__(self, domain: str, reply: Reply):
        super().__init__(f"{domain}: {reply}")
        self.domain = domain
        self.reply = reply

    def is_transient(self) -> bool:
        """SERVFAIL or timeout: try again later."""
        return self.reply.is_transient()

    def is_permanent(self) -> bool:
        """NXDOMAIN, null MX, no address: bounce."""
        return self.reply.is_permanent()


class NullMX(DNSError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail (5.1.10)."""


@dataclass(frozen=True)
class Trouble:
    """How one failure is handled: its scope, its reply, and whether it is soft."""

    scope: Scope
    reply: Reply
    transient: bool

    @property
    def try_next_exchange(self) -> bool:
        """A soft failure of site or message scope: the pending recipients go to the next exchange."""
        return self.transient and self.scope in (Scope.SITE, Scope.MESSAGE)


def classify(exc: BaseException) -> Trouble:
    """Classify any failure raised while talking to an exchange.

    Errors mxq raised itself carry their own scope; anything else (an
    ``OSError`` smtplib let through, an ``ssl.SSLError``) is a soft site error,
    because it says nothing about the message or the recipient.
    """
    if isinstance(exc, SMTPError):
        return Trouble(exc.scope, exc.reply, exc.is_transient())
    if isinstance(exc, DNSError):
        return Trouble(Scope.SITE, exc.reply, exc.is_transient())
    if isinstance(exc, TimeoutError):
        return Trouble(Scope.SITE, Reply.local("4.4.2", f"timeout: {exc}"), True)
    if isinstance(exc, ConnectionRefusedError):
        return Trouble(Scope.SITE, Reply.local("4.4.1", "Connection refused"), True)
    if isinstance(exc, OSError):
        return Trouble(Scope.SITE, Reply.local("4.4.2", f"lost connection: {exc}"), True)
    return Trouble(Scope.SITE, Reply.local("4.3.0", f"{type(exc).__name__}: {exc}"), True)


# ------------------------------------------------------------------------------------------ interrupts
#
# The engine catches broad exceptions in a few places (a failed server must
# never stop a delivery run; dnspython records every exception a query raises
# and tries the next server).  An interrupt that belongs to the caller -- such
# as Celery's SoftTimeLimitExceeded, a plain Exception raised from a signal
# handler -- must go through all of them.  The engine never imports the
# caller's framework: the caller registers the types instead.

_interrupts: tuple[type[BaseException], ...] = ()


def register_interrupt(*types: type[BaseException]) -> None:
    """Make the engine re-raise exceptions of these types wherever it would otherwise catch them.

    Idempotent.  ``mxq.tasks`` registers ``celery.exceptions.SoftTimeLimitExceeded``;
    an application running the engine under its own time limit registers
    its own exception the same way.  ``BaseException`` subclasses that are
    not ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) always go
    through: the engine never catches them.
    """
    global _interrupts
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"register_interrupt takes exception types, not {t!r}")
        if t not in _interrupts:
            _interrupts = _interrupts + (t,)


def unregister_interrupt(*types: type[BaseException]) -> None:
    """Undo ``register_interrupt`` for these types (tests)."""
    global _interrupts
    _interrupts = tuple(t for t in _interrupts if t not in types)


def is_interrupt(exc: BaseException) -> bool:
    """True for an exception the engine must never swallow: a registered type, or not an ``Exception``."""
    return not isinstance(exc, Exception) or (bool(_interrupts) and isinstance(exc, _interrupts))


def reraise_interrupt(exc: BaseException) -> None:
    """``raise exc`` when it is an interrupt (see ``is_interrupt``); otherwise return.

    For ``except Exception as e:`` blocks that classify any failure::

        except Exception as e:
            reraise_interrupt(e)
            ...
    """
    if is_interrupt(exc):
        raise exc


def find_interrupt(errors) -> BaseException | None:
    """The first interrupt among ``errors`` (exceptions, or tuples holding one, as dnspython lists them)."""
    for item in errors or ():
        for value in (item if isinstance(item, tuple) else (item,)):
            if isinstance(value, BaseException) and is_interrupt(value):
                return value
    return None

"""Session events: what an ``SMTPSession`` tells its observers while it talks to a server.

An observer is any callable taking one event; register it with
``SMTPSession(observers=[fn])`` or ``session.observe(fn)``.  Every event
carries the ``session`` it comes from (so one observer can watch many) and
is a frozen dataclass; match on the class or on ``event.kind``::

    def trace(event):
        if event.kind == "command":
            print("->", event.line)
        elif event.kind == "reply":
            print("<-", event.reply)

    with SMTPSession("127.0.0.2", observers=[trace]) as s:
        s.send_message(...)

Contract:

- Zero cost when nobody listens: the session builds no event unless it has
  an observer.
- Events are emitted synchronously, in wire order, from the thread using the
  session: ``CommandSent`` after the command's bytes were written (for a
  pipelined group, one per command, in the order they went out, flagged
  ``pipelined``), ``ReplyReceived`` once a whole reply was read.
- AUTH payloads never reach an observer: the initial response and every
  line answering a 334 challenge are replaced by ``****`` in ``line``.
  Message content is never in an event either: ``DataProgress`` counts
  bytes, ``DataWritten`` (raw ``write()``) gives only the size.
- An observer that raises is logged and ignored (it must not break a
  delivery), except for an interrupt registered with
  ``mxq.workers.errors.register_interrupt``, which propagates.

``phase`` names (also the keys of the ``Timeouts`` field that bounds them,
see ``PHASE_TIMEOUT``): ``connect``, ``greeting``, ``ehlo``, ``helo``,
``starttls``, ``auth``, ``mail``, ``rcpt``, ``data`` (the DATA command),
``content`` (message text), ``dot`` (the final ``.`` and its reply),
``rset``, ``noop``, ``quit``, ``command`` (``SMTPSession.command``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .reply import Reply

__all__ = ["Event", "Connected", "CommandSent", "ReplyReceived", "DataProgress", "DataWritten",
           "TimedOut", "TLSStarted", "Closed", "Observer", "PHASE_TIMEOUT"]

#: Which ``Timeouts`` field bounds each phase.
PHASE_TIMEOUT = {
    "connect": "connect", "greeting": "greeting", "ehlo": "command", "helo": "command",
    "starttls": "command", "auth": "command", "mail": "command", "rcpt": "command",
    "data": "data_init", "content": "data_block", "dot": "data_final", "rset": "command",
    "noop": "command", "quit": "command", "command": "command",
}

Observer = Callable[["Event"], Any]


@dataclass(frozen=True)
class Event:
    """Base class: ``session`` is the ``SMTPSession`` that emitted the event (typed ``Any``: this
    module sits under session.py, which imports it, and must not import it back)."""

    session: Any
    kind = "event"


@dataclass(frozen=True)
class Connected(Event):
    """The TCP connection is up (before the greeting): ``peer`` and ``local`` are (ip, port)."""

    peer: tuple
    local: tuple
    kind = "connected"


@dataclass(frozen=True)
class CommandSent(Event):
    """A command line went out (without its CRLF; AUTH payloads masked).

    ``verb`` is its first word upper-cased (``"."`` for the end of data);
    ``pipelined`` is True when it went out in a group without waiting for
    the previous reply (RFC 2920).
    """

    phase: str
    line: str
    verb: str
    pipelined: bool = False
    kind = "command"


@dataclass(frozen=True)
class ReplyReceived(Event):
    """A whole reply was read, in ``phase`` (the command it answers; ``greeting`` for the banner).

    ``reply`` is parsed (code, enhanced status, text); ``lines`` is the text
    of each line as the server sent it, after its code and separator
    (enhanced status codes included), for traces.
    """

    phase: str
    reply: Reply
    lines: tuple = ()
    kind = "reply"


@dataclass(frozen=True)
class DataProgress(Event):
    """Message text written during DATA: ``sent`` bytes of the message so far, of ``total`` (None: unknown).

    Counted in message bytes as given (before dot-stuffing and line-end
    conversion), so for bytes, str and file content the last event of a
    message has ``sent == total``.  Emitted after every block written, and
    once more (``done``) when the text is complete, just before the final dot.
    """

    sent: int
    total: int | None
    done: bool = False
    kind = "progress"


@dataclass(frozen=True)
class DataWritten(Event):
    """Raw bytes went out through ``SMTPSession.write`` (only the size is given, never the data)."""

    size: int
    kind = "write"


@dataclass(frozen=True)
class TimedOut(Event):
    """``phase`` ran past its deadline of ``limit`` seconds; the connection is being dropped."""

    phase: str
    limit: float
    kind = "timeout"


@dataclass(frozen=True)
class TLSStarted(Event):
    """TLS is up (STARTTLS or implicit): ``protocol`` (e.g. ``TLSv1.3``), ``cipher`` (name), ``bits``.

    ``verified``: the certificate chain was verified and matched
    ``server_hostname``; False for opportunistic (unauthenticated) TLS.
    """

    protocol: str | None
    cipher: str | None
    bits: int | None
    verified: bool
    server_hostname: str
    kind = "tls"


@dataclass(frozen=True)
class Closed(Event):
    """The connection was closed: ``quit`` True after a QUIT, False when it was dropped."""

    quit: bool
    kind = "closed"

"""One SMTP client connection, with the classic SMTP control's methods.

``SMTPSession`` wraps ``smtplib.SMTP`` (which does the reply parsing, EHLO
parsing and the AUTH exchanges) and adds what smtplib lacks for a delivery
agent:

- per-phase deadlines (RFC 5321 section 4.5.3.2) from ``Timeouts``: each
  phase (greeting, each command, each block of DATA, the final dot) must
  finish by its deadline, however the server spreads its bytes, and a reply
  is bounded in size (``MAX_REPLY_BYTES``, lines kept to ``MAX_REPLY_LINE``);
- TLS policy like Postfix's ``smtp_tls_security_level``: ``none``,
  ``opportunistic`` (``may``: STARTTLS when offered, certificate not checked,
  clear text after a failed handshake), ``required`` (``secure``: STARTTLS must
  succeed with a verified certificate and host name) and ``implicit`` (TLS on
  connect, verified);
- per-recipient RCPT replies that are returned, never raised;
- DATA streamed in chunks from bytes, text, a file or an iterable, with line
  ends made CRLF and dot-stuffing done across chunk boundaries, so a large
  file is never read whole into memory;
- every failure mapped to ``mxq.workers.errors`` with a ``Reply`` (local ones
  carry RFC 3463 codes: 4.4.1 connect, 4.4.2 lost connection or timeout,
  4.5.0 a reply too large, 4.7.x TLS);
- events for observers (``mxq.workers.events``): each command and reply,
  progress during DATA, timeouts, TLS -- at no cost when nobody listens;
- lower-level access: ``command(verb, argument)`` for any command the
  session does not wrap, and ``write(data)`` for raw message text.

smtplib still parses EHLO and runs the AUTH exchanges, but every byte it
reads or writes goes through the session (``_Wire``), so the bounds and the
events cover it too.

Usage::

    with SMTPSession("127.0.0.2", 25, timeouts=Timeouts(connect=5)) as s:
        result = s.send_message("a@a.test", ["b@b.test", "c@b.test"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
        result.recipients["b@b.test"].code, result.reply

or the staged transaction: ``create_message``, ``add_recipient`` (once per
recipient), ``append_message`` (once or more), ``close_message``.

The session never logs message content or credentials.  This module does not
import Celery or ``tasks``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import select
import smtplib
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from mxq import settings as registry

from . import events
from .address import Address, parse_address, parse_sender
from .envelope import DSN, Recipient
from .errors import (
    InvalidInput,
    InvalidMessage,
    Scope,
    SMTPAuthError,
    SMTPBindError,
    SMTPConnectError,
    SMTPDataError,
    SMTPGreetingError,
    SMTPHeloError,
    SMTPNotSupported,
    SMTPProtocolError,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
    SMTPTLSError,
    is_interrupt,
    reraise_interrupt,
)
from .events import PHASE_TIMEOUT, Observer
from .reply import Reply
from .timeouts import Timeouts

log = logging.getLogger("mxq.session")

__all__ = ["SMTPSession", "SendResult", "Transaction", "DotStuffer", "TLS_POLICIES", "xtext", "utf8_addr_xtext",
           "MAX_REPLY_LINE", "MAX_REPLY_BYTES", "MAX_COMMAND_LINE"]

#: The accepted values of ``SMTPSession(tls=...)``.
TLS_POLICIES = ("none", "opportunistic", "required", "implicit")

#: Bytes read from a file or sent per socket write while streaming DATA.
CHUNK_SIZE = 64 * 1024

# Preference order when the caller names no mechanism (strongest first).
_AUTH_PREFERENCE = ("CRAM-MD5", "PLAIN", "LOGIN")


def xtext(value: str) -> str:
    """RFC 3461 section 4 xtext: "!" to "~" except "+" and "=" as is, others as "+XX"."""
    out = []
    for ch in value:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend("+%02X" % b for b in ch.encode("utf-8"))
    return "".join(out)


def utf8_addr_xtext(value: str) -> str:
    """RFC 6533 section 3 utf-8-addr-xtext: non-ASCII, "+", "=" and controls as ``\\x{HEX}``."""
    out = []
    for ch in value:
        if "!" <= ch <= "~" and ch not in "+=\\":
            out.append(ch)
        else:
            out.append("\\x{%X}" % ord(ch))
    return "".join(out)


@dataclass
class SendResult:
    """The outcome of one ``send_message`` transaction.

    ``recipients`` maps each recipient address (as given) to the server's
    RCPT reply -- or, for recipients never tried because the server said 452
    (too many recipients), to that 452 reply, so they can be retried in a new
    transaction.  ``reply`` is the reply to DATA's end (or to a refused DATA
    command); None when no recipient was accepted and DATA was not sent.
    """

    recipients: dict[str, Reply] = field(default_factory=dict)
    reply: Reply | None = None

    @property
    def accepted(self) -> list[str]:
        """Recipients whose RCPT was accepted (2xx)."""
        return [a for a, r in self.recipients.items() if r.is_positive()]

    @property
    def delivered(self) -> list[str]:
        """Recipients accepted at RCPT when the final reply was 2xx as well."""
        if self.reply is None or not self.reply.is_positive():
            return []
        return self.accepted


@dataclass
class Transaction:
    """The envelope phase of one transaction (``SMTPSession.start_transaction``).

    ``mail``: the reply to MAIL FROM; ``recipients``: the RCPT reply per
    recipient in order (None for a recipient not tried: after a 452 without
    pipelining, or after a 421); ``data``: the reply to DATA (354: DATA is
    open), or None when DATA was not sent (or ended at once because nobody
    was accepted); ``previous``: the final reply of the message before, when
    ``send_content(wait=False)`` left it to be read with this group.
    """

    mail: Reply | None = None
    recipients: list = field(default_factory=list)
    data: Reply | None = None
    previous: Reply | None = None


class DotStuffer:
    """Turns message bytes into DATA bytes, chunk by chunk.

    Every line end (CRLF, bare LF, bare CR) becomes CRLF and a line starting
    with "." gets another "." (RFC 5321 section 4.5.2), correctly when a line
    end or a leading dot falls across a chunk boundary: a trailing CR is held
    back until the next chunk shows whether an LF follows.  ``finish()`` ends
    the last line and returns the tail including the final ``".\\r\\n"``.
    """

    def __init__(self) -> None:
        self._pending_cr = False
        self._at_line_start = True
        #: The last bytes of the text on the wire (at most 4; the DATA line's CRLF at first): what a
        #: raw ``SMTPSession.write`` must not complete into the end-of-data sequence.
        self.tail = b"\r\n"

    def feed(self, chunk: bytes) -> bytes:
        """Convert one chunk; the result may be shorter or longer than the input."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            self._pending_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        # CRLF -> LF, bare CR -> LF, then every LF -> CRLF: three passes in C.
        data = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\r\n")
        self.tail = data[-4:] if len(data) >= 4 else (self.tail + data)[-4:]
        return data

    def finish(self) -> bytes:
        """The rest: a held-back CR as a line end, a final CRLF if missing, and ``.\\r\\n``."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r\n"
        elif not self._at_line_start:
            tail = b"\r\n"
        self._at_line_start = True
        return tail + b".\r\n"


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # opportunistic TLS: encryption without authentication
    return ctx


_UNVERIFIED = _unverified_context()


def _caused_by(exc: BaseException, kind: type) -> bool:
    """True when ``exc`` or anything in its cause/context chain is a ``kind``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@functools.lru_cache(maxsize=4096)
def _address_of(text: str) -> Address:
    return parse_address(text)


@functools.lru_cache(maxsize=1024)
def _sender_of(text: str) -> Address | None:
    return parse_sender(text)


def address_of(text: str) -> Address:
    """``parse_address(text)``, remembered: a delivery parses each address several times
    (validation, grouping, RCPT), and ``Address`` is immutable.  Errors are not remembered."""
    return _address_of(text) if type(text) is str else parse_address(text)


def sender_of(text: str | None) -> Address | None:
    """``parse_sender(text)``, remembered like ``address_of``."""
    return _sender_of(text) if type(text) is str else parse_sender(text)


def _default_helo_name() -> str:
    try:
        return registry.value("MXQ_HELO_NAME") or socket.getfqdn()
    except registry.ConfigError:
        return socket.getfqdn()


# ------------------------------------------------------------------------------------------ the wire

#: Octets of one reply line kept (RFC 5321 4.5.3.1.5 allows 512 including CRLF;
#: like Postfix's ``line_length_limit`` we tolerate four times that, and skip
#: whatever a longer line has beyond it).
MAX_REPLY_LINE = 2048

#: Octets read for one reply, all its lines together, before the server is
#: given up on (an EHLO reply is a few hundred octets; a server that streams
#: ``220-`` lines for ever is cut here, or by the phase deadline, whichever
#: comes first).
MAX_REPLY_BYTES = 64 * 1024

#: Longest command line ``command()`` sends (RFC 4954's limit for AUTH lines).
MAX_COMMAND_LINE = 12288

# Human phase names, as error texts and logs say them (Postfix's wording).
_PHASE_TEXT = {
    "connect": "connecting", "greeting": "receiving the initial server greeting",
    "ehlo": "sending EHLO", "helo": "sending HELO", "starttls": "sending STARTTLS",
    "auth": "authenticating", "mail": "sending MAIL FROM", "rcpt": "sending RCPT TO",
    "data": "sending DATA", "content": "sending message content",
    "dot": "waiting for the reply to the end of data", "rset": "sending RSET", "noop": "sending NOOP",
    "quit": "sending QUIT", "command": "sending a command",
}

# Commands ``command()`` refuses, and why: the session's own methods own them.
_OWNED_VERBS = {
    "STARTTLS": "TLS is started by connect() according to the tls policy",
    "EHLO": "connect() sends EHLO/HELO",
    "HELO": "connect() sends EHLO/HELO",
    "QUIT": "use disconnect()",
    "BDAT": "BDAT (CHUNKING) is not supported: use DATA",
}

_PIPELINED_PHASE = {"MAIL": "mail", "RCPT": "rcpt", "DATA": "data"}

_RCPT_PATH = re.compile(r"TO:\s*<([^>]*)>", re.IGNORECASE)


class _ReplyTooLarge(Exception):
    """Internal: a reply ran past ``MAX_REPLY_BYTES``."""


class _Reader:
    """Reads reply lines from a socket under a deadline, never more than a budget.

    ``readline`` returns one line (with its line end), truncated to
    ``limit`` octets (the rest of a longer line is read and dropped), and
    how many octets it consumed; ``b""`` at end of file.  Every ``recv``
    waits at most until ``deadline`` (``time.monotonic()`` seconds), so a
    server trickling one byte at a time is cut at the deadline, not after
    one timeout per byte.
    """

    __slots__ = ("sock", "buf")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def readline(self, limit: int, deadline: float, budget: int) -> tuple[bytes, int]:
        buf = self.buf
        head = None          # the kept part of an over-long line
        dropped = 0
        while True:
            i = buf.find(b"\n")
            if i >= 0:
                n = i + 1
                if head is None:
                    line = bytes(buf[:n]) if n <= limit else bytes(buf[:limit]) + b"\r\n"
                else:
                    line = head
                del buf[:n]
                return line, dropped + n
            if head is None and len(buf) > limit:
                head = bytes(buf[:limit]) + b"\r\n"
            if head is not None:
                dropped += len(buf)
                buf.clear()
            if dropped + len(buf) > budget:
                raise _ReplyTooLarge(dropped + len(buf))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("phase deadline passed")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                return b"", dropped
            buf += data


class _Wire(smtplib.SMTP):
    """``smtplib.SMTP`` whose reads and writes go through the session.

    smtplib still does what it is good at (EHLO parsing, the AUTH
    exchanges); every byte it sends goes through ``SMTPSession._send_command``
    and every reply it reads comes from ``SMTPSession._read_reply``: bounded,
    under the phase deadline, and seen by the session's observers.
    """

    ehlo_msg = "EHLO"       # smtplib sends "ehlo"; commands go out upper-case, as RFC 5321 writes them

    def __init__(self, session: "SMTPSession"):
        super().__init__(local_hostname=session.helo_name)
        self._mxq = session

    def helo(self, name=""):
        self.putcmd("HELO", name or self.local_hostname)
        code, msg = self.getreply()
        self.helo_resp = msg
        return code, msg

    def send(self, s):
        self._mxq._send_command(s)

    def getreply(self):
        return self._mxq._read_reply()


class SMTPSession:
    """One SMTP client connection to ``host:port``.

    ``host`` is normally an IP address (the delivery layer resolves MX names
    itself; the session never resolves names through the system resolver
    when given an address).  ``server_hostname`` is the exchange's name: it
    is what a ``required``/``implicit`` certificate must match (default:
    ``host``) and what error texts show, as in ``mx1.b.test[127.0.0.2]:25``.

    ``tls`` is one of ``TLS_POLICIES``.  ``tls_context`` replaces the default
    client context (opportunistic: unverified; required and implicit:
    ``ssl.create_default_context()``, which honours ``SSL_CERT_FILE``).
    Opportunistic: a refused STARTTLS (4xx/5xx) continues in clear text on
    the same connection (RFC 3207 leaves it usable); a failed handshake
    reconnects once without TLS (``tls_fallback`` says why).
    ``timeouts`` defaults to ``Timeouts.from_env()`` (so ``MXQ_CONNECT_TIMEOUT``
    and ``MXQ_COMMAND_TIMEOUT`` apply).  ``chunk_size`` is how many bytes are
    read and sent at a time while streaming DATA.  ``pipelining``: let
    ``start_transaction`` (and so ``send_message``) send MAIL, every RCPT
    and DATA in one write when the server advertises PIPELINING (RFC 2920);
    off by default, so the classic one-command-at-a-time dialogue is what a
    library user gets unless asked for.  ``source_address``: the local
    address to connect from, ``"ip"`` or ``(ip, port)`` (it must be of the
    server's address family).  ``observers``: callables that receive the
    session's events (``mxq.workers.events``; more with ``observe()``).

    Bounds (each a deadline for the whole phase, never per ``recv``): the
    connect (with an implicit TLS handshake) ``timeouts.connect``; the
    greeting ``timeouts.greeting``; each command and its reply
    ``timeouts.command`` (DATA: ``data_init``); each block of message text
    written ``timeouts.data_block``; the final dot and its reply
    ``timeouts.data_final``.  A reply is at most ``MAX_REPLY_BYTES`` octets
    (a longer one is a 4.5.0 protocol failure and the connection is
    dropped), each of its lines is kept to ``MAX_REPLY_LINE`` octets.

    Local failure codes: 4.4.1 for connect failures (refused, unreachable,
    connect timeout), 4.4.2 for a timeout or lost connection after that,
    4.5.0 for a reply too large to be an SMTP reply, 4.3.5 for a source
    address that cannot be used (``SMTPBindError``), 4.7.4 TLS required but
    not offered, 4.7.5 STARTTLS refused or handshake / certificate failure
    (``SMTPTLSError``, also for implicit TLS).

    Attributes after ``connect()``: ``greeting`` (Reply), ``extensions``
    (EHLO keywords lower-case -> parameters; empty after HELO), ``esmtp``,
    ``tls_active``, ``tls_protocol``, ``tls_cipher``, ``tls_verified``,
    ``tls_fallback`` (why opportunistic TLS was dropped, or None), ``peer``
    ((ip, port)), ``local`` ((ip, port) we connected from), ``accepted``
    (recipients accepted in the open transaction), ``server_seconds`` (the
    server's own time answering, summed over the replies waited for: see
    ``_arrived``).
    """

    def __init__(self, host: str, port: int = 25, *, helo_name: str | None = None,
                 tls: str = "opportunistic", tls_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, timeouts: Timeouts | None = None,
                 source_address: str | tuple[str, int] | None = None, chunk_size: int = CHUNK_SIZE,
                 pipelining: bool = False, observers: Iterable[Observer] = ()):
        if tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {tls!r}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.host = host
        self.port = port
        self.helo_name = helo_name or _default_helo_name()
        self.tls = tls
        self.tls_context = tls_context
        self.server_hostname = server_hostname or host
        self.timeouts = timeouts if timeouts is not None else Timeouts.from_env()
        if isinstance(source_address, str):
            source_address = (source_address, 0)
        self.source_address = source_address
        self.chunk_size = chunk_size
        self.use_pipelining = pipelining
        self._observers: tuple = tuple(observers)
        self._parsed: tuple | None = None     # (raw text, Reply) of the last reply read, when observers parsed it
        self._awaiting: float | None = None   # monotonic time a reply read began, while it waits (``silence``)
        #: Seconds the server took to answer, summed over every reply the session waited for: from
        #: the read's start (right after what it answers went out) to the reply's arrival in the
        #: kernel (``_arrived``), so this process's delays in reading it do not count.
        self.server_seconds = 0.0
        #: False once a wait was timed without the kernel's arrival time (not Linux): it then ran to
        #: the end of the read, this process's delay in reading included.
        self.server_timed = True

        self.greeting: Reply | None = None
        self.helo_reply: Reply | None = None
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls_active = False
        self.tls_protocol: str | None = None
        self.tls_cipher: str | None = None
        self.tls_verified = False
        self.tls_fallback: str | None = None
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.accepted: list[str] = []
        self._smtp: _Wire | None = None
        self._reader: _Reader | None = None
        self._phase = "connect"      # the phase in progress, its limit and deadline
        self._limit = 0.0
        self._deadline = 0.0
        self._masking = False        # in an AUTH exchange: command lines are masked in events
        self._auth_open = False      # command("AUTH") got a 334: the next line answers it
        self._in_mail = False        # MAIL FROM accepted, transaction open
        self._stuffer: DotStuffer | None = None   # not None while DATA is in progress
        self._sent = 0               # message bytes written in this DATA (progress)
        self._total: int | None = None   # the message's size, when known (progress)
        self._held = b""             # message text send_content leaves for close_message to send
        self._defer_final = False    # close_message: send, leave the final reply unread
        self._final_unread = False   # a final reply is owed: read by start_transaction or final_reply()
        self._out = b""              # a message's text and dot, held to open the next group
        self._out_progress: tuple[int, int | None] | None = None   # its progress, told when it goes out
        self.last_final: Reply | None = None   # the owed final reply, once read
        self._smtputf8 = False

    # ------------------------------------------------------------------
    # observers

    def observe(self, observer: Observer) -> Observer:
        """Add an observer (a callable taking one event, see ``mxq.workers.events``); returns it."""
        if observer not in self._observers:
            self._observers = self._observers + (observer,)
        return observer

    def unobserve(self, observer: Observer) -> None:
        """Remove an observer added before (no error if it was not there)."""
        self._observers = tuple(o for o in self._observers if o != observer)   # == : bound methods

    @property
    def observers(self) -> tuple:
        """The observers, in the order they are told."""
        return self._observers

    def _emit(self, event) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception as e:  # noqa: BLE001 -- an observer must never break a delivery
                reraise_interrupt(e)
                log.exception("%s: session observer %r failed on %s", self.where, observer, event.kind)

    # ------------------------------------------------------------------
    # plumbing

    @property
    def where(self) -> str:
        """The exchange as logs and error texts name it: ``name[ip]:port``."""
        ip = self.peer[0] if self.peer else self.host
        return f"{self.server_hostname}[{ip}]:{self.port}"

    @property
    def connected(self) -> bool:
        """True while the connection is open (as far as the client knows)."""
        return self._smtp is not None and self._smtp.sock is not None

    @property
    def phase(self) -> str:
        """The phase in progress or last run (see ``mxq.workers.events``)."""
        return self._phase

    def _abort(self, quit: bool = False) -> None:
        """Drop the connection (without QUIT unless ``quit``: after a timeout or a broken connection)."""
        smtp, self._smtp = self._smtp, None
        self._reader = None
        self._stuffer = None
        self._held = b""
        self._defer_final = self._final_unread = False
        self._out = b""              # never sent: the server never saw its dot
        self._out_progress = None
        self._in_mail = False
        self._masking = self._auth_open = False
        self.accepted = []
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass
            if self._observers:
                self._emit(events.Closed(self, quit))

    def _begin(self, phase: str, limit: float | None = None) -> None:
        """Start ``phase``: its deadline is now + its timeout (or ``limit``)."""
        if limit is None:
            limit = getattr(self.timeouts, PHASE_TIMEOUT[phase])
        self._phase, self._limit = phase, limit
        self._deadline = time.monotonic() + limit

    def _lost(self, text: str, exc: BaseException) -> SMTPServerDisconnected:
        self._abort()
        detail = f": {exc}" if str(exc) else ""
        return SMTPServerDisconnected(
            Reply.local("4.4.2", f"lost connection with {self.where} while {text}{detail}"))

    def _timed_out(self, text: str) -> SMTPTimeoutError:
        phase, limit = self._phase, self._limit
        if self._observers:
            self._emit(events.TimedOut(self, phase, limit))
        self._abort()
        return SMTPTimeoutError(Reply.local(
            "4.4.2", f"conversation with {self.where} timed out while {text} (limit {limit:g} s)"))

    def _io(self, phase: str, fn, *args, text: str | None = None, limit: float | None = None):
        """Run one exchange with the server as ``phase``, under its deadline, mapping network failures."""
        text = text or _PHASE_TEXT[phase]
        if not self.connected:
            raise SMTPServerDisconnected(Reply.local("4.4.2", f"not connected to {self.where} ({text})"))
        self._begin(phase, limit)
        try:
            return fn(*args)
        except _ReplyTooLarge as e:
            self._abort()
            raise SMTPProtocolError(Reply.local(
                "4.5.0", f"reply from {self.where} exceeded {MAX_REPLY_BYTES} bytes while {text}"),
                scope=Scope.SITE) from e
        except smtplib.SMTPServerDisconnected as e:
            if _caused_by(e, TimeoutError):
                raise self._timed_out(text) from e
            raise self._lost(text, e) from e
        except smtplib.SMTPException:   # a reply-carrying error (AUTH): the caller maps it
            raise
        except OSError as e:   # socket and ssl errors
            if _caused_by(e, TimeoutError):
                raise self._timed_out(text) from e
            raise self._lost(text, e) from e

    def _send_bytes(self, data) -> None:
        """Write ``data`` whole before the phase deadline (a slow reader is cut at it)."""
        sock = self._smtp.sock
        deadline = self._deadline
        view = memoryview(data)
        n = len(view)
        off = 0
        while off < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("phase deadline passed")
            sock.settimeout(remaining)
            off += sock.send(view[off:] if off else view)

    def _send_command(self, s) -> None:
        """smtplib's ``send``: one command line (or AUTH line), then its event."""
        data = s.encode(self._smtp.command_encoding) if isinstance(s, str) else bytes(s)
        self._send_bytes(data)
        if self._observers:
            self._command_events(data, pipelined=False)

    def _command_events(self, data: bytes, pipelined: bool) -> None:
        for raw in data.split(b"\r\n"):
            if not raw:
                continue
            line = raw.decode("utf-8", "replace")
            verb = line.split(" ", 1)[0].upper()
            phase = _PIPELINED_PHASE.get(verb, self._phase) if pipelined else self._phase
            if self._masking:
                if verb == "AUTH":
                    parts = line.split(" ")
                    line = " ".join(parts[:2] + (["****"] if len(parts) > 2 else []))
                else:
                    line, verb = "****", ""
            self._emit(events.CommandSent(self, phase, line, verb, pipelined))

    def _read_reply(self) -> tuple[int, bytes]:
        """smtplib's ``getreply``: one whole reply, bounded (see ``_Reader``); ``(-1, text)`` if malformed."""
        # Every read follows the write it answers without a pause (nothing yields between them),
        # so the wait for the server starts here (``silence``).
        self._awaiting = started = time.monotonic()
        waits = b"\n" not in self._reader.buf      # else the reply (or its first line) came earlier
        try:
            out = self._read_reply_lines()
        finally:
            self._awaiting = None
        if waits:
            now = time.monotonic()
            ago = _arrived(self._smtp.sock)
            if ago is None:
                self.server_timed = False
                ago = 0.0
            self.server_seconds += max(0.0, now - ago - started)
        return out

    def _read_reply_lines(self) -> tuple[int, bytes]:
        reader, deadline = self._reader, self._deadline
        lines = []
        total = 0
        code = -1
        while True:
            line, used = reader.readline(MAX_REPLY_LINE, deadline, MAX_REPLY_BYTES - total)
            if not line:
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            total += used
            if total > MAX_REPLY_BYTES:
                raise _ReplyTooLarge(total)
            digits = line[:3]
            if len(digits) != 3 or not digits.isdigit():
                code = -1
                lines.append(line.strip(b" \t\r\n"))
                break
            code = int(digits)
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                break
        msg = b"\n".join(lines)
        if self._observers and code != -1:
            reply = Reply.parse(code, msg)
            self._parsed = (msg, reply)         # _reply takes it instead of parsing it again
            self._emit(events.ReplyReceived(self, self._phase, reply,
                                            tuple(x.decode("utf-8", "replace") for x in lines)))
        return code, msg

    def _parse(self, code: int, msg: bytes) -> Reply:
        """``Reply.parse(code, msg)``, or the reply ``_read_reply`` parsed for the observers from this very text."""
        parsed, self._parsed = self._parsed, None
        if parsed is not None and parsed[0] is msg:
            return parsed[1]
        return Reply.parse(code, msg)

    def _command(self, phase: str, cmd: str, args: str = "", *, text: str | None = None) -> Reply:
        if self._final_unread:
            # Its reply would be taken for this command's: read it with final_reply() first.
            raise SMTPProtocolError(Reply.local("4.3.0", f"{cmd}: the previous message's final reply is unread"))
        code, msg = self._io(phase, self._smtp.docmd, cmd, args, text=text)
        if code == -1:   # not an SMTP reply
            raise self._lost(text or _PHASE_TEXT[phase], OSError(
                "malformed reply: " + (msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg)[:200]))
        return self._parse(code, msg)

    def _require_connected(self, what: str) -> None:
        if not self.connected:
            raise SMTPProtocolError(Reply.local("4.3.0", f"{what}: not connected; call connect() first"),
                                    scope=Scope.SITE)

    # ------------------------------------------------------------------
    # connection

    def connect(self) -> Reply:
        """Connect, read the greeting, EHLO (HELO fallback) and apply the TLS policy.

        Returns the greeting.  Raises ``SMTPConnectError`` (refused,
        unreachable; ``SMTPBindError`` for an unusable source address),
        ``SMTPTimeoutError`` (connect, greeting or command timeout),
        ``SMTPServerDisconnected``, ``SMTPGreetingError`` (not 220),
        ``SMTPHeloError``, ``SMTPTLSError`` or ``SMTPProtocolError`` (a
        reply too large).  Calling it while connected returns the current
        greeting.
        """
        if self.connected:
            return self.greeting
        self.tls_fallback = None
        try:
            self._open(starttls=self.tls in ("opportunistic", "required"))
        except _TLSFallback as fb:
            # Opportunistic TLS failed during the handshake: like Postfix, try
            # once more in clear text on a new connection.
            self.tls_fallback = fb.reason
            log.info("%s: %s; retrying without TLS", self.where, fb.reason)
            self._open(starttls=False)
        return self.greeting

    def _connect_failed(self, text: str, exc: BaseException, timed_out: bool = False):
        if timed_out:
            if self._observers:
                self._emit(events.TimedOut(self, "connect", self._limit))
            return SMTPTimeoutError(Reply.local("4.4.1", f"connect to {self.where}: Connection timed out"))
        return SMTPConnectError(Reply.local("4.4.1", f"connect to {self.where}: {text}"))

    def _new_socket(self) -> socket.socket:
        """A connected socket (TLS-wrapped for implicit TLS), under the connect deadline."""
        self._begin("connect")
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise self._connect_failed(f"cannot resolve {self.host}: {e.strerror or e}", e) from e
        sock = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                if self.source_address is not None:
                    self._bind(sock, family)
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("connect deadline passed")
                sock.settimeout(remaining)
                sock.connect(addr)
                break
            except SMTPBindError:
                sock.close()
                raise
            except TimeoutError as e:
                sock.close()
                raise self._connect_failed("", e, timed_out=True) from e
            except ConnectionRefusedError as e:
                sock.close()
                if addr is infos[-1][4]:
                    raise self._connect_failed("Connection refused", e) from e
            except OSError as e:
                sock.close()
                if addr is infos[-1][4]:
                    raise self._connect_failed(e.strerror or str(e), e) from e
        # Every write we make is a whole command or a whole data chunk, so
        # Nagle's algorithm only adds latency: with the server's delayed ACK
        # the final "." waited ~40 ms behind the last data chunk per message.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _bind(self, sock: socket.socket, family: int) -> None:
        ip, port = self.source_address[0], int(self.source_address[1] or 0)
        want = socket.AF_INET6 if ":" in ip else socket.AF_INET
        if want != family:
            raise SMTPBindError(Reply.local(
                "4.3.5", f"source address {ip} is not of the address family of {self.where}"))
        try:
            sock.bind((ip, port))
        except OSError as e:
            raise SMTPBindError(Reply.local(
                "4.3.5", f"cannot use source address {ip} for {self.where}: {e.strerror or e}")) from e

    def _wrap(self, sock: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket:
        """The TLS handshake under the current phase's deadline (one deadline for the whole handshake)."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("phase deadline passed")
        sock.settimeout(remaining)
        tls = ctx.wrap_socket(sock, server_hostname=self.server_hostname)
        cipher = tls.cipher() or (None, None, None)
        self.tls_protocol = tls.version()
        self.tls_cipher = cipher[0]
        self.tls_verified = ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        return tls

    def _tls_started(self, sock: ssl.SSLSocket) -> None:
        if self._observers:
            cipher = sock.cipher() or (None, None, None)
            self._emit(events.TLSStarted(self, self.tls_protocol, self.tls_cipher, cipher[2],
                                         self.tls_verified, self.server_hostname))

    def _open(self, starttls: bool) -> None:
        self._abort()
        self.greeting = self.helo_reply = None
        self.extensions, self.esmtp, self.tls_active, self.peer, self.local = {}, False, False, None, None
        self.tls_protocol = self.tls_cipher = None
        self.tls_verified = False
        sock = self._new_socket()
        self.peer = tuple(sock.getpeername()[:2])
        self.local = tuple(sock.getsockname()[:2])
        smtp = _Wire(self)
        smtp.sock = sock
        smtp._host = self.server_hostname  # smtplib's name for the peer (used in its own messages)
        self._smtp = smtp
        self._reader = _Reader(sock)
        if self._observers:
            self._emit(events.Connected(self, self.peer, self.local))
        if self.tls == "implicit":
            ctx = self.tls_context or ssl.create_default_context()
            try:
                smtp.sock = self._wrap(sock, ctx)
            except TimeoutError as e:
                raise self._timed_out("performing the TLS handshake") from e
            except (ssl.SSLError, ssl.CertificateError, OSError) as e:
                self._abort()
                raise SMTPTLSError(Reply.local("4.7.5", f"TLS handshake with {self.where} failed: {e}")) from e
            self._reader = _Reader(smtp.sock)
            self.tls_active = True
            self._tls_started(smtp.sock)
        code, msg = self._io("greeting", smtp.getreply)
        self.greeting = self._parse(code, msg) if code != -1 else Reply.local("4.5.0", "malformed greeting")
        if code != 220:
            self._abort()
            if code == -1:
                raise SMTPProtocolError(Reply.local(
                    "4.5.0", f"malformed greeting from {self.where}: {msg.decode('utf-8', 'replace')[:200]}"),
                    scope=Scope.SITE)
            raise SMTPGreetingError(self.greeting)
        self._hello()
        if not starttls:
            return
        if "starttls" not in self.extensions:
            if self.tls == "required":
                self.disconnect()
                raise SMTPTLSError(Reply.local("4.7.4", f"TLS is required, but was not offered by {self.where}"))
            return
        self._starttls()

    def _hello(self) -> None:
        smtp = self._smtp
        code, msg = self._io("ehlo", smtp.ehlo, self.helo_name)
        if code == 250:
            self.esmtp = True
            self.extensions = {k.lower(): v.strip() for k, v in smtp.esmtp_features.items()}
            self.helo_reply = self._parse(code, msg)
            return
        if code == -1:
            raise self._lost("sending EHLO", OSError("malformed reply"))
        ehlo_reply = self._parse(code, msg)
        if code == 421:
            self._abort()
            raise SMTPHeloError(ehlo_reply)
        code, msg = self._io("helo", smtp.helo, self.helo_name)
        if code == -1:
            raise self._lost("sending HELO", OSError("malformed reply"))
        self.helo_reply = self._parse(code, msg)
        if code != 250:
            self.disconnect()
            raise SMTPHeloError(self.helo_reply)
        self.esmtp = False
        self.extensions = {}

    def _starttls(self) -> None:
        opportunistic = self.tls == "opportunistic"
        if self.tls_context is not None:
            ctx = self.tls_context
        else:
            ctx = _UNVERIFIED if opportunistic else ssl.create_default_context()
        reply = self._command("starttls", "STARTTLS")
        if reply.code != 220:
            if opportunistic:
                # The session is still in a known state (RFC 3207 section 4):
                # carry on in clear text on this connection.
                self.tls_fallback = f"STARTTLS refused: {reply}"
                log.info("%s: %s; continuing without TLS", self.where, self.tls_fallback)
                return
            self.disconnect()
            raise SMTPTLSError(Reply.local("4.7.5", f"STARTTLS refused by {self.where}: {reply}"))
        smtp = self._smtp
        # Anything the server sent after its 220 came in clear text and must
        # not be taken as a reply inside TLS (the STARTTLS injection attack).
        self._reader = None
        try:
            smtp.sock = self._wrap(smtp.sock, ctx)
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            self._abort()
            if opportunistic:
                raise _TLSFallback(f"TLS handshake failed: {e}") from e
            if isinstance(e, TimeoutError):
                raise SMTPTimeoutError(Reply.local("4.4.2", f"TLS handshake with {self.where} timed out")) from e
            raise SMTPTLSError(Reply.local("4.7.5", f"TLS handshake with {self.where} failed: {e}")) from e
        self._reader = _Reader(smtp.sock)
        # Forget everything learnt in clear text (RFC 3207 section 4.2).
        smtp.file = None
        smtp.helo_resp = smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        smtp.does_esmtp = False
        self.tls_active = True
        self._tls_started(smtp.sock)
        self._hello()

    # ------------------------------------------------------------------
    # authentication

    def authenticate(self, user: str, password: str | None = None, *, oauth2_token: str | None = None,
                     mechanism: str | None = None) -> Reply:
        """AUTH with the best offered mechanism (CRAM-MD5 > PLAIN > LOGIN), or XOAUTH2 with a token.

        ``mechanism`` forces one (it must be offered).  Raises
        ``SMTPAuthError`` with the server's reply on failure, or with a local
        5.7.4 reply when no usable mechanism is offered.  Credentials are
        never logged, and events show AUTH payloads as ``****``.
        """
        self._require_connected("authenticate")
        offered = [m.upper() for m in self.extensions.get("auth", "").split()]
        if mechanism:
            mech = mechanism.upper()
            candidates = [mech] if mech in offered else []
        elif oauth2_token is not None:
            candidates = ["XOAUTH2"] if "XOAUTH2" in offered else []
        else:
            candidates = [m for m in _AUTH_PREFERENCE if m in offered]
        if not candidates:
            want = mechanism or ("XOAUTH2" if oauth2_token is not None else " ".join(_AUTH_PREFERENCE))
            raise SMTPAuthError(Reply.local(
                "5.7.4", f"{self.where} offers no usable authentication mechanism "
                         f"(offered: {' '.join(offered) or 'none'}; usable: {want})"))
        mech = candidates[0]
        if mech == "XOAUTH2":
            if oauth2_token is None:
                raise SMTPAuthError(Reply.local("5.7.8", "XOAUTH2 needs an oauth2_token"))
            token = oauth2_token

            def authobject(challenge=None):
                # First call: the initial response; after an error challenge
                # (334 + JSON) the client must answer with an empty line.
                return f"user={user}\x01auth=Bearer {token}\x01\x01" if challenge is None else ""
        else:
            if password is None:
                raise SMTPAuthError(Reply.local("5.7.8", f"AUTH {mech} needs a password"))
            smtp = self._smtp
            smtp.user, smtp.password = user, password
            authobject = getattr(smtp, "auth_" + mech.lower().replace("-", "_"))
        self._masking = True
        try:
            code, msg = self._io("auth", self._smtp.auth, mech, authobject, text=f"authenticating with {mech}")
        except smtplib.SMTPAuthenticationError as e:
            raise SMTPAuthError(Reply.parse(e.smtp_code, e.smtp_error)) from None
        except UnicodeEncodeError:
            # smtplib sends AUTH data as ASCII; the exchange may be half done.
            self._abort()
            raise SMTPAuthError(Reply.local("5.7.8", "non-ASCII credentials are not supported")) from None
        except smtplib.SMTPException as e:
            self._abort()
            raise SMTPAuthError(Reply.local("4.7.0", f"AUTH {mech} with {self.where} failed: {e}")) from None
        finally:
            self._masking = False
            if self._smtp is not None:
                self._smtp.password = None
        return self._parse(code, msg)

    # ------------------------------------------------------------------
    # lower-level access

    def command(self, verb: str, argument: str = "") -> Reply:
        """Send one command line and return the server's reply (never raised for a 4xx/5xx).

        For extensions the session does not wrap (VRFY, EXPN, ETRN, HELP, a
        vendor command) and for driving a transaction by hand.  The session
        keeps track of what it can: MAIL (250 opens a transaction), RCPT
        (250/251 adds to ``accepted``), DATA (354 opens DATA: then
        ``write()`` raw text or ``append_message()``, and ``close_message()``),
        RSET, and AUTH (while the server answers 334, the next ``command``
        is the response line; its text is masked in events).  A 421 reply
        closes the connection.

        Refused (``SMTPProtocolError``, nothing sent): while a pipelined
        final reply is owed (``final_reply()`` first), while DATA is open,
        MAIL inside a transaction, RCPT outside one, DATA without an
        accepted recipient, AUTH inside a transaction, and the commands the
        session owns (STARTTLS, EHLO, HELO, QUIT, BDAT).  A verb or argument
        with CR, LF or NUL, or a line over ``MAX_COMMAND_LINE`` octets, is
        ``InvalidInput``.
        """
        self._require_connected("command")
        if not isinstance(verb, str) or not verb or any(c.isspace() for c in verb):
            raise InvalidInput(f"command verb must be one word, not {verb!r}")
        argument = "" if argument is None else str(argument)
        if any(c in "\r\n\0" for c in verb + argument):
            raise InvalidInput("command verb and argument must not contain CR, LF or NUL")
        line_len = len((verb + " " + argument).encode("utf-8"))
        if line_len > MAX_COMMAND_LINE:
            raise InvalidInput(f"command line of {line_len} octets exceeds {MAX_COMMAND_LINE}")
        if self._final_unread or self._out:
            raise SMTPProtocolError(Reply.local("4.3.0", f"{verb}: a pipelined final reply is owed; "
                                                         "read it with final_reply() first"))
        if self._stuffer is not None:
            raise SMTPProtocolError(Reply.local("4.3.0", f"{verb}: DATA is open; write() the text, "
                                                         "then close_message()"))
        upper = verb.upper()
        if self._auth_open:
            phase = "auth"               # a response to a 334 challenge, whatever it looks like
        else:
            why = _OWNED_VERBS.get(upper)
            if why is None and upper == "MAIL" and self._in_mail:
                why = "a transaction is open: close_message() or RSET first"
            elif why is None and upper == "RCPT" and not self._in_mail:
                why = "no transaction is open (MAIL first)"
            elif why is None and upper == "DATA" and not (self._in_mail and self.accepted):
                why = "DATA outside a transaction with an accepted recipient"
            elif why is None and upper == "AUTH" and self._in_mail:
                why = "AUTH is not allowed during a transaction (RFC 4954)"
            if why is not None:
                raise SMTPProtocolError(Reply.local("4.3.0", f"{upper} refused: {why}"))
            phase = {"MAIL": "mail", "RCPT": "rcpt", "DATA": "data", "RSET": "rset", "NOOP": "noop",
                     "AUTH": "auth"}.get(upper, "command")
        encoding = self._smtp.command_encoding
        if not (verb + argument).isascii():
            if "smtputf8" not in self.extensions:
                raise InvalidInput(f"{upper}: a non-ASCII command needs SMTPUTF8, which {self.where} does not offer")
            self._smtp.command_encoding = "utf-8"
        if phase == "auth":
            self._masking = True
        try:
            reply = self._command(phase, verb, argument, text=f"sending {upper}" if phase == "command" else None)
        finally:
            if phase == "auth":
                self._masking = False
            if self._smtp is not None and upper != "MAIL":
                self._smtp.command_encoding = encoding
        if phase == "auth":
            self._auth_open = reply.code == 334
        elif upper == "MAIL" and reply.code == 250:
            self._in_mail, self.accepted = True, []
            self._smtputf8 = "SMTPUTF8" in argument.upper()
        elif upper == "RCPT" and reply.code in (250, 251):
            m = _RCPT_PATH.search(argument)
            self.accepted.append(m.group(1) if m else argument)
        elif upper == "DATA" and reply.code == 354:
            self._stuffer = DotStuffer()
            self._sent = 0
        elif upper == "RSET" and reply.code == 250:
            self._in_mail, self.accepted = False, []
        if reply.code == 421:
            self._abort()
        return reply

    def write(self, data) -> None:
        """Write raw bytes while DATA is open (after a 354), exactly as given.

        No dot-stuffing and no line-end conversion: ``data`` must already be
        SMTP message text (CRLF line ends, a line starting with "." doubled).
        It must not hold the end-of-data sequence (``CRLF.CRLF``), nor
        complete one with what was written before (the sequence split
        across writes, the DATA line's CRLF counting as the first line end):
        end with ``close_message()``, which adds a CRLF first when the text
        did not end with one (and refuses, ``InvalidInput``, when the text
        ends with a line holding a lone "."; so does ``append_message``).
        Bounded by ``timeouts.data_block``; observers get a ``DataWritten``
        with the size.  Raises ``SMTPProtocolError`` when DATA is not open,
        ``InvalidInput`` (nothing sent) for data that would end DATA.
        """
        self._require_connected("write")
        if self._stuffer is None or self._final_unread:
            raise SMTPProtocolError(Reply.local("4.3.0", "write: DATA is not open (DATA must be answered 354 first)"))
        data = bytes(data)
        if not data:
            return
        stuffer = self._stuffer
        # A CR held back by append_message() goes first: CRLF with a leading LF, else a line end
        # of its own (what the stuffer would have made of it).
        wire = (b"\r" if data.startswith(b"\n") else b"\r\n") + data if stuffer._pending_cr else data
        if b"\r\n.\r\n" in wire or b"\r\n.\r\n" in stuffer.tail + wire[:4]:
            # Also across writes (a "." line split from its CRLF): the text after it would reach
            # the server as commands (SMTP smuggling).
            raise InvalidInput("write: data holds the end-of-data sequence; use close_message()")
        self._io("content", self._send_bytes, wire)
        stuffer._pending_cr = False
        stuffer.tail = wire[-4:] if len(wire) >= 4 else (stuffer.tail + wire)[-4:]
        stuffer._at_line_start = stuffer.tail.endswith(b"\r\n")
        self._sent += len(data)
        if self._observers:
            self._emit(events.DataWritten(self, len(data)))

    # ------------------------------------------------------------------
    # the transaction

    def create_message(self, sender: str | None, size: int | None = None, dsn: DSN | None = None, *,
                       smtputf8: bool = False, eightbit: bool = False) -> Reply:
        """MAIL FROM; "" or None is the null sender ``<>``.

        Parameters are sent only when the server advertises them: SIZE,
        BODY=8BITMIME (when ``eightbit``; without 8BITMIME the message is sent
        anyway, like Postfix does), SMTPUTF8 (when ``smtputf8`` or the sender
        needs it), RET/ENVID (DSN).  Raises ``InvalidAddress`` (nothing sent),
        ``SMTPNotSupported`` (5.3.4 size over the advertised limit; 5.6.7
        SMTPUTF8 needed but not offered; nothing sent), ``SMTPSenderRefused``
        (the server's refusal), ``SMTPProtocolError`` (a transaction is open).
        ``size`` is also the total that progress events count towards.
        """
        args, needs_utf8 = self._mail_args(sender, size, dsn, smtputf8=smtputf8, eightbit=eightbit)
        self._smtp.command_encoding = "utf-8" if needs_utf8 else "ascii"
        reply = self._command("mail", "MAIL", args)
        if reply.code != 250:
            raise SMTPSenderRefused(reply, scope=Scope.SITE if reply.code == 421 else None)
        self._in_mail = True
        self._smtputf8 = needs_utf8
        self._total = size
        self.accepted = []
        return reply

    def _mail_args(self, sender: str | None, size: int | None, dsn: DSN | None, *, smtputf8: bool,
                   eightbit: bool) -> tuple[str, bool]:
        """Check a MAIL FROM (see ``create_message``); return its argument text and whether it needs SMTPUTF8."""
        addr = sender_of(sender)
        self._require_connected("create_message")
        if self._in_mail or self._stuffer is not None:
            raise SMTPProtocolError(Reply.local("4.3.0", "a transaction is open: close_message() or reset() first"))
        ext = self.extensions
        needs_utf8 = smtputf8 or (addr is not None and addr.needs_smtputf8)
        params = []
        if needs_utf8:
            if "smtputf8" not in ext:
                raise SMTPNotSupported(Reply.local(
                    "5.6.7", f"SMTPUTF8 required but not offered by {self.where}"))
            params.append("SMTPUTF8")
        if (eightbit or needs_utf8) and "8bitmime" in ext:
            params.append("BODY=8BITMIME")
        elif eightbit:
            log.info("%s: 8-bit message sent without 8BITMIME (not offered)", self.where)
        if size is not None and "size" in ext:
            limit = int(ext["size"]) if ext["size"].strip().isdigit() else 0
            if limit and size > limit:
                raise SMTPNotSupported(Reply.local(
                    "5.3.4", f"message size {size} exceeds size limit {limit} of server {self.where}"))
            params.append(f"SIZE={int(size)}")
        if dsn is not None and "dsn" in ext:
            if dsn.ret:
                params.append(f"RET={dsn.ret.upper()}")
            if dsn.envid:
                params.append(f"ENVID={xtext(dsn.envid)}")
        path = f"<{addr.smtp()}>" if addr is not None else "<>"
        return " ".join([f"FROM:{path}"] + params), needs_utf8

    def add_recipient(self, address: str | Recipient, notify: Iterable[str] | None = None,
                      orcpt: str | None = None) -> Reply:
        """RCPT TO; returns the server's reply and never raises for a 4xx/5xx.

        ``address`` may be a ``Recipient`` (its notify/orcpt are used unless
        given here).  NOTIFY and ORCPT (``rfc822;xtext``, or ``utf-8;`` per
        RFC 6533 for a non-ASCII address) are sent only when the server
        advertises DSN.  A malformed address raises ``InvalidAddress`` before
        anything is sent; a non-ASCII address in a transaction without
        SMTPUTF8 gets a local 5.6.7 reply without anything sent.  A dead
        connection raises ``SMTPServerDisconnected`` / ``SMTPTimeoutError``.
        """
        address, args = self._rcpt_args(address, notify, orcpt, in_mail=self._in_mail, utf8=self._smtputf8)
        if isinstance(args, Reply):
            return args
        reply = self._command("rcpt", "RCPT", args)
        if reply.code in (250, 251):
            self.accepted.append(address)
        return reply

    def _rcpt_args(self, address: str | Recipient, notify, orcpt, *, in_mail: bool,
                   utf8: bool) -> tuple[str, str | Reply]:
        """Check a RCPT TO (see ``add_recipient``): ``(address, argument text)``, or a local refusal as a Reply."""
        if isinstance(address, Recipient):
            notify = address.notify if notify is None else notify
            orcpt = address.orcpt if orcpt is None else orcpt
            address = address.address
        addr = address_of(address)
        if not in_mail:
            raise SMTPProtocolError(Reply.local("4.3.0", "add_recipient before create_message"))
        if addr.needs_smtputf8 and not utf8:
            return address, Reply.local("5.6.7", f"<{address}>: SMTPUTF8 needed but not requested in MAIL FROM")
        params = []
        if "dsn" in self.extensions:
            if notify:
                params.append("NOTIFY=" + ",".join(n.strip().upper() for n in notify))
            if orcpt:
                params.append("ORCPT=" + _orcpt(orcpt))
        return address, " ".join([f"TO:<{addr.smtp()}>"] + params)

    # ------------------------------------------------------------------
    # a whole envelope at once (PIPELINING, RFC 2920)

    @property
    def pipelining(self) -> bool:
        """True when ``start_transaction`` pipelines: asked for, and advertised by the server."""
        return self.use_pipelining and "pipelining" in self.extensions

    def start_transaction(self, sender: str | None, recipients: Iterable[str | Recipient],
                          size: int | None = None, dsn: DSN | None = None, *, smtputf8: bool = False,
                          eightbit: bool = False) -> "Transaction":
        """MAIL FROM, RCPT TO for each recipient, and DATA when a recipient was accepted.

        With ``pipelining`` (asked for and advertised), the commands go out in
        one write (RFC 2920 section 3.1: DATA last) and every reply is read
        afterwards, so the envelope costs one round trip instead of 2 + n.
        Without it, the commands go one at a time, the RCPT phase stops at a
        452 once a recipient was accepted (the rest are not tried: reply
        None), and DATA is sent only when a recipient was accepted.

        Per-recipient outcomes are the same either way -- each recipient's
        RCPT reply says whether it is in the transaction -- with these
        differences in what is on the wire when pipelining: recipients after
        a 452 are tried (their replies are used as they are: an accepted one
        is in this transaction), and DATA is always sent; when no recipient
        was accepted and the server still answers DATA with 354 (RFC 2920
        says a client must not assume it will not), a lone "." ends that
        empty message at once (``data`` is then None, as if DATA had not
        been sent).

        Returns a ``Transaction``: ``mail`` (250), ``recipients`` (a reply or
        None per recipient, in order), ``data`` (the reply to DATA, None when
        not sent).  After it:

        - ``data.code == 354``: DATA is open, send the content with
          ``append_message`` / ``close_message`` (or ``send_content``);
        - otherwise the transaction (MAIL) is still open: ``reset()`` it;
        - a 421 to a RCPT (or, pipelining, to DATA): the connection is
          dropped (``connected`` is False) and the replies after it are
          None; a 421 to MAIL raises ``SMTPSenderRefused`` (site scope).

        Raises what ``create_message`` raises (a refused MAIL raises
        ``SMTPSenderRefused`` after the pipelined replies were read, so the
        connection stays usable, with no transaction open), ``InvalidAddress``
        for a malformed recipient (nothing sent), ``SMTPServerDisconnected`` /
        ``SMTPTimeoutError`` for a dead connection.
        """
        rcpts = [Recipient.of(r) for r in recipients]
        if not self.pipelining:
            return self._transaction_stepwise(sender, rcpts, size, dsn, smtputf8=smtputf8, eightbit=eightbit)
        tx = Transaction()
        args, needs_utf8 = self._mail_args(sender, size, dsn, smtputf8=smtputf8, eightbit=eightbit)
        self._pipeline(args, needs_utf8, size, rcpts, tx)
        return tx

    def _flush_events(self, out: bytes, pipelined: bool) -> None:
        """Events for a held message text and dot that just went out (see ``send_content(wait=False)``)."""
        progress, self._out_progress = self._out_progress, None
        if self._observers and progress is not None:
            self._emit(events.DataProgress(self, progress[0], progress[1], True))
            self._emit(events.CommandSent(self, "dot", ".", ".", pipelined))

    def _pipeline(self, mail_args: str, needs_utf8: bool, size: int | None, rcpts: list[Recipient],
                  tx: "Transaction") -> Reply:
        """The pipelined envelope (see ``start_transaction``): fills ``tx``, returns the MAIL reply."""
        prepared = [self._rcpt_args(r, None, None, in_mail=True, utf8=needs_utf8) for r in rcpts]
        encoding = "utf-8" if needs_utf8 else "ascii"
        lines = [f"MAIL {mail_args}\r\n"]
        lines += [f"RCPT {args}\r\n" for _, args in prepared if not isinstance(args, Reply)]
        lines.append("DATA\r\n")
        payload = "".join(lines).encode(encoding)
        out, self._out = self._out, b""
        if out:         # the previous message's text and dot open the group
            self._io("content", self._send_bytes, out + payload)
        else:
            self._io("mail", self._send_bytes, payload)
        if self._observers:
            self._flush_events(out, True)
            self._command_events(payload, pipelined=True)
        if self._final_unread:
            # The previous message's final reply comes first (its text opened this group).
            tx.previous = self._owed_final()
            if tx.previous.code == 421:
                self._abort()
                raise SMTPServerDisconnected(tx.previous, scope=Scope.SITE)
        tx.mail = self._reply("mail")
        if tx.mail.code == 421:
            self._abort()
            raise SMTPSenderRefused(tx.mail, scope=Scope.SITE)
        mail_ok = tx.mail.code == 250
        self._in_mail = mail_ok
        self._smtputf8 = needs_utf8
        self._total = size
        self.accepted = []
        closing = False
        for address, args in prepared:
            if isinstance(args, Reply) or closing:
                tx.recipients.append(args if isinstance(args, Reply) else None)
                continue
            reply = self._reply("rcpt")
            tx.recipients.append(reply)
            if reply.code == 421:
                closing = True
            elif reply.code in (250, 251) and mail_ok:
                self.accepted.append(address)
        if closing:
            self._abort()
            if not mail_ok:
                raise SMTPSenderRefused(tx.mail)
            return tx.mail
        data = self._reply("data")
        if data.code == 421:
            self._abort()
            tx.data = data
        elif data.code == 354 and (not mail_ok or not self.accepted):
            # DATA accepted with nobody to deliver to: end the empty message now.
            self._io("dot", self._send_bytes, b".\r\n")
            if self._observers:
                self._emit(events.CommandSent(self, "dot", ".", ".", False))
            self._reply("dot")
            self._in_mail = False
        elif data.code == 354:
            self._stuffer = DotStuffer()
            self._sent = 0
            tx.data = data
        else:
            tx.data = data
        if not mail_ok:
            self._in_mail = False
            raise SMTPSenderRefused(tx.mail)
        return tx.mail

    def _transaction_stepwise(self, sender, rcpts: list[Recipient], size, dsn, *, smtputf8: bool,
                              eightbit: bool) -> "Transaction":
        tx = Transaction()
        tx.mail = self.create_message(sender, size, dsn, smtputf8=smtputf8, eightbit=eightbit)
        stopped = False
        for rcpt in rcpts:
            if stopped:
                tx.recipients.append(None)
                continue
            reply = self.add_recipient(rcpt)
            tx.recipients.append(reply)
            if reply.code == 421:
                self._abort()
                stopped = True
            elif reply.code == 452 and self.accepted:
                stopped = True          # too many recipients: the rest wait for another transaction
        if not self.connected or not self.accepted:
            return tx
        reply = self._command("data", "DATA")
        tx.data = reply
        if reply.code == 354:
            self._stuffer = DotStuffer()
            self._sent = 0
        return tx

    def _reply(self, phase: str) -> Reply:
        """Read one reply (of a pipelined group) under ``phase``'s deadline."""
        code, msg = self._io(phase, self._smtp.getreply)
        if code == -1:
            raise self._lost(_PHASE_TEXT[phase], OSError("malformed reply"))
        return self._parse(code, msg)

    def append_message(self, content) -> None:
        """Send (more of) the message text; the first call sends DATA.

        ``content``: bytes, ``str`` (message text, UTF-8), a path
        (``os.PathLike``), a binary file object, or an iterable of byte
        chunks.  It is streamed in ``chunk_size`` pieces with line ends made
        CRLF and dot-stuffing applied, each write within
        ``timeouts.data_block``.  Observers get a ``DataProgress`` after each
        block.  Raises ``SMTPProtocolError`` when no recipient was accepted
        (DATA is not sent), ``SMTPDataError`` when the server refuses DATA
        (the transaction stays open: ``reset()``), ``InvalidMessage`` for an
        unreadable content (nothing sent when it is detected before DATA).
        If reading the content fails midway the connection is dropped, so a
        truncated message is never completed.
        """
        self._require_connected("append_message")
        chunks = _chunks(content, self.chunk_size)
        if self._stuffer is None:
            if not self._in_mail or not self.accepted:
                _close_quietly(chunks)
                raise SMTPProtocolError(Reply.local("5.5.1", "no accepted recipient: DATA not sent"))
            try:
                reply = self._command("data", "DATA")
            except BaseException:
                _close_quietly(chunks)
                raise
            if reply.code != 354:
                _close_quietly(chunks)
                raise SMTPDataError(reply, scope=Scope.SITE if reply.code == 421 else None)
            self._stuffer = DotStuffer()
            self._sent = 0
        stuffer = self._stuffer
        if stuffer.tail.endswith(b"\r\n."):
            _close_quietly(chunks)
            raise InvalidInput("append_message: the text written ends with a line holding a lone '.' "
                               "(write its second '.' first): a line end now would end DATA")
        observed = bool(self._observers)
        try:
            for chunk in chunks:
                data = stuffer.feed(chunk)
                if data:
                    self._io("content", self._send_bytes, data)
                self._sent += len(chunk)
                if observed:
                    self._emit(events.DataProgress(self, self._sent, self._total))
        except (SMTPServerDisconnected, SMTPTimeoutError):
            raise
        except BaseException:
            # The content source failed mid-stream (or the caller was interrupted):
            # never let a partial message be completed by a later close_message().
            self._abort()
            raise
        finally:
            _close_quietly(chunks)

    def close_message(self) -> Reply:
        """End DATA (final CRLF if missing, then ".") and return the server's final reply.

        A 4xx/5xx refusal is returned, not raised.  A timeout raises
        ``SMTPTimeoutError``; a dropped connection ``SMTPServerDisconnected``
        -- never a success.  Sends DATA first if ``append_message`` was not
        called (an empty message).
        """
        if self._stuffer is None:
            self.append_message(b"")
        if self._stuffer.tail.endswith(b"\r\n."):
            # Only a raw write() leaves a line holding a lone "." (the stuffer doubles it): ending
            # that line would end DATA, and our own "." would then reach the server as a command.
            raise InvalidInput("close_message: the text written ends with a line holding a lone '.'; "
                               "write its second '.' (dot-stuffing) first")
        tail = self._stuffer.finish()
        held, self._held = self._held, b""
        defer, self._defer_final = self._defer_final, False
        if defer:
            # Held, not sent: it opens the next group in the same write (a server that
            # answers a group at once is not left waiting on a half of it, and a reply
            # to the dot sent alone could wait behind Nagle for our delayed ACK).
            self._out = held + tail
            self._out_progress = (self._sent, self._total)
            self._stuffer = None
            self._in_mail = False
            self._final_unread = True
            return None
        if held:
            self._io("content", self._send_bytes, held + tail)
        else:
            self._io("dot", self._send_bytes, tail, text="sending end of data")
        if self._observers:
            self._out_progress = (self._sent, self._total)
            self._flush_events(tail, False)
        return self._final_reply()

    def _final_reply(self) -> Reply:
        reply = self._reply("dot")
        self._stuffer = None
        self._in_mail = False
        self._total = None
        return reply

    def send_content(self, content, *, wait: bool = True) -> Reply | None:
        """``append_message(content)`` then ``close_message()``: the whole message text and the final reply.

        When DATA is open (354 from ``start_transaction``) and ``content`` is
        bytes no longer than ``chunk_size``, the text and the final "." go
        in one write; otherwise it streams as ``append_message`` does.  For
        progress events the total is the ``size`` given to the transaction,
        else the content's own size when it is known (bytes, str, a path).

        ``wait=False`` (pipelining only): return None at once; the text and
        dot are held and go out in the same write as the next
        ``start_transaction``'s commands (RFC 2920 lets the message text open
        a group), whose replies start with this message's final reply (given
        as ``previous``), or with ``final_reply()``.  Nothing else may be
        sent before one of those two; ``disconnect`` before them drops the
        connection without sending the held text (the server discards the
        unfinished message), so a message is never completed unseen.
        """
        if not wait and not self.pipelining:
            raise SMTPProtocolError(Reply.local("4.3.0", "send_content(wait=False) needs PIPELINING"))
        if self._total is None and self._sent == 0:
            self._total = _size_of(content)
        self._defer_final = not wait
        try:
            if self._stuffer is not None and isinstance(content, (bytes, bytearray)) \
                    and len(content) <= self.chunk_size and self.connected:
                # Held back and sent by close_message with the final dot.
                self._held = self._stuffer.feed(bytes(content))
                self._sent += len(content)
                return self.close_message()
            self.append_message(content)
            return self.close_message()
        finally:
            self._defer_final = False

    @property
    def owes_final(self) -> bool:
        """True while a final reply left unread by ``send_content(wait=False)`` is owed."""
        return self._final_unread

    def final_reply(self) -> Reply | None:
        """Read the final reply ``send_content(wait=False)`` left unread; None when none is owed.

        Also kept in ``last_final``.  A dropped connection or a timeout raises,
        as ``close_message`` does.
        """
        if not self._final_unread:
            return None
        out, self._out = self._out, b""
        if out:
            self._io("content", self._send_bytes, out)
            if self._observers:
                self._flush_events(out, False)
        return self._owed_final()

    def _owed_final(self) -> Reply:
        self._final_unread = False
        self.last_final = self._reply("dot")
        self._total = None
        return self.last_final

    def send_message(self, sender: str | None, recipients: Iterable[str | Recipient], content,
                     dsn: DSN | None = None, *, size: int | None = None, eightbit: bool | None = None,
                     smtputf8: bool | None = None) -> SendResult:
        """One whole transaction: MAIL, a RCPT per recipient, DATA.

        Per-recipient replies are in the result; a 452 stops adding and is
        given to the remaining recipients (with ``pipelining`` every
        recipient is tried, and each has its own reply: see
        ``start_transaction``).  When no recipient is accepted the
        transaction is reset and ``reply`` is None.  A refused DATA command is
        returned as ``reply`` (after RSET).  For bytes/str content, ``size``
        and ``eightbit`` are worked out when not given; SMTPUTF8 is used when
        an address needs it (or ``smtputf8``).  Raises what
        ``create_message`` raises; a 421 to RCPT raises
        ``SMTPServerDisconnected`` (site scope).
        """
        rcpts = [Recipient.of(r) for r in recipients]
        if not rcpts:
            raise InvalidMessage("no recipients")
        parsed: list[Address] = [address_of(r.address) for r in rcpts]
        if isinstance(content, str):
            content = content.encode("utf-8")
        if isinstance(content, (bytes, bytearray, memoryview)):
            if size is None:
                size = len(content)
            if eightbit is None:
                data = content.tobytes() if isinstance(content, memoryview) else content
                eightbit = not data.isascii()
        elif isinstance(content, os.PathLike) and size is None:
            try:
                size = os.path.getsize(content)
            except OSError as e:
                raise InvalidMessage(f"cannot read {os.fspath(content)}: {e}") from e
        need_utf8 = bool(smtputf8) or any(a.needs_smtputf8 for a in parsed)
        tx = self.start_transaction(sender, rcpts, size, dsn, smtputf8=need_utf8, eightbit=bool(eightbit))
        result = SendResult()
        stop = None
        for rcpt, reply in zip(rcpts, tx.recipients):
            if reply is None:           # not tried: after a 452 (the rest wait for another transaction)
                if stop is not None:
                    result.recipients.setdefault(rcpt.address, stop)
                continue
            result.recipients[rcpt.address] = reply
            if reply.code == 421:
                self._abort()
                raise SMTPServerDisconnected(reply, scope=Scope.SITE)
            if reply.code == 452:
                stop = reply
        if not self.accepted:
            if self.connected:
                self.reset()
            return result
        if tx.data is None or tx.data.code != 354:
            # A refused DATA command (Too many recipients... or 4xx/5xx): returned, after RSET.
            result.reply = tx.data
            if self.connected:
                self.reset()
            return result
        result.reply = self.send_content(content)
        return result

    def reset(self) -> Reply:
        """RSET: abandon the open transaction (if any); the connection stays usable.

        Not allowed while DATA is in progress (``SMTPProtocolError``): the
        only way out of DATA is ``close_message()`` or ``disconnect()``.
        """
        self._require_connected("reset")
        if self._stuffer is not None:
            raise SMTPProtocolError(Reply.local("4.3.0", "cannot RSET during DATA"))
        reply = self._command("rset", "RSET")
        self._in_mail = False
        self._total = None
        self.accepted = []
        return reply

    @property
    def reusable(self) -> bool:
        """True when the connection could carry another transaction as it is (``mxq.workers.scache``).

        Open, no transaction or DATA in progress, no final reply owed, nothing
        held back, and the server has sent nothing since its last reply (a
        readable socket means it closed the connection or said something
        unasked, such as a 421 on an idle timeout).  Costs one ``poll``.
        """
        if not self.connected or self._in_mail or self._stuffer is not None or self._final_unread \
                or self._out or self._held:
            return False
        return _readable(self._smtp.sock) is False

    @property
    def reply_unread(self) -> bool:
        """True when the server has sent bytes the session has not read yet: the wait for a reply
        under way is the caller's process being late, not the server.

        Bytes in TLS's buffer or the socket's (one ``poll``); the part of a
        line the session has read already is the server's wait for the
        rest.  ``silence`` asks it: a process starting a hundred destinations
        at once reads replies that have long arrived only when its turn
        comes.  False when not connected.
        """
        smtp = self._smtp                   # (asked from another thread: read once)
        sock = smtp.sock if smtp is not None else None
        return sock is not None and _readable(sock) is True

    @property
    def silence(self) -> float:
        """Seconds the server has owed the reply the session is waiting for, none of it arrived yet.

        0.0 when no reply is being waited for, or when bytes of it are in and
        the session has not read them (``reply_unread``: the wait is then the
        caller's process being late).  The clock starts when the read begins,
        right after the command or final dot went out, so neither this
        process's delays before it sent nor its delays in reading count: a
        server that answers at once is never silent for long, however busy
        the client is.  The queue manager's speculation watch asks it from
        another thread of a lane's first transaction.
        """
        since = self._awaiting
        if since is None or self.reply_unread:
            return 0.0
        return max(0.0, time.monotonic() - since)

    def noop(self) -> Reply:
        """NOOP: check that the connection is still alive."""
        self._require_connected("noop")
        return self._command("noop", "NOOP")

    def disconnect(self) -> None:
        """QUIT and close; tolerant of a dead peer, never raises (but an interrupt goes through).

        During DATA no QUIT is sent (it would become message text): the
        connection is just closed, so the server discards the message.
        """
        if self._smtp is None:
            return
        if self._out:
            # A message held by send_content(wait=False) and never sent: its dot must not go
            # out now (nobody would read the verdict), and QUIT would be taken for its text.
            self._abort()
            return
        quit = False
        if self._stuffer is None and self._smtp.sock is not None and not self._final_unread:
            try:
                self._io("quit", self._smtp.docmd, "QUIT", limit=min(self.timeouts.command, 10.0))
                quit = True
            except Exception as e:  # noqa: BLE001 -- a dead peer: nothing more to say
                reraise_interrupt(e)
        self._abort(quit=quit)

    close = disconnect

    def abort(self) -> None:
        """Drop the connection at once, without QUIT (the server discards an unfinished message)."""
        self._abort()

    def __enter__(self) -> "SMTPSession":
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        if exc[1] is not None and is_interrupt(exc[1]):
            self._abort()           # out of time: no QUIT round trip
        else:
            self.disconnect()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<SMTPSession {self.where} tls={self.tls} {state}>"


_TCP_INFO = getattr(socket, "TCP_INFO", None)
#: struct tcp_info (linux/tcp.h): ``tcpi_last_data_recv``, milliseconds since data last arrived (u32).
_LAST_DATA_RECV = 52


def _arrived(sock) -> float | None:
    """Seconds since the kernel last received data on ``sock`` (Linux's ``TCP_INFO``: a jiffy's
    resolution, 1-10 ms); None where it cannot say (another system, a closed socket).

    The end of a reply the session has just read is the last data in: ``now - _arrived(sock)`` is
    when the server's answer came, however late this process got round to reading it.  A gevent
    worker delivering to a hundred instant exchanges reads each reply 20-150 ms after it came (its
    turn among the others), and timing the read itself made those exchanges look slow.
    """
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV + 4)
    except (OSError, ValueError, AttributeError):
        return None
    if len(info) < _LAST_DATA_RECV + 4:
        return None
    return int.from_bytes(info[_LAST_DATA_RECV:_LAST_DATA_RECV + 4], sys.byteorder) / 1000.0


def _readable(sock) -> bool | None:
    """Has the peer sent something not read yet (TLS's buffer, or the socket's: one ``poll(0)``)?
    None when the socket cannot be asked (closed)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        poller = select.poll()          # not select(): descriptors above 1023 are common here
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return None


def _size_of(content) -> int | None:
    """The message size in bytes when it is known without reading (bytes, str, a path)."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return len(content)
    if isinstance(content, str):
        return len(content.encode("utf-8"))
    if isinstance(content, os.PathLike):
        try:
            return os.path.getsize(content)
        except OSError:
            return None
    return None


class _TLSFallback(Exception):
    """Internal: opportunistic TLS failed in the handshake; reconnect in clear text."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _orcpt(value: str) -> str:
    """ORCPT value: ``rfc822;xtext(addr)``, or ``utf-8;...`` (RFC 6533) for non-ASCII."""
    kind, sep, addr = value.partition(";")
    if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", kind):
        kind, addr = "rfc822", value
    addr = addr.strip().strip("<>")
    if not addr.isascii():
        return "utf-8;" + utf8_addr_xtext(addr)
    return f"{kind};{xtext(addr)}"


def _close_quietly(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _split(data, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), size):
        yield bytes(view[i:i + size])


def _chunks(content, size: int) -> Iterator[bytes]:
    """An iterator of byte chunks for any supported content; files are opened eagerly.

    Opening (and type checking) happens here, before DATA is sent, so a
    missing file or an unsupported type fails with nothing sent.
    """
    if isinstance(content, str):
        return _split(content.encode("utf-8"), size)
    if isinstance(content, (bytes, bytearray, memoryview)):
        return _split(content, size)
    if isinstance(content, os.PathLike):
        try:
            f = open(content, "rb")
        except OSError as e:
            raise InvalidMessage(f"cannot read {os.fspath(content)}: {e}") from e
        return _read_file(f, size, close=True)
    if hasattr(content, "read"):
        return _read_file(content, size, close=False)
    if isinstance(content, Iterable):
        return _iterate(content, size)
    raise InvalidMessage(f"unsupported message content type {type(content).__name__}")


def _read_file(f, size: int, close: bool) -> Iterator[bytes]:
    try:
        while True:
            piece = f.read(size)
            if not piece:
                return
            yield piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)
    finally:
        if close:
            f.close()


def _iterate(chunks: Iterable, size: int) -> Iterator[bytes]:
    for chunk in chunks:
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        elif not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise InvalidMessage(f"message chunks must be bytes, not {type(chunk).__name__}")
        if len(chunk) > size:
            yield from _split(chunk, size)
        else:
            yield bytes(chunk)

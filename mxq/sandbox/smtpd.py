"""Scripted SMTP servers (aiosmtpd 1.4) for tests and the demo sandbox.

Each server runs aiosmtpd's ``SMTP`` protocol (subclassed as ``ScriptedSMTP``)
in a thread of its own via aiosmtpd's ``Controller``; a ``Behaviour`` says how
it misbehaves, and the returned ``ServerHandle`` records what it saw.

Public API
==========

``Behaviour`` (dataclass; every field has a default, so ``Behaviour()`` is a
well-behaved ESMTP server that accepts everything except the default
recipient rules)::

    hostname="mx.sandbox.test"      # name in the greeting and EHLO reply
    greeting_code=220               # e.g. 421 or 554: send that greeting, then close
    greeting_text=None              # text after the code (default depends on code)
    ehlo=True                       # False: EHLO answered "500 5.5.1 ..." (HELO-only server)
    helo_reply=None                 # e.g. "550 5.7.1 go away": refuse HELO too
    mail_reply=None                 # e.g. "451 4.3.0 try later" / "553 5.7.1 no": refuse MAIL FROM
    rcpt_rules=DEFAULT_RCPT_RULES   # {local-part prefix: reply}; "{address}" is substituted;
                                    #   default {"reject": 550 5.1.1, "later": 450 4.2.0}
    rcpt_limit=None                 # N: "452 4.5.3 Too many recipients" after N accepted RCPTs
    greylist=False                  # 450 4.7.1 on the first try of each (client ip, sender, rcpt)
    greylist_delay=0.0              # a retry is accepted only this many seconds after the first
    data_init_reply=None            # reply to DATA instead of 354 (e.g. "554 5.5.1 no valid recipients")
    data_reply=None                 # reply after the final dot, e.g. "554 5.6.0 rejected after DATA";
                                    #   default "250 2.0.0 Ok: queued as <id>"; a 2xx reply records
    drop_mid_data=None              # N: close the connection once N bytes of DATA arrived, no reply
    drop_after_data=False           # read the whole DATA, then close without replying
    delays={}                       # seconds to stall before answering a phase: "greeting", "ehlo",
                                    #   "starttls", "auth", "mail", "rcpt", "data", "data_final", "rset"
    starttls=None                   # server ssl.SSLContext (make_tls().server_context): offer STARTTLS
    starttls_reply=None             # e.g. "454 4.7.0 TLS not available": advertise but refuse
    broken_starttls=False           # answer 220 to STARTTLS, then send garbage and close
    require_starttls=False          # 530 for everything but EHLO/NOOP/QUIT/STARTTLS before TLS
    implicit_tls=None               # server ssl.SSLContext: TLS on connect (port 465 style)
    auth=None                       # {user: password}: offer AUTH PLAIN LOGIN CRAM-MD5
    oauth2_tokens=None              # {user: token}: offer AUTH XOAUTH2 (exact RFC/Google wire format)
    auth_mechanisms=None            # restrict the offered mechanisms, e.g. ("LOGIN",)
    auth_require_tls=True           # offer/accept AUTH only under TLS (STARTTLS or implicit)
    auth_required=False             # 530 5.7.0 on MAIL/RCPT/DATA until authenticated
    dsn=True                        # advertise DSN; accept RET/ENVID/NOTIFY/ORCPT (else 555)
    smtputf8=True                   # advertise SMTPUTF8 (else non-ASCII commands get 500/553)
    eightbitmime=True               # advertise 8BITMIME (else BODY= gets 555)
    size_limit=52428800             # advertise "SIZE n" and enforce (552 5.3.4); 0 = "SIZE" with no
                                    #   limit; None = no SIZE extension and no limit
    keep_content=True               # keep each message's bytes in memory (False: size/sha256 only)
    spool_dir=None                  # also write each accepted message as <id>.eml + <id>.json
    idle_timeout=60.0               # server-side idle timeout per connection

``start_server(host="127.0.0.1", port=25, behaviour=None, *, ready_timeout=5.0, protocol=ScriptedSMTP) -> ServerHandle``
    Starts a server and waits until it is ready (aiosmtpd's own readiness
    trigger plus a real connect; the greeting is read when it is not
    delayed).  ``port=0`` picks a free port.  Readiness connections are not
    recorded.  Also usable as ``with start_server(...) as srv:``.

``ServerHandle``
    ``.host``, ``.port``, ``.address`` (host, port), ``.behaviour``
    ``.messages``   -> list[ReceivedMessage] (a snapshot copy; thread-safe)
    ``.sessions``   -> list[SessionRecord] (one per client connection)
    ``.stats``      -> dict[str, int] snapshot of counters: connections, ehlo, helo, starttls,
                       tls_failed, auth_ok, auth_failed, mail, mail_refused, rcpt_ok, rcpt_refused,
                       greylisted, data, data_refused, dropped, messages, rset, quit
    ``.wait_for_messages(n, timeout=10.0) -> list[ReceivedMessage]`` (raises TimeoutError)
    ``.clear()``    forget messages, sessions, counters and greylist state
    ``.stop()``     stop the server (idempotent); ``with`` stops it on exit

``ReceivedMessage`` (frozen dataclass, one per accepted message)
    ``id``, ``mail_from`` ("" for the null sender), ``mail_options`` (list of str as sent,
    keywords upper-cased, values verbatim), ``mail_params`` (dict keyword -> value or True),
    ``rcpt_tos`` (list), ``rcpt_options`` (list of lists, one per recipient),
    ``rcpt_params`` (list of dicts), ``content`` (bytes with CRLF line ends, dot-stuffing
    removed; None when keep_content=False), ``size``, ``sha256`` (hex of content),
    ``ehlo_name``, ``esmtp`` (EHLO vs HELO), ``tls`` (bool), ``tls_version``, ``auth_user``,
    ``peer`` (ip, port), ``session_id``, ``path`` (spooled .eml or None), ``received_at``;
    ``.email()`` -> email.message.EmailMessage.

``SessionRecord`` (one per connection; mutable, updated as the session goes)
    ``id``, ``peer``, ``ehlo_name``, ``esmtp``, ``tls``, ``tls_version``, ``auth_user``,
    ``auth_mechanism``, ``auth_log`` (list of (mechanism, user, ok, detail)), ``commands``
    (list of str; AUTH arguments redacted), ``replies`` (list of (command, reply line)).

``SilentServer(host="127.0.0.1", port=25, mode="greeting")`` / ``start_silent_server(...)``
    A server that never answers.  mode="greeting": connections are accepted and
    held, no greeting is ever sent (greeting timeout).  mode="connect": a socket
    with ``listen(0)`` that never accepts, plus one filler connection made at
    start, so every later connect times out (connect timeout).  ``.stop()``,
    context manager, ``.address``.

``make_tls(*names, directory=None) -> TLSBundle``
    A trustme CA and a leaf certificate for ``names`` (host names and/or IP
    addresses; default ("mx.sandbox.test", "127.0.0.1")).  ``TLSBundle`` has
    ``server_context`` (ssl.SSLContext for Behaviour.starttls / implicit_tls),
    ``client_context`` (verifying, trusts only this CA), ``ca_file`` (PEM path,
    e.g. for SSL_CERT_FILE), ``ca`` (trustme.CA), ``names``.

``DEFAULT_RCPT_RULES``, ``xtext_decode(s)`` (RFC 3461 xtext to str).

``ScriptedSMTP`` is the aiosmtpd ``SMTP`` subclass itself: for a behaviour no
knob gives, subclass it and pass ``start_server(..., protocol=MySMTP)``
(its ``__init__(state)`` signature must be kept).

Semantics worth knowing
-----------------------
- Recipient checks run in this order: rcpt_limit (452), rcpt_rules, greylist;
  otherwise 250.  Only accepted recipients are in ``rcpt_tos``.
- MAIL/RCPT parameters are parsed here, not by aiosmtpd (which upper-cases
  values and refuses DSN parameters); values are recorded verbatim.
- DATA is read line by line and never needs more memory than one message
  (or none with keep_content=False), so 20 MB tests are fine.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import email
import email.policy
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, Session

log = logging.getLogger("mxq.sandbox.smtpd")

__all__ = [
    "Behaviour", "DEFAULT_RCPT_RULES", "ReceivedMessage", "SessionRecord", "ServerHandle",
    "ScriptedSMTP", "SilentServer", "TLSBundle", "make_tls", "start_server",
    "start_silent_server", "xtext_decode",
]

#: The default recipient rules: local parts starting ``reject`` are unknown
#: users (permanent), ``later`` ones are deferred (transient).
DEFAULT_RCPT_RULES: dict[str, str] = {
    "reject": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    "later": "450 4.2.0 <{address}>: Recipient address rejected: try again later",
}

_DEFAULT_GREETING_TEXT = {
    220: "{hostname} ESMTP mxq sandbox",
    421: "4.3.2 {hostname} Service not available, closing transmission channel",
    554: "5.3.2 {hostname} No SMTP service here",
}

# Commands allowed before STARTTLS when require_starttls is set (RFC 3207 section 4).
_ALLOWED_BEFORE_STARTTLS = {"NOOP", "EHLO", "STARTTLS", "QUIT"}


@dataclass
class Behaviour:
    """How a scripted server behaves; see the module docstring for every knob."""

    hostname: str = "mx.sandbox.test"
    greeting_code: int = 220
    greeting_text: str | None = None
    ehlo: bool = True
    helo_reply: str | None = None
    mail_reply: str | None = None
    rcpt_rules: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_RCPT_RULES))
    rcpt_limit: int | None = None
    greylist: bool = False
    greylist_delay: float = 0.0
    data_init_reply: str | None = None
    data_reply: str | None = None
    drop_mid_data: int | None = None
    drop_after_data: bool = False
    delays: dict[str, float] = field(default_factory=dict)
    starttls: ssl.SSLContext | None = None
    starttls_reply: str | None = None
    broken_starttls: bool = False
    require_starttls: bool = False
    implicit_tls: ssl.SSLContext | None = None
    auth: dict[str, str] | None = None
    oauth2_tokens: dict[str, str] | None = None
    auth_mechanisms: tuple[str, ...] | None = None
    auth_require_tls: bool = True
    auth_required: bool = False
    dsn: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    size_limit: int | None = 52428800
    keep_content: bool = True
    spool_dir: str | os.PathLike | None = None
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server accepted (its final reply was 2xx)."""

    id: str
    mail_from: str
    mail_options: list[str]
    mail_params: dict[str, Any]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    rcpt_params: list[dict[str, Any]]
    content: bytes | None
    size: int
    sha256: str
    ehlo_name: str | None
    esmtp: bool
    tls: bool
    tls_version: str | None
    auth_user: str | None
    peer: tuple | None
    session_id: int
    path: Path | None
    received_at: float

    def email(self) -> email.message.EmailMessage:
        """The content parsed with the modern email policy (needs keep_content=True)."""
        if self.content is None:
            raise ValueError("content was not kept (Behaviour.keep_content=False)")
        return email.message_from_bytes(self.content, policy=email.policy.default)


@dataclass
class SessionRecord:
    """What one client connection did; updated live by the server thread."""

    id: int
    peer: tuple | None
    ehlo_name: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_version: str | None = None
    auth_user: str | None = None
    auth_mechanism: str | None = None
    auth_log: list[tuple[str, str | None, bool, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    replies: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class TLSBundle:
    """A throw-away CA and server certificate (see ``make_tls``)."""

    server_context: ssl.SSLContext
    client_context: ssl.SSLContext
    ca_file: str
    ca: Any
    names: tuple[str, ...]


def make_tls(*names: str, directory: str | os.PathLike | None = None) -> TLSBundle:
    """Make a trustme CA and a server certificate for ``names`` (host names or IPs).

    The CA certificate is written as PEM to ``directory`` (a new temporary
    directory by default) so it can be given to ``SSL_CERT_FILE`` or
    ``ssl.create_default_context(cafile=...)``.
    """
    import trustme  # only the sandbox extra has it

    names = names or ("mx.sandbox.test", "127.0.0.1")
    ca = trustme.CA()
    leaf = ca.issue_cert(*names)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="mxq-tls-"))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TLSBundle(server, client, str(ca_file), ca, tuple(names))


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` hex escapes) into text."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


class _State:
    """State shared by every connection of one server; guarded by ``lock``."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.lock = threading.Condition()
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionRecord] = []
        self.stats: collections.Counter = collections.Counter()
        self.greylist: dict[tuple, float] = {}
        self.accepted = 0          # protocol instances created (readiness ones included)
        self.readiness_left = 2    # aiosmtpd's trigger connection and ours
        self.msg_seq = 0

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.stats[name] += n

    def next_id(self) -> str:
        with self.lock:
            self.msg_seq += 1
            return "%08X" % (self.msg_seq * 7919 + 0x1000)


def _split_params(text: str) -> tuple[list[str], dict[str, Any]] | None:
    """ESMTP parameters: keywords upper-cased, values verbatim; None on bad syntax."""
    options, params = [], {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key) or (eq and not value):
            return None
        key = key.upper()
        options.append(f"{key}={value}" if eq else key)
        params[key] = value if eq else True
    return options, params


class _Sink:
    """Where DATA goes: memory (optional), a running sha256, and an optional spool file."""

    def __init__(self, keep: bool, spool_dir: Path | None):
        self.buf = bytearray() if keep else None
        self.hash = hashlib.sha256()
        self.size = 0
        self.tmp = None
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=spool_dir, prefix=".incoming-")
            self.tmp = (os.fdopen(fd, "wb"), Path(name))

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.hash.update(data)
        if self.buf is not None:
            self.buf += data
        if self.tmp:
            self.tmp[0].write(data)

    def commit(self, path: Path | None) -> Path | None:
        if not self.tmp:
            return None
        self.tmp[0].close()
        self.tmp[1].rename(path)
        self.tmp = None
        return path

    def discard(self) -> None:
        if self.tmp:
            self.tmp[0].close()
            self.tmp[1].unlink(missing_ok=True)
            self.tmp = None
        self.buf = None


class _Session(Session):
    """aiosmtpd's Session without the deprecation warning it logs on every AUTH."""

    @property
    def login_data(self):
        return self._login_data

    @login_data.setter
    def login_data(self, value):
        self._login_data = value


class _Handler:
    """aiosmtpd wants a handler object; every hook lives in ``ScriptedSMTP`` instead."""


class ScriptedSMTP(SMTP):
    """aiosmtpd's SMTP protocol, driven by a ``Behaviour`` and recording into the server state.

    MAIL, RCPT, DATA and EHLO are re-implemented (aiosmtpd upper-cases
    parameter values, refuses DSN parameters, and reads all of DATA before any
    hook runs); the rest is aiosmtpd's.
    """

    def __init__(self, state: _State, **kwargs):
        b = state.behaviour
        self.state = state
        self.behaviour = b
        self.record: SessionRecord | None = None
        self.readiness = False
        super().__init__(
            _Handler(),
            hostname=b.hostname,
            ident="ESMTP mxq sandbox",
            tls_context=b.starttls,
            require_starttls=bool(b.starttls and b.require_starttls),
            auth_required=b.auth_required,
            auth_require_tls=b.auth_require_tls and b.implicit_tls is None,
            authenticator=self._check_login,
            enable_SMTPUTF8=b.smtputf8,
            data_size_limit=None,
            decode_data=False,
            timeout=b.idle_timeout,
            **kwargs,
        )
        # aiosmtpd keeps command_size_limits on the class and grows it at every
        # EHLO; give each connection its own, roomy enough for DSN parameters.
        self.command_size_limits = collections.defaultdict(lambda: 2048)
        self.command_size_limit = 2048
        enabled = set()
        if b.auth:
            enabled |= {"PLAIN", "LOGIN", "CRAM-MD5"}
        if b.oauth2_tokens:
            enabled.add("XOAUTH2")
        if b.auth_mechanisms is not None:
            enabled &= {m.upper() for m in b.auth_mechanisms}
        self._auth_methods = {k: v for k, v in self._auth_methods.items() if k in enabled}

    # -- connection ------------------------------------------------------

    def _create_session(self):
        return _Session(self.loop)

    def connection_made(self, transport):
        """Start (or, after STARTTLS, update) this connection's ``SessionRecord``."""
        first = self.transport is None
        super().connection_made(transport)
        if first:
            with self.state.lock:
                if self.state.readiness_left > 0:
                    self.state.readiness_left -= 1
                    self.readiness = True
                    return
                self.record = SessionRecord(id=len(self.state.sessions), peer=self.session.peer)
                self.state.sessions.append(self.record)
                self.state.stats["connections"] += 1
        ssl_object = transport.get_extra_info("ssl_object")
        if self.record is not None and ssl_object is not None:
            self.record.tls = True
            self.record.tls_version = ssl_object.version()
            if not first:
                self.state.count("starttls")

    def _secure(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None

    async def push(self, status):
        """Send a reply line, noting it in the session record."""
        if self.record is not None and isinstance(status, str):
            self.record.replies.append((self._current, status))
        await super().push(status)

    _current = ""

    async def _delay(self, phase: str) -> None:
        seconds = self.behaviour.delays.get(phase)
        if seconds:
            await asyncio.sleep(seconds)

    async def _handle_client(self):
        # Scripted greeting: stall, or refuse with a non-220 code and close.
        await self._delay("greeting")
        b = self.behaviour
        if b.greeting_code != 220 or b.greeting_text:
            text = b.greeting_text or _DEFAULT_GREETING_TEXT.get(b.greeting_code, "{hostname}")
            text = text.format(hostname=b.hostname)
            if b.greeting_code != 220:
                await self.push(f"{b.greeting_code} {text}")
                self.transport.close()
                return
            self.__ident__ = text.split(" ", 1)[1] if " " in text else text
        await super()._handle_client()

    def _note(self, command: str, arg: str | None) -> None:
        self._current = command
        if self.record is not None:
            shown = arg or ""
            if command == "AUTH":
                shown = shown.split(" ", 1)[0] + (" ********" if " " in shown else "")
            self.record.commands.append(f"{command} {shown}".rstrip())

    # -- commands ---------------------------------------------------------

    async def smtp_EHLO(self, hostname: str):
        """EHLO with exactly the extensions the behaviour advertises."""
        self._note("EHLO", hostname)
        b = self.behaviour
        if not b.ehlo:
            await self.push('500 5.5.1 Error: command "EHLO" not recognized')
            return
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        await self._delay("ehlo")
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        if self.record is not None:
            self.record.ehlo_name, self.record.esmtp = hostname, True
        self.state.count("ehlo")
        lines = [self.hostname, "PIPELINING"]
        if b.size_limit is not None:
            lines.append(f"SIZE {b.size_limit}" if b.size_limit else "SIZE")
        if b.eightbitmime:
            lines.append("8BITMIME")
        if b.smtputf8:
            lines.append("SMTPUTF8")
        if b.dsn:
            lines.append("DSN")
        lines.append("ENHANCEDSTATUSCODES")
        if self.tls_context and not self._tls_protocol:
            lines.append("STARTTLS")
        if self._auth_methods and (not self._auth_require_tls or self._secure()):
            lines.append("AUTH " + " ".join(sorted(self._auth_methods)))
        lines.append("HELP")
        for line in lines[:-1]:
            await self.push("250-" + line)
        await self.push("250 " + lines[-1])

    async def smtp_HELO(self, hostname: str):
        """HELO, refused when ``helo_reply`` says so."""
        self._note("HELO", hostname)
        if self.behaviour.helo_reply:
            await self.push(self.behaviour.helo_reply)
            return
        if not hostname:
            await self.push("501 Syntax: HELO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = False
        self.session.host_name = hostname
        if self.record is not None:
            self.record.ehlo_name, self.record.esmtp = hostname, False
        self.state.count("helo")
        await self.push(f"250 {self.hostname}")

    async def smtp_STARTTLS(self, arg: str):
        """STARTTLS, optionally refused or broken on purpose."""
        self._note("STARTTLS", arg)
        b = self.behaviour
        await self._delay("starttls")
        if b.starttls_reply and self.tls_context:
            await self.push(b.starttls_reply)
            return
        if b.broken_starttls and self.tls_context and not arg:
            await self.push("220 2.0.0 Ready to start TLS")
            self.state.count("tls_failed")
            # Not a TLS record: the client's handshake fails.
            self._writer.write(b"this is not TLS\r\n" * 4)
            await self._writer.drain()
            self.transport.close()
            return
        try:
            await super().smtp_STARTTLS(arg)
        except Exception:
            self.state.count("tls_failed")
            raise

    async def smtp_AUTH(self, arg: str):
        """AUTH per aiosmtpd (PLAIN, LOGIN) plus CRAM-MD5 and XOAUTH2 defined below."""
        self._note("AUTH", arg)
        await self._delay("auth")
        await super().smtp_AUTH(arg)

    def _check_login(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        # aiosmtpd's "authenticator" for PLAIN and LOGIN.
        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        users = self.behaviour.auth or {}
        ok = user in users and hmac.compare_digest(users[user].encode(), password.encode())
        return self._auth_done(mechanism, user, ok, "")

    def _auth_done(self, mechanism: str, user: str | None, ok: bool, detail: str) -> AuthResult:
        self.state.count("auth_ok" if ok else "auth_failed")
        if self.record is not None:
            self.record.auth_log.append((mechanism, user, ok, detail))
            if ok:
                self.record.auth_user, self.record.auth_mechanism = user, mechanism
        if ok:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    async def auth_CRAM__MD5(self, _, args):
        """RFC 2195 CRAM-MD5 against ``Behaviour.auth``."""
        challenge = f"<{secrets.token_hex(8)}.{int(time.time())}@{self.hostname}>"
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        user, _, digest = response.decode("utf-8", "replace").rpartition(" ")
        password = (self.behaviour.auth or {}).get(user)
        ok = password is not None and hmac.compare_digest(
            hmac.new(password.encode(), challenge.encode(), "md5").hexdigest(), digest.lower())
        return self._auth_done("CRAM-MD5", user, ok, "")

    async def auth_XOAUTH2(self, _, args):
        """XOAUTH2 (Google's wire format): base64 of "user=U\\x01auth=Bearer T\\x01\\x01".

        A malformed response or a wrong token gets Google's answer: a 334 with
        a base64 JSON error, then 535 5.7.8 after the client's empty line.
        """
        if len(args) > 1:
            try:
                raw = base64.b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            raw = await self.challenge_auth("")
            if raw is MISSING:
                return AuthResult(success=False, handled=True)
        text = raw.decode("utf-8", "replace")
        m = re.fullmatch(r"user=([^\x01]+)\x01auth=Bearer ([^\x01]+)\x01\x01", text)
        user = m.group(1) if m else None
        tokens = self.behaviour.oauth2_tokens or {}
        ok = bool(m) and user in tokens and hmac.compare_digest(tokens[user], m.group(2))
        detail = "ok" if ok else ("malformed" if not m else "bad token")
        self._auth_done("XOAUTH2", user, ok, detail)
        if ok:
            return AuthResult(success=True, auth_data=user)
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"})
        await self.challenge_auth(error)  # the client answers with an empty line
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")

    async def _gate(self, command: str) -> bool:
        """Common checks for MAIL/RCPT/DATA; True when the command was already answered."""
        if (self.require_starttls and not self._tls_protocol
                and command not in _ALLOWED_BEFORE_STARTTLS):
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return True
        if await self.check_helo_needed():
            return True
        if await self.check_auth_needed(command):
            return True
        return False

    def _needs_utf8(self, address: str) -> bool:
        return not address.isascii()

    async def smtp_MAIL(self, arg: str | None):
        """MAIL FROM with SIZE, BODY, SMTPUTF8, RET, ENVID and AUTH parameters."""
        self._note("MAIL", arg)
        if await self._gate("MAIL"):
            return
        b = self.behaviour
        syntaxerr = "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
        arg = self._strip_command_keyword("FROM:", arg or "")
        if arg is None:
            await self.push(syntaxerr)
            return
        address, rest = self._getaddr(arg)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if not address:
            await self.push(syntaxerr)
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = _split_params(rest or "")
        if parsed is None or (parsed[1] and not self.session.extended_smtp):
            await self.push(syntaxerr)
            return
        options, params = parsed
        await self._delay("mail")
        known = {"SIZE", "BODY", "AUTH"}
        if b.smtputf8:
            known.add("SMTPUTF8")
        if b.dsn:
            known |= {"RET", "ENVID"}
        unknown = [k for k in params if k not in known]
        if unknown:
            await self.push(f"555 5.5.4 Unsupported option: {unknown[0]}")
            return
        body = params.get("BODY")
        if body is not None:
            if not b.eightbitmime:
                await self.push("555 5.5.4 Unsupported option: BODY")
                return
            if not isinstance(body, str) or body.upper() not in ("7BIT", "8BITMIME"):
                await self.push("501 5.5.4 Bad BODY parameter")
                return
        size = params.get("SIZE")
        if size is not None:
            if not isinstance(size, str) or not size.isdigit():
                await self.push("501 5.5.4 Bad SIZE parameter")
                return
            if b.size_limit and int(size) > b.size_limit:
                self.state.count("mail_refused")
                await self.push("552 5.3.4 Message size exceeds fixed limit")
                return
        if params.get("SMTPUTF8") not in (None, True):
            await self.push("501 5.5.4 SMTPUTF8 takes no value")
            return
        null = address == "<>"
        if not null and self._needs_utf8(address) and "SMTPUTF8" not in params:
            await self.push("553 5.6.7 SMTPUTF8 required for a non-ASCII address")
            return
        if b.mail_reply:
            self.state.count("mail_refused")
            await self.push(b.mail_reply.format(address=address))
            return
        self.envelope.mail_from = "" if null else address
        self.envelope.mail_options = options
        self.envelope.smtp_utf8 = "SMTPUTF8" in params
        self._mail_params = params
        self._rcpt_options: list[list[str]] = []
        self._rcpt_params: list[dict] = []
        self.state.count("mail")
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str | None):
        """RCPT TO with NOTIFY and ORCPT; applies rcpt_limit, rcpt_rules and greylisting."""
        self._note("RCPT", arg)
        if await self._gate("RCPT"):
            return
        b = self.behaviour
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        syntaxerr = "501 5.5.4 Syntax: RCPT TO:<address> [SP <parameters>]"
        arg = self._strip_command_keyword("TO:", arg or "")
        if arg is None:
            await self.push(syntaxerr)
            return
        address, rest = self._getaddr(arg)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if not address or address == "<>":
            await self.push(syntaxerr)
            return
        parsed = _split_params(rest or "")
        if parsed is None or (parsed[1] and not self.session.extended_smtp):
            await self.push(syntaxerr)
            return
        options, params = parsed
        await self._delay("rcpt")
        known = {"NOTIFY", "ORCPT"} if b.dsn else set()
        unknown = [k for k in params if k not in known]
        if unknown:
            await self.push(f"555 5.5.4 Unsupported option: {unknown[0]}")
            return
        if self._needs_utf8(address) and not self.envelope.smtp_utf8:
            await self.push("553 5.6.7 SMTPUTF8 required for a non-ASCII address")
            return
        reply = self._rcpt_verdict(address)
        if reply is not None:
            self.state.count("rcpt_refused")
            await self.push(reply)
            return
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(options)
        self._rcpt_options.append(options)
        self._rcpt_params.append(params)
        self.state.count("rcpt_ok")
        await self.push("250 2.1.5 Ok")

    def _rcpt_verdict(self, address: str) -> str | None:
        b = self.behaviour
        if b.rcpt_limit is not None and len(self.envelope.rcpt_tos) >= b.rcpt_limit:
            return "452 4.5.3 Error: too many recipients"
        local = address.rpartition("@")[0].lower().strip('"')
        for prefix, reply in b.rcpt_rules.items():
            if local.startswith(prefix.lower()):
                return reply.format(address=address)
        if b.greylist:
            peer_ip = self.session.peer[0] if self.session.peer else None
            key = (peer_ip, self.envelope.mail_from, address.lower())
            now = time.monotonic()
            with self.state.lock:
                first = self.state.greylist.setdefault(key, now)
            if first == now or now - first < b.greylist_delay:
                self.state.count("greylisted")
                return f"450 4.7.1 <{address}>: Recipient address rejected: Greylisted, try again later"
        return None

    async def smtp_RSET(self, arg: str):
        """RSET (counted)."""
        self._note("RSET", arg)
        await self._delay("rset")
        self.state.count("rset")
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str):
        """QUIT (counted)."""
        self._note("QUIT", arg)
        self.state.count("quit")
        await super().smtp_QUIT(arg)

    async def smtp_NOOP(self, arg: str):
        """NOOP (recorded)."""
        self._note("NOOP", arg)
        await super().smtp_NOOP(arg)

    async def smtp_DATA(self, arg: str):
        """DATA read line by line into a ``_Sink``: constant memory apart from the kept copy."""
        self._note("DATA", arg)
        if await self._gate("DATA"):
            return
        b = self.behaviour
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self._delay("data")
        if b.data_init_reply:
            self.state.count("data_refused")
            await self.push(b.data_init_reply)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        msg_id = self.state.next_id()
        spool = Path(b.spool_dir) if b.spool_dir else None
        sink = _Sink(b.keep_content, spool)
        committed = False
        try:
            total = 0
            at_line_start = True
            while True:
                try:
                    chunk = await self._reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as e:
                    # A line longer than the stream limit: take it in pieces.
                    chunk = await self._reader.read(e.consumed)
                except asyncio.IncompleteReadError:
                    return
                if at_line_start and chunk == b".\r\n":
                    break
                total += len(chunk)
                if b.drop_mid_data is not None and total >= b.drop_mid_data:
                    self.state.count("dropped")
                    self.transport.close()
                    return
                if at_line_start and chunk.startswith(b"."):
                    chunk = chunk[1:]   # RFC 5321 4.5.2 transparency
                at_line_start = chunk.endswith(b"\r\n")
                sink.write(chunk)
            self.state.count("data")
            await self._delay("data_final")
            if b.drop_after_data:
                self.state.count("dropped")
                self.transport.close()
                return
            if b.size_limit and sink.size > b.size_limit:
                reply = "552 5.3.4 Error: message file too big"
            elif b.data_reply:
                reply = b.data_reply.format(id=msg_id)
            else:
                reply = f"250 2.0.0 Ok: queued as {msg_id}"
            if reply.startswith("2"):
                self._record_message(msg_id, sink, spool)
                committed = True
            else:
                self.state.count("data_refused")
            self._set_post_data_state()
            await self.push(reply)
        finally:
            if not committed:
                sink.discard()

    def _record_message(self, msg_id: str, sink: _Sink, spool: Path | None) -> None:
        rec = self.record
        env = self.envelope
        path = sink.commit(spool / f"{msg_id}.eml") if spool else None
        msg = ReceivedMessage(
            id=msg_id,
            mail_from=env.mail_from,
            mail_options=list(env.mail_options),
            mail_params=dict(self._mail_params),
            rcpt_tos=list(env.rcpt_tos),
            rcpt_options=[list(o) for o in self._rcpt_options],
            rcpt_params=[dict(p) for p in self._rcpt_params],
            content=bytes(sink.buf) if sink.buf is not None else None,
            size=sink.size,
            sha256=sink.hash.hexdigest(),
            ehlo_name=rec.ehlo_name if rec else None,
            esmtp=rec.esmtp if rec else False,
            tls=self._secure(),
            tls_version=rec.tls_version if rec else None,
            auth_user=rec.auth_user if rec else None,
            peer=self.session.peer,
            session_id=rec.id if rec else -1,
            path=path,
            received_at=time.time(),
        )
        if spool:
            meta = {k: v for k, v in asdict(msg).items() if k not in ("content",)}
            meta["path"] = str(path)
            (spool / f"{msg_id}.json").write_text(json.dumps(meta, indent=1, default=str))
        with self.state.lock:
            self.state.messages.append(msg)
            self.state.stats["messages"] += 1
            self.state.lock.notify_all()


class _Controller(Controller):
    def __init__(self, state: _State, host: str, port: int, ready_timeout: float, protocol: type):
        b = state.behaviour
        self.state = state
        self.protocol = protocol
        super().__init__(_Handler(), hostname=host, port=port, ready_timeout=ready_timeout,
                         ssl_context=b.implicit_tls)

    def factory(self):
        return self.protocol(self.state)


class ServerHandle:
    """A running scripted server; see the module docstring."""

    def __init__(self, host: str, port: int, behaviour: Behaviour, ready_timeout: float = 5.0,
                 protocol: type = None):
        self.host = host
        self.port = port
        self.behaviour = behaviour
        self._state = _State(behaviour)
        self._controller = _Controller(self._state, host, port, ready_timeout, protocol or ScriptedSMTP)
        self._ready_timeout = ready_timeout
        self._running = False

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on."""
        return (self.host, self.port)

    def start(self) -> "ServerHandle":
        """Start the server thread and check that it really answers; returns self."""
        self._controller.start()
        self._running = True
        try:
            self._check_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ready(self) -> None:
        b = self.behaviour
        sock = socket.create_connection((self.host, self.port), timeout=self._ready_timeout)
        try:
            if b.implicit_tls is not None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                sock = ctx.wrap_socket(sock, server_hostname=None)
            if not b.delays.get("greeting"):
                data = b""
                while not data.endswith(b"\r\n"):
                    piece = sock.recv(1024)
                    if not piece:
                        break
                    data += piece
                if not data.startswith(str(b.greeting_code).encode()):
                    raise RuntimeError(f"SMTP server on {self.host}:{self.port} greeted {data!r}")
        finally:
            sock.close()

    def stop(self) -> None:
        """Stop the server; safe to call twice."""
        if self._running:
            self._running = False
            self._controller.stop()

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Accepted messages, oldest first (a copy)."""
        with self._state.lock:
            return list(self._state.messages)

    @property
    def sessions(self) -> list[SessionRecord]:
        """One record per client connection, oldest first (a copy of the list)."""
        with self._state.lock:
            return list(self._state.sessions)

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a snapshot); missing keys are zero."""
        with self._state.lock:
            return collections.defaultdict(int, self._state.stats)

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least ``n`` messages were accepted; TimeoutError after ``timeout``."""
        with self._state.lock:
            if not self._state.lock.wait_for(lambda: len(self._state.messages) >= n, timeout):
                raise TimeoutError(f"{len(self._state.messages)} of {n} messages after {timeout}s")
            return list(self._state.messages)

    def clear(self) -> None:
        """Forget messages, sessions, counters and greylist state."""
        with self._state.lock:
            self._state.messages.clear()
            self._state.sessions.clear()
            self._state.stats.clear()
            self._state.greylist.clear()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(host: str = "127.0.0.1", port: int = 25, behaviour: Behaviour | None = None,
                 *, ready_timeout: float = 5.0, protocol: type | None = None) -> ServerHandle:
    """Start a scripted server on ``host:port`` (0 = a free port) and wait until it answers.

    ``protocol`` replaces ``ScriptedSMTP`` with a subclass of it.
    """
    behaviour = behaviour or Behaviour()
    if port == 0:
        port = _free_port(host)
    return ServerHandle(host, port, behaviour, ready_timeout, protocol).start()


class SilentServer:
    """A server that never answers.

    ``mode="greeting"``: connections are accepted (by a thread) and held open
    without a greeting, so the client's greeting timeout fires.
    ``mode="connect"``: ``listen(0)`` and never accept, with one filler
    connection already queued, so every later connect times out.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 25, mode: str = "greeting"):
        if mode not in ("greeting", "connect"):
            raise ValueError("mode must be 'greeting' or 'connect'")
        self.host, self.mode = host, mode
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = None
        if mode == "connect":
            self._listener.listen(0)
            filler = socket.create_connection((host, self.port), timeout=5)
            self._held.append(filler)
        else:
            self._listener.listen(16)
            self._listener.settimeout(0.1)
            self._thread = threading.Thread(target=self._accept, daemon=True)
            self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on."""
        return (self.host, self.port)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            self._held.append(conn)

    def stop(self) -> None:
        """Close the listener and every held connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for s in self._held:
            s.close()
        self._held.clear()
        self._listener.close()

    def __enter__(self) -> "SilentServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_silent_server(host: str = "127.0.0.1", port: int = 25, mode: str = "greeting") -> SilentServer:
    """Start a ``SilentServer`` (it is ready when this returns)."""
    return SilentServer(host, port, mode)

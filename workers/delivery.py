"""Delivery of messages to one domain across its exchanges and the relay (Postfix's smtp(8)).

``deliver(envelope)`` groups the recipients by domain and calls
``deliver_domain`` for each; ``deliver_domain(domain, envelopes)`` walks the
retry chain once and returns a ``RecipientResult`` per recipient.

The retry chain of a domain
---------------------------
``resolver.exchanges(domain)`` in order (preference-sorted, equal
preferences shuffled), every address of every exchange, then the relay when
``settings.relay_mode == "fallback"`` and a relay is configured.  With
``relay_mode == "always"`` the relay is the whole chain and no MX lookup is
made.  A recipient moves down the chain while it is *pending*:

- connection refused, connect/greeting timeout, 4xx greeting, 4xx to EHLO,
  TLS failure, a dropped connection, a timeout: the whole site failed softly,
  every pending recipient goes on to the next address;
- 4xx to MAIL, 4xx to DATA or after the final dot: the recipients of that
  transaction go on to the next address (Postfix: a soft error on a non-final
  server means "try the next one");
- 4xx to RCPT: that recipient goes on; 5xx to RCPT: that recipient bounces;
- 5xx to MAIL, to DATA or after the final dot: every recipient of the
  transaction bounces;
- 5xx greeting or 5xx to EHLO and HELO: skipped like a soft error unless it
  is the final server of the chain, where it bounces the pending recipients
  (Postfix's ``smtp_skip_5xx_greeting``: a misconfigured backup MX should not
  bounce mail the primary would take; the final server's word is final);
- authentication failure at the relay: deferred, never bounced (Postfix's
  ``smtp_sasl_auth_soft_bounce``: our credentials are wrong, not the mail).

Bounds per attempt (Postfix's smtp_mx_address_limit / smtp_mx_session_limit):
at most ``settings.mx_address_limit`` exchange addresses (5) are tried, and
once ``settings.mx_session_limit`` sessions (2: connections that got through
TCP; refused and timed-out connects do not count) were made, no further
exchange is tried -- the pending recipients are deferred, or go to the
fallback relay, which the limits do not cover.  The DNS phase (MX and address
lookups) ends ``settings.timeouts.dns`` seconds after it starts, or at the
run's ``deadline``; each SMTP phase has its deadline in the session.

Interrupts: the run catches broad exceptions around every server it talks
to, but an exception type registered with
``mxq.workers.errors.register_interrupt`` (Celery's SoftTimeLimitExceeded)
always goes through: the open connection is dropped without QUIT and the
interrupt reaches the caller, who knows what was not finished.

What is still pending after the last server is *deferred* with the last
reply it got.  The relay, in fallback mode, receives only recipients that are
still pending after every exchange (port 25 blocked, every exchange down or
deferring) -- never bounced ones.  DNS: null MX (5.1.10), NXDOMAIN (5.1.2)
and "no address" (5.4.4) bounce without any connection or relay; a transient
DNS failure (4.4.3) defers, or, with a fallback relay configured, goes to the
relay (the relay has its own resolver and can deliver what we could not
look up).

The relay (``workers/relay.py``): TLS per ``MXQ_RELAY``'s ``?tls=``
(``required`` by default: verified STARTTLS; ``smtps://`` implicit TLS),
clear text only to addresses the operator named, AUTH only with
credentials and only when offered, never in clear text to an unnamed
address, XOAUTH2 with a refreshable token.

MTA-STS (``workers/mtasts.py``, RFC 8461): after the MX lookup the domain's
policy is looked up (cached).  ``enforce``: exchanges the policy does not
list are left out (all of them: deferred 4.7.5 naming the policy), and each
remaining one must give STARTTLS with a certificate verified for its name,
else it fails like a down site (4.7.5) and the next one is tried --
never clear text.  ``testing``: the same checks, failures counted, and the
mail goes out over an opportunistic session.  TLS-RPT
(``workers/tlsrpt.py``, RFC 8460): each TLS session with an exchange (and
each exchange a policy ruled out) is counted in ``tls_report``.

Port 25 blocked (``workers/port25.py``): with a relay in fallback mode,
failed connects feed the detector; once it concludes (the same failure at
3 exchanges of 2 domains within 5 minutes while the relay works), runs skip
the exchanges and give their recipients to the relay at once, and one
caller per interval re-probes port 25 in the background.

Failure memory: an address that refused a connection or timed out before
its greeting is marked down in ``host_status`` for ``HOST_DOWN_SECONDS``;
while it is down later deliveries skip it (a soft site failure "host marked
down") instead of waiting on it again.  ``deliver()`` without
``host_status`` uses a fresh ``MemoryHostStatus`` per call (a process-wide
default would make unrelated deliveries -- and tests -- interfere); the
pipeline passes a shared, Redis-backed one.

Pipelining: when a server advertises PIPELINING (RFC 2920) and the content
is in memory, MAIL, the RCPTs and DATA go in one write and the message text
with its final dot in another, and the final reply is read with the next
message's replies (the text opens the next group, as RFC 2920 allows), so a
message costs one round trip; each reply is judged as below, and recipients
after a 452 are tried in the same group (an accepted one is in the
transaction, a refused one waits for the next).

Transactions: at most ``settings.max_recipients`` recipients per
transaction; a 452 (too many recipients) ends the RCPT phase, the accepted
ones are sent, and the rest follow in a new transaction on the same
connection.  Several envelopes for the same domain share one connection per
server (RSET only after an aborted transaction).  A recipient is reported
``delivered`` only when the reply to the final dot of its transaction was 2xx.

Logging: logger ``mxq.delivery``, one line per recipient per attempt, in
Postfix's format (see ``logline``; a refusal says what it answered: ``(in
reply to RCPT TO command)``).  Logger ``mxq.smtp``, fed by session events:
a line per TLS connection (``Untrusted TLS connection established to
mx[ip]:25: TLSv1.3 with cipher ...``, Postfix's words) and, when set to
DEBUG, the whole conversation (AUTH payloads masked).  Credentials are
never logged.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from .address import Address, normalize_domain
from .config import Settings
from .envelope import Envelope, Recipient
from .errors import (DNSError, InvalidInput, InvalidMessage, Scope, SMTPAuthError, SMTPBindError, SMTPConnectError,
                     SMTPDataError, SMTPError, SMTPGreetingError, SMTPHeloError, SMTPSenderRefused,
                     SMTPServerDisconnected, SMTPTimeoutError, SMTPTLSError, classify, reraise_interrupt)
from .logline import format_line
from .mtasts import MTASTS, Lookup
from .mtasts import default_cache as default_policy_cache
from .mx import Later
from .port25 import MemoryPort25State, Port25, Thresholds
from .relay import login as relay_login
from .relay import refusal as relay_refusal
from .relay import session_tls as relay_session_tls
from .reply import Reply
from .results import RecipientResult, State
from .scache import Connection
from .session import SMTPSession, address_of, sender_of
from .tlsrpt import (STARTTLS_NOT_SUPPORTED, VALIDATION_FAILURE, Failure, PolicyRef, TLSReportSink,
                     classify_tls_failure, default_report, local_address)

log = logging.getLogger("mxq.delivery")

#: Seconds an address that refused a connection or timed out stays marked down.
HOST_DOWN_SECONDS = 60.0

__all__ = ["deliver", "deliver_domain", "HostStatus", "MemoryHostStatus", "HOST_DOWN_SECONDS", "RunStats",
           "route_key"]


# ------------------------------------------------------------------------------------------ host status

class HostStatus(Protocol):
    """Failure memory shared by deliveries: which (ip, port) to skip for now."""

    def is_down(self, ip: str, port: int) -> bool:
        """True while ``ip:port`` is marked down."""

    def mark_down(self, ip: str, port: int, seconds: float, reason: str) -> None:
        """Mark ``ip:port`` down for ``seconds`` (``reason`` is for humans and logs)."""

    # Optional: ``mark_up(ip, port)`` forgets a mark (called when a probe got through).


class MemoryHostStatus:
    """In-process ``HostStatus``: thread-safe, entries expire after their time.

    ``clock`` (default ``time.monotonic``) is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._down: dict[tuple[str, int], tuple[float, str]] = {}

    def is_down(self, ip: str, port: int) -> bool:
        """True while ``ip:port`` is marked down (expired entries are forgotten)."""
        key = (ip, int(port))
        with self._lock:
            entry = self._down.get(key)
            if entry is None:
                return False
            if entry[0] <= self._clock():
                del self._down[key]
                return False
            return True

    def mark_down(self, ip: str, port: int, seconds: float, reason: str) -> None:
        """Mark ``ip:port`` down for ``seconds``; a later mark replaces an earlier one."""
        with self._lock:
            self._down[(ip, int(port))] = (self._clock() + seconds, reason)

    def mark_up(self, ip: str, port: int) -> None:
        """Forget a mark of ``ip:port`` (it answered again)."""
        with self._lock:
            self._down.pop((ip, int(port)), None)

    def reason(self, ip: str, port: int) -> str | None:
        """Why ``ip:port`` is down, or None when it is not."""
        if not self.is_down(ip, port):
            return None
        with self._lock:
            entry = self._down.get((ip, int(port)))
            return entry[1] if entry else None


# ------------------------------------------------------------------------------------------ internals

@dataclass
class RunStats:
    """What one ``deliver_domain`` call saw of the destination (the queue manager's feedback).

    ``connects``: connections opened that completed the handshake (greeting,
    EHLO, TLS, AUTH); ``reused``: cached connections taken; ``connect_failures``:
    connections that failed before or during the handshake, and exchanges
    skipped as marked down; ``transactions``: transactions that got a server
    verdict (a final reply, or a refusal of MAIL, every RCPT or DATA);
    ``dns_transient``: the MX lookup failed transiently; ``seconds``: the
    run's duration, ``setup_seconds`` the part of it spent in DNS lookups and
    opening connections.  A run with no transaction and only connect failures
    is what Postfix calls a failed delivery for its destination concurrency
    (negative feedback).  ``session``: while the run holds a connection, its
    ``SMTPSession`` (None otherwise), for a watcher in another thread to ask
    its ``silence`` -- how long the server has owed it a reply.
    ``server_seconds``: the part of the run's time the servers took to
    answer on connections in use (``SMTPSession.server_seconds``, the
    handshakes left out), ``server_timed`` False when some of it was timed
    to the end of a read (no kernel arrival time): this process's delays in
    reading replies are then in it.
    """

    connects: int = 0
    reused: int = 0
    connect_failures: int = 0
    transactions: int = 0
    dns_transient: bool = False
    seconds: float = 0.0
    setup_seconds: float = 0.0
    session: SMTPSession | None = field(default=None, repr=False, compare=False)
    server_seconds: float = 0.0
    server_timed: bool = True

    @property
    def failed(self) -> bool:
        """True when the run reached no server at all: nothing but connection or handshake failures."""
        return self.transactions == 0 and self.connect_failures > 0 and self.connects + self.reused == 0

    @property
    def seconds_per_message(self) -> float | None:
        """The run's time per transaction, DNS and connection set-up left out (None without any)."""
        if not self.transactions:
            return None
        return max(0.0, self.seconds - self.setup_seconds) / self.transactions

    @property
    def server_seconds_per_message(self) -> float | None:
        """The servers' time per transaction (``server_seconds``; None without any transaction)."""
        if not self.transactions:
            return None
        return self.server_seconds / self.transactions


def route_key(settings: Settings, route: "_Route", source_pool: str | None = None) -> tuple:
    """What a connection to ``route`` can be reused for (``mxq.workers.scache``).

    Address, port, relay or not, TLS policy (MTA-STS included), HELO name,
    source pool, and the name the server's certificate is verified for when
    it is (required TLS, MTA-STS, the relay): two domains sharing an exchange
    share its connections unless a certificate check would differ.
    """
    if route.relay:
        relay = settings.relay
        return ("relay", route.ip, route.port, relay.host, relay.username or "", settings.helo_name, source_pool)
    verified = settings.tls in ("required", "implicit") or route.sts is not None
    return ("mx", route.ip, route.port, settings.tls, route.sts, settings.helo_name, source_pool,
            route.name if verified else "")


@dataclass(frozen=True)
class _Route:
    """One server address in the chain."""

    name: str          # exchange name (or relay host) as logged and reported
    ip: str
    port: int
    relay: bool
    final: bool        # the last server of the chain: its hard site errors bounce
    sts: str | None = None   # MTA-STS mode applied to this exchange: "enforce", "testing" or None
    unlisted: bool = False   # the MTA-STS policy does not list this exchange (enforce: skipped; testing: counted)


@dataclass
class _Rcpt:
    """A recipient's progress through the chain."""

    env: int
    index: int
    address: str
    parsed: Address
    notify: tuple | None
    orcpt: str | None
    state: State | None = None        # None while pending
    reply: Reply | None = None
    route: _Route | None = None       # the server that gave ``reply``
    scope: Scope | None = None        # what ``reply`` applied to (RecipientResult.scope)
    attempts: int = 0
    tried_on: int = -1                # id of the connection where it got its last verdict

    @property
    def pending(self) -> bool:
        return self.state is None


@dataclass
class _Job:
    """One envelope being delivered to this domain."""

    envelope: Envelope
    rcpts: list[_Rcpt] = field(default_factory=list)
    stop: bool = False                # a local content error: no point trying other servers
    reported: bool = False            # given to on_done already

    def pending(self) -> list[_Rcpt]:
        return [r for r in self.rcpts if r.pending]


class _SiteFailure(Exception):
    """The connection is unusable: every pending recipient moves on."""

    def __init__(self, reply: Reply, hard: bool = False, unreached: bool = False, command: str | None = None,
                 lost: bool = False):
        super().__init__(str(reply))
        self.reply = reply
        self.hard = hard
        self.unreached = unreached    # no server reply at all (connect failed): logged as relay=none
        self.lost = lost              # the connection dropped or timed out (no reply said so)
        self.command = command        # what the reply answered, when known (else the session's phase)


# What a reply in each session phase answered, as Postfix's log says it ("in reply to X command").
_PHASE_COMMAND = {"ehlo": "EHLO", "helo": "HELO", "starttls": "STARTTLS", "auth": "AUTH", "mail": "MAIL FROM",
                  "rcpt": "RCPT TO", "data": "DATA", "content": "end of DATA", "dot": "end of DATA",
                  "rset": "RSET"}

smtp_log = logging.getLogger("mxq.smtp")


def _conversation(event) -> None:
    """Observer: the SMTP conversation on logger ``mxq.smtp`` at DEBUG (attached only when DEBUG is on)."""
    kind = event.kind
    if kind == "command":
        smtp_log.debug("%s: -> %s", event.session.where, event.line)
    elif kind == "reply":
        smtp_log.debug("%s: <- %s", event.session.where, event.reply)
    elif kind == "timeout":
        smtp_log.debug("%s: timed out after %gs in phase %s", event.session.where, event.limit, event.phase)


def _tls_logged(event) -> None:
    """Observer: one line per TLS connection, as Postfix logs it (logger ``mxq.smtp``, INFO)."""
    if event.kind == "tls":
        bits = f" ({event.bits}/{event.bits} bits)" if event.bits else ""
        smtp_log.info("%s TLS connection established to %s: %s with cipher %s%s",
                      "Verified" if event.verified else "Untrusted", event.session.where, event.protocol,
                      event.cipher, bits)


class _Run:
    """One ``deliver_domain`` call: the chain, the recipients, the log."""

    def __init__(self, domain: str, envelopes: list[Envelope], settings: Settings, resolver,
                 host_status: HostStatus, relay_tls_context: ssl.SSLContext | None,
                 deadline: float | None = None, observers: tuple = (), source_pool: str | None = None, *,
                 mta_sts: MTASTS | None = None, tls_report: TLSReportSink | None = None,
                 port25: Port25 | None = None, cache=None, on_done=None, stats: RunStats | None = None,
                 ignore_down: bool = False, stop: Callable[[], bool] | None = None):
        self.domain = domain
        self.stop = stop
        self.cache = cache                # a scache.View (or None: a connection per route, closed after)
        self.on_done = on_done
        self.stats = stats if stats is not None else RunStats()
        self.ignore_down = ignore_down
        self._current: Connection | None = None     # the connection in use (also stats.session)
        self._server_base = 0.0                     # its session's server_seconds when it came in use
        self.observers = observers
        self.source_pool = source_pool
        self.mta_sts = mta_sts
        self.sts_later: Later | None = None          # the MTA-STS lookup started by exchanges()
        self.tls_report = tls_report
        self.port25 = port25
        self.sts: Lookup | None = None      # the MTA-STS lookup of this run's domain
        self.deadline = deadline
        self.out_of_time = False
        # The accepted recipients of the last pipelined message, whose final reply is
        # still unread (it comes with the next message's replies, or confirm() reads it).
        self.unconfirmed: list[_Rcpt] | None = None
        self.settings = settings
        self.resolver = resolver
        self.host_status = host_status
        self.relay_tls_context = relay_tls_context
        self.started = time.monotonic()
        self.conn_seq = 0
        self.sessions = 0             # connections that got through TCP, to exchanges (not the relay)
        self.jobs = []
        for e, env in enumerate(envelopes):
            job = _Job(env)
            for i, r in enumerate(env.recipients):
                a = address_of(r.address)
                job.rcpts.append(_Rcpt(e, i, r.address, a, r.notify, r.orcpt))
            self.jobs.append(job)

    # -- helpers ---------------------------------------------------------------------------------

    def pending(self) -> list[_Rcpt]:
        return [r for job in self.jobs if not job.stop for r in job.rcpts if r.pending]

    def log(self, rcpt: _Rcpt, route: _Route | None, reply: Reply, status: str, command: str | None = None) -> None:
        env = self.jobs[rcpt.env].envelope
        log.info("%s", format_line(rcpt.address, route and (route.name, route.ip, route.port), reply, status,
                                   delay=time.monotonic() - self.started, queue_id=env.id, command=command))

    def settle(self, rcpt: _Rcpt, state: State | None, reply: Reply, route: _Route | None, *,
               weak: bool = False, unreached: bool = False, scope: Scope | None = None,
               command: str | None = None) -> None:
        """Record a verdict (``state`` None: still pending) and log it.

        A ``weak`` reply (a skipped host) never replaces a reply a server gave;
        ``unreached`` logs ``relay=none`` (no server was talked to).  ``scope``:
        what the reply applied to (None: a local decision, no server's reply);
        ``command``: what the reply answered, for the log (``RCPT TO``...).
        """
        if not (weak and rcpt.reply is not None and rcpt.reply.code is not None):
            rcpt.reply, rcpt.route, rcpt.scope = reply, route, scope
        rcpt.state = state
        status = {State.DELIVERED: "sent", State.BOUNCED: "bounced"}.get(state, "deferred")
        self.log(rcpt, None if (weak or unreached) else route, reply, status, command)
        if state is not None and self.on_done is not None:
            job = self.jobs[rcpt.env]
            if not job.reported and all(r.state is not None for r in job.rcpts):
                job.reported = True
                try:
                    self.on_done(rcpt.env, [self.result(r) for r in job.rcpts])
                except Exception:  # noqa: BLE001 -- the caller's bookkeeping must not stop the delivery
                    log.exception("on_done callback failed for message %s", job.envelope.id)

    # -- the chain -------------------------------------------------------------------------------

    @property
    def relay_on(self) -> bool:
        s = self.settings
        return s.relay is not None and s.relay_mode in ("fallback", "always")

    def exchanges(self) -> list:
        """The domain's exchanges in order; settles every pending recipient on a DNS failure ([] then)."""
        s = self.settings
        # A new destination's MTA-STS lookup (its _mta-sts TXT record, the policy cache, a policy
        # fetch) runs beside its MX and address lookups, not after them: exchange_routes takes it.
        if (self.mta_sts is not None and self.sts_later is None
                and not self.mta_sts.answers_at_once(self.domain)):
            self.sts_later = Later(self.mta_sts.lookup, self.domain)
        try:
            exchanges = self.resolver.exchanges(self.domain, deadline=self.dns_deadline(),
                                                limit=s.mx_address_limit, policy=s.destinations)
        except DNSError as e:
            state = State.BOUNCED if e.is_permanent() else None    # deferred, or on to the relay
            self.stats.dns_transient = state is None
            for r in self.pending():
                self.settle(r, state, e.reply, None)
            return []
        for x in exchanges:
            for ip, why in x.refused:
                log.info("%s: not connecting to %s[%s]: %s address (destination policy)",
                         self.domain, x.name, ip, why)
        return exchanges

    def exchange_routes(self, exchanges: list) -> list[_Route]:
        """Every exchange address to try, in order, under the domain's MTA-STS policy.

        With a policy in ``enforce`` mode, exchanges the policy does not
        list stay in the list in their place, flagged ``unlisted``: ``run``
        never connects to them, and counts one failed session for TLS-RPT
        (``mx-not-in-policy``) when the delivery gets to one -- not when a
        preferred exchange took the mail first.  When the policy lists none
        of them every pending recipient is deferred with the policy's
        reason.  In ``testing`` mode they are tried, and their session counts
        as one failure.  The relay is not in this list: ``run`` resolves
        and tries it only when something is still pending after the
        exchanges.
        """
        s = self.settings
        policy = None
        if self.mta_sts is not None and exchanges:
            later, self.sts_later = self.sts_later, None
            self.sts = later.result() if later is not None else self.mta_sts.lookup(self.domain)
            policy = self.sts.policy
        mode = policy.mode if policy is not None and policy.mode in ("enforce", "testing") else None
        routes, left_out, tried = [], [], 0
        for x in exchanges:
            unlisted = mode is not None and not policy.matches(x.name)
            skipped = unlisted and mode == "enforce"
            if skipped:
                left_out.append(x.name)
                log.info("%s: MX host %s is not in the MTA-STS policy (enforce): not used", self.domain, x.name)
            for ip in x.addresses:
                if not skipped:
                    if s.mx_address_limit and tried >= s.mx_address_limit:
                        continue                       # Postfix's smtp_mx_address_limit
                    tried += 1
                routes.append(_Route(x.name, ip, s.smtp_port, relay=False, final=False, sts=mode,
                                     unlisted=unlisted))
        if not tried:
            if left_out:
                reply = Reply.local("4.7.5", f"MTA-STS policy of {self.domain} (mode enforce, id {policy.id}) "
                                             f"lists none of its MX hosts ({', '.join(left_out)}; policy mx: "
                                             f"{', '.join(policy.mx)}): not delivered")
                for route in routes:
                    self.report_tls(route, VALIDATION_FAILURE, "mx-not-in-policy")
                for r in self.pending():
                    self.settle(r, None, reply, None)
            return []
        # The last exchange tried: its hard site error bounces, relay or not: the relay takes only
        # what is still deferred (4xx, unreachable), never what an exchange refused for good.
        last = max(i for i, route in enumerate(routes) if not _skipped(route))
        routes[last] = dataclasses.replace(routes[last], final=True)
        return routes

    def relay_routes(self) -> list[_Route]:
        relay = self.settings.relay
        try:
            ips = [str(ipaddress.ip_address(relay.host))]
        except ValueError:
            try:
                ips = self.resolver.addresses(relay.host, deadline=self.dns_deadline())
            except DNSError as e:
                # Our relay's name does not resolve: a configuration problem, never a bounce.
                reply = Reply.local("4.4.3", f"relay host {relay.host}: {e.reply.text}")
                for r in self.pending():
                    self.settle(r, None, reply, None)
                return []
        routes = []
        for ip in ips:
            refused = relay_refusal(relay, ip)
            if refused is not None:
                # ?tls=none towards an address the operator did not name: nothing is sent there.
                for r in self.pending():
                    self.settle(r, None, refused, None)
                continue
            routes.append(_Route(relay.host, ip, relay.port, relay=True, final=False))
        if routes:
            last = routes[-1]
            routes[-1] = _Route(last.name, last.ip, last.port, True, final=True)
        return routes

    def dns_deadline(self) -> float:
        """When the DNS phase must be over: ``timeouts.dns`` from now, and never after the run's deadline."""
        end = time.monotonic() + self.settings.timeouts.dns
        return end if self.deadline is None else min(end, self.deadline)

    def sessions_used_up(self) -> bool:
        """True once ``mx_session_limit`` exchange sessions were made (Postfix's smtp_mx_session_limit)."""
        limit = self.settings.mx_session_limit
        return bool(limit) and self.sessions >= limit

    def expired(self) -> bool:
        """True once the run's deadline has passed, or ``stop()`` said so (then no new connection or
        transaction starts)."""
        if not self.out_of_time and ((self.deadline is not None and time.monotonic() >= self.deadline)
                                     or (self.stop is not None and self.stop())):
            self.out_of_time = True
        return self.out_of_time

    def port25_blocked(self, exchanges: list) -> bool:
        """True when port 25 is known blocked (fleet-wide): the exchanges are skipped for the relay.

        Meanwhile one caller per probe interval tries the first exchange in
        the background; when that connects, later runs use the exchanges again.
        """
        if self.port25 is None or not self.relay_on or self.settings.relay_mode != "fallback":
            return False
        if self.port25.blocked() is None:
            return False
        first = next((ip for x in exchanges for ip in x.addresses), None)
        if first is not None:
            self.port25.maybe_probe(first, self.settings.smtp_port, self.settings.timeouts.connect)
        reply = Reply.local("4.4.1", f"exchanges of {self.domain} not tried: outbound port {self.settings.smtp_port} "
                                     "is blocked on this network; sent through the relay")
        for r in self.pending():
            self.settle(r, None, reply, None, weak=True)
        return True

    def port25_suspected(self) -> bool:
        """True when failed connects across the fleet already look like a blocked port 25 (fallback relay only).

        The relay has not been seen working yet, so nothing is concluded;
        the run tries the relay now instead of its remaining exchanges (a
        working relay then concludes "blocked").
        """
        if self.port25 is None or not self.relay_on or self.settings.relay_mode != "fallback":
            return False
        state = self.port25.suspected()
        if state is None:
            return False
        log.info("%s: connections to %d exchanges of %d domains failed the same way (%s): trying the relay "
                 "before the remaining exchanges", self.domain, state["exchanges"], state["domains"], state["kind"])
        return True

    def run(self) -> list[list[RecipientResult]]:
        always = self.settings.relay is not None and self.settings.relay_mode == "always"
        started = time.monotonic()
        exchanges = [] if always else self.exchanges()
        # (the MTA-STS policy's lookups -- TXT record, shared cache, fetch -- are set-up too)
        routes = [] if not exchanges or self.port25_blocked(exchanges) else self.exchange_routes(exchanges)
        self.stats.setup_seconds += time.monotonic() - started
        for route in routes:
            if not self.pending() or self.expired() or self.sessions_used_up():
                break
            if _skipped(route):
                # MTA-STS enforce: an exchange the policy does not list, reached in preference order.
                self.report_tls(route, VALIDATION_FAILURE, "mx-not-in-policy")
                continue
            failures = self.stats.connect_failures
            self.try_route(route)
            if self.port25 is not None and self.pending():
                if self.port25_blocked(exchanges):
                    break                               # just concluded: the rest go to the relay now
                if self.stats.connect_failures > failures and self.port25_suspected():
                    break                               # the relay now: if it works, that concludes it
        if self.relay_on and self.pending() and not self.expired():
            for route in self.relay_routes():
                if not self.pending() or self.expired():
                    break
                self.try_route(route)
        for r in (r for job in self.jobs for r in job.rcpts):
            if r.pending:
                if self.out_of_time and r.reply is None:
                    # Never tried in this run: not an attempt at all.
                    r.state, r.attempts = State.QUEUED, 0
                    r.reply = Reply.local("4.3.0", "not attempted: the delivery run's time was up")
                else:
                    r.state = State.DEFERRED
        self.stats.seconds = time.monotonic() - self.started
        return [[self.result(r) for r in job.rcpts] for job in self.jobs]

    def result(self, r: _Rcpt) -> RecipientResult:
        reply = r.reply or Reply.local("4.3.0", "not attempted")
        route = r.route
        return RecipientResult(
            address=r.address, domain=r.parsed.domain, state=r.state, code=reply.code,
            enhanced=reply.dsn, text=reply.text, exchange=route.name if route else None,
            ip=route.ip if route else None, relay=bool(route and route.relay), attempts=r.attempts,
            scope=r.scope.value if r.scope is not None and reply.code is not None
            and r.state is not State.DELIVERED else None)

    # -- TLS reporting (RFC 8460) ----------------------------------------------------------------

    def report_tls(self, route: _Route, result_type: str | None, reason: str | None = None,
                   session: SMTPSession | None = None) -> None:
        """Count one TLS session with an exchange of this domain (``result_type`` None: a success)."""
        if self.tls_report is None or route.relay:
            return
        sts = self.sts
        if sts is not None and sts.failure and sts.policy is None:
            # The domain announced a policy we could not obtain: every session is that failure.
            result_type, reason = sts.failure, None
        policy = PolicyRef.of(sts) if sts is not None else PolicyRef.none(self.domain)
        failure = None
        if result_type is not None:
            source = session.local[0] if session is not None and session.local else None
            failure = Failure(result_type, route.name, route.ip, source or local_address(route.ip, route.port),
                              reason)
        try:
            self.tls_report.record(policy, failure)
        except Exception:  # noqa: BLE001 -- reporting must never stop a delivery
            log.exception("TLS-RPT: could not record a session with %s", route.name)

    def report_session(self, route: _Route, session: SMTPSession) -> None:
        """Count a connected session's TLS outcome (exchanges only; ``MXQ_TLS=none`` counts nothing)."""
        if route.unlisted:
            # MTA-STS testing: a session with an exchange the policy does not list is one failed
            # session, whatever its TLS was (a TLS failure was counted by connect() instead).
            self.report_tls(route, VALIDATION_FAILURE, "mx-not-in-policy", session=session)
            return
        if route.sts is not None:
            self.report_tls(route, None, session=session)          # verified TLS, or connect() raised
            return
        if session.tls == "none" and not (self.sts and self.sts.failure):
            return
        if session.tls_active:
            self.report_tls(route, None, session=session)
        elif session.tls_fallback and not session.tls_fallback.startswith("STARTTLS refused"):
            self.report_tls(route, VALIDATION_FAILURE, "tls-handshake-failed", session=session)
        else:
            self.report_tls(route, STARTTLS_NOT_SUPPORTED, session=session)

    # -- one server ------------------------------------------------------------------------------

    def try_route(self, route: _Route) -> None:
        """Deliver the pending recipients through ``route``: a cached connection to it, or a new one.

        An exchange marked down (``HostStatus``) is skipped unless a connection to
        it is at hand in the cache: the mark is about opening connections, and an
        open one that the server keeps answering is used, as Postfix's smtp uses a
        cached session without asking qmgr again.  (That also spares the shared
        down-list its read for every chunk sent over a kept connection.)
        """
        key = route_key(self.settings, route, self.source_pool) if self.cache is not None else None
        cached = self.cache.take(key) if self.cache is not None else None
        if cached is None:
            started = time.monotonic()
            down = self.host_status.is_down(route.ip, route.port)
            self.stats.setup_seconds += time.monotonic() - started     # (a shared-memory read: set-up)
            if down and not self.ignore_down:
                reply = Reply.local("4.4.1", f"host {route.name}[{route.ip}]:{route.port} is marked down: skipped")
                self.stats.connect_failures += 1
                for r in self.pending():
                    self.settle(r, None, reply, route, weak=True)
                return
        self.conn_seq += 1
        conn = self.conn_seq
        for r in self.pending():
            r.attempts += 1
        done = False
        try:
            while True:
                reused = cached is not None
                try:
                    if cached is None:
                        cached = self.open(route, key)
                    else:
                        self.stats.reused += 1
                    self.current = cached
                    for job in self.jobs:
                        if not job.stop and job.pending():
                            self.deliver_job(route, job, conn)
                    self.confirm(self.current.session, route)   # the last message's final reply
                    done = True
                    return
                except _SiteFailure as f:
                    if not (reused and f.lost and not self.replied_on(conn)):
                        raise
                    # A cached connection the server had closed (idle timeout): say so and
                    # open a new one; not a failure of the server.
                    log.info("%s: cached connection to %s[%s]:%d was closed by the server; reconnecting",
                             self.domain, route.name, route.ip, route.port)
                    self.unconfirmed = None
                    self.drop_current()
                    cached = None
        except _SiteFailure as f:
            self.unconfirmed = None                 # their outcome is unknown: pending, settled below
            state = State.BOUNCED if f.hard and route.final else None
            session = self.current.session if self.current is not None else None
            command = f.command or (_PHASE_COMMAND.get(session.phase)
                                    if session is not None and f.reply.code is not None else None)
            for r in self.pending():
                self.settle(r, state, f.reply, route, unreached=f.unreached, scope=Scope.SITE, command=command)
        except BaseException:
            # An interrupt (or a bug): no QUIT round trip, and a message whose final
            # reply was not read is left to the caller as not known to be delivered.
            current, self.current = self.current, None
            if current is not None:
                current.session.abort()
            raise
        finally:
            current, self.current = self.current, None
            if current is not None:
                if done and self.cache is not None and current.session.reusable:
                    self.cache.give(current)
                else:
                    current.session.disconnect()

    @property
    def current(self) -> Connection | None:
        """The connection in use; ``stats.session`` follows it (for the queue manager's watch)."""
        return self._current

    @current.setter
    def current(self, conn: Connection | None) -> None:
        old = self._current
        if old is not None:
            self.stats.server_seconds += old.session.server_seconds - self._server_base
            self.stats.server_timed = self.stats.server_timed and old.session.server_timed
        self._current = conn
        self._server_base = conn.session.server_seconds if conn is not None else 0.0
        self.stats.session = conn.session if conn is not None else None

    def replied_on(self, conn: int) -> bool:
        """True when some recipient got a server reply on connection ``conn`` (see ``_Rcpt.tried_on``)."""
        return any(r.tried_on == conn for job in self.jobs for r in job.rcpts)

    def drop_current(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.session.disconnect()

    def open(self, route: _Route, key) -> Connection:
        """A new connection to ``route`` through the handshake (and login at the relay), or ``_SiteFailure``."""
        started = time.monotonic()
        session = self.open_session(route)
        try:
            try:
                session = self.connect(session, route)
                if route.relay:
                    relay_login(session, self.settings.relay, route.ip)
                    if self.port25 is not None:
                        self.port25.relay_worked()
            except Exception as e:  # noqa: BLE001 -- every failure is classified
                try:
                    reraise_interrupt(e)
                except BaseException:
                    session.abort()
                    raise
                self.stats.connect_failures += 1
                failure = self.site_failure(e, route, connecting=True)
                if failure.command is None and failure.reply.code is not None:
                    failure.command = _PHASE_COMMAND.get(session.phase)
                session.disconnect()
                raise failure from None
            except BaseException:
                session.abort()
                raise
        finally:
            if session.peer is not None and not route.relay:
                self.sessions += 1
            self.stats.setup_seconds += time.monotonic() - started
        self.stats.connects += 1
        if self.ignore_down:
            # A probe got through to a server marked down: it is up again for everyone.
            mark_up = getattr(self.host_status, "mark_up", None)
            if mark_up is not None:
                mark_up(route.ip, route.port)
        return Connection(session, key)

    def rotate(self, route: _Route) -> None:
        """Replace a connection that reached its reuse limits (``scache.ReuseLimits``) with a new one."""
        current = self.current
        if self.cache is None or current is None or not current.spent(self.cache.limits):
            return
        self.confirm(current.session, route)
        self.drop_current()
        self.current = self.open(route, current.key)

    def connect(self, session: SMTPSession, route: _Route) -> SMTPSession:
        """``session.connect()`` with the exchange's TLS accounting; returns the session to use.

        Under an MTA-STS policy the session verifies the MX's certificate;
        a TLS failure is counted for TLS-RPT and then, in ``enforce`` mode,
        fails the exchange (4.7.5, naming the policy), while in ``testing``
        mode a new opportunistic session is opened and the mail goes out.
        """
        try:
            session.connect()
        except Exception as e:  # noqa: BLE001
            reraise_interrupt(e)
            if route.relay:
                raise
            if self.port25 is not None:
                self.port25.connect_failed(e, route.ip, self.domain)
            result_type = classify_tls_failure(e)
            if result_type is None:
                raise
            self.report_tls(route, result_type, session=session)
            if route.sts == "enforce":
                trouble = classify(e)
                raise SMTPTLSError(Reply.local(
                    "4.7.5", f"MTA-STS policy of {self.domain} (enforce) requires verified TLS: "
                             f"{trouble.reply.text}")) from e
            if route.sts != "testing":
                raise
            log.info("%s: MTA-STS (testing): %s with %s[%s]; delivering without verified TLS",
                     self.domain, result_type, route.name, route.ip)
            session.disconnect()
            second = self.open_session(route, tls="opportunistic")
            try:
                second.connect()
            except BaseException:
                second.disconnect()
                raise
            self.report_session_port25(route)
            return second
        if not route.relay:
            self.report_session_port25(route)
            self.report_session(route, session)
        return session

    def report_session_port25(self, route: _Route) -> None:
        if self.port25 is not None:
            self.port25.connected(route.ip)

    def open_session(self, route: _Route, tls: str | None = None) -> SMTPSession:
        s = self.settings
        ctx = None
        if route.relay:
            tls = relay_session_tls(s.relay)
            ctx = self.relay_tls_context if tls in ("required", "implicit") else None
        elif tls is None:
            # MTA-STS: STARTTLS with a certificate verified for the MX name, whatever MXQ_TLS says.
            tls = "required" if route.sts is not None else s.tls
        server_hostname = None if route.name.startswith("[") else route.name
        source = s.source_pools.pick(ipaddress.ip_address(route.ip).version, self.source_pool) \
            if s.source_pools else None
        observers = (_tls_logged,) + self.observers
        if smtp_log.isEnabledFor(logging.DEBUG):
            observers = (_conversation,) + observers
        return SMTPSession(route.ip, route.port, helo_name=(source and source.helo) or s.helo_name, tls=tls,
                           tls_context=ctx, server_hostname=server_hostname, timeouts=s.timeouts, pipelining=True,
                           observers=observers, source_address=source.ip if source else None)

    def site_failure(self, exc: BaseException, route: _Route, connecting: bool = False) -> _SiteFailure:
        """Turn a failure that makes the connection unusable into a ``_SiteFailure``."""
        trouble = classify(exc)
        reply = trouble.reply
        if connecting and isinstance(exc, (SMTPConnectError, SMTPTimeoutError)) and not isinstance(exc, SMTPBindError):
            # (a source address we cannot bind says nothing about the exchange)
            self.host_status.mark_down(route.ip, route.port, HOST_DOWN_SECONDS, reply.text)
        if isinstance(exc, SMTPAuthError):
            # Postfix's smtp_sasl_auth_soft_bounce: a credential problem defers, it never bounces.
            return _SiteFailure(reply if reply.is_transient() else _soften(reply))
        hard = not trouble.transient and isinstance(exc, (SMTPGreetingError, SMTPHeloError))
        lost = not connecting and isinstance(exc, (SMTPServerDisconnected, SMTPTimeoutError))
        return _SiteFailure(reply, hard=hard, unreached=connecting and reply.code is None, lost=lost)

    # -- transactions ----------------------------------------------------------------------------

    def deliver_job(self, route: _Route, job: _Job, conn: int) -> None:
        """Every transaction this envelope needs on this connection (several after 452)."""
        while True:
            todo = [r for r in job.pending() if r.tried_on != conn]
            if not todo or job.stop or self.expired():
                return
            self.rotate(route)
            batch = todo[:max(1, self.settings.max_recipients)]
            self.transaction(self.current.session, route, job, batch, conn)
            self.current.transactions += 1
            self.stats.transactions += 1

    def transaction(self, session: SMTPSession, route: _Route, job: _Job, batch: list[_Rcpt], conn: int) -> None:
        env = job.envelope
        if session.pipelining and isinstance(env.content, (bytes, bytearray, str)):
            self.pipelined_transaction(session, route, job, batch, conn)
            return
        self.confirm(session, route)
        try:
            session.create_message(env.sender, env.size, env.dsn, smtputf8=env.smtputf8, eightbit=env.eightbit)
        except Exception as e:  # noqa: BLE001
            reraise_interrupt(e)
            # A refused MAIL opens no transaction: no RSET needed before the next one.
            self.message_failure(session, e, route, job, job.pending(), conn, reset=False)
            return

        accepted: list[_Rcpt] = []
        for r in batch:
            try:
                reply = session.add_recipient(r.address, notify=r.notify, orcpt=r.orcpt)
            except Exception as e:  # noqa: BLE001 -- a dead connection
                reraise_interrupt(e)
                raise self.site_failure(e, route) from None
            if reply.code == 421:
                session.disconnect()
                raise _SiteFailure(reply, command="RCPT TO")
            if reply.code in (250, 251):      # what the session counts as accepted, too
                accepted.append(r)
                continue
            if reply.code == 452 and accepted:
                break        # too many recipients: the rest go in the next transaction
            r.tried_on = conn
            # Anything but a 5xx (including an odd 2xx/3xx) leaves the recipient pending.
            self.settle(r, State.BOUNCED if reply.is_permanent() else None, reply, route, scope=Scope.RECIPIENT,
                        command="RCPT TO")

        if not accepted:
            self.reset(session, route)
            return
        for r in accepted:
            r.tried_on = conn
        try:
            session.append_message(env.content)
            reply = session.close_message()
        except InvalidInput as e:
            # The content could not be read (a file gone): a local problem no server can fix.
            job.stop = True
            reply = Reply.local("4.3.0", f"cannot read the message content: {e}")
            for r in job.pending():
                self.settle(r, State.DEFERRED, reply, route)
            if session.connected:
                self.reset(session, route)
            return
        except Exception as e:  # noqa: BLE001
            reraise_interrupt(e)
            if isinstance(e, SMTPError) and classify(e).scope is Scope.MESSAGE:
                self.message_failure(session, e, route, job, accepted, conn, reset=True)
                return
            raise self.site_failure(e, route) from None
        self.final(session, route, accepted, reply)

    def pipelined_transaction(self, session: SMTPSession, route: _Route, job: _Job, batch: list[_Rcpt],
                              conn: int) -> None:
        """``transaction`` when the server pipelines (RFC 2920) and the content is in memory.

        MAIL, the RCPTs and DATA go in one write; the message text and its
        final dot are held and open the next message's group (or are sent by
        ``confirm``), whose replies start with this message's final reply:
        one round trip per message instead of 4 + n.  Each reply is judged
        exactly as in ``transaction``; the one difference on the wire is that
        recipients after a 452 were tried too, so an accepted one is delivered
        in this transaction, and a 452 one (once something was accepted)
        waits for the next transaction, as there.
        """
        env = job.envelope
        content = env.content.encode("utf-8") if isinstance(env.content, str) else env.content
        prev, self.unconfirmed = self.unconfirmed, None
        session.last_final = None
        try:
            tx = session.start_transaction(
                env.sender, [Recipient(r.address, notify=r.notify, orcpt=r.orcpt) for r in batch], env.size,
                env.dsn, smtputf8=env.smtputf8, eightbit=env.eightbit)
        except Exception as e:  # noqa: BLE001
            reraise_interrupt(e)
            # A refused MAIL (its pipelined replies read: no transaction open), or a dead connection.
            if prev is not None:
                reply = session.last_final
                if reply is None and session.owes_final and session.connected:
                    try:                          # refused before anything was sent (SIZE, SMTPUTF8)
                        reply = session.final_reply()
                    except Exception as e2:  # noqa: BLE001 -- unknown outcome: pending, the failure settles it
                        reraise_interrupt(e2)
                        reply = None
                if reply is not None and reply.code != 421:
                    self.final(session, route, prev, reply)
            self.message_failure(session, e, route, job, job.pending(), conn, reset=False)
            return
        if prev is not None:
            if tx.previous is None:           # cannot happen: the session owed it; never guess
                raise _SiteFailure(Reply.local("4.3.0", "the final reply of the previous message went missing"))
            self.final(session, route, prev, tx.previous)
        accepted: list[_Rcpt] = []
        for r, reply in zip(batch, tx.recipients):
            if reply is None:
                continue                      # never tried (after a 421): still pending
            if reply.code == 421:
                session.disconnect()
                raise _SiteFailure(reply, command="RCPT TO")
            if reply.code in (250, 251):
                accepted.append(r)
                continue
            if reply.code == 452 and accepted:
                continue                      # too many recipients: this one goes in the next transaction
            r.tried_on = conn
            self.settle(r, State.BOUNCED if reply.is_permanent() else None, reply, route, scope=Scope.RECIPIENT,
                        command="RCPT TO")
        data = tx.data
        if not accepted:
            if data is not None and data.code == 421:
                raise _SiteFailure(data, command="DATA")
            self.reset(session, route)
            return
        for r in accepted:
            r.tried_on = conn
        try:
            if data is None or data.code != 354:
                raise SMTPDataError(data or Reply.local("4.3.0", "DATA was not answered"),
                                    scope=Scope.SITE if data is not None and data.code == 421 else None)
            # The final reply is read with the next message's replies (one round trip per
            # message), or by confirm() after the last one.
            session.send_content(content, wait=False)
        except Exception as e:  # noqa: BLE001
            reraise_interrupt(e)
            if isinstance(e, SMTPError) and classify(e).scope is Scope.MESSAGE:
                self.message_failure(session, e, route, job, accepted, conn, reset=True)
                return
            raise self.site_failure(e, route) from None
        self.unconfirmed = accepted

    def confirm(self, session: SMTPSession, route: _Route) -> None:
        """Read the final reply of the last pipelined message, if unread, and settle its recipients."""
        accepted, self.unconfirmed = self.unconfirmed, None
        if accepted is None:
            return
        try:
            reply = session.final_reply()
        except Exception as e:  # noqa: BLE001 -- like a failed close_message: they move on
            reraise_interrupt(e)
            self.unconfirmed = accepted
            raise self.site_failure(e, route) from None
        self.final(session, route, accepted, reply)

    def final(self, session: SMTPSession, route: _Route, accepted: list[_Rcpt], reply: Reply) -> None:
        """The verdict of a message's final reply for its accepted recipients."""
        if reply.is_positive():
            state = State.DELIVERED
        elif reply.code == 421:
            session.disconnect()
            raise _SiteFailure(reply, command="end of DATA")     # the accepted ones are pending: they move on
        else:
            state = None if reply.is_transient() else State.BOUNCED
        # The final reply of a transaction that carried one recipient is about that
        # recipient alone (as LMTP's per-recipient replies); shared, it is the message's.
        scope = Scope.RECIPIENT if len(accepted) == 1 else Scope.MESSAGE
        for r in accepted:
            self.settle(r, state, reply, route, scope=scope, command="end of DATA")

    def message_failure(self, session, exc, route, job, rcpts, conn, reset: bool) -> None:
        """A MAIL or DATA refusal: soft -> those recipients move on; hard -> they bounce."""
        trouble = classify(exc)
        if trouble.scope is Scope.SITE or not isinstance(exc, SMTPError):
            raise self.site_failure(exc, route) from None
        state = None if trouble.transient else State.BOUNCED
        command = "MAIL FROM" if isinstance(exc, SMTPSenderRefused) else "DATA" if isinstance(exc, SMTPDataError) \
            else None
        for r in rcpts:
            r.tried_on = conn
            self.settle(r, state, trouble.reply, route, scope=Scope.MESSAGE, command=command)
        if reset and session.connected:
            self.reset(session, route)

    def reset(self, session: SMTPSession, route: _Route) -> None:
        try:
            session.reset()
        except Exception as e:  # noqa: BLE001
            reraise_interrupt(e)
            raise self.site_failure(e, route) from None


def _skipped(route: _Route) -> bool:
    """True for an exchange MTA-STS ``enforce`` rules out: in the chain for TLS-RPT only, never connected to."""
    return route.unlisted and route.sts == "enforce"


def _soften(reply: Reply) -> Reply:
    """The same reply as a transient one (5xx -> 4xx, 5.x.y -> 4.x.y)."""
    code = reply.code - 100 if reply.code is not None and reply.code >= 500 else reply.code
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced and reply.enhanced.startswith("5") else reply.enhanced
    return Reply(code, reply.text, enhanced)


class _Rewinding:
    """A seekable file as re-iterable content: every attempt starts again where the file was."""

    def __init__(self, f):
        self.f = f
        self.start = f.tell()

    def __iter__(self):
        self.f.seek(self.start)
        while True:
            chunk = self.f.read(64 * 1024)
            if not chunk:
                return
            yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)


def _reusable(env: Envelope) -> Envelope:
    """The envelope with content every attempt can send whole.

    bytes, str, paths and re-iterable objects (``message.FileContent``, lists)
    are used as they are; a seekable file is rewound for every attempt; a
    one-shot iterator or unseekable file is read into memory once (it could
    not be sent to a second server otherwise).
    """
    c = env.content
    if isinstance(c, (bytes, bytearray, str)):
        if env.size is None:   # SIZE= on MAIL FROM lets a server refuse a too large message early
            return _copy(env, c, len(c.encode("utf-8") if isinstance(c, str) else c))
        return env
    if hasattr(c, "__fspath__"):
        return env
    if hasattr(c, "read"):
        if getattr(c, "seekable", lambda: False)():
            content = _Rewinding(c)
        else:
            data = c.read()
            content = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    elif iter(c) is c:
        content = b"".join(x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in c)
    else:
        return env
    size = env.size if env.size is not None or not isinstance(content, bytes) else len(content)
    return _copy(env, content, size)


def _copy(env: Envelope, content, size) -> Envelope:
    return Envelope(sender=env.sender, recipients=env.recipients, content=content, dsn=env.dsn,
                    eightbit=env.eightbit, smtputf8=env.smtputf8, size=size, id=env.id)


def _check(env: Envelope) -> None:
    """Validate every address before anything is sent (``InvalidAddress`` / ``InvalidMessage``)."""
    sender_of(env.sender)
    if not env.recipients:
        raise InvalidMessage("no recipients")
    for r in env.recipients:
        address_of(r.address)


# ------------------------------------------------------------------------------------------ public API

def deliver_domain(domain: str, envelopes: Iterable[Envelope], *, settings: Settings | None = None,
                   resolver=None, host_status: HostStatus | None = None,
                   relay_tls_context: ssl.SSLContext | None = None,
                   deadline: float | None = None, observers: Iterable = (),
                   source_pool: str | None = None, mta_sts: MTASTS | None = None,
                   tls_report: TLSReportSink | None = None,
                   port25: Port25 | None = None, sessions=None,
                   on_done: Callable[[int, list[RecipientResult]], None] | None = None,
                   stats: RunStats | None = None, ignore_down: bool = False,
                   stop: Callable[[], bool] | None = None) -> list[list[RecipientResult]]:
    """Deliver envelopes whose recipients are all in ``domain``; one result list per envelope.

    Results are in each envelope's recipient order.  Raises ``InvalidAddress``
    / ``InvalidMessage`` (nothing sent) for a malformed address, and
    ``ValueError`` for a recipient outside ``domain``.  ``relay_tls_context``
    replaces the default verifying context (system store or
    ``SSL_CERT_FILE``) for the relay.  ``deadline`` (``time.monotonic()``
    seconds): no connection or transaction is started after it; a recipient
    that got no reply at all by then comes back ``State.QUEUED`` with
    ``attempts`` 0 (not attempted: the caller retries it at once), the others
    as usual.  ``observers``: session observers (``mxq.workers.events``)
    attached to every SMTP session the run opens (metrics, tracing).
    ``source_pool``: the ``settings.source_pools`` pool to connect from
    (``mxq.workers.sources``; None: ``default``); ValueError when there is
    no such pool.
    ``mta_sts``: the ``MTASTS`` policy source (default: one on ``resolver``
    and the process-wide policy cache, when ``settings.mta_sts``);
    ``tls_report``: where TLS sessions are counted (default: the
    process-wide ``tlsrpt.default_report()``); ``port25``: the port-25
    detector (default: a fresh in-process one when a relay is configured in
    fallback mode).

    ``sessions``: a ``mxq.workers.scache.View`` (or anything with its
    ``take(key)``, ``give(connection)`` and ``limits``): a cached connection
    to a server is used when it holds one, a connection that reaches its
    reuse limits is replaced by a new one, and a healthy idle connection is
    given back to it at the end instead of closed.  Without it every server
    gets a connection of its own, closed at the end (the library default).
    ``on_done(index, results)``: called as soon as every recipient of
    envelope ``index`` has its verdict for this run (delivered or bounced by
    a server reply: right after the final reply to its message, usually), so
    a caller can record outcomes while the rest of the batch is under way;
    envelopes with a recipient still pending when the run ends (deferred,
    not attempted) are not passed to it; every envelope is in the return
    value either way.  ``stats``: a ``RunStats`` the run fills in.
    ``ignore_down``: try exchanges even while ``host_status`` marks them down
    (the probe of a destination declared dead).  ``stop()``: checked where the
    deadline is; once it returns True the run starts nothing new, as past its
    deadline (a caller whose lease on the work was lost).
    """
    settings = settings if settings is not None else Settings.from_env()
    if resolver is None:
        from .mx import Resolver
        resolver = Resolver(settings)
    host_status = host_status if host_status is not None else MemoryHostStatus()
    envelopes = [_reusable(e) for e in envelopes]
    d = normalize_domain(domain)
    for env in envelopes:
        _check(env)
        for r in env.recipients:
            if address_of(r.address).ascii_domain != d:
                raise ValueError(f"recipient {r.address!r} is not in domain {domain!r}")
    if source_pool is not None and source_pool != "default" and source_pool not in settings.source_pools.names():
        raise ValueError(f"source pool {source_pool!r} is not defined in MXQ_SOURCE_ADDRESSES "
                         f"(pools: {', '.join(settings.source_pools.names()) or 'none'})")
    mta_sts, tls_report, port25 = _defaults(settings, resolver, mta_sts, tls_report, port25)
    return _Run(d, envelopes, settings, resolver, host_status, relay_tls_context, deadline,
                tuple(observers), source_pool, mta_sts=mta_sts, tls_report=tls_report, port25=port25,
                cache=sessions, on_done=on_done, stats=stats, ignore_down=ignore_down, stop=stop).run()


def _defaults(settings: Settings, resolver, mta_sts, tls_report, port25):
    """The engine's defaults for the policy source, the TLS-RPT sink and the port-25 detector."""
    if mta_sts is None and settings.mta_sts:
        mta_sts = MTASTS(resolver, default_policy_cache(), timeout=settings.mta_sts_timeout,
                         destinations=settings.destinations)
    if tls_report is None:
        tls_report = default_report()
    if port25 is None and settings.relay is not None and settings.relay_mode == "fallback":
        port25 = Port25(MemoryPort25State(), Thresholds(probe_interval=settings.port25_probe_interval),
                        relay=settings.relay.name)
    return mta_sts, tls_report, port25


def deliver(envelope: Envelope, *, settings: Settings | None = None, resolver=None,
            host_status: HostStatus | None = None,
            relay_tls_context: ssl.SSLContext | None = None, observers: Iterable = (),
            source_pool: str | None = None, mta_sts: MTASTS | None = None,
            tls_report: TLSReportSink | None = None, port25: Port25 | None = None) -> list[RecipientResult]:
    """Deliver one envelope to all its recipients' domains; results in the envelope's recipient order.

    Domains are delivered one after another (IDNA and case folded, so
    ``B.test`` and ``b.test`` are one domain; an address literal is its own
    domain).  ``settings`` defaults to ``Settings.from_env()``, ``resolver``
    to a ``mxq.workers.mx.Resolver`` on those settings, ``host_status`` to a fresh
    ``MemoryHostStatus`` shared by the domains of this call only (and so is
    the default port-25 detector); ``observers``, ``source_pool``,
    ``mta_sts``, ``tls_report``, ``port25`` as for ``deliver_domain``.
    """
    settings = settings if settings is not None else Settings.from_env()
    if resolver is None:
        from .mx import Resolver
        resolver = Resolver(settings)
    host_status = host_status if host_status is not None else MemoryHostStatus()
    mta_sts, tls_report, port25 = _defaults(settings, resolver, mta_sts, tls_report, port25)
    envelope = _reusable(envelope)
    _check(envelope)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(envelope.recipients):
        groups.setdefault(address_of(r.address).ascii_domain, []).append(i)
    results: list[RecipientResult | None] = [None] * len(envelope.recipients)
    for domain, indexes in groups.items():
        sub = Envelope(sender=envelope.sender, recipients=[envelope.recipients[i] for i in indexes],
                       content=envelope.content, dsn=envelope.dsn, eightbit=envelope.eightbit,
                       smtputf8=envelope.smtputf8, size=envelope.size, id=envelope.id)
        (domain_results,) = deliver_domain(domain, [sub], settings=settings, resolver=resolver,
                                           host_status=host_status, relay_tls_context=relay_tls_context,
                                           observers=observers, source_pool=source_pool, mta_sts=mta_sts,
                                           tls_report=tls_report, port25=port25)
        for i, res in zip(indexes, domain_results):
            results[i] = res
    return results

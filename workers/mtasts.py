"""MTA-STS (RFC 8461): a domain's transport security policy, discovered, fetched, cached.

``MTASTS(resolver, cache).lookup(domain)`` answers "which policy applies to
mail for ``domain`` now" as a ``Lookup``: the ``Policy`` (mode ``enforce``,
``testing`` or ``none``, the MX patterns, ``max_age``) or None, and, when a
domain announces a policy that could not be obtained, why (an RFC 8460
result type for TLS-RPT).  ``delivery`` applies it: in ``enforce`` mode only
MX hosts matching the policy are used, each with STARTTLS and a certificate
verified for the MX name; in ``testing`` mode the same checks are made and
their failures recorded, but mail goes out regardless.

Discovery and fetching (RFC 8461 sections 3 and 5):

- the TXT record ``_mta-sts.<domain>`` is looked up through mxq's own
  resolver (``MXQ_DNS_SERVERS``, the DNS cache).  Records not starting with
  ``v=STSv1`` are ignored; if not exactly one is left, or it has no valid
  ``id`` (1-32 letters and digits), the domain has no policy;
- the policy is fetched from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.
  The policy host's name is resolved through the same resolver (never the
  system's), the certificate is verified for that name against the trust
  store (``ssl.create_default_context()``: the system's, or ``SSL_CERT_FILE``),
  redirects are not followed, only a 200 with media type ``text/plain``
  counts, the body is bounded (``MAX_POLICY_SIZE``, 64 KiB) and the whole
  fetch is bounded in time (``timeout``, default 10 s: connect, handshake,
  request, status line, headers and a body that trickles all count: a
  timer shuts the connection down at the deadline); a body shorter than
  its Content-Length is a fetch error, never a policy;
- a fetched policy is cached for its ``max_age`` (at most one year) under its
  ``id``.  A TXT record with the same ``id`` means the cached policy is
  current; a new ``id`` means a fetch.  When the fetch fails the cached policy
  (if not expired) stays in force, and the failure itself is remembered for
  ``failure_retry`` seconds (five minutes, as section 3.3 suggests) so a
  broken policy host costs one fetch per five minutes, not one per delivery.
  No TXT record (or a failed TXT lookup) with a cached policy: the cached
  policy applies until it expires (section 5.1: removing the record does not
  revoke a policy).  A TXT lookup that failed (timeout, SERVFAIL) is not
  repeated for ``failure_retry`` seconds either (remembered in process);
- failures (RFC 8460 names): ``sts-webpki-invalid`` (the policy host's
  certificate does not verify), ``sts-policy-invalid`` (not text/plain, too
  large, does not parse), ``sts-policy-fetch-error`` (anything else: no
  address, connect, timeout, HTTP status other than 200).  A domain whose
  policy could not be obtained is delivered to as if it had none (RFC 8461
  fails open) and the failure is reported.

The cache is a ``PolicyCache``: ``MemoryPolicyCache`` in process (the plain
engine's default, one per process: policies are facts about the world, not
per-call state), or the pipeline's Redis one (``mxq.tasks.hoststatus``), so
every worker shares one fetch per policy.

This module does not import Celery or ``tasks``.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

from .errors import DNSError

log = logging.getLogger("mxq.mtasts")

__all__ = ["MTASTS", "Policy", "Lookup", "PolicyCache", "MemoryPolicyCache", "PolicyError", "parse_txt",
           "mx_matches", "fetch_policy", "default_cache", "FETCH_ERROR", "POLICY_INVALID", "WEBPKI_INVALID"]

#: Largest policy body accepted (RFC 8461 section 3.2 suggests 64 KB is plenty).
MAX_POLICY_SIZE = 64 * 1024
#: Seconds for one whole policy fetch.
DEFAULT_FETCH_TIMEOUT = 10.0
#: Seconds a failed fetch is not repeated for the same policy id (RFC 8461 section 3.3).
FAILURE_RETRY = 300.0
#: The largest ``max_age`` (RFC 8461 section 3.2): larger values are capped to it.
MAX_MAX_AGE = 31557600
WELL_KNOWN = "/.well-known/mta-sts.txt"

#: RFC 8460 result types of a policy that could not be obtained.
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"

MODES = ("enforce", "testing", "none")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD = re.compile(r"([A-Za-z0-9_.-]+)=([\x21-\x3a\x3c\x3e-\x7e]*)")
_MX_PATTERN = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


class PolicyError(Exception):
    """A policy could not be obtained: ``result_type`` (RFC 8460) and a human ``detail``."""

    def __init__(self, result_type: str, detail: str):
        super().__init__(f"{result_type}: {detail}")
        self.result_type = result_type
        self.detail = detail


# ----------------------------------------------------------------------------- the policy

@dataclass(frozen=True)
class Policy:
    """One parsed MTA-STS policy (RFC 8461 section 3.2).

    ``lines`` is the policy text as fetched, one entry per non-empty line:
    TLS-RPT's ``policy-string``.  ``mx`` patterns are lower case, with any
    trailing dot removed.
    """

    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    lines: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, id: str = "") -> "Policy":
        """Parse a policy body; raise ``PolicyError`` (``sts-policy-invalid``) when it is not one.

        Lines are separated by LF or CRLF; ``key: value`` with blanks around
        the value ignored.  ``version`` must be ``STSv1``, ``mode`` one of
        ``MODES``, ``max_age`` digits (capped at one year), at least one
        ``mx`` unless the mode is ``none``.  Unknown keys are ignored
        (extensions); ``version``, ``mode`` and ``max_age`` may appear once.
        """
        fields: dict[str, list[str]] = {}
        lines = []
        for raw in text.replace("\r\n", "\n").split("\n"):
            line = raw.strip(" \t")
            if not line:
                continue
            key, sep, value = line.partition(":")
            if not sep or not key or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", key.strip(" \t")):
                raise PolicyError(POLICY_INVALID, f"not a policy line: {line[:80]!r}")
            fields.setdefault(key.strip(" \t"), []).append(value.strip(" \t"))
            lines.append(line)

        def one(key: str) -> str:
            values = fields.get(key)
            if not values:
                raise PolicyError(POLICY_INVALID, f"the policy has no {key}")
            if len(values) > 1:
                raise PolicyError(POLICY_INVALID, f"the policy has {len(values)} {key} fields")
            return values[0]

        if one("version") != "STSv1":
            raise PolicyError(POLICY_INVALID, f"unknown policy version {fields['version'][0][:20]!r}")
        mode = one("mode")
        if mode not in MODES:
            raise PolicyError(POLICY_INVALID, f"unknown policy mode {mode[:20]!r}")
        age = one("max_age")
        if not re.fullmatch(r"[0-9]{1,10}", age):
            raise PolicyError(POLICY_INVALID, f"max_age is not a number of seconds: {age[:20]!r}")
        mx = []
        for pattern in fields.get("mx", []):
            p = pattern.lower().rstrip(".")
            if not _MX_PATTERN.fullmatch(p) or "*" in p[2:]:
                raise PolicyError(POLICY_INVALID, f"malformed mx pattern {pattern[:80]!r}")
            mx.append(p)
        if not mx and mode != "none":
            raise PolicyError(POLICY_INVALID, "the policy has no mx")
        return cls(id=id, mode=mode, mx=tuple(mx), max_age=min(int(age), MAX_MAX_AGE), lines=tuple(lines))

    @property
    def text(self) -> str:
        """The policy body (its lines, CRLF-separated), as kept in a cache."""
        return "\r\n".join(self.lines) + "\r\n"

    def matches(self, host: str) -> bool:
        """True when MX host name ``host`` matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(host, p) for p in self.mx)


def mx_matches(host: str, pattern: str) -> bool:
    """RFC 8461 section 4.1: exact (case-insensitive), or ``*.suffix`` matching exactly one more label."""
    h = host.lower().rstrip(".")
    p = pattern.lower().rstrip(".")
    if p.startswith("*."):
        suffix = p[1:]
        return h.endswith(suffix) and len(h) > len(suffix) and "." not in h[:-len(suffix)]
    return h == p


def parse_txt(records: list[str]) -> str | None:
    """The policy ``id`` of a domain's ``_mta-sts`` TXT records, or None when there is no valid policy record.

    RFC 8461 section 3.1: records not starting with ``v=STSv1`` are ignored;
    if not exactly one remains, or it is malformed, there is no policy.
    """
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields = {}
    for part in candidates[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        m = _FIELD.fullmatch(part)
        if m is None:
            return None
        fields.setdefault(m.group(1), m.group(2))
    if fields.get("v") != "STSv1":
        return None
    ident = fields.get("id", "")
    return ident if _ID.fullmatch(ident) else None


@dataclass(frozen=True)
class Lookup:
    """What applies to mail for ``domain``: ``policy`` (None: no policy), and why it failed, if it did.

    ``failure`` is an RFC 8460 result type when the domain announced a
    policy (a valid TXT record) that could not be obtained and no cached one
    stands in; ``detail`` says what happened.  Such a domain is delivered to
    as if it had no policy.
    """

    domain: str
    policy: Policy | None = None
    failure: str | None = None
    detail: str = ""

    @property
    def mode(self) -> str | None:
        """``enforce``, ``testing``, ``none``, or None without a policy."""
        return self.policy.mode if self.policy is not None else None


# ----------------------------------------------------------------------------- the cache

class PolicyCache(Protocol):
    """Where fetched policies and failed fetches are remembered (by policy domain).

    ``get`` returns ``(policy, expires)`` (``expires`` in ``time.time()``
    seconds) or None; ``put`` keeps a policy ``ttl`` seconds; ``get_failure``
    returns ``(id, result_type, detail)`` of a fetch that failed recently, or
    None; ``put_failure`` keeps one ``ttl`` seconds.  Implementations must
    never raise for a storage problem (answer None, forget the write).  A
    cache whose ``get`` may answer from a memory of its own also has
    ``refresh(domain)``: ``get`` from the source, called before a fetch.
    """

    def get(self, domain: str) -> tuple[Policy, float] | None: ...

    def put(self, domain: str, policy: Policy, ttl: float) -> None: ...

    def get_failure(self, domain: str) -> tuple[str, str, str] | None: ...

    def put_failure(self, domain: str, id: str, result_type: str, detail: str, ttl: float) -> None: ...


class MemoryPolicyCache:
    """In-process ``PolicyCache``: thread-safe, entries expire, at most ``max_entries`` domains (LRU)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_entries: int = 10_000):
        self.clock = clock
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._policies: OrderedDict[str, tuple[Policy, float]] = OrderedDict()
        self._failures: OrderedDict[str, tuple[tuple[str, str, str], float]] = OrderedDict()

    def _get(self, table: OrderedDict, domain: str):
        with self._lock:
            item = table.get(domain)
            if item is None:
                return None
            if item[1] <= self.clock():
                del table[domain]
                return None
            table.move_to_end(domain)
            return item

    def _put(self, table: OrderedDict, domain: str, value, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            table[domain] = (value, self.clock() + ttl)
            table.move_to_end(domain)
            while len(table) > self.max_entries:
                table.popitem(last=False)

    def get(self, domain: str) -> tuple[Policy, float] | None:
        return self._get(self._policies, domain)

    def put(self, domain: str, policy: Policy, ttl: float) -> None:
        self._put(self._policies, domain, policy, ttl)

    def get_failure(self, domain: str) -> tuple[str, str, str] | None:
        item = self._get(self._failures, domain)
        return item[0] if item is not None else None

    def put_failure(self, domain: str, id: str, result_type: str, detail: str, ttl: float) -> None:
        self._put(self._failures, domain, (id, result_type, detail), ttl)

    def clear(self) -> None:
        with self._lock:
            self._policies.clear()
            self._failures.clear()


class _Expiring:
    """Process-wide ``key -> until`` (``MTASTS.clock`` seconds), thread-safe, at most ``max_entries`` (LRU)."""

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._until: OrderedDict[str, float] = OrderedDict()

    def get(self, key: str, now: float) -> bool:
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until <= now:
                del self._until[key]
                return False
            return True

    def put(self, key: str, until: float) -> None:
        with self._lock:
            self._until[key] = until
            self._until.move_to_end(key)
            while len(self._until) > self.max_entries:
                self._until.popitem(last=False)


#: Domains whose ``_mta-sts`` TXT lookup failed lately (timeout, SERVFAIL), in this process.
_txt_failures = _Expiring()

_default_cache: MemoryPolicyCache | None = None
_default_lock = threading.Lock()


def default_cache() -> MemoryPolicyCache:
    """The process-wide in-memory policy cache (the plain engine's)."""
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            _default_cache = MemoryPolicyCache()
        return _default_cache


# ----------------------------------------------------------------------------- fetching

class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a given address, verifying the certificate for ``host`` (SNI too).

    ``expire()`` (from a timer: the fetch's deadline) shuts the connection
    down under whatever is reading it -- the TLS handshake, the status line,
    the headers or the body: socket timeouts bound each read, not the sum of
    reads a peer trickling a byte at a time makes.
    """

    def __init__(self, host: str, ip: str, port: int, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, context=context, timeout=timeout)
        self._ip = ip
        self._guard: socket.socket | None = None     # a dup of the socket, for expire()
        self.expired = False

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        try:
            self._guard = sock.dup()
            if self.expired:                           # the timer fired before the guard was in place
                raise TimeoutError("the fetch's time was up")
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def expire(self) -> None:
        """The deadline passed: shut the connection down (reads end at once)."""
        self.expired = True
        guard = self._guard
        if guard is not None:
            try:
                guard.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        super().close()
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.close()


def fetch_policy(domain: str, resolver, *, timeout: float = DEFAULT_FETCH_TIMEOUT,
                 context: ssl.SSLContext | None = None, port: int = 443,
                 max_size: int = MAX_POLICY_SIZE, destinations=None) -> str:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt``; the body as text, or ``PolicyError``.

    The host name is resolved with ``resolver.addresses`` (mxq's resolver);
    the addresses are tried in order until one connects.  ``destinations``
    (a ``mxq.workers.destinations.DestinationPolicy``, the one exchanges obey)
    keeps the fetch off addresses it refuses: the policy host's name is
    chosen by the recipient domain, like its MX.  ``context`` defaults to
    ``ssl.create_default_context()`` (verifying).  At most ``timeout``
    seconds in all; no redirect is followed.
    """
    host = f"mta-sts.{domain}"
    deadline = time.monotonic() + timeout
    try:
        addresses = resolver.addresses(host, deadline=deadline)
    except DNSError as e:
        raise PolicyError(FETCH_ERROR, f"{host}: {e.reply.text}") from None
    if destinations is not None:
        refused = [(ip, destinations.refusal(ip)) for ip in addresses]
        addresses = [ip for ip, why in refused if why is None]
        if not addresses:
            raise PolicyError(FETCH_ERROR, f"{host}: no address the destination policy allows ("
                              + ", ".join(f"{ip}: {why}" for ip, why in refused) + ")")
    ctx = context if context is not None else ssl.create_default_context()
    last: PolicyError | None = None
    for ip in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn = _PinnedHTTPSConnection(host, ip, port, ctx, left)
        timer = threading.Timer(left, conn.expire)
        timer.daemon = True
        timer.start()
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as e:
                raise PolicyError(WEBPKI_INVALID, f"{host}[{ip}]: certificate: {e.verify_message or e}") from None
            except (OSError, ssl.SSLError) as e:
                last = PolicyError(FETCH_ERROR, f"{host}[{ip}]:{port}: "
                                                f"{'timed out' if conn.expired else _reason(e)}")
                continue                  # the next address
            return _get(conn, host, ip, deadline, max_size)
        finally:
            timer.cancel()
            conn.close()
    if last is not None:
        raise last
    raise PolicyError(FETCH_ERROR, f"{host}: timed out after {timeout:g} s")


def _get(conn: _PinnedHTTPSConnection, host: str, ip: str, deadline: float, max_size: int) -> str:
    where = f"https://{host}{WELL_KNOWN} [{ip}]"
    try:
        conn.request("GET", WELL_KNOWN, headers={"User-Agent": "mxq (MTA-STS, RFC 8461)",
                                                 "Accept": "text/plain", "Connection": "close"})
        sock = conn.sock                  # http.client forgets it once the response owns the connection
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        resp = conn.getresponse()
        if conn.expired:                  # headers cut short by the deadline: judge nothing in them
            raise TimeoutError("the policy host's answer did not arrive in time")
        if resp.status != 200:
            # 3xx included: RFC 8461 section 3.3 forbids following redirects.
            raise PolicyError(FETCH_ERROR, f"{where}: HTTP {resp.status} {resp.reason}".rstrip())
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise PolicyError(POLICY_INVALID, f"{where}: media type {ctype or 'missing'}, not text/plain")
        length = resp.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > max_size:
            raise PolicyError(POLICY_INVALID, f"{where}: policy of {int(length)} bytes, over {max_size}")
        body = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the policy body did not arrive in time")
            sock.settimeout(left)
            chunk = resp.read1(min(16384, max_size + 1 - len(body)))
            if not chunk:
                break
            body += chunk
            if len(body) > max_size:
                raise PolicyError(POLICY_INVALID, f"{where}: policy larger than {max_size} bytes")
        if conn.expired:
            raise TimeoutError("the policy did not arrive in time")
        if resp.length:                   # http.client counts down Content-Length; EOF came first
            raise PolicyError(FETCH_ERROR, f"{where}: the connection closed {resp.length} bytes before the "
                                           "end of the policy (Content-Length)")
    except PolicyError:
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError) as e:
        raise PolicyError(FETCH_ERROR, f"{where}: {'timed out' if conn.expired else _reason(e)}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(POLICY_INVALID, f"{where}: the policy is not UTF-8 text") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


# ----------------------------------------------------------------------------- discovery

class MTASTS:
    """Policy lookups for delivery (see the module docstring).

    ``resolver``: a ``mxq.workers.mx.Resolver`` (TXT and the policy host's
    addresses go through it).  ``cache``: a ``PolicyCache`` (default: the
    process-wide ``default_cache()``).  ``timeout``: seconds per fetch.
    ``tls_context``: the verifying context for the policy host (default:
    ``ssl.create_default_context()``).  ``port``: the policy host's HTTPS
    port (443; other values are for tests).  ``destinations``: the
    ``DestinationPolicy`` the fetch obeys (None: any address).  ``clock``:
    ``time.time``.
    """

    def __init__(self, resolver, cache: PolicyCache | None = None, *, timeout: float = DEFAULT_FETCH_TIMEOUT,
                 tls_context: ssl.SSLContext | None = None, port: int = 443,
                 failure_retry: float = FAILURE_RETRY, clock: Callable[[], float] = time.time,
                 destinations=None):
        self.resolver = resolver
        self.destinations = destinations
        self.cache = cache if cache is not None else default_cache()
        self.timeout = timeout
        self.tls_context = tls_context
        self.port = port
        self.failure_retry = failure_retry
        self.clock = clock

    def answers_at_once(self, domain: str) -> bool:
        """Will ``lookup(domain)`` answer without the network?  (An address literal; the
        ``_mta-sts`` TXT answer held in this process; or its lookup failed lately.)"""
        if domain.startswith("["):
            return True
        known = getattr(self.resolver, "known", None)
        if known is not None and known("TXT", f"_mta-sts.{domain}"):
            return True
        return bool(_txt_failures.get(domain, self.clock()))

    def lookup(self, domain: str) -> Lookup:
        """The policy in force for ``domain`` (A-label, lower case); never raises for network trouble."""
        if domain.startswith("["):
            return Lookup(domain)                     # an address literal has no policy
        cached = self.cache.get(domain)
        policy = cached[0] if cached is not None else None
        if _txt_failures.get(domain, self.clock()):
            return Lookup(domain, policy)             # the TXT lookup failed lately: the cached policy, if any
        try:
            ident = parse_txt(self.resolver.txt(f"_mta-sts.{domain}", deadline=time.monotonic() + self.timeout))
        except DNSError:
            # A failed lookup: the cached policy, if any.  Remembered in this process for
            # failure_retry (RFC 2308 lets a server failure be cached up to 5 minutes), so a
            # domain whose DNS does not answer for _mta-sts does not hold up every delivery for
            # the DNS deadline (in process: no Redis command per delivery run for it).
            _txt_failures.put(domain, self.clock() + self.failure_retry)
            return Lookup(domain, policy)
        if ident is None or (policy is not None and policy.id == ident):
            return Lookup(domain, policy)
        refresh = getattr(self.cache, "refresh", None)
        if refresh is not None:
            # A cache that remembers its answers (RedisPolicyCache) asked again at the source
            # before a fetch: another worker may have fetched this policy meanwhile.
            cached = refresh(domain)
            policy = cached[0] if cached is not None else None
            if policy is not None and policy.id == ident:
                return Lookup(domain, policy)
        failed = self.cache.get_failure(domain)
        if failed is not None and failed[0] == ident:
            if policy is not None:
                return Lookup(domain, policy)
            return Lookup(domain, None, failed[1], failed[2])
        try:
            text = fetch_policy(domain, self.resolver, timeout=self.timeout, context=self.tls_context,
                                port=self.port, destinations=self.destinations)
            fresh = Policy.parse(text, ident)
        except PolicyError as e:
            log.warning("MTA-STS policy of %s (id %s) unavailable: %s", domain, ident, e)
            self.cache.put_failure(domain, ident, e.result_type, e.detail, self.failure_retry)
            if policy is not None:
                return Lookup(domain, policy)         # the cached policy stays in force
            return Lookup(domain, None, e.result_type, e.detail)
        self.cache.put(domain, fresh, fresh.max_age)
        log.info("MTA-STS policy of %s: id %s, mode %s, mx %s, max_age %d", domain, ident, fresh.mode,
                 ",".join(fresh.mx) or "-", fresh.max_age)
        return Lookup(domain, fresh)

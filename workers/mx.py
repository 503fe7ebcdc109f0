"""MX resolution with caching: where to deliver a domain's mail (RFC 5321 section 5.1).

``Resolver.exchanges(domain)`` returns the domain's mail exchangers in the
order to try them, each with its addresses (A records, then AAAA):

- MX records sorted by preference; exchanges of EQUAL preference are shuffled
  on every call (RFC 5321 5.1: spread the load), so the order within a
  preference class is a fresh random permutation each time.  An exchange
  listed twice keeps its lowest preference.
- An exchange with no address is skipped.  If no exchange has an address the
  domain fails: transient 4.4.3 when any address lookup failed transiently
  (SERVFAIL, timeout), else permanent 5.4.4.
- No MX records (NODATA): the implicit MX -- the domain's own A/AAAA as one
  ``Exchange(implicit=True)``; no address either: permanent 5.4.4 (or 4.4.3
  if an address lookup failed transiently).
- Null MX (RFC 7505: an MX whose exchange is the root, ``0 .``): ``NullMX``
  with 5.1.10.  If a null MX appears beside real MX records the domain is
  misconfigured (RFC 7505 section 3 forbids it); we ignore the null record
  and deliver to the real exchanges, as OpenSMTPD does.  (Postfix instead
  treats any MX with an empty exchange as null MX and bounces -- its
  dns_get_rr() returns DNS_NULLMX for the whole answer.  We prefer not to
  bounce mail a domain's other records say it wants.)  An MX ``.`` with a
  non-zero preference is treated like a null MX too.
- NXDOMAIN: permanent 5.1.2.  SERVFAIL or timeout: transient 4.4.3.
- Address literals (``[127.0.0.5]``, ``[IPv6:::1]``): one implicit exchange
  with that address and no DNS query.

Bounds (``exchanges(domain, deadline=..., limit=...)``): addresses are
looked up exchange by exchange, in delivery order, only until ``limit``
usable addresses are known (like Postfix's ``smtp_mx_address_limit``: an MX
set of 50 hosts costs a handful of lookups, not 100); no lookup starts after
``deadline``, and each lookup's lifetime ends at it, so a DNS server that
never answers costs at most the DNS phase, however many names there are.
What was found by then is used; nothing found is a transient 4.4.3.
A ``policy`` (``mxq.workers.destinations.DestinationPolicy``) keeps refused
addresses out of ``Exchange.addresses`` (they are listed in ``refused``
with the reason); a domain whose every address is refused fails with 5.4.4.

Interrupts: dnspython catches every exception a query raises and tries the
next server.  An interrupt registered with
``mxq.workers.errors.register_interrupt`` (Celery's SoftTimeLimitExceeded)
is caught at the server it hit, makes every remaining server fail at once,
and is raised again from the lookup, so it reaches the caller promptly.

Answers are cached per ``(type, name)`` in a ``dnscache.DNSCache`` (in
process, plus Redis shared by all workers when a client or
``settings.redis_url`` is given).  Names are resolved as absolute names (no
search list), in IDNA 2008 A-label form, through the servers in
``settings.dns_servers`` (``MXQ_DNS_SERVERS``) or, when that is None, the
system's resolver configuration.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .address import normalize_domain
from .config import Settings
from .dnscache import NODATA, NXDOMAIN, OK, CachedAnswer, DNSCache, quick_client
from .errors import DNSError, NullMX, is_interrupt
from .reply import Reply

DEFAULT_LIFETIME = 5.0   #: seconds for one whole lookup (all tries, all servers)
DEFAULT_TIMEOUT = 2.0    #: seconds for one try at one server


@dataclass(frozen=True)
class Exchange:
    """One mail exchanger: ``name`` (no trailing dot), ``preference``, ``addresses`` (A then AAAA).

    ``implicit`` is True for the implicit MX (the domain's own address) and
    for address literals.  ``refused``: ``(address, reason)`` pairs a
    destination policy kept out of ``addresses``.
    """

    name: str
    preference: int
    addresses: list[str]
    implicit: bool = False
    refused: tuple = field(default=())


class _Interrupted(OSError):
    """Internal: an interrupt hit a DNS query.  An OSError, so dnspython drops that server at once."""


_interrupt = threading.local()   # the interrupt caught inside dnspython by this thread's lookup


class _Nameserver(dns.nameserver.Do53Nameserver):
    """A Do53 server whose queries let registered interrupts out of dnspython's retry loop."""

    def query(self, request, timeout, source, source_port, max_size=False, one_rr_per_rrset=False,
              ignore_trailing=False):
        if getattr(_interrupt, "exc", None) is not None:
            raise _Interrupted("interrupted")          # every other server fails at once too
        try:
            return super().query(request, timeout, source, source_port, max_size, one_rr_per_rrset,
                                 ignore_trailing)
        except Exception as e:
            if is_interrupt(e):
                _interrupt.exc = e
                raise _Interrupted("interrupted") from e
            raise


class _Transient(Exception):
    """A lookup failed in a way that may succeed later (SERVFAIL, timeout, no server answered)."""


class Resolver:
    """Resolves domains to ``Exchange`` lists and hosts to addresses, with a TTL cache.

    ``settings``: ``Settings`` (None: ``Settings.from_env()``); its
    ``dns_servers`` replace the system resolver, its ``dns_*_ttl`` bound the
    cache, its ``redis_url`` enables the shared cache.  ``redis``: a redis-py
    client for the shared cache (overrides ``redis_url``).  ``lifetime`` and
    ``timeout``: seconds for a whole lookup and for one try.  ``cache``: a
    ``DNSCache`` to use (e.g. shared by several resolvers); ``clock``: the
    cache's clock, for tests.  ``rng``: the ``random.Random`` that shuffles
    equal preferences.

    Thread-safe.  ``stats`` counts ``queries`` sent to DNS, cache ``hits``
    (``redis_hits`` of them from Redis) and ``misses``.
    """

    def __init__(self, settings: Settings | None = None, *, redis: Any = None,
                 lifetime: float = DEFAULT_LIFETIME, timeout: float = DEFAULT_TIMEOUT,
                 cache: DNSCache | None = None, clock: Callable[[], float] | None = None,
                 rng: random.Random | None = None):
        self.settings = settings if settings is not None else Settings.from_env()
        if redis is None and cache is None and self.settings.redis_url:
            # The cache is an optimisation: one quick try, no retries with back-off
            # (redis-py's default), and a bounded pool that queues (dnscache.quick_client).
            redis = quick_client(self.settings.redis_url)
        if cache is None:
            kw = {"clock": clock} if clock is not None else {}
            cache = DNSCache(self.settings, redis=redis, **kw)
        self.cache = cache
        self.rng = rng or random.Random()
        self._dns = self._make_resolver(lifetime, timeout)
        self._lock = threading.Lock()
        self._stats = {"queries": 0}

    def _make_resolver(self, lifetime: float, timeout: float) -> dns.resolver.Resolver:
        servers = self.settings.dns_servers
        if servers is None:
            r = dns.resolver.Resolver(configure=True)
            r.nameservers = [_Nameserver(ns.address, ns.port) if type(ns) is dns.nameserver.Do53Nameserver
                             else ns for ns in r.nameservers]
        else:
            r = dns.resolver.Resolver(configure=False)
            # Nameserver objects carry their own port, so servers may differ in port.
            r.nameservers = [_Nameserver(host, port) for host, port in servers]
        self.lifetime = lifetime
        r.lifetime = lifetime
        r.timeout = min(timeout, lifetime)
        r.cache = None                  # our cache does the caching (and the clamping)
        r.use_search_by_default = False
        return r

    @property
    def stats(self) -> dict[str, int]:
        """``{"queries": n, "hits": n, "misses": n, "redis_hits": n}`` since this resolver was made."""
        c = self.cache.stats
        with self._lock:
            return {"queries": self._stats["queries"], "hits": c["hits"], "misses": c["misses"],
                    "redis_hits": c["redis_hits"]}

    # ----------------------------------------------------------------- public

    def exchanges(self, domain: str, *, deadline: float | None = None, limit: int | None = None,
                  policy=None) -> list[Exchange]:
        """The exchanges for ``domain`` in delivery order (see the module docstring).

        ``deadline`` (``time.monotonic()`` seconds): no lookup starts after it
        and none runs past it; ``limit``: stop looking up exchanges once this
        many usable addresses are known (0/None: all); ``policy``: a
        ``DestinationPolicy`` whose refused addresses go to
        ``Exchange.refused`` instead of ``addresses``.

        Raises ``NullMX`` (5.1.10), ``DNSError`` (5.1.2 NXDOMAIN, 5.4.4 no
        exchange with a usable address, 4.4.3 SERVFAIL/timeout/deadline),
        ``InvalidAddress`` for a malformed domain.
        """
        d = normalize_domain(domain)
        literal = _literal(d)
        if literal is not None:
            x = _split(Exchange(name=d, preference=0, addresses=[literal], implicit=True), policy)
            if not x.addresses:
                kind = x.refused[0][1]
                raise DNSError(d, Reply.local("5.4.4", f"address literal {d} is {_a(kind)} {kind} address, "
                                                       f"which mxq does not deliver to ({_HINT})"))
            return [x]
        try:
            mx = self._lookup("MX", d, deadline)
        except _Transient as e:
            raise DNSError(d, Reply.local("4.4.3", f"MX lookup for {d} failed: {e}")) from None
        if mx.status == NXDOMAIN:
            raise DNSError(d, Reply.local("5.1.2", f"Host or domain name not found: {d} (NXDOMAIN)"))
        if mx.status == NODATA or not mx.records:
            addresses, transient = self._host_addresses(d, deadline)
            if addresses:
                x = _split(Exchange(name=d, preference=0, addresses=addresses, implicit=True), policy)
                if x.addresses:
                    return [x]
                if transient:
                    raise DNSError(d, Reply.local("4.4.3", f"{d} has no MX and its address lookup failed"))
                raise DNSError(d, Reply.local("5.4.4", f"{d} has no MX record and resolves only to addresses "
                                                       f"mxq does not deliver to: {_refused_text([x])} ({_HINT})"))
            if transient:
                raise DNSError(d, Reply.local("4.4.3", f"{d} has no MX and its address lookup failed"))
            raise DNSError(d, Reply.local("5.4.4", f"{d} has no MX record and no address"))

        real = [(int(p), n) for p, n in mx.records if n != "."]
        if not real:
            raise NullMX(d, Reply.local("5.1.10", f"{d} does not accept mail (null MX, RFC 7505)"))
        result, refused, transient, usable = [], [], False, 0
        for pref, name in self._ordered(real):
            if limit and usable >= limit:
                break
            if deadline is not None and time.monotonic() >= deadline:
                transient = True        # out of time: use what was found
                break
            addresses, failed = self._host_addresses(name, deadline)
            transient = transient or failed
            if addresses:
                x = _split(Exchange(name=name, preference=pref, addresses=addresses), policy)
                if x.addresses:
                    result.append(x)
                    usable += len(x.addresses)
                if x.refused:
                    refused.append(x)
        if result:
            return result
        names = ", ".join(n for _, n in real[:10]) + (", ..." if len(real) > 10 else "")
        if transient:
            raise DNSError(d, Reply.local("4.4.3", f"address lookup failed for the MX hosts of {d} ({names})"))
        if refused:
            raise DNSError(d, Reply.local("5.4.4", f"the MX hosts of {d} resolve only to addresses mxq does not "
                                                   f"deliver to: {_refused_text(refused)} ({_HINT})"))
        raise DNSError(d, Reply.local("5.4.4", f"no MX host of {d} has an address ({names})"))

    def addresses(self, hostname: str, *, deadline: float | None = None) -> list[str]:
        """A then AAAA addresses of ``hostname`` (an IP address, or ``[literal]``, returns itself).

        Never returns an empty list: raises ``DNSError`` 4.4.3 when a lookup
        failed transiently and no address was found, 5.4.4 when the host has
        no address (NXDOMAIN or NODATA).
        """
        host = hostname.strip()
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        name = normalize_domain(host[:-1] if host.endswith(".") and not host.startswith("[") else host)
        literal = _literal(name)
        if literal is not None:
            return [literal]
        addresses, transient = self._host_addresses(name, deadline)
        if addresses:
            return addresses
        if transient:
            raise DNSError(name, Reply.local("4.4.3", f"address lookup for {name} failed"))
        raise DNSError(name, Reply.local("5.4.4", f"Host not found: {name} has no address"))

    def txt(self, name: str, *, deadline: float | None = None) -> list[str]:
        """The TXT records of ``name`` (each record's strings joined, as text), cached like the rest.

        Returns [] when the name has none (NXDOMAIN or NODATA); raises
        ``DNSError`` 4.4.3 when the lookup failed transiently.  Used for
        policy records such as ``_mta-sts.<domain>`` (RFC 8461).
        """
        # Not normalize_domain(): policy names have underscore labels, which are not host names.
        n = name[:-1].lower() if name.endswith(".") else name.lower()
        try:
            ans = self._lookup("TXT", n, deadline)
        except _Transient as e:
            raise DNSError(n, Reply.local("4.4.3", f"TXT lookup for {n} failed: {e}")) from None
        return list(ans.records) if ans.status == OK else []

    # ----------------------------------------------------------------- internals

    def _ordered(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Sort by preference, shuffling within each preference; keep each exchange's best preference."""
        best: dict[str, int] = {}
        for pref, name in records:
            if name not in best or pref < best[name]:
                best[name] = pref
        classes: dict[int, list[str]] = {}
        for name, pref in best.items():
            classes.setdefault(pref, []).append(name)
        ordered = []
        for pref in sorted(classes):
            names = classes[pref]
            with self._lock:           # random.Random is not documented as thread-safe
                self.rng.shuffle(names)
            ordered.extend((pref, n) for n in names)
        return ordered

    def known(self, rtype: str, name: str) -> bool:
        """Does this process hold the answer for ``(rtype, name)`` (no Redis, no DNS needed)?"""
        return self.cache.peek(rtype, name)

    def _host_addresses(self, name: str, deadline: float | None = None) -> tuple[list[str], bool]:
        """``(addresses A then AAAA, whether a lookup failed transiently)``.

        A and AAAA are looked up at the same time when this process knows
        neither (a new exchange): its connection waits for one lookup, not
        two in a row -- each a Redis read, a DNS query and a Redis write, on
        a new destination's way to its first delivery.  The AAAA answer of a
        name whose A lookup said NXDOMAIN is not used (it says the same).
        """
        literal = _ip(name)
        if literal is not None:
            return [literal], False
        aaaa = None
        if not self.known("AAAA", name) and not self.known("A", name):
            aaaa = Later(self._lookup, "AAAA", name, deadline)
        addresses: list[str] = []
        transient = False
        for rtype in ("A", "AAAA"):
            try:
                ans = aaaa.result() if rtype == "AAAA" and aaaa is not None else self._lookup(rtype, name, deadline)
            except _Transient:
                transient = True
                continue
            if ans.status == OK:
                addresses.extend(a for a in ans.records if a not in addresses)
            elif ans.status == NXDOMAIN:
                # The name does not exist: no point asking for AAAA.  One asked already says the
                # same; it is waited for (it is quick) so no lookup outlives the call.
                if aaaa is not None:
                    aaaa.wait()
                break
        return addresses, transient

    def _lookup(self, rtype: str, name: str, deadline: float | None = None) -> CachedAnswer:
        """One cached lookup; raises ``_Transient`` for SERVFAIL, timeouts, failures and a passed ``deadline``."""
        hit = self.cache.get(rtype, name)
        if hit is not None:
            return hit
        lifetime = self.lifetime
        if deadline is not None:
            lifetime = min(lifetime, deadline - time.monotonic())
            if lifetime <= 0:
                raise _Transient("the DNS phase's time is up")
        with self._lock:
            self._stats["queries"] += 1
        _interrupt.exc = None
        try:
            try:
                ans = self._dns.resolve(dns.name.from_text(name), rtype, search=False, raise_on_no_answer=False,
                                        lifetime=lifetime)
            except Exception:
                caught = getattr(_interrupt, "exc", None)
                if caught is not None:
                    raise caught from None
                raise
            finally:
                _interrupt.exc = None
        except dns.resolver.NXDOMAIN as e:
            response = next(iter(e.responses().values()), None)
            answer = CachedAnswer(NXDOMAIN, [], 0, _negative_ttl(response))
        except dns.exception.Timeout as e:
            raise _Transient(f"timeout: {e}") from None
        except dns.resolver.NoNameservers as e:
            raise _Transient(f"no server answered (SERVFAIL or refused): {e}") from None
        except dns.exception.DNSException as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        else:
            if ans.rrset is None:
                answer = CachedAnswer(NODATA, [], 0, _negative_ttl(ans.response))
            else:
                answer = CachedAnswer(OK, _records(rtype, ans.rrset), int(ans.chaining_result.minimum_ttl))
        return self.cache.put(rtype, name, answer)


class Later:
    """``fn(*args)`` started now in a thread of its own (a greenlet under gevent); ``result()``
    waits for it and returns its value or raises its exception.

    For lookups a caller needs a little later, started before the ones it needs
    first (a new destination's AAAA beside its A, its MTA-STS policy beside
    its MX), so their waits overlap.  The work must bound its own time (DNS
    deadlines, fetch timeouts): ``result()`` waits for it.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._fn, self._args = fn, args
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mxq-later", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 -- handed to result()'s caller
            self._error = e

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _records(rtype: str, rrset) -> list:
    if rtype == "MX":
        out = []
        for rd in rrset:
            if rd.exchange == dns.name.root:
                out.append([rd.preference, "."])
            else:
                out.append([rd.preference, rd.exchange.to_text(omit_final_dot=True).lower()])
        return out
    if rtype == "TXT":
        return [b"".join(rd.strings).decode("utf-8", "replace") for rd in rrset]
    return [rd.address for rd in rrset]


def _negative_ttl(response: dns.message.Message | None) -> int | None:
    """RFC 2308 negative TTL: min(SOA TTL, SOA minimum) from the authority section, None without an SOA."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return None


_HINT = "MXQ_ALLOW_PRIVATE_DESTINATIONS allows them"


def _split(x: Exchange, policy) -> Exchange:
    """``x`` with the addresses ``policy`` refuses moved to ``refused``."""
    if policy is None:
        return x
    ok, refused = [], []
    for ip in x.addresses:
        why = policy.refusal(ip)
        if why is None:
            ok.append(ip)
        else:
            refused.append((ip, why))
    if not refused:
        return x
    return Exchange(x.name, x.preference, ok, x.implicit, tuple(refused))


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _refused_text(exchanges: list[Exchange]) -> str:
    items = [f"{x.name}[{ip}] {why}" for x in exchanges for ip, why in x.refused]
    return ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _literal(domain: str) -> str | None:
    """The IP of a normalised address literal (``[127.0.0.5]``, ``[IPv6:::1]``), else None."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    return _ip(inner)


# --------------------------------------------------------------------------- module level

_default: Resolver | None = None
_by_settings: dict[str, Resolver] = {}
_default_lock = threading.Lock()


def default_resolver() -> Resolver:
    """The process-wide resolver built from ``Settings.from_env()`` on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Resolver(Settings.from_env())
        return _default


def reset_default_resolver() -> None:
    """Forget the process-wide resolvers (after the environment changed, or in tests)."""
    global _default
    with _default_lock:
        _default = None
        _by_settings.clear()


def exchanges(domain: str, settings: Settings | None = None) -> list[Exchange]:
    """``Resolver.exchanges`` on the process-wide resolver (one per distinct ``settings``)."""
    if settings is None:
        return default_resolver().exchanges(domain)
    key = repr(settings)
    with _default_lock:
        resolver = _by_settings.get(key)
        if resolver is None:
            resolver = _by_settings[key] = Resolver(settings)
    return resolver.exchanges(domain)

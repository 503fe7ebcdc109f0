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
from dataclasses import dataclass
from typing import Any, Callable

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .address import normalize_domain
from .config import Settings
from .dnscache import NODATA, NXDOMAIN, OK, CachedAnswer, DNSCache
from .errors import DNSError, NullMX
from .reply import Reply

DEFAULT_LIFETIME = 5.0   #: seconds for one whole lookup (all tries, all servers)
DEFAULT_TIMEOUT = 2.0    #: seconds for one try at one server


@dataclass(frozen=True)
class Exchange:
    """One mail exchanger: ``name`` (no trailing dot), ``preference``, ``addresses`` (A then AAAA).

    ``implicit`` is True for the implicit MX (the domain's own address) and
    for address literals.
    """

    name: str
    preference: int
    addresses: list[str]
    implicit: bool = False


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
            import redis as redis_lib   # only when asked for: library users may not run Redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # The cache is an optimisation: one quick try, no retries with back-off
            # (redis-py's default), so a dead Redis costs milliseconds, not seconds.
            redis = redis_lib.Redis.from_url(self.settings.redis_url, socket_timeout=1.0,
                                             socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
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
        else:
            r = dns.resolver.Resolver(configure=False)
            # Nameserver objects carry their own port, so servers may differ in port.
            r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
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

    def exchanges(self, domain: str) -> list[Exchange]:
        """The exchanges for ``domain`` in delivery order (see the module docstring).

        Raises ``NullMX`` (5.1.10), ``DNSError`` (5.1.2 NXDOMAIN, 5.4.4 no
        exchange with an address, 4.4.3 SERVFAIL/timeout), ``InvalidAddress``
        for a malformed domain.
        """
        d = normalize_domain(domain)
        literal = _literal(d)
        if literal is not None:
            return [Exchange(name=d, preference=0, addresses=[literal], implicit=True)]
        try:
            mx = self._lookup("MX", d)
        except _Transient as e:
            raise DNSError(d, Reply.local("4.4.3", f"MX lookup for {d} failed: {e}")) from None
        if mx.status == NXDOMAIN:
            raise DNSError(d, Reply.local("5.1.2", f"Host or domain name not found: {d} (NXDOMAIN)"))
        if mx.status == NODATA or not mx.records:
            addresses, transient = self._host_addresses(d)
            if addresses:
                return [Exchange(name=d, preference=0, addresses=addresses, implicit=True)]
            if transient:
                raise DNSError(d, Reply.local("4.4.3", f"{d} has no MX and its address lookup failed"))
            raise DNSError(d, Reply.local("5.4.4", f"{d} has no MX record and no address"))

        real = [(int(p), n) for p, n in mx.records if n != "."]
        if not real:
            raise NullMX(d, Reply.local("5.1.10", f"{d} does not accept mail (null MX, RFC 7505)"))
        result, transient = [], False
        for pref, name in self._ordered(real):
            addresses, failed = self._host_addresses(name)
            transient = transient or failed
            if addresses:
                result.append(Exchange(name=name, preference=pref, addresses=addresses))
        if result:
            return result
        names = ", ".join(n for _, n in real)
        if transient:
            raise DNSError(d, Reply.local("4.4.3", f"address lookup failed for the MX hosts of {d} ({names})"))
        raise DNSError(d, Reply.local("5.4.4", f"no MX host of {d} has an address ({names})"))

    def addresses(self, hostname: str) -> list[str]:
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
        addresses, transient = self._host_addresses(name)
        if addresses:
            return addresses
        if transient:
            raise DNSError(name, Reply.local("4.4.3", f"address lookup for {name} failed"))
        raise DNSError(name, Reply.local("5.4.4", f"Host not found: {name} has no address"))

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

    def _host_addresses(self, name: str) -> tuple[list[str], bool]:
        """``(addresses A then AAAA, whether a lookup failed transiently)``."""
        literal = _ip(name)
        if literal is not None:
            return [literal], False
        addresses: list[str] = []
        transient = False
        for rtype in ("A", "AAAA"):
            try:
                ans = self._lookup(rtype, name)
            except _Transient:
                transient = True
                continue
            if ans.status == OK:
                addresses.extend(a for a in ans.records if a not in addresses)
            elif ans.status == NXDOMAIN:
                break                  # the name does not exist: no point asking for AAAA
        return addresses, transient

    def _lookup(self, rtype: str, name: str) -> CachedAnswer:
        """One cached lookup; raises ``_Transient`` for SERVFAIL, timeouts and other failures."""
        hit = self.cache.get(rtype, name)
        if hit is not None:
            return hit
        with self._lock:
            self._stats["queries"] += 1
        try:
            ans = self._dns.resolve(dns.name.from_text(name), rtype, search=False, raise_on_no_answer=False)
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


def _records(rtype: str, rrset) -> list:
    if rtype == "MX":
        out = []
        for rd in rrset:
            if rd.exchange == dns.name.root:
                out.append([rd.preference, "."])
            else:
                out.append([rd.preference, rd.exchange.to_text(omit_final_dot=True).lower()])
        return out
    return [rd.address for rd in rrset]


def _negative_ttl(response: dns.message.Message | None) -> int | None:
    """RFC 2308 negative TTL: min(SOA TTL, SOA minimum) from the authority section, None without an SOA."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return None


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

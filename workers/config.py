"""The engine's settings: ``Settings``, built from the ``MXQ_*`` registry (``mxq.settings``).

``Settings.from_env()`` is the engine's view of the registry (the
environment, and in a Django or Flask process their ``MXQ_*`` settings, see
``mxq.settings``); everything else in the engine takes a ``Settings``.  Relay credentials live only here and
in the relay connection: ``RelayConfig``'s repr hides the password, and no
result, log line or task argument ever carries it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from mxq import settings as registry

from .destinations import DestinationPolicy
from .sources import SourcePools
from .oauth2 import TokenSource
from .scache import ReuseLimits
from .timeouts import Timeouts

TLS_POLICIES = ("none", "opportunistic", "required")
RELAY_MODES = ("fallback", "always", "never")


#: The relay's TLS policies (``?tls=`` in ``MXQ_RELAY``).
RELAY_TLS = ("required", "opportunistic", "none")


def parse_networks(value: str, name: str = "MXQ_RELAY_CLEARTEXT") -> tuple:
    """``addr[/len],...`` into a tuple of ``ipaddress`` networks; ConfigError naming ``name``."""
    nets = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            raise registry.ConfigError(name, f"has {item!r}, not an IP address or network "
                                             "(a.b.c.d[/n] or ipv6[/n])") from None
    return tuple(nets)


@dataclass(frozen=True)
class RelayConfig:
    """A relay (smarthost), from ``MXQ_RELAY``.

    ``smtp://[user[:password]@]host[:port][?tls=required|opportunistic|none]``
    (port 587 by default) or ``smtps://[user[:password]@]host[:port]``
    (implicit TLS, port 465).  ``tls`` (smtp:// only):

    - ``required`` (default): STARTTLS with a certificate verified for
      ``host`` (system trust store, or ``SSL_CERT_FILE``);
    - ``opportunistic``: STARTTLS when offered, certificate not checked,
      clear text otherwise;
    - ``none``: never TLS -- allowed only towards addresses the operator
      names: the relay given as an IP address, or its addresses in
      ``cleartext`` (``MXQ_RELAY_CLEARTEXT``).  A host name that resolves
      elsewhere is not used.

    AUTH is used only when credentials are given (a user name with a
    password, or with a token source for XOAUTH2), and credentials are never
    sent over a connection without TLS unless the address is one the
    operator named (as for ``none``).  ``token`` is an
    ``oauth2.TokenSource`` (``MXQ_RELAY_TOKEN_FILE`` /
    ``MXQ_RELAY_TOKEN_COMMAND``): AUTH XOAUTH2 as ``username`` with a fresh
    token.  ``repr`` shows neither the password nor the token.
    """

    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: str = "required"
    cleartext: tuple = ()
    token: TokenSource | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.tls not in RELAY_TLS:
            raise registry.ConfigError("MXQ_RELAY", f"?tls= must be one of {', '.join(RELAY_TLS)}, not {self.tls!r}")
        if self.implicit_tls and self.tls != "required":
            raise registry.ConfigError("MXQ_RELAY", "is smtps://, TLS from the first byte: ?tls= can only be required")
        if self.tls == "none" and not self.cleartext and _ip(self.host) is None:
            raise registry.ConfigError(
                "MXQ_RELAY", f"has ?tls=none, which sends mail in clear text: name {self.host}'s addresses in "
                             "MXQ_RELAY_CLEARTEXT (e.g. 10.1.2.3 or 10.0.0.0/8), or give the relay as an IP address")
        if self.token is not None and (not self.username or self.password is not None):
            raise registry.ConfigError(
                "MXQ_RELAY", "needs a user name and no password for XOAUTH2: smtp://user@host with "
                             "MXQ_RELAY_TOKEN_FILE or MXQ_RELAY_TOKEN_COMMAND")

    @classmethod
    def parse(cls, url: str, *, cleartext: str | None = None, token_file: str | None = None,
              token_command: str | None = None) -> "RelayConfig":
        """Parse ``MXQ_RELAY``; raise ConfigError (a ValueError, without echoing the password) when malformed.

        ``cleartext``: ``MXQ_RELAY_CLEARTEXT``; ``token_file`` /
        ``token_command``: the XOAUTH2 token's source (at most one).
        """
        url = registry.REGISTRY["MXQ_RELAY"].parse(url)      # ConfigError (a ValueError) naming MXQ_RELAY
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        if parts.port == 0:
            raise registry.ConfigError("MXQ_RELAY", "has port 0: give the relay's port (1-65535), or none for "
                                                    "the default (587, or 465 for smtps://)")
        port = parts.port or (465 if implicit else 587)
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"tls"})
        if unknown:
            raise registry.ConfigError("MXQ_RELAY", f"has an unknown parameter {unknown[0]!r} (known: tls)")
        tls = query.get("tls", ["required"])[-1].lower()
        if token_file and token_command:
            raise registry.ConfigError("MXQ_RELAY_TOKEN_FILE",
                                       "and MXQ_RELAY_TOKEN_COMMAND are both set: set one, not both")
        token = None
        if token_file:
            token = TokenSource(file=token_file)
        elif token_command:
            token = TokenSource(command=token_command)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if password is not None and not user:
            raise registry.ConfigError("MXQ_RELAY", "has a password without a user name: smtp://user:password@host")
        if user and password is None and token is None:
            raise registry.ConfigError("MXQ_RELAY", "names a user without a password: add :password, or set "
                                                    "MXQ_RELAY_TOKEN_FILE / MXQ_RELAY_TOKEN_COMMAND for XOAUTH2")
        return cls(host=parts.hostname, port=port, implicit_tls=implicit, username=user, password=password,
                   tls=tls, cleartext=parse_networks(cleartext or ""), token=token)

    @property
    def name(self) -> str:
        """``host:port``, safe to log."""
        return f"{self.host}:{self.port}"

    @property
    def has_credentials(self) -> bool:
        """True when AUTH is to be used (a user with a password or a token)."""
        return bool(self.username) and (self.password is not None or self.token is not None)

    def cleartext_allowed(self, ip: str) -> bool:
        """True when mail and credentials may go to ``ip`` without TLS: an address the operator named."""
        addr = _ip(ip)
        if addr is None:
            return False
        if _ip(self.host) == addr:
            return True
        return any(addr in net for net in self.cleartext)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def default_helo_name() -> str:
    """The host's fully qualified name, as Postfix's ``myhostname`` defaults to."""
    return socket.getfqdn() or "localhost"


def parse_dns_servers(value: str) -> list[tuple[str, int]]:
    """``host[:port],...`` (IPv6 as ``[::1]:5353``) into ``[(host, port), ...]``; ValueError naming MXQ_DNS_SERVERS."""
    return registry.REGISTRY["MXQ_DNS_SERVERS"].parse(value)


def _destination_policy() -> DestinationPolicy:
    """``MXQ_ALLOW_PRIVATE_DESTINATIONS`` from the registry: a ``Settings`` made by hand follows it too
    (unless given ``destinations=``), so the policy is never silently off or on."""
    return DestinationPolicy.parse(registry.value("MXQ_ALLOW_PRIVATE_DESTINATIONS"))


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to deliver; see the README's configuration table."""

    helo_name: str = field(default_factory=default_helo_name)
    dns_servers: list[tuple[str, int]] | None = None   #: None: the system resolver's
    smtp_port: int = 25
    max_recipients: int = 100
    tls: str = "opportunistic"                          #: to exchanges: none | opportunistic | required
    relay: RelayConfig | None = None
    relay_mode: str = "never"                           #: fallback | always | never
    timeouts: Timeouts = field(default_factory=Timeouts)
    redis_url: str | None = None                        #: shared DNS cache and host status
    dns_min_ttl: int = 60
    dns_max_ttl: int = 3600
    dns_negative_ttl: int = 300
    #: exchange addresses tried per delivery attempt, 0: no limit (Postfix's smtp_mx_address_limit)
    mx_address_limit: int = 5
    #: SMTP sessions (connections that got through TCP) per delivery attempt before the
    #: exchanges are given up (or the fallback relay is tried); 0: no limit (smtp_mx_session_limit)
    mx_session_limit: int = 2
    #: which exchange addresses may be connected to (MXQ_ALLOW_PRIVATE_DESTINATIONS; the relay is exempt)
    destinations: DestinationPolicy = field(default_factory=_destination_policy)
    #: local addresses (and EHLO names) to connect from, in named pools (MXQ_SOURCE_ADDRESSES)
    source_pools: SourcePools = field(default_factory=SourcePools)
    mta_sts: bool = True                                #: apply MTA-STS policies (RFC 8461)
    mta_sts_timeout: float = 10.0                       #: seconds for one policy fetch
    port25_probe_interval: float = 300.0                #: while port 25 looks blocked, seconds between probes
    #: connection reuse across deliveries (``mxq.workers.scache``; used where a cache is given)
    reuse: ReuseLimits = field(default_factory=ReuseLimits)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """The engine's settings from the registry (``env``: that mapping alone); ValueError naming a bad one."""
        c = registry.load(env)
        relay = None
        if c.is_set("MXQ_RELAY"):
            relay = RelayConfig.parse(c.raw("MXQ_RELAY"), cleartext=c.raw("MXQ_RELAY_CLEARTEXT"),
                                      token_file=c["MXQ_RELAY_TOKEN_FILE"], token_command=c["MXQ_RELAY_TOKEN_COMMAND"])
        mode = c["MXQ_RELAY_MODE"] or ("fallback" if relay else "never")
        if mode == "always" and relay is None:
            raise registry.ConfigError("MXQ_RELAY_MODE", "is always, which needs MXQ_RELAY")
        kw = {}
        if c["MXQ_HELO_NAME"]:
            kw["helo_name"] = c["MXQ_HELO_NAME"]
        return cls(relay=relay, relay_mode=mode, tls=c["MXQ_TLS"], timeouts=Timeouts.from_env(env),
                   redis_url=c.raw("MXQ_REDIS_URL"), dns_servers=c["MXQ_DNS_SERVERS"],
                   smtp_port=c["MXQ_SMTP_PORT"], max_recipients=c["MXQ_MAX_RECIPIENTS"],
                   dns_min_ttl=c["MXQ_DNS_MIN_TTL"], dns_max_ttl=c["MXQ_DNS_MAX_TTL"],
                   dns_negative_ttl=c["MXQ_DNS_NEGATIVE_TTL"], mx_address_limit=c["MXQ_MX_ADDRESS_LIMIT"],
                   mx_session_limit=c["MXQ_MX_SESSION_LIMIT"],
                   destinations=DestinationPolicy.parse(c["MXQ_ALLOW_PRIVATE_DESTINATIONS"]),
                   source_pools=SourcePools(c["MXQ_SOURCE_ADDRESSES"] or ()),
                   mta_sts=c["MXQ_MTA_STS"], mta_sts_timeout=c["MXQ_MTA_STS_TIMEOUT"],
                   port25_probe_interval=c["MXQ_PORT25_PROBE_INTERVAL"],
                   reuse=ReuseLimits(idle=c["MXQ_CONNECTION_CACHE_TIME"], time=c["MXQ_CONNECTION_REUSE_TIME"],
                                     count=c["MXQ_CONNECTION_REUSE_LIMIT"]), **kw)

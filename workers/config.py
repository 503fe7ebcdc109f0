"""The engine's settings: ``Settings``, built from the ``MXQ_*`` registry (``mxq.settings``).

``Settings.from_env()`` is the engine's view of the registry (the
environment, and in a Django or Flask process their ``MXQ_*`` settings, see
``mxq.settings``); everything else in the engine takes a ``Settings``.  Relay credentials live only here and
in the relay connection: ``RelayConfig``'s repr hides the password, and no
result, log line or task argument ever carries it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

from mxq import settings as registry

from .destinations import DestinationPolicy
from .sources import SourcePools
from .timeouts import Timeouts

TLS_POLICIES = ("none", "opportunistic", "required")
RELAY_MODES = ("fallback", "always", "never")


@dataclass(frozen=True)
class RelayConfig:
    """A smarthost: ``smtp://`` (STARTTLS required, port 587) or ``smtps://`` (implicit TLS, 465)."""

    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> "RelayConfig":
        """Parse ``MXQ_RELAY``; raise ValueError (without echoing the password) when malformed."""
        url = registry.REGISTRY["MXQ_RELAY"].parse(url)      # ConfigError (a ValueError) naming MXQ_RELAY
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        port = parts.port or (465 if implicit else 587)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(host=parts.hostname, port=port, implicit_tls=implicit, username=user, password=password)

    @property
    def name(self) -> str:
        """``host:port``, safe to log."""
        return f"{self.host}:{self.port}"


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """The engine's settings from the registry (``env``: that mapping alone); ValueError naming a bad one."""
        c = registry.load(env)
        relay = RelayConfig.parse(c.raw("MXQ_RELAY")) if c.is_set("MXQ_RELAY") else None
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
                   source_pools=SourcePools(c["MXQ_SOURCE_ADDRESSES"] or ()), **kw)

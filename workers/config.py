"""Engine settings read from ``MXQ_*`` environment variables.

``Settings.from_env()`` is the only place the engine reads the environment;
everything else takes a ``Settings``.  Relay credentials live only here and
in the relay connection: ``RelayConfig``'s repr hides the password, and no
result, log line or task argument ever carries it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

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
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("MXQ_RELAY must look like smtp://user:password@host:587 or smtps://user:password@host:465")
        implicit = parts.scheme == "smtps"
        try:
            port = parts.port or (465 if implicit else 587)
        except ValueError:
            raise ValueError("MXQ_RELAY has an invalid port") from None
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
    """``host[:port],...`` (IPv6 as ``[::1]:5353``) into ``[(host, port), ...]``."""
    servers = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = int(p)
        else:
            host, port = item, 53
        servers.append((host, port))
    return servers


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read every ``MXQ_*`` variable the engine uses; raise ValueError naming a bad one."""
        env = os.environ if env is None else env
        relay = RelayConfig.parse(env["MXQ_RELAY"]) if env.get("MXQ_RELAY") else None
        mode = env.get("MXQ_RELAY_MODE") or ("fallback" if relay else "never")
        if mode not in RELAY_MODES:
            raise ValueError(f"MXQ_RELAY_MODE must be one of {', '.join(RELAY_MODES)}, not {mode!r}")
        if mode == "always" and relay is None:
            raise ValueError("MXQ_RELAY_MODE=always needs MXQ_RELAY")
        tls = env.get("MXQ_TLS", "opportunistic")
        if tls not in TLS_POLICIES:
            raise ValueError(f"MXQ_TLS must be one of {', '.join(TLS_POLICIES)}, not {tls!r}")
        kw = {}
        if env.get("MXQ_HELO_NAME"):
            kw["helo_name"] = env["MXQ_HELO_NAME"]
        if env.get("MXQ_DNS_SERVERS"):
            kw["dns_servers"] = parse_dns_servers(env["MXQ_DNS_SERVERS"])
        for name, attr in (("MXQ_SMTP_PORT", "smtp_port"), ("MXQ_MAX_RECIPIENTS", "max_recipients"),
                           ("MXQ_DNS_MIN_TTL", "dns_min_ttl"), ("MXQ_DNS_MAX_TTL", "dns_max_ttl"),
                           ("MXQ_DNS_NEGATIVE_TTL", "dns_negative_ttl")):
            if env.get(name):
                try:
                    kw[attr] = int(env[name])
                except ValueError:
                    raise ValueError(f"{name} must be an integer, not {env[name]!r}") from None
        return cls(relay=relay, relay_mode=mode, tls=tls, timeouts=Timeouts.from_env(env),
                   redis_url=env.get("MXQ_REDIS_URL") or None, **kw)

"""Every ``MXQ_*`` setting, in one registry: name, type, default, secret or not, and what it does.

This module is the one place mxq reads its configuration.  The engine
(``mxq.workers``), the pipeline (``mxq.tasks``), the ``mxq`` command and the
framework integrations all read settings through it; ``mxq config`` (effective
values and where each came from, like ``postconf -n``), the generated
``.env.example`` and the README's configuration table are made from it
(``python -m mxq.settings --write`` rewrites both files).  It imports nothing of
mxq, Celery or Redis, so the engine can use it.

Where a value comes from, lowest to highest precedence:

1. the registry's default;
2. the process environment (``MXQ_REDIS_URL=...``);
3. the framework's configuration in this process -- Django's settings
   (``settings.MXQ_REDIS_URL``, as soon as Django's settings are configured),
   a Flask application's ``app.config`` (in an app context of an app that
   uses ``mxq.contrib.flask.Mxq``: views, ``flask`` commands, ``with
   app.app_context()``), and ``configure()`` for anything else.

An empty string is the same as unset (so ``MXQ_HELO_NAME=`` in an env file
means "the default").  Framework values may be typed (``MXQ_BATCH_SIZE = 64``,
``MXQ_RETRY_SCHEDULE = [60, 300]``, ``MXQ_ON_COMMIT = True``); ``None`` is unset.

Reading::

    from mxq import settings
    settings.value("MXQ_BATCH_SIZE")          # 64, an int: parsed and checked
    cfg = settings.current()                  # every source of this process, now
    cfg["MXQ_SUBMIT_TIMEOUT"], cfg.origin("MXQ_SUBMIT_TIMEOUT")
    settings.load({"MXQ_TLS": "required"})    # a given mapping alone (tests, tools)

A malformed value raises ``ConfigError`` (a ``ValueError``) whose message
starts with the variable's name, when it is read (a bad webhook setting does
not stop ``mxq deliver``, which never reads it); ``mxq config`` checks them
all.  The ``mxq`` commands exit 78 (EX_CONFIG) on it.

Adding a setting is one ``_define(...)`` call below (name, kind, default,
doc, secret); read it with ``value("MXQ_NEW")``; then ``python -m
mxq.settings --write`` regenerates the README table and ``.env.example``
(``tests/test_settings.py`` fails while they are stale).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Setting", "Kind", "ConfigError", "Config", "REGISTRY", "current", "load", "value",
           "configure", "mask", "env_example", "markdown_table"]


class ConfigError(ValueError):
    """A malformed ``MXQ_*`` value; ``str(e)`` starts with the variable's name, ``e.name`` is it."""

    def __init__(self, name: str, message: str, origin: str | None = None):
        self.name = name
        self.origin = origin
        where = f" (from {origin})" if origin and origin not in ("environment", "default") else ""
        if message.startswith(name):            # an owner's message that names it already
            super().__init__(message + where)
        else:
            super().__init__(f"{name}{where} {message}")


# ---------------------------------------------------------------- kinds (types)
@dataclass(frozen=True)
class Kind:
    """How a setting's text is parsed and shown.

    ``parse(text)`` returns the typed value or raises ValueError with a
    message such as ``"must be an integer, not 'x'"`` (the registry puts the
    variable's name in front); ``show(value)`` spells a typed value as the
    environment would; ``label`` is the type in the docs.
    """

    label: str
    parse: Callable[[str], Any]
    show: Callable[[Any], str] = str


def _bad(what: str, text: str) -> ValueError:
    return ValueError(f"must be {what}, not {text!r}")


def text_kind(label: str = "text") -> Kind:
    """Any non-empty text, taken as it is (surrounding blanks removed)."""
    return Kind(label, lambda t: t.strip())


def integer(minimum: int | None = None, maximum: int | None = None, label: str | None = None) -> Kind:
    """A whole number within ``[minimum, maximum]``."""
    if label is None:
        label = "integer" + (f" >= {minimum}" if minimum is not None and maximum is None else "") \
            + (f" {minimum}..{maximum}" if minimum is not None and maximum is not None else "")

    def parse(t: str) -> int:
        try:
            v = int(t.strip())
        except ValueError:
            raise _bad("a whole number", t) from None
        if minimum is not None and v < minimum:
            raise _bad(f"at least {minimum}", t)
        if maximum is not None and v > maximum:
            raise _bad(f"at most {maximum}", t)
        return v
    return Kind(label, parse)


def seconds(maximum: float | None = None, allow_zero: bool = False) -> Kind:
    """A positive number of seconds (a float), at most ``maximum``."""
    def parse(t: str) -> float:
        try:
            v = float(t.strip())
        except ValueError:
            raise _bad("a number of seconds", t) from None
        if v != v or v in (float("inf"), float("-inf")):
            raise _bad("a finite number of seconds", t)
        if v < 0 or (v == 0 and not allow_zero):
            raise _bad("0 or more seconds" if allow_zero else "a positive number of seconds", t)
        if maximum is not None and v > maximum:
            raise _bad(f"at most {maximum:g} seconds", t)
        return v
    return Kind("seconds", parse, _num)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def choice(*values: str) -> Kind:
    """One of ``values`` (case-insensitive; the canonical spelling is returned)."""
    def parse(t: str) -> str:
        v = t.strip().lower()
        if v not in values:
            raise _bad("one of " + ", ".join(values), t)
        return v
    return Kind(" | ".join(values), parse)


def seconds_list() -> Kind:
    """Comma-separated positive seconds (``60,300,900``), at least one."""
    def parse(t: str) -> tuple[float, ...]:
        try:
            steps = tuple(float(v) for v in t.split(",") if v.strip())
        except ValueError:
            raise _bad("comma-separated seconds", t) from None
        if not steps or any(not s > 0 or s == float("inf") for s in steps):
            raise _bad("comma-separated positive seconds (at least one)", t)
        return steps
    return Kind("seconds, comma-separated", parse, lambda v: ",".join(_num(x) for x in v))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean() -> Kind:
    """``1/true/yes/on`` or ``0/false/no/off``."""
    def parse(t: str) -> bool:
        v = t.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise _bad("1/true/yes/on or 0/false/no/off", t)
    return Kind("boolean", parse, lambda v: "1" if v else "0")


def url(*schemes: str, label: str | None = None) -> Kind:
    """An absolute URL with a host and one of ``schemes`` (a ``+`` suffix matches ``db+postgresql``)."""
    def parse(t: str) -> str:
        v = t.strip()
        try:
            parts = urlsplit(v)
            parts.port
        except ValueError:
            raise ValueError(f"has a bad port or form: {mask_url(v)!r}") from None
        scheme_ok = any(parts.scheme == s or (s.endswith("+") and parts.scheme.startswith(s)) for s in schemes)
        if not scheme_ok or not (parts.hostname or parts.scheme in ("unix", "redis+socket")
                                 or parts.scheme.startswith("db+sqlite")):
            raise ValueError(f"must be a {' or '.join(s.rstrip('+') + '://' for s in schemes)} URL, "
                             f"not {mask_url(v)!r}")
        return v
    return Kind(label or "URL", parse)


def dns_servers() -> Kind:
    """``host[:port],...`` (IPv6 as ``[::1]:5353``) into ``[(host, port), ...]``."""
    def parse(t: str) -> list[tuple[str, int]]:
        servers = []
        for item in (v.strip() for v in t.split(",")):
            if not item:
                continue
            try:
                if item.startswith("["):
                    host, sep, rest = item[1:].partition("]")
                    if not sep or (rest and not rest.startswith(":")):
                        raise ValueError
                    port = int(rest[1:]) if rest else 53
                elif item.count(":") == 1:
                    host, p = item.split(":")
                    port = int(p)
                else:
                    host, port = item, 53
            except ValueError:
                raise _bad("host[:port] or [ipv6]:port, comma-separated", t) from None
            if not host or not 0 < port < 65536:
                raise _bad("host[:port] or [ipv6]:port, comma-separated (ports 1..65535)", t)
            servers.append((host, port))
        if not servers:
            raise _bad("at least one host[:port]", t)
        return servers

    def show(v) -> str:
        return ",".join((f"[{h}]" if ":" in h else h) + (f":{p}" if p != 53 else "") for h, p in v)
    return Kind("host[:port], comma-separated", parse, show)


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Setting:
    """One ``MXQ_*`` setting."""

    name: str
    kind: Kind
    default: Any                 #: the typed default; None when unset means "off" or is computed
    doc: str
    secret: bool = False         #: never shown in full (``mxq config``, logs); URLs lose only their password
    group: str = "engine"        #: engine | pipeline | webhooks | metrics | integrations | operations
    default_text: str | None = None   #: how the default reads when it is computed or unset
    example: str | None = None   #: a sample value for ``.env.example``

    def parse(self, raw, origin: str | None = None):
        """The typed value of ``raw`` (text, or a framework's typed value); ConfigError naming the setting."""
        text = as_text(raw)
        try:
            return self.kind.parse(text)
        except ValueError as e:
            raise ConfigError(self.name, str(e), origin) from None

    def show(self, value) -> str:
        """A typed value as the environment would spell it."""
        return "" if value is None else self.kind.show(value)

    @property
    def default_shown(self) -> str:
        """The default as the docs spell it."""
        if self.default_text is not None:
            return self.default_text
        return self.show(self.default)


REGISTRY: dict[str, Setting] = {}


def _define(name: str, kind: Kind, default, doc: str, **kw) -> Setting:
    if not re.fullmatch(r"MXQ_[A-Z0-9_]+", name) or name in REGISTRY:
        raise AssertionError(f"bad or duplicate setting name {name}")
    s = REGISTRY[name] = Setting(name, kind, default, " ".join(doc.split()), **kw)
    return s


# -- the engine (mxq.workers): mxq deliver and the workers' SMTP client
_define("MXQ_HELO_NAME", text_kind("host name"), None,
        "The name mxq gives in EHLO/HELO and in Message-IDs of its reports; receivers check it "
        "against the sending IP's reverse DNS, so set it to that name.",
        default_text="this host's FQDN", example="mail.example.com")
_define("MXQ_DNS_SERVERS", dns_servers(), None,
        "DNS servers for MX/A/AAAA lookups.", default_text="the system resolver's", example="127.0.0.53")
_define("MXQ_SMTP_PORT", integer(1, 65535), 25, "Port of the exchanges (tests only: MX delivery is port 25).")
_define("MXQ_MAX_RECIPIENTS", integer(1), 100,
        "Most recipients per SMTP transaction (RFC 5321 requires servers to take 100).")
_define("MXQ_TLS", choice("none", "opportunistic", "required"), "opportunistic",
        "TLS to exchanges: none, opportunistic (STARTTLS when offered, certificate not checked) or "
        "required (STARTTLS with a verified certificate).")


def _relay_url(t: str) -> str:
    v = t.strip()
    try:
        parts = urlsplit(v)
        parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("must look like smtp://[user:password@]host[:port][?tls=required|opportunistic|none] "
                         "or smtps://[user:password@]host[:port]")
    return v


def _networks(t: str) -> str:
    import ipaddress
    for item in (v.strip() for v in t.split(",")):
        if item:
            try:
                ipaddress.ip_network(item.strip("[]"), strict=False)
            except ValueError:
                raise _bad("IP addresses or networks (a.b.c.d[/n], ipv6[/n]), comma-separated", t) from None
    return t.strip()


_define("MXQ_RELAY", Kind("smtp[s]://[user:password@]host[:port][?tls=...]", _relay_url), None,
        "A smarthost: smtp:// (port 587; ?tls=required, the default: verified STARTTLS; ?tls=opportunistic; "
        "?tls=none, only to addresses named by IP or in MXQ_RELAY_CLEARTEXT) or smtps:// (implicit TLS, "
        "port 465); credentials in the URL (percent-encoded), AUTH only when given and offered.",
        secret=True, default_text="none", example="smtp://user:password@smtp.example.com:587")
_define("MXQ_RELAY_CLEARTEXT", Kind("addresses/networks, comma-separated", _networks), None,
        "Addresses where the relay may be used without TLS (?tls=none) and credentials may go in clear "
        "text.", default_text="none", example="10.0.0.0/8")
_define("MXQ_RELAY_TOKEN_FILE", text_kind("path"), None,
        "XOAUTH2 at the relay (smtp://user@host, no password): a file holding the OAuth 2.0 access "
        "token, read again whenever it changes.", default_text="none", example="/run/secrets/relay-token")
_define("MXQ_RELAY_TOKEN_COMMAND", text_kind("shell command"), None,
        "XOAUTH2 at the relay: a command printing the access token (or JSON with access_token and "
        "expires_in); run again when the token expires or is refused.", secret=True, default_text="none",
        example="gcloud auth print-access-token")
_define("MXQ_RELAY_MODE", choice("fallback", "always", "never"), None,
        "When the relay is used: fallback (for recipients still pending after every exchange), always "
        "(no MX lookup), never.",
        default_text="fallback with MXQ_RELAY, else never")
_define("MXQ_PORT25_PROBE_INTERVAL", seconds(), 300.0,
        "While outbound port 25 is concluded blocked (mail goes straight to the relay), seconds between "
        "direct connect probes, one for the whole fleet.")
_define("MXQ_MTA_STS", boolean(), True,
        "Apply recipient domains' MTA-STS policies (RFC 8461): in enforce mode only MX hosts the policy "
        "lists, with verified TLS.")
_define("MXQ_MTA_STS_TIMEOUT", seconds(maximum=120), 10.0,
        "Seconds for one MTA-STS policy fetch over HTTPS (connect, TLS, response).")
_define("MXQ_CONNECT_TIMEOUT", seconds(), 30.0, "TCP connect (and implicit TLS handshake) timeout.")
_define("MXQ_CONNECTION_CACHE_TIME", seconds(allow_zero=True), 2.0,
        "A worker keeps an idle connection this long for the next delivery to that exchange (Postfix's "
        "smtp_connection_cache_time_limit; 0: no reuse across deliveries).")
_define("MXQ_CONNECTION_REUSE_TIME", seconds(), 300.0,
        "A connection is not reused for a new transaction this long after it was opened (Postfix's "
        "smtp_connection_reuse_time_limit).")
_define("MXQ_CONNECTION_REUSE_LIMIT", integer(0), 100,
        "Transactions one connection carries at most, then a new one is opened (0: no limit).")
_define("MXQ_COMMAND_TIMEOUT", seconds(), None,
        "One timeout for every SMTP phase (greeting, commands, DATA, final dot); each is a deadline for "
        "the whole phase, however the server spreads its bytes.",
        default_text="RFC 5321's per phase (300, DATA 120, final dot 600)")
def _destinations(t: str) -> str:
    v = t.strip()
    if v.lower() in ("0", "no", "false", "off", "none", "1", "yes", "true", "all", "on"):
        return v.lower()
    import ipaddress
    for item in (x.strip() for x in v.split(",")):
        if not item:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"must be 0, 1/all, or a comma list of networks (10.20.0.0/16,fd00::/8); "
                             f"{item!r} is not a network") from None
    return v


_define("MXQ_ALLOW_PRIVATE_DESTINATIONS", Kind("0 | 1/all | networks", _destinations), None,
        "By default mxq never connects to loopback, private, link-local, multicast, unspecified or other "
        "non-public addresses, whatever DNS or an address literal says (a domain left with no allowed "
        "address bounces, 5.4.4); 1 or all allows every address (the sandbox, tests), a comma list of "
        "networks allows those.  The relay is never subject to it.",
        default_text="public addresses only", example="10.20.0.0/16")
_POOL = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*):(?:\s+|$)")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def parse_source_addresses(t: str) -> tuple:
    """``MXQ_SOURCE_ADDRESSES`` into ``((pool, ((ip, helo or None), ...)), ...)``; ValueError with the reason.

    Pools are separated by ``;``; a pool after the first starts with ``NAME:``
    and a blank (the first may too; without a name it is ``default``); a pool
    lists ``IP[=HELO]`` entries separated by commas.  IPv4 and IPv6 entries
    may be mixed: each connection uses an entry of the destination's family.
    """
    import ipaddress

    pools: list = []
    seen: set = set()
    for n, group in enumerate(g.strip() for g in t.split(";")):
        if not group:
            continue
        m = _POOL.match(group)
        if m:
            name, group = m.group(1), group[m.end():]
        elif n == 0:
            name = "default"
        else:
            raise ValueError(f"pool {n + 1} ({group!r}) must start with its name: 'NAME: IP[=HELO], ...'")
        if name in seen:
            raise ValueError(f"pool {name!r} is defined twice")
        seen.add(name)
        entries = []
        for item in (x.strip() for x in group.split(",")):
            if not item:
                continue
            ip_text, eq, helo = item.partition("=")
            ip_text, helo = ip_text.strip().strip("[]"), helo.strip()
            try:
                ip = ipaddress.ip_address(ip_text)
            except ValueError:
                raise ValueError(f"{ip_text!r} (pool {name}) is not an IP address") from None
            if ip.is_unspecified or ip.is_multicast:
                raise ValueError(f"{ip_text!r} (pool {name}) cannot be a source address")
            if eq and not _HOSTNAME.fullmatch(helo):
                raise ValueError(f"{helo!r} (pool {name}) is not a host name for EHLO")
            entries.append((str(ip), helo or None))
        if not entries:
            raise ValueError(f"pool {name!r} has no address")
        pools.append((name, tuple(entries)))
    if not pools:
        raise ValueError("lists no address")
    return tuple(pools)


def _show_source_addresses(v) -> str:
    return "; ".join(f"{name}: " + ", ".join(ip + (f"={helo}" if helo else "") for ip, helo in entries)
                     for name, entries in v)


_define("MXQ_SOURCE_ADDRESSES", Kind("IP[=HELO],... [; NAME: IP[=HELO],...]", parse_source_addresses,
                                     _show_source_addresses), None,
        "Local addresses to send from, each with the name to give in EHLO for it (its reverse DNS): "
        "IPv4 and IPv6 mixed, a connection uses one of the destination's family (in turn).  Named pools "
        "after ';' (\"bulk: 192.0.2.20=b1.example.com, 192.0.2.21=b2.example.com\") are chosen per domain "
        "in MXQ_SHAPING (gmail.com=5c,pool=bulk).", default_text="the system's choice, MXQ_HELO_NAME",
        example="192.0.2.10=mx1.example.com, 2001:db8::10=mx1.example.com")
_define("MXQ_DNS_TIMEOUT", seconds(), 20.0,
        "Deadline for the whole DNS phase of one delivery attempt (the MX and address lookups together).")
_define("MXQ_MX_ADDRESS_LIMIT", integer(0), 5,
        "Exchange addresses tried per delivery attempt; 0: no limit (Postfix's smtp_mx_address_limit).")
_define("MXQ_MX_SESSION_LIMIT", integer(0), 2,
        "SMTP sessions (connections that got through TCP) per delivery attempt before the exchanges are "
        "given up or the fallback relay is tried; 0: no limit (Postfix's smtp_mx_session_limit).")
_define("MXQ_DNS_MIN_TTL", integer(0), 60, "Shortest time a DNS answer is cached (seconds).")
_define("MXQ_DNS_MAX_TTL", integer(1), 3600, "Longest time a DNS answer is cached (seconds).")
_define("MXQ_DNS_NEGATIVE_TTL", integer(0), 300, "How long NXDOMAIN / no-data answers are cached (seconds).")
_define("MXQ_MAX_MESSAGE_SIZE", integer(1), 36700160,
        "Largest message accepted, in octets (35 MiB); larger ones are refused as bad input.")
_define("MXQ_DKIM", text_kind("path"), None,
        "A JSON file mapping signing domains to DKIM keys ({domain: {selector, key, algorithm}}); "
        "messages submitted to the pipeline are signed once at intake.", default_text="no signing",
        example="/etc/mxq/dkim.json")

# -- the pipeline (mxq.tasks): queue manager, Celery, Redis
_define("MXQ_REDIS_URL", url("redis", "rediss", "unix"), "redis://127.0.0.1:6379/0",
        "Redis: Celery's broker, mxq's state and (unless MXQ_RESULT_BACKEND) the result backend; for the "
        "engine alone, the shared DNS cache and exchange status when set.",
        secret=True, group="pipeline")
def _result_backend(t: str) -> str:
    v = t.strip()
    if v.lower() in ("none", "django-db", "django-cache"):
        return v.lower()
    return url("redis", "rediss", "db+", "unix").parse(v)


_define("MXQ_RESULT_BACKEND", Kind("Celery result backend URL | django-db | none", _result_backend), None,
        "Where each finished job's outcome is stored, under its job id, for AsyncResult(job_id).get(): "
        "redis://..., db+postgresql+psycopg://... (Celery's SQLAlchemy backend), django-db "
        "(django-celery-results; the worker needs DJANGO_SETTINGS_MODULE), or none.", secret=True,
        group="pipeline", default_text="MXQ_REDIS_URL")
_define("MXQ_SUBMIT_TIMEOUT", seconds(maximum=300), 2.0,
        "A submission fails (Redis unreachable) within this many seconds instead of waiting for Redis.",
        group="pipeline")
_define("MXQ_RECIPIENT_LIMIT", integer(1), 10000,
        "Most recipients of one submitted message; a message with more is refused at submission "
        "(InvalidMessage), as Postfix's smtpd_recipient_limit.", group="pipeline")
_define("MXQ_RETRY_SCHEDULE", seconds_list(), (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
        "Seconds between delivery attempts of deferred mail; the last step repeats.", group="pipeline")
_define("MXQ_MAX_LIFETIME", seconds(), 432000.0,
        "A recipient still deferred this long after submission expires (bounces).", group="pipeline")
_define("MXQ_RESULT_TTL", integer(1), 604800,
        "How long a finished job's state, content and stored outcome are kept (seconds).", group="pipeline")
_define("MXQ_LEASE_SECONDS", seconds(), 45.0,
        "Lease on work in flight; a dead worker's mail is retried this long after it died.", group="pipeline")
_define("MXQ_DISPATCH_STALE", seconds(), 60.0,
        "A lane with ready work and no task activity this long gets new tasks.", group="pipeline")
_define("MXQ_BATCH_SIZE", integer(1), 64,
        "Most messages of one domain a delivery task takes at a time over its connection (it takes fewer "
        "from a slow destination: about half a second of work).", group="pipeline")
_define("MXQ_DOMAIN_CONCURRENCY", integer(1), 4,
        "Delivery status report tasks queued at once (delivery to a domain follows its concurrency window).",
        group="pipeline")
_define("MXQ_INITIAL_CONCURRENCY", integer(1), 5,
        "Connections a destination starts with; one more per delivered message, up to its MXQ_SHAPING limit, "
        "one fewer per failed connection (Postfix's initial_destination_concurrency).", group="pipeline")
_define("MXQ_FAILED_COHORT_LIMIT", integer(1), 1,
        "Failed cohorts (a window's worth of failed connections in a row) that declare a destination dead: "
        "its mail waits deferred, one probe at a time retries it (Postfix's "
        "default_destination_concurrency_failed_cohort_limit).", group="pipeline")
_define("MXQ_INTAKE_THRESHOLD", integer(1), 20000,
        "submit_many batches larger than this are split by domain on the workers (mxq.intake tasks); "
        "smaller ones by the script that stores them.", group="pipeline")
_define("MXQ_TASK_SOFT_LIMIT", seconds(), 900.0, "Soft time limit of a task (seconds).", group="pipeline")
_define("MXQ_TASK_HARD_LIMIT", seconds(), 960.0,
        "Hard time limit of a task (its process is killed); larger than MXQ_TASK_SOFT_LIMIT.", group="pipeline")
_define("MXQ_SHAPING", text_kind("rules or a path"), None,
        "Per-domain limits shared by every worker: concurrency Nc, rate R/s, R/m or R/h, burst=N; "
        "rules (\"default=20c; gmail.com=5c,50/s\") or the path of a file of them.", group="pipeline",
        default_text="default=20c", example="default=20c; gmail.com=5c,50/s")
_define("MXQ_SUPPRESS_TTL", integer(0), 2592000,
        "A recipient refused permanently (5.1.x) is suppressed this long (seconds; 0: never automatically).",
        group="pipeline")
_define("MXQ_BEAT_SCHEDULE", text_kind("path"), None,
        "mxq scheduler touches this file after every tick (health checks read its age).", group="pipeline", default_text="mxq-celerybeat-schedule in the temp dir")
_define("MXQ_LOG_LEVEL", choice("debug", "info", "warning", "error"), "info",
        "Log level of mxq worker and mxq scheduler (info shows one line per delivery attempt).",
        group="pipeline")

_define("MXQ_TLSRPT_ORG", text_kind("name"), None,
        "organization-name in the TLS-RPT reports mxq tlsrpt prints.", group="pipeline",
        default_text="MXQ_HELO_NAME", example="Example Inc")
_define("MXQ_TLSRPT_CONTACT", text_kind("address"), None,
        "contact-info in the TLS-RPT reports mxq tlsrpt prints.", group="pipeline",
        default_text="postmaster@ the HELO name", example="tlsrpt@example.com")

# -- webhooks (mxq.tasks.webhooks)
_define("MXQ_WEBHOOK_URL", url("http", "https"), None,
        "Every final recipient outcome is POSTed there as JSON.", secret=True, group="webhooks",
        default_text="off", example="https://app.example.com/mxq/events/")
_define("MXQ_WEBHOOK_SECRET", text_kind("secret"), None,
        "HMAC-SHA256 key signing webhook requests (X-Mxq-Signature); without it they are not signed.",
        secret=True, group="webhooks", default_text="unsigned")
_define("MXQ_WEBHOOK_EVENTS", text_kind("final | all | states"), "final",
        "final (delivered, bounced, expired, suppressed, dropped), all (also deferred), or a comma list "
        "of states.", group="webhooks")
_define("MXQ_WEBHOOK_TIMEOUT", seconds(maximum=60), 5.0, "Seconds per network operation of one POST.",
        group="webhooks")
_define("MXQ_WEBHOOK_RETRY_SCHEDULE", seconds_list(), (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0),
        "Seconds between tries of a failed event; the last step repeats.", group="webhooks")
_define("MXQ_WEBHOOK_MAX_AGE", seconds(), 86400.0,
        "An event still failing this long after it happened is dropped.", group="webhooks")
_define("MXQ_WEBHOOK_CONCURRENCY", integer(1), 1, "Tasks POSTing events at once, across all workers.",
        group="webhooks")

# -- metrics (mxq.tasks.metrics)
_define("MXQ_METRICS_PORT", text_kind("port | port+ | port+N | 0"), None,
        "Prometheus /metrics port: 9808, 9808+ (the first free port from 9808), 9808+N, or 0/auto.",
        group="metrics", default_text="off", example="9808+")
_define("MXQ_METRICS_ADDR", text_kind("address"), "0.0.0.0", "Address /metrics listens on.", group="metrics")

# -- framework integrations (mxq.contrib)
_define("MXQ_ON_COMMIT", boolean(), False,
        "Django: submit mail when the surrounding database transaction commits (nothing is sent for a "
        "rolled-back one).", group="integrations")


# ---------------------------------------------------------------- values and sources
def as_text(raw) -> str:
    """A framework's typed value as the environment would spell it (lists become comma lists)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return "1" if raw else "0"
    if isinstance(raw, (list, tuple)):
        if raw and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in raw):   # [(host, port), ...]
            return ",".join(f"{h}:{p}" for h, p in raw)
        return ",".join(str(v) for v in raw)
    if isinstance(raw, os.PathLike):
        return os.fspath(raw)
    return str(raw)


_UNSET = object()


class Config(Mapping):
    """Settings resolved from layers of sources (lowest first), parsed when read.

    ``cfg["MXQ_X"]`` is the typed value (the default when unset);
    ``cfg.origin("MXQ_X")`` says where it came from (``default``,
    ``environment``, ``Django settings``, ``Flask app.config``, ...);
    ``cfg.raw("MXQ_X")`` is the text as set (None when unset).
    """

    def __init__(self, layers: list[tuple[str, Mapping[str, Any]]]):
        self._raw: dict[str, tuple[Any, str]] = {}
        self.unknown: dict[str, str] = {}          #: MXQ_* names not in the registry -> their origin
        for origin, source in layers:
            for k, v in source.items():
                if not isinstance(k, str) or not k.startswith("MXQ_") or v is None:
                    continue
                if isinstance(v, str) and not v.strip():
                    self._raw.pop(k, None)          # empty: unset (a higher layer may clear a lower one)
                    continue
                if k in REGISTRY:
                    self._raw[k] = (v, origin)
                else:
                    self.unknown[k] = origin
        self._parsed: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str):
        try:
            return self._parsed[name]
        except KeyError:
            pass
        setting = REGISTRY[name]                    # KeyError: not a setting (a programming error)
        found = self._raw.get(name)
        v = setting.default if found is None else setting.parse(found[0], found[1])
        with self._lock:
            self._parsed[name] = v
        return v

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)

    def get(self, name: str, default=None):
        """The typed value (raising ConfigError when malformed), as ``cfg[name]``."""
        return self[name] if name in REGISTRY else default

    def is_set(self, name: str) -> bool:
        """True when a source set ``name`` (to a non-empty value)."""
        return name in self._raw

    def raw(self, name: str) -> str | None:
        """The value's text as set (None when unset)."""
        found = self._raw.get(name)
        return None if found is None else as_text(found[0])

    def origin(self, name: str) -> str:
        """Where the value comes from: ``default``, ``environment`` or a framework's configuration."""
        found = self._raw.get(name)
        return "default" if found is None else found[1]

    def errors(self) -> list[ConfigError]:
        """Every malformed value (each setting parsed)."""
        out = []
        for name in REGISTRY:
            try:
                self[name]
            except ConfigError as e:
                out.append(e)
        return out

    def shown(self, name: str) -> str:
        """The value for people: as set (or the default), secrets masked."""
        s = REGISTRY[name]
        text = self.raw(name)
        if text is None:
            return s.default_shown
        return mask(s, text)

    def env(self) -> dict[str, str]:
        """The settings that are set, as environment variables (for a child process)."""
        return {name: as_text(v) for name, (v, _) in self._raw.items()}


def mask_url(text: str) -> str:
    """``text`` with a URL's password (and any query string) replaced by ``***``."""
    try:
        p = urlsplit(text)
        netloc = p.netloc
        if p.password is not None:
            user = p.username or ""
            host = netloc.rsplit("@", 1)[1]
            netloc = f"{user}:***@{host}"
        return urlunsplit((p.scheme, netloc, p.path, "***" if p.query else "", ""))
    except ValueError:
        return "***"


def mask(setting: Setting | str, text: str) -> str:
    """A value as it may be shown: a secret URL keeps all but its password, other secrets become ``***``."""
    s = REGISTRY[setting] if isinstance(setting, str) else setting
    if not s.secret:
        return text
    if "://" in text:
        return mask_url(text)
    return "***"


# -- the process's sources
_lock = threading.Lock()
_configured: dict[str, Any] = {}       # configure()
_cache: dict = {}


def configure(values: Mapping[str, Any] | None = None, **kw) -> None:
    """Set ``MXQ_*`` values for this process, over the environment and frameworks (None unsets one).

    For programs that are neither Django nor Flask: ``configure(MXQ_REDIS_URL="redis://...")``.
    """
    items = dict(values or {}, **kw)
    for k in items:
        if k not in REGISTRY:
            raise KeyError(f"{k} is not an mxq setting (see mxq config --all)")
    with _lock:
        for k, v in items.items():
            if v is None:
                _configured.pop(k, None)
            else:
                REGISTRY[k].parse(v, "configure()")       # refuse a bad value now, naming it
                _configured[k] = v


def _django_layer() -> tuple[str, dict] | None:
    """Django's ``MXQ_*`` settings, when Django is imported and its settings configured."""
    conf = sys.modules.get("django.conf")
    if conf is None:
        return None
    try:
        s = conf.settings
        if not s.configured:
            return None
        wrapped = s._wrapped
        key = (id(wrapped), _django_generation[0])
        hit = _django_cache.get("layer")
        if hit is not None and hit[0] == key:
            return hit[1]
        layer = ("Django settings", {k: getattr(s, k) for k in dir(s) if k.startswith("MXQ_")})
        _watch_django_changes()
        _django_cache["layer"] = (key, layer)
        return layer
    except Exception:               # ImproperlyConfigured and friends: not a Django process after all
        return None


_django_cache: dict = {}
_django_generation = [0]
_django_watching = [False]


def _watch_django_changes() -> None:
    """Forget the cached Django layer when a setting changes (``override_settings`` in tests)."""
    if _django_watching[0]:
        return
    try:
        from django.core.signals import setting_changed
    except ImportError:
        return

    def changed(setting=None, **_):
        if isinstance(setting, str) and setting.startswith("MXQ_"):
            _django_generation[0] += 1
    setting_changed.connect(changed, weak=False, dispatch_uid="mxq.settings")
    _django_watching[0] = True


def _flask_layer() -> tuple[str, Mapping] | None:
    """The current Flask app's config, when there is an app context and the app uses ``Mxq``
    (as Flask extensions do: outside an app context no app is current)."""
    if "flask" not in sys.modules:
        return None
    try:
        from flask import current_app, has_app_context
        if not (has_app_context() and "mxq" in current_app.extensions):
            return None
        app = current_app._get_current_object()
    except Exception:
        return None
    return ("Flask app.config", {k: v for k, v in app.config.items() if isinstance(k, str) and k.startswith("MXQ_")})


def _layers(env: Mapping[str, str]) -> list[tuple[str, Mapping[str, Any]]]:
    layers: list[tuple[str, Mapping[str, Any]]] = [("environment", env)]
    for layer in (_django_layer(), _flask_layer()):
        if layer is not None:
            layers.append(layer)
    if _configured:
        layers.append(("configure()", dict(_configured)))
    return layers


def _stamp(layers) -> tuple:
    out = []
    for origin, source in layers:
        items = []
        for k, v in source.items():
            if isinstance(k, str) and k.startswith("MXQ_"):
                try:
                    hash(v)
                    items.append((k, v))
                except TypeError:
                    items.append((k, repr(v)))
        out.append((origin, tuple(sorted(items, key=lambda kv: kv[0]))))
    return tuple(out)


def _mxq_environ() -> dict[str, str]:
    """The environment's ``MXQ_*`` variables, as ``os.environ`` has them now.

    On POSIX ``os.environ`` keeps bytes and decodes every key and value it
    iterates: 22 us for 39 variables, paid on every ``current()`` (several
    per delivered chunk in a worker).  Matching the prefix on its bytes and
    decoding only the matches (as ``os.environ`` decodes: ``os.fsdecode``)
    takes 2 us.
    """
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        return {os.fsdecode(k): os.fsdecode(v) for k, v in data.items() if k[:4] == b"MXQ_"}
    return {k: v for k, v in os.environ.items() if k.startswith("MXQ_")}


def current() -> Config:
    """This process's settings now: the environment, Django settings, Flask config, ``configure()``.

    Cached until any source changes (each call compares the sources' ``MXQ_*`` values).
    """
    env = _mxq_environ()
    layers = _layers(env)
    stamp = _stamp(layers)
    hit = _cache.get("config")
    if hit is not None and hit[0] == stamp:
        return hit[1]
    cfg = Config(layers)
    _cache["config"] = (stamp, cfg)
    return cfg


def load(env: Mapping[str, Any] | None = None) -> Config:
    """``current()``; or, given a mapping, the settings of that mapping alone (an explicit environment)."""
    if env is None or env is os.environ:
        return current()
    return Config([("environment", env)])


def value(name: str, env: Mapping[str, Any] | None = None):
    """One setting's typed value (``load(env)[name]``); ConfigError when malformed."""
    return load(env)[name]


# ---------------------------------------------------------------- generated documentation
GROUP_TITLES = {
    "engine": "Engine (mxq deliver and the workers' SMTP client)",
    "pipeline": "Pipeline (queue, Celery, Redis)",
    "webhooks": "Webhooks",
    "metrics": "Metrics",
    "integrations": "Django and Flask",
}


def markdown_table() -> str:
    """The README's configuration table (one row per setting, in registry order)."""
    rows = ["| variable | default | type | meaning |", "|---|---|---|---|"]
    for s in REGISTRY.values():
        secret = " *(secret: masked in `mxq config`)*" if s.secret else ""
        default = s.default_shown
        default = f"`{default}`" if s.default is not None and s.default_text is None else default
        cells = (f"`{s.name}`", default, s.kind.label, s.doc + secret)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def env_example() -> str:
    """The ``.env.example`` text: every setting, commented out at its default, grouped."""
    out = ["# mxq settings for docker-compose (env_file: .env).  Generated from mxq/settings.py by",
           "# `python -m mxq.settings --write`; `mxq config` shows the effective values and their origin.",
           "# Copy to .env and uncomment what you change.  Empty means the default.",
           "#",
           "# Required by docker-compose.yml (it refuses to start without them):",
           "MXQ_HELO_NAME=",
           "FLOWER_BASIC_AUTH=",
           "REDIS_PASSWORD=",
           "",
           "# ---- docker-compose.yml only",
           "# The DKIM key directory on the host, mounted read-only at /etc/mxq/dkim",
           "# (then MXQ_DKIM=/etc/mxq/dkim/keys.json):",
           "#MXQ_DKIM_KEYS=./dkim",
           "# The image's base (a build argument) and names:",
           "#MXQ_BASE_IMAGE=python:3.11-slim",
           "#MXQ_IMAGE=mxq:latest",
           "#MXQ_REDIS_IMAGE=redis:7-alpine",
           "# Flower on the host: 127.0.0.1:5555 unless these say otherwise:",
           "#FLOWER_BIND=127.0.0.1",
           "#FLOWER_PORT=5555",
           ""]
    for group, title in GROUP_TITLES.items():
        out.append(f"# ---- {title}")
        for s in REGISTRY.values():
            if s.group != group or s.name == "MXQ_HELO_NAME":
                continue
            head = f"# {s.name} (default: {s.default_shown}): "
            lines = _wrap(head + s.doc, 96)
            out.append(lines[0])
            out.extend("#   " + line for line in lines[1:])
            shown = s.example if s.example is not None else (s.show(s.default) if s.default is not None else "")
            out.append(f"#{s.name}={shown}")
        out.append("")
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


README_BEGIN = "<!-- settings table: generated by `python -m mxq.settings --write` -->"
README_END = "<!-- end of settings table -->"


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the table markers replaced by ``markdown_table()``."""
    start, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    return readme[:start] + "\n" + markdown_table() + readme[end:]


def _main(argv: list[str]) -> int:
    """``python -m mxq.settings [--markdown | --env-example | --json | --write [ROOT]]``."""
    import pathlib
    if argv[:1] == ["--markdown"]:
        sys.stdout.write(markdown_table())
    elif argv[:1] == ["--env-example"]:
        sys.stdout.write(env_example())
    elif argv[:1] == ["--json"]:
        sys.stdout.write(json.dumps([{"name": s.name, "type": s.kind.label, "default": s.default_shown,
                                      "secret": s.secret, "group": s.group, "doc": s.doc}
                                     for s in REGISTRY.values()], indent=1) + "\n")
    elif argv[:1] == ["--write"]:
        root = pathlib.Path(argv[1] if len(argv) > 1 else pathlib.Path(__file__).resolve().parents[1])
        (root / ".env.example").write_text(env_example())
        readme = root / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
        print(f"wrote {root / '.env.example'} and the table in {readme}")
    else:
        print("usage: python -m mxq.settings --markdown | --env-example | --json | --write [ROOT]", file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""Event webhooks: a signed JSON POST to ``MXQ_WEBHOOK_URL`` for every recipient outcome.

What is sent
------------

One POST per event, ``Content-Type: application/json``, body::

    {"id": "<event id, 32 hex>", "job": "<job id>", "recipient": "bob@example.test",
     "domain": "example.test", "state": "delivered", "code": 250, "enhanced": "2.0.0",
     "text": "Ok: queued as 4FD2", "exchange": "mx1.example.test", "ip": "192.0.2.1",
     "relay": false, "attempts": 1, "next_attempt": null, "timestamp": 1767225600.25}

``state`` is the recipient's new state: ``delivered``, ``bounced``,
``expired``, ``suppressed`` (refused at submission, ``mxq.tasks.suppress``),
``dropped`` (``mxq queue drop``), and ``deferred`` when
``MXQ_WEBHOOK_EVENTS=all`` (``next_attempt`` then says when).  ``timestamp``
is when the outcome was recorded (epoch seconds).  No content, no sender, no
credential is ever in an event.  An event may arrive more than once (a POST
whose answer was lost is sent again): deduplicate on ``id``.

Signature (``MXQ_WEBHOOK_SECRET``)
----------------------------------

Each POST carries ``X-Mxq-Timestamp: <unix seconds when this POST was
made>``, ``X-Mxq-Event: <id>`` and, when a secret is set,
``X-Mxq-Signature: sha256=<hex>`` where ``<hex>`` is
``HMAC-SHA256(secret, timestamp + "." + raw body)``.  A receiver recomputes
it over the raw body bytes, compares in constant time, and refuses a
timestamp more than a few minutes off its clock, so a captured request
cannot be replayed later (``verify()`` does all three).  A retry is signed
again with a fresh timestamp; the body is the same.

Delivery, never blocking mail
-----------------------------

Events are enqueued in Redis by the same atomic script that records the
outcome (``mxq.tasks.store``: the release script for deliveries, the submit
script for suppressed recipients, the drop script for dropped ones): a hash
``mxq:hook:{id}`` (``b`` the body, ``n`` failed POSTs so far) and a work item
``!w|{id}`` on the webhook lane ``mxq:ready:!w``.  The ``mxq.webhook`` task
(``notifications`` queue) claims up to ``BATCH`` items under a lease, POSTs
them one by one with a bounded timeout, deletes each one the endpoint
answered 2xx, and sends the others to the deferred queue
(``mxq:deferred``) at the next step of ``MXQ_WEBHOOK_RETRY_SCHEDULE``; the
scheduler brings them back -- no countdown or ETA tasks.  An event older
than ``MXQ_WEBHOOK_MAX_AGE`` that still fails is dropped with a warning in
the worker's log.  Redirects are not followed and proxy variables are
ignored; https URLs are verified against the system CA store
(``SSL_CERT_FILE`` to override).

A slow or hanging endpoint must not take the workers' processes away from
delivery, so, across all workers:

- at most ``MXQ_WEBHOOK_CONCURRENCY`` tasks POST at once (sender slots in
  the zset ``mxq:webhook:senders``, token -> expiry, renewed by the task's
  heartbeat); a task that finds no free slot puts its events back (due in a
  second) and ends at once;
- when the endpoint cannot be reached at all (refused, timeout), the rest of
  the batch is deferred untried and ``mxq:webhook:down`` (``SET PX``) holds
  every sender off for that event's back-off step: a hanging endpoint costs
  one timeout per retry step, not one per event.

For high event rates, raise ``MXQ_WEBHOOK_CONCURRENCY`` and run the
``mxq.notifications`` queue on workers of its own (``mxq worker -Q mxq.notifications``).

Which process decides: the one that records the outcome (the worker for
deliveries; the producer for ``suppressed``; ``mxq queue drop`` for
``dropped``) enqueues events when ``MXQ_WEBHOOK_URL`` is set in its
environment; the worker running ``mxq.webhook`` sends them with its own
``MXQ_WEBHOOK_URL`` and ``MXQ_WEBHOOK_SECRET``.  Give them all the same values.

| variable | default | meaning |
|---|---|---|
| ``MXQ_WEBHOOK_URL`` | unset (off) | ``http://`` or ``https://`` URL events are POSTed to |
| ``MXQ_WEBHOOK_SECRET`` | unset | HMAC-SHA256 key; without it requests are not signed |
| ``MXQ_WEBHOOK_EVENTS`` | ``final`` | ``final`` (delivered, bounced, expired, suppressed, dropped), ``all`` (also deferred), or a comma list of states |
| ``MXQ_WEBHOOK_TIMEOUT`` | 5 | seconds, per network operation of one POST (at most 60) |
| ``MXQ_WEBHOOK_RETRY_SCHEDULE`` | ``10,30,60,300,900,1800,3600`` | seconds between tries of a failed event; the last repeats |
| ``MXQ_WEBHOOK_MAX_AGE`` | 86400 | an event still failing this long after it happened is dropped |
| ``MXQ_WEBHOOK_CONCURRENCY`` | 1 | tasks POSTing at once, across all workers |
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Mapping

from mxq import settings as registry
from mxq.workers.reply import printable

from .store.items import WEBHOOK_LANE as STORE_WEBHOOK_LANE
from .store.keys import HOOK_PREFIX as STORE_HOOK_PREFIX

log = logging.getLogger("mxq.webhooks")

QUEUE = "mxq.notifications"
WEBHOOK_LANE = STORE_WEBHOOK_LANE
HOOK_PREFIX = STORE_HOOK_PREFIX
FINAL_EVENTS = ("delivered", "bounced", "expired", "suppressed", "dropped")
ALL_EVENTS = FINAL_EVENTS + ("deferred",)
DEFAULT_RETRY_SCHEDULE = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
BATCH = 50                      #: events one ``mxq.webhook`` task claims
MAX_TIMEOUT = 60.0
SIGNATURE_HEADER = "X-Mxq-Signature"
TIMESTAMP_HEADER = "X-Mxq-Timestamp"
EVENT_HEADER = "X-Mxq-Event"
ENV_NAMES = ("MXQ_WEBHOOK_URL", "MXQ_WEBHOOK_SECRET", "MXQ_WEBHOOK_EVENTS", "MXQ_WEBHOOK_TIMEOUT",
             "MXQ_WEBHOOK_RETRY_SCHEDULE", "MXQ_WEBHOOK_MAX_AGE", "MXQ_WEBHOOK_CONCURRENCY")


def parse_events(value: str | None) -> frozenset[str]:
    """``final`` / ``all`` / a comma list of states into the set of states that make events."""
    v = (value or "final").strip().lower()
    if v == "final":
        return frozenset(FINAL_EVENTS)
    if v == "all":
        return frozenset(ALL_EVENTS)
    states = {s.strip() for s in v.split(",") if s.strip()}
    unknown = states - set(ALL_EVENTS)
    if not states or unknown:
        raise ValueError(f"MXQ_WEBHOOK_EVENTS must be final, all or a comma list of {', '.join(ALL_EVENTS)}, "
                         f"not {value!r}")
    return frozenset(states)


def check_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL with a host; ValueError otherwise (no secret in the message)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MXQ_WEBHOOK_URL must be an http:// or https:// URL with a host, not {redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"MXQ_WEBHOOK_URL has a bad port: {redact(url)!r}") from None
    return url


def redact(url: str) -> str:
    """``url`` with any user:password part replaced by ``***`` (for messages and logs)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class WebhookConfig:
    """The webhook settings (module docstring); ``enabled`` when a URL is set."""

    url: str = ""
    secret: str = field(default="", repr=False)
    events: frozenset = frozenset(FINAL_EVENTS)
    timeout: float = 5.0
    retry_schedule: tuple = DEFAULT_RETRY_SCHEDULE
    max_age: float = 86400.0
    concurrency: int = 1

    @property
    def enabled(self) -> bool:
        """True when events are enqueued and sent."""
        return bool(self.url)

    def wants(self, state: str) -> bool:
        """Whether an outcome in ``state`` makes an event."""
        return self.enabled and state in self.events

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed POST (1-based); the last step repeats."""
        i = min(max(failures, 1), len(self.retry_schedule)) - 1
        return float(self.retry_schedule[i])

    @property
    def key_ttl(self) -> int:
        """Lifetime of a stored event: its maximum age plus an hour of slack."""
        return int(self.max_age) + 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WebhookConfig":
        """The ``MXQ_WEBHOOK_*`` settings from the registry (``mxq.settings``); ValueError naming a bad one."""
        c = registry.load(env)
        url = c["MXQ_WEBHOOK_URL"] or ""
        if url:
            check_url(url)
        return cls(url=url, secret=c["MXQ_WEBHOOK_SECRET"] or "", events=parse_events(c.raw("MXQ_WEBHOOK_EVENTS")),
                   retry_schedule=c["MXQ_WEBHOOK_RETRY_SCHEDULE"], timeout=c["MXQ_WEBHOOK_TIMEOUT"],
                   max_age=c["MXQ_WEBHOOK_MAX_AGE"], concurrency=c["MXQ_WEBHOOK_CONCURRENCY"])


_cache: dict = {}


def current(*, strict: bool = True) -> WebhookConfig:
    """This process's ``WebhookConfig`` (re-read when the variables change).

    ``strict=False`` (the delivery path, which must never fail over a
    setting): a bad configuration is logged once and means no events.
    """
    c = registry.current()
    stamp = tuple(c.raw(n) for n in ENV_NAMES)
    hit = _cache.get("config")
    if hit is not None and hit[0] == stamp:
        cfg, error = hit[1], hit[2]
    else:
        try:
            cfg, error = WebhookConfig.from_env(), None
        except ValueError as e:
            cfg, error = WebhookConfig(), e
            log.error("webhooks off: %s", e)
        _cache["config"] = (stamp, cfg, error)
    if error is not None and strict:
        raise error
    return cfg


# ---------------------------------------------------------------- events
def event_body(event_id: str, job: str, record: Mapping, now: float) -> str:
    """The JSON body of one event (see the module docstring); never content or credentials."""
    return json.dumps({
        "id": event_id, "job": job, "recipient": record.get("address"), "domain": record.get("domain"),
        "state": record.get("state"), "code": record.get("code"), "enhanced": record.get("enhanced"),
        "text": printable(str(record.get("text") or "")), "exchange": record.get("exchange"), "ip": record.get("ip"),
        "relay": bool(record.get("relay")), "attempts": int(record.get("attempts") or 0),
        "next_attempt": record.get("next_attempt"), "timestamp": now,
    }, separators=(",", ":"))


def hook_arg(cfg: WebhookConfig, job: str, record: Mapping, now: float):
    """``[id, body, ttl]`` for a store script when ``record``'s state makes an event, else False."""
    if not cfg.wants(record.get("state") or ""):
        return False
    hid = uuid.uuid4().hex
    return [hid, event_body(hid, job, record, now), cfg.key_ttl]


# ---------------------------------------------------------------- signing
def sign(secret: str | bytes, timestamp: str | int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``timestamp + "." + body`` under ``secret``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: str | bytes, body: bytes, timestamp: str | None, signature: str | None, *,
           tolerance: float = 300.0, now: float | None = None) -> bool:
    """A receiver's check: the signature header matches and the timestamp is within ``tolerance``."""
    if not timestamp or not signature or not signature.startswith("sha256="):
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature[len("sha256="):])


def headers_for(cfg: WebhookConfig, event_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The request headers of one POST (timestamp, event id, signature when a secret is set)."""
    ts = str(int(time.time() if now is None else now))
    h = {"Content-Type": "application/json", "User-Agent": "mxq-webhook/1", TIMESTAMP_HEADER: ts,
         EVENT_HEADER: event_id}
    if cfg.secret:
        h[SIGNATURE_HEADER] = "sha256=" + sign(cfg.secret, ts, body)
    return h


# ---------------------------------------------------------------- sending
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer, not an instruction: it counts as a failure and is retried later."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


@dataclass
class PostResult:
    """One POST: ``ok`` (2xx), ``reachable`` (the endpoint answered at all), ``detail`` for logs."""

    ok: bool
    reachable: bool
    detail: str


def post(cfg: WebhookConfig, event_id: str, body: bytes) -> PostResult:
    """POST one event; never raises for network trouble, bounded by ``cfg.timeout`` per operation."""
    url = cfg.url
    headers = headers_for(cfg, event_id, body)
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:      # user:password@ in the URL: send it as Basic auth, not in the host
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode("utf-8")).decode("ascii")
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        if ":" in (parts.hostname or ""):
            host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(req, timeout=cfg.timeout) as resp:
            status = resp.status
        return PostResult(200 <= status < 300, True, f"HTTP {status}")
    except urllib.error.HTTPError as e:
        e.close()
        return PostResult(False, True, f"HTTP {e.code}")
    except urllib.error.URLError as e:
        return PostResult(False, False, str(e.reason))
    except (OSError, http.client.HTTPException, ValueError) as e:     # timeouts are OSErrors
        return PostResult(False, False, f"{type(e).__name__}: {e}")

"""Traffic shaping shared by every worker on every machine: per-domain concurrency and rate.

Celery's ``rate_limit`` counts per worker process, so ten workers send ten
times the limit.  mxq keeps the limits' state in Redis, in the same database
as the queue, and every check is one atomic Lua script timed by Redis's own
``TIME`` -- the clocks of the workers' machines play no part in the limits.

``MXQ_SHAPING`` -- the one setting
==================================

Either the rules themselves, or (a value without ``=``) the path of a file
holding them; the syntax is the same.  Rules are separated by ``;`` or new
lines, ``#`` starts a comment::

    MXQ_SHAPING="default=20c; gmail.com=5c,50/s; example.com=2/m,burst=5"
    MXQ_SHAPING=/etc/mxq/shaping.conf

A rule is ``TARGET=LIMIT[,LIMIT...]``.  ``TARGET`` is ``default`` or a
domain (a delivery lane: compared after IDNA and case folding, so
``Bücher.example`` and ``xn--bcher-kva.example`` are one rule; an address
literal such as ``[192.0.2.1]`` works too).  Each ``LIMIT`` is one of:

=============  ==================================================================
``Nc``         at most N connections open at once to the domain, across every
               worker (N >= 1); ``*c``: no concurrency limit
``R/s``        at most R messages per second to the domain (also ``R/m``,
               ``R/min``, ``R/h``; R may be a decimal: ``0.5/s``); ``*/s``: no rate
``burst=N``    how many messages may go at once after an idle spell (the token
               bucket's size); default: one second's worth, ``ceil(R)``, at least 1
``pool=NAME``  send from the source address pool NAME of ``MXQ_SOURCE_ADDRESSES``
               (``mxq.workers.sources``); default: the ``default`` pool
=============  ==================================================================

Without ``MXQ_SHAPING`` the policy is ``default=20c`` (Postfix's
``default_destination_concurrency_limit``), with no rate limit.  The
``default`` rule applies to every domain *separately* (``default=10/s`` gives
each domain its own 10 messages a second, not 10 for all).  A domain rule
overrides only the limits it names; the others come from ``default``, except
``burst``, which goes with the rate it belongs to.  Anything else -- an
unknown word, a limit given twice, ``burst`` without a rate, a repeated
target, a bad domain -- is refused with a ``ValueError`` naming the rule, and
``celery worker`` refuses to start with it (see ``check_on_worker_init``).

How the limits are kept
=======================

- **Concurrency.**  A ``mxq.deliver`` task holds one connection at a time
  (``deliver_domain`` walks the exchanges in turn), so "connections open to a
  domain" is "deliver tasks of that lane running".  A task takes a *slot*
  before it claims any work: ``mxq:shape:conn:{domain}`` is a ZSET of slot
  holders (the task's batch token) scored by expiry (Redis time).  Expired
  holders are removed by the same script that counts them, so a worker that
  died (SIGKILL, power loss) frees its slot within ``MXQ_LEASE_SECONDS``;
  a running task renews its slot with its lease heartbeat, and gives it
  back when it ends.  The limit is per domain (the lane), like Postfix's
  per-destination limit: two domains served by one exchange have a limit
  each.
- **Rate.**  GCRA (the generic cell rate algorithm, a token bucket kept as
  one number): ``mxq:shape:tat:{domain}`` holds the bucket's "theoretical
  arrival time".  A task asks for as many messages as it would claim
  (``MXQ_BATCH_SIZE``, at most what is ready) and is granted as many as the
  bucket holds; one message (one work item: one job's recipients in the
  domain) costs one token, whatever its outcome.  Tokens granted but not
  used (another task claimed the items first) are given back.  Over any
  span of L seconds a domain is granted at most ``R*L + burst`` messages.
- **Waiting without a worker.**  A task that finds the slots full or the
  bucket empty does not sleep and does not claim: the same script leaves the
  lane's work on its ready list, does the ``mxq:pending`` bookkeeping a
  claim would have done, records the lane in ``mxq:throttled`` (a ZSET, score
  = when to look again: when the next token is due, or ``BACKSTOP`` seconds
  for a full set of slots) and the task returns at once, freeing the worker
  for other domains.  The scheduler's tick (``Store.tick``, every second)
  re-dispatches throttled lanes whose time has come; a finishing task of the
  lane re-dispatches it too (its release publishes tasks for ready work).
  So a wait is rounded up to the next tick: a domain saturated at its rate
  is served in bursts about a second apart, which is why the default burst
  is one second's worth (a smaller burst gives less than the rate).  No
  countdown or ETA task is ever published.

Public API: ``Limits``, ``Policy`` (``parse``, ``from_env``, ``for_domain``),
``Shaper`` (``acquire``, ``renew``, ``release``, ``refund``), ``Grant``,
``DEFAULT_CONCURRENCY``, ``BACKSTOP``, ``check_on_worker_init``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mxq import settings as registry
from mxq.workers.address import normalize_domain
from mxq.workers.errors import InvalidInput

from .store import Destinations, Grant
from .store.keys import THROTTLED  # noqa: F401 -- the keys a Shaper's state lives in, for its callers
from .store.keys import slots as slots_key  # noqa: F401
from .store.keys import tat as tat_key  # noqa: F401

#: Connections open at once to one domain when nothing says otherwise (Postfix's default).
DEFAULT_CONCURRENCY = 20
#: Seconds before a lane refused for want of a slot is looked at again by the
#: scheduler (a finishing task of the lane usually re-dispatches it sooner).
BACKSTOP = 1.0
#: Upper bounds that catch typos (``2000000c``) rather than limit anyone.
MAX_CONCURRENCY = 100_000
MAX_RATE = 1_000_000.0

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_UNSET = object()


@dataclass(frozen=True)
class Limits:
    """The limits of one domain: ``concurrency`` connections (None: unlimited),
    ``rate`` messages per second (None: unlimited), ``burst`` messages."""

    concurrency: int | None = DEFAULT_CONCURRENCY
    rate: float | None = None
    burst: int | None = None
    pool: str | None = None          #: source address pool (MXQ_SOURCE_ADDRESSES); None: the default one

    @property
    def bucket(self) -> int:
        """The token bucket's size: ``burst``, or one second's worth of the rate (at least 1)."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate or 1))

    def describe(self) -> str:
        """The limits in ``MXQ_SHAPING`` syntax (``20c,50/s,burst=50``)."""
        parts = [f"{self.concurrency}c" if self.concurrency else "*c"]
        parts.append(f"{self.rate:g}/s" if self.rate else "*/s")
        if self.rate:
            parts.append(f"burst={self.bucket}")
        if self.pool:
            parts.append(f"pool={self.pool}")
        return ",".join(parts)


@dataclass(frozen=True)
class Policy:
    """The default limits plus per-domain overrides (domains normalised: IDNA A-label, lower case)."""

    default: Limits = field(default_factory=Limits)
    domains: Mapping[str, Limits] = field(default_factory=dict)

    def for_domain(self, domain: str) -> Limits:
        """The limits for ``domain`` (a lane name: already normalised)."""
        return self.domains.get(domain, self.default)

    def describe(self) -> str:
        """The whole policy in ``MXQ_SHAPING`` syntax, one rule per domain."""
        rules = [f"default={self.default.describe()}"]
        rules += [f"{d}={lim.describe()}" for d, lim in sorted(self.domains.items())]
        return "; ".join(rules)

    @classmethod
    def parse(cls, text: str, *, source: str = "MXQ_SHAPING") -> "Policy":
        """Parse the rules in ``text`` (see the module docstring); raise ValueError naming the bad rule."""
        default_fields: dict = {}
        domain_fields: dict[str, dict] = {}
        seen: dict[str, str] = {}
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        rules = [r.strip() for line in lines for r in line.split(";")]
        for n, rule in enumerate((r for r in rules if r), 1):
            where = f"{source}: rule {n} ({rule!r})"
            target, eq, body = rule.partition("=")
            target = target.strip()
            if not eq or not target or not body.strip():
                raise ValueError(f"{where}: expected TARGET=LIMIT[,LIMIT...], e.g. gmail.com=5c,50/s")
            if target.lower() == "default":
                key = "default"
            else:
                try:
                    key = normalize_domain(target)
                except (InvalidInput, ValueError) as e:
                    raise ValueError(f"{where}: {target!r} is not a domain: {e}") from None
            if key in seen:
                raise ValueError(f"{where}: {target!r} already has a rule ({seen[key]!r})")
            seen[key] = rule
            fields = _parse_limits(body, where)
            if key == "default":
                default_fields = fields
            else:
                domain_fields[key] = fields
        default = _merge(Limits(), default_fields)
        return cls(default, {d: _merge(default, f) for d, f in domain_fields.items()})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Policy":
        """The policy of ``MXQ_SHAPING`` (rules, or a file of rules); the built-in default when unset."""
        value = (registry.value("MXQ_SHAPING", env) or "").strip()
        if not value:
            return cls()
        if "=" not in value:
            path = Path(value).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"MXQ_SHAPING: cannot read the rules file {value!r}: {e.strerror or e}") from None
            return cls.parse(text, source=f"MXQ_SHAPING file {value}")
        return cls.parse(value)


def _parse_limits(body: str, where: str) -> dict:
    """``"5c,50/s,burst=10"`` into ``{"concurrency": 5, "rate": 50.0, "burst": 10}`` (None = unlimited)."""
    out: dict = {}

    def put(name: str, value, item: str):
        if name in out:
            raise ValueError(f"{where}: {name} is given twice")
        out[name] = value

    for item in (x.strip() for x in body.split(",")):
        low = item.lower().replace(" ", "")
        if not low:
            raise ValueError(f"{where}: empty limit (a stray comma?)")
        if low.endswith("c") and "/" not in low and "=" not in low:
            num = low[:-1]
            if num == "*":
                put("concurrency", None, item)
                continue
            if not num.isdigit() or not 1 <= int(num) <= MAX_CONCURRENCY:
                raise ValueError(f"{where}: {item!r}: concurrency must be a whole number from 1 to "
                                 f"{MAX_CONCURRENCY} followed by c (or *c for no limit)")
            put("concurrency", int(num), item)
        elif "/" in low:
            num, _, unit = low.partition("/")
            if unit not in _UNITS:
                raise ValueError(f"{where}: {item!r}: the rate's unit must be /s, /m (/min) or /h")
            if num == "*":
                put("rate", None, item)
                continue
            try:
                value = float(num)
            except ValueError:
                value = float("nan")
            if not (value > 0 and math.isfinite(value)) or value / _UNITS[unit] > MAX_RATE:
                raise ValueError(f"{where}: {item!r}: a rate must be a positive number per second, "
                                 f"minute or hour (or */s for no limit)")
            put("rate", value / _UNITS[unit], item)
        elif low.startswith("pool="):
            name = item.split("=", 1)[1].strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
                raise ValueError(f"{where}: {item!r}: pool=NAME names a pool of MXQ_SOURCE_ADDRESSES")
            put("pool", name, item)
        elif low.startswith("burst="):
            num = low[len("burst="):]
            if not num.isdigit() or not 1 <= int(num) <= MAX_CONCURRENCY * 100:
                raise ValueError(f"{where}: {item!r}: burst must be a whole number of messages, at least 1")
            put("burst", int(num), item)
        else:
            raise ValueError(f"{where}: {item!r} is not a limit (use Nc, R/s, R/m, R/h, burst=N or pool=NAME)")
    if "burst" in out and not out.get("rate"):
        raise ValueError(f"{where}: burst=N needs a rate in the same rule (R/s, R/m or R/h)")
    return out


def _merge(base: Limits, fields: dict) -> Limits:
    concurrency = fields.get("concurrency", base.concurrency)
    if "rate" in fields:                    # a new rate brings its own burst (or the default one)
        rate, burst = fields["rate"], fields.get("burst")
    else:
        rate, burst = base.rate, base.burst
    return Limits(concurrency=concurrency, rate=rate, burst=burst, pool=fields.get("pool", base.pool))


# ---------------------------------------------------------------- Redis side
# The scripts and keys are the store's (mxq.tasks.store: _ACQUIRE, _SLOT_RENEW,
# _SLOT_RELEASE, _REFUND, class Destinations); the Shaper applies a Policy through them.

# The keys (mxq.tasks.store.keys): THROTTLED, slots_key(domain), tat_key(domain).


class Shaper:
    """A ``Policy`` applied through the store's destination scripts on one Redis client.

    ``slot_ttl``: seconds a slot outlives its holder's last renewal (the
    pipeline uses ``MXQ_LEASE_SECONDS``, renewed by the lease heartbeat).
    """

    def __init__(self, client, policy: Policy | None = None, *, slot_ttl: float = 45.0,
                 backstop: float = BACKSTOP, dest: Destinations | None = None):
        self.r = client
        self.policy = policy if policy is not None else Policy.from_env()
        self.slot_ttl = float(slot_ttl)
        self.backstop = float(backstop)
        self.dest = dest if dest is not None else Destinations(client)

    def acquire(self, domain: str, token: str, want: int, *, now: float) -> Grant:
        """Take a slot and up to ``want`` tokens for ``domain``'s ready work, or refuse.

        The slot is counted against the domain's concurrency window (which
        grows from ``MXQ_INITIAL_CONCURRENCY`` to its limit, see
        ``mxq.tasks.qmgr``).  On refusal nothing is held and the lane is put in
        ``mxq:throttled`` for the scheduler; either way the task no longer
        counts in ``mxq:pending``.  ``now`` is the caller's clock (the one the
        store and scheduler use); the limits use Redis time.
        """
        lim = self.policy.for_domain(domain)
        return self.dest.acquire(domain, token, want, concurrency=lim.concurrency or 0,
                                 interval=1.0 / lim.rate if lim.rate else 0.0, bucket=lim.bucket,
                                 slot_ttl=self.slot_ttl, backstop=self.backstop, now=now)

    def renew(self, domain: str, token: str) -> bool:
        """Extend ``token``'s slot for ``domain``; False when it holds none (expired, or no limit)."""
        return self.dest.renew(domain, token, self.slot_ttl)

    def release(self, domain: str, token: str, *, park: bool = False) -> list[tuple[str, int]]:
        """Give ``token``'s slot back (nothing happens when it holds none); return the tasks to publish.

        ``park``: the holder's connection goes idle in a connection cache and
        keeps the slot (it counts against the limit, not as a running task).
        """
        return self.dest.release(domain, token, park=park, ttl=self.slot_ttl)[1]

    def refund(self, domain: str, tokens: int) -> None:
        """Give back ``tokens`` granted but not used (the work was claimed by someone else)."""
        lim = self.policy.for_domain(domain)
        if tokens > 0 and lim.rate:
            self.dest.refund(domain, tokens, 1.0 / lim.rate)

    def holders(self, domain: str) -> int:
        """How many slots of ``domain`` are held now (expired holders included until the next acquire)."""
        return self.dest.holders(domain)


def check_on_worker_init(**_kw) -> None:
    """Celery ``worker_init`` hook: refuse to start a worker with a bad ``MXQ_SHAPING``
    (or one naming a source pool ``MXQ_SOURCE_ADDRESSES`` does not define).

    Celery logs and swallows exceptions from signal handlers, so this exits
    (``SystemExit``) with the parse error instead.
    """
    try:
        check_pools(Policy.from_env())
    except ValueError as e:
        raise SystemExit(f"mxq: {e}") from None


def check_pools(policy: Policy, env: Mapping[str, str] | None = None) -> Policy:
    """``policy``, after checking that every ``pool=`` it names is a pool of ``MXQ_SOURCE_ADDRESSES``."""
    named = {lim.pool for lim in [policy.default, *policy.domains.values()] if lim.pool}
    if not named:
        return policy
    sources = registry.value("MXQ_SOURCE_ADDRESSES", env) or ()
    defined = {name for name, _ in sources}
    missing = sorted(named - defined - {"default"})
    if missing:
        raise ValueError(f"MXQ_SHAPING names source pool(s) {', '.join(missing)}, which MXQ_SOURCE_ADDRESSES "
                         f"does not define (pools: {', '.join(sorted(defined)) or 'none'})")
    return policy

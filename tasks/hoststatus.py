"""The delivery agent's shared memory in Redis: what every worker knows about the network.

- ``RedisHostStatus``: the exchanges' failure memory (the engine's
  ``mxq.workers.delivery.HostStatus``): an exchange that timed out or
  refused is marked down with ``SET EX`` (the key expires by itself when the
  time is up), and every worker skips it meanwhile instead of each paying
  the connect timeout again.  Key ``mxq:down:{ip}:{port}``, value: the
  reason (never a credential: reasons are connection failures).
- ``RedisPort25State``: whether outbound port 25 is blocked
  (``mxq.workers.port25``): ``mxq:port25`` (the verdict),
  ``mxq:port25:ev`` (recent failed connects), ``mxq:port25:relay`` (the
  relay worked lately), ``mxq:port25:probe`` (whose turn to re-probe).
- ``RedisPolicyCache``: MTA-STS policies (``mxq.workers.mtasts``):
  ``mxq:sts:{domain}`` for the policy's max_age, ``mxq:stsfail:{domain}``
  for a failed fetch (5 minutes).
- ``RedisTLSReport``: TLS-RPT session counts (``mxq.workers.tlsrpt``):
  ``mxq:tlsrpt:{day}:{domain}`` and ``mxq:tlsrpt:{day}``, kept 8 days.

Every key of these kinds is written and read here only (``mxq queue``,
``mxq tlsrpt`` and the metrics read through these classes).  None holds a
secret.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time

import redis

from .store.hosts import Port25Scripts
from .store.keys import DOWN as KEY
from .store.keys import PORT25, PORT25_EVIDENCE, PORT25_PROBE, STS_FAILURE, STS_POLICY, TLSRPT, TLSRPT_DAY


class RedisHostStatus:
    """``HostStatus`` backed by Redis keys with a TTL.

    Redis being unreachable must not stop delivery: ``is_down`` then answers
    False (try the exchange) and ``mark_down`` forgets, because the failure
    memory is an optimisation, not state anything depends on.
    """

    def __init__(self, client: redis.Redis):
        self.r = client

    def is_down(self, ip: str, port: int) -> bool:
        """True while the exchange at ``ip:port`` is marked down."""
        try:
            return bool(self.r.exists(KEY.format(ip=ip, port=port)))
        except redis.exceptions.RedisError:
            return False

    def mark_down(self, ip: str, port: int, seconds: float, reason: str = "") -> None:
        """Mark ``ip:port`` down for ``seconds`` (at least one second) with ``reason``."""
        try:
            self.r.set(KEY.format(ip=ip, port=port), (reason or "down")[:200],
                       ex=max(1, math.ceil(seconds)))
        except redis.exceptions.RedisError:
            pass

    def mark_up(self, ip: str, port: int) -> None:
        """Forget the mark of ``ip:port`` (a probe of a dead destination got through)."""
        try:
            self.r.delete(KEY.format(ip=ip, port=port))
        except redis.exceptions.RedisError:
            pass

    def reason(self, ip: str, port: int) -> str | None:
        """Why ``ip:port`` is marked down, or None when it is not."""
        v = self.r.get(KEY.format(ip=ip, port=port))
        return v.decode("utf-8", "replace") if v is not None else None


# ---------------------------------------------------------------- port 25 (mxq.workers.port25)


class RedisPort25State:
    """``mxq.workers.port25.Port25State`` in Redis, shared by every worker (atomic Lua).

    Redis trouble never stops delivery: reads answer "not blocked" (the
    exchanges are tried), writes are forgotten.
    """

    def __init__(self, client: redis.Redis):
        self.r = client
        self._scripts = Port25Scripts(client)

    def _run(self, args: list) -> dict | None:
        try:
            got = self._scripts.record(args)
        except redis.exceptions.RedisError:
            return None
        return json.loads(got) if got else None

    def failure(self, kind: str, ip: str, domain: str, now: float, t) -> dict | None:
        return self._run([kind, ip, domain, now, t.window, t.exchanges, t.domains, t.state_ttl, t.probe_interval])

    def relay_ok(self, now: float, t) -> dict | None:
        return self._run(["", "", "", now, t.window, t.exchanges, t.domains, t.state_ttl, t.probe_interval])

    def suspected(self, now: float, t) -> dict | None:
        from mxq.workers.port25 import conclude

        try:
            members = self.r.zrangebyscore(PORT25_EVIDENCE, now - t.window, "+inf", withscores=True)
        except redis.exceptions.RedisError:
            return None
        events = []
        for member, when in members:
            kind, ip, domain = _text(member).split("|", 2)
            events.append((kind, ip, domain, when))
        return conclude(events, now, now, t)

    def success(self) -> dict | None:
        try:
            got = self._scripts.success()
        except redis.exceptions.RedisError:
            return None
        return json.loads(got) if got else None

    def blocked(self) -> dict | None:
        try:
            got = self.r.get(PORT25)
        except redis.exceptions.RedisError:
            return None
        try:
            return json.loads(got) if got else None
        except ValueError:
            return None

    def claim_probe(self, now: float, interval: float) -> bool:
        try:
            return bool(self.r.set(PORT25_PROBE, "1", nx=True, ex=max(1, math.ceil(interval))))
        except redis.exceptions.RedisError:
            return False

    def refresh(self, ttl: float) -> None:
        try:
            self.r.expire(PORT25, max(1, math.ceil(ttl)), xx=True)
        except redis.exceptions.RedisError:
            pass

    def probe_due(self) -> float | None:
        """Seconds until the next probe may start (None: none pending), for ``mxq queue``."""
        try:
            ttl = self.r.ttl(PORT25_PROBE)
        except redis.exceptions.RedisError:
            return None
        return float(ttl) if ttl is not None and ttl >= 0 else 0.0


# ---------------------------------------------------------------- MTA-STS policies (mxq.workers.mtasts)


_UNREAD = object()      # RedisPolicyCache._read: Redis did not answer


class RedisPolicyCache:
    """``mxq.workers.mtasts.PolicyCache`` in Redis: one fetch per policy for the whole fleet.

    Every delivery run asks for its domain's policy (a domain without MTA-STS
    too: a cached policy stays in force while its TXT record is missing), so
    what Redis said is kept in the process for ``MEMORY`` seconds (at most
    ``MEMORY_ENTRIES`` domains, least recently used first out): one GET and
    PTTL per domain and half-minute instead of per delivery run (0.2 Redis
    commands a message in the bench's loopback stage).  ``put`` updates the
    memory too; ``refresh`` reads Redis whatever the memory holds (the
    engine calls it before fetching a policy another worker may have
    fetched meanwhile).
    """

    MEMORY = 30.0
    MEMORY_ENTRIES = 10_000

    def __init__(self, client: redis.Redis, clock=time.time):
        from collections import OrderedDict

        self.r = client
        self.clock = clock
        self._lock = threading.Lock()
        self._memory: OrderedDict = OrderedDict()     # domain -> (read at + MEMORY, get()'s answer)

    def get(self, domain: str):
        now = self.clock()
        with self._lock:
            hit = self._memory.get(domain)
            if hit is not None and hit[0] > now and (hit[1] is None or hit[1][1] > now):
                self._memory.move_to_end(domain)
                return hit[1]
        return self.refresh(domain)

    def _remember(self, domain: str, answer) -> None:
        with self._lock:
            self._memory[domain] = (self.clock() + self.MEMORY, answer)
            self._memory.move_to_end(domain)
            while len(self._memory) > self.MEMORY_ENTRIES:
                self._memory.popitem(last=False)

    def refresh(self, domain: str):
        """``get`` from Redis itself (the memory updated with the answer).

        Redis not answering is not "no policy": the policy this process last knew for the
        domain is returned while it is valid (its max_age), and nothing is remembered, so the
        next call asks Redis again.  (It was remembered as no policy for ``MEMORY`` seconds: a
        Redis timeout and a failed ``_mta-sts`` TXT lookup together sent an MTA-STS domain's mail
        without its policy -- seen once under CI load, in testing mode.)
        """
        answer = self._read(domain)
        if answer is _UNREAD:
            with self._lock:
                hit = self._memory.get(domain)
            if hit is not None and hit[1] is not None and hit[1][1] > self.clock():
                return hit[1]
            return None
        self._remember(domain, answer)
        return answer

    def _read(self, domain: str):
        """``(policy, expires)`` from Redis, None when it holds none, ``_UNREAD`` when it did not answer."""
        from mxq.workers.mtasts import Policy, PolicyError

        key = STS_POLICY.format(domain=domain)
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = pipe.execute()
        except redis.exceptions.RedisError:
            return _UNREAD
        if value is None or pttl is None or pttl <= 0:
            return None
        try:
            d = json.loads(value)
            return Policy.parse(d["text"], d["id"]), self.clock() + pttl / 1000.0
        except (ValueError, KeyError, TypeError, PolicyError):
            return None

    def put(self, domain: str, policy, ttl: float) -> None:
        if ttl < 1:
            return
        self._remember(domain, (policy, self.clock() + int(ttl)))
        try:
            self.r.set(STS_POLICY.format(domain=domain), json.dumps({"id": policy.id, "text": policy.text}),
                       ex=int(ttl))
        except redis.exceptions.RedisError:
            pass

    def get_failure(self, domain: str):
        try:
            value = self.r.get(STS_FAILURE.format(domain=domain))
            if value is None:
                return None
            d = json.loads(value)
            return d["id"], d["type"], d.get("detail", "")
        except (redis.exceptions.RedisError, ValueError, KeyError, TypeError):
            return None

    def put_failure(self, domain: str, id: str, result_type: str, detail: str, ttl: float) -> None:
        try:
            self.r.set(STS_FAILURE.format(domain=domain),
                       json.dumps({"id": id, "type": result_type, "detail": detail[:500]}), ex=max(1, int(ttl)))
        except redis.exceptions.RedisError:
            pass


# ---------------------------------------------------------------- TLS-RPT counts (mxq.workers.tlsrpt)

#: Days the counts are kept (a week of reports, plus the day being written).
TLSRPT_KEEP_DAYS = 8


class RedisTLSReport:
    """``mxq.workers.tlsrpt.TLSReportSink`` in Redis: counts of every worker, by UTC day and domain.

    One round trip per recorded session: one HINCRBY for a success, two for
    a failure; the policy text, the day's domain set and the expiries are
    written by the first session of a (day, domain, policy) in each process.
    Redis trouble loses the count, never the delivery.
    """

    def __init__(self, client: redis.Redis):
        self.r = client
        self._known: set[tuple[str, str, str]] = set()     # (day, domain, pk) set up by this process
        self._day = ""

    def record(self, policy, failure=None, *, when: float | None = None) -> None:
        from mxq.workers.tlsrpt import day_of

        day = day_of(when)
        key = TLSRPT.format(day=day, domain=policy.domain)
        pk = hashlib.sha1(policy.key().encode()).hexdigest()[:16]
        if day != self._day:
            self._day, self._known = day, set()
        first = (day, policy.domain, pk) not in self._known
        try:
            pipe = self.r.pipeline(transaction=False)
            if failure is None:
                pipe.hincrby(key, f"ok:{pk}", 1)
            else:
                pipe.hincrby(key, f"fail:{pk}", 1)
                pipe.hincrby(key, f"f:{pk}:{failure.key()}", 1)
            if first:
                ttl = TLSRPT_KEEP_DAYS * 86400
                pipe.hsetnx(key, f"p:{pk}", policy.key())
                pipe.expire(key, ttl)
                pipe.sadd(TLSRPT_DAY.format(day=day), policy.domain)
                pipe.expire(TLSRPT_DAY.format(day=day), ttl)
            pipe.execute()
        except redis.exceptions.RedisError:
            return
        if first:
            self._known.add((day, policy.domain, pk))

    def domains(self, day: str) -> list[str]:
        """Domains with counts on ``day`` (``YYYY-MM-DD``)."""
        return sorted(_text(d) for d in self.r.smembers(TLSRPT_DAY.format(day=day)))

    def entries(self, day: str, domains=None) -> list[dict]:
        """The counts of ``day`` (of ``domains`` only, when given), as ``mxq.workers.tlsrpt.report`` takes them.

        Raises ``redis.RedisError`` (the caller is a command that must say so).
        """
        out = []
        for domain in (sorted(domains) if domains is not None else self.domains(day)):
            fields = {_text(k): _text(v) for k, v in self.r.hgetall(TLSRPT.format(day=day, domain=domain)).items()}
            for name, value in fields.items():
                if not name.startswith("p:"):
                    continue
                pk = name[2:]
                details = []
                prefix = f"f:{pk}:"
                for fname, n in fields.items():
                    if fname.startswith(prefix):
                        details.append((json.loads(fname[len(prefix):]), int(n)))
                out.append({"policy": json.loads(value), "ok": int(fields.get(f"ok:{pk}", 0)),
                            "fail": int(fields.get(f"fail:{pk}", 0)), "details": details})
        return out


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

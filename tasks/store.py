"""All of mxq's state in Redis: jobs, recipients, work items, leases, the deferred queue.

mxq's state is the source of truth; Celery's queues only say "there may be
work in this lane".  Every state change is one Lua script (atomic, one round
trip), so a worker that dies at any instant leaves each work item in exactly
one place: a ready list, the lease set, or the deferred queue.

Key layout (``mxq:`` prefix; one Redis database; not Redis Cluster-ready,
because the scripts build key names themselves):

===============================  ======  ==================================================
key                              type    contents
===============================  ======  ==================================================
``mxq:msg:{job}``                string  the message content, stored once (bytes)
``mxq:job:{job}``                hash    ``sender``, ``ret``, ``envid``, ``eightbit``,
                                         ``smtputf8``, ``size``, ``created``, ``n``
                                         (recipients), ``left`` (not yet final),
                                         ``domains`` (comma list), ``d:{domain}`` (the
                                         recipient indexes in that domain), ``idem``,
                                         ``done`` (time the last recipient became final)
``mxq:rcpt:{job}``               hash    field = recipient index, value = JSON record:
                                         address, domain, state, code, enhanced, text,
                                         exchange, ip, relay, attempts, first_attempt,
                                         last_attempt, next_attempt, notify, orcpt,
                                         runs (delivery runs), delay_reported
``mxq:idem:{sha256(key)}``       string  job id for an idempotency key (SET NX)
``mxq:ready:{lane}``             list    work items ready to run in that lane
``mxq:lease``                    zset    work items in flight, score = lease expiry
``mxq:owner``                    hash    work item -> token of the task holding its lease
``mxq:deferred``                 zset    work items waiting, score = due time
``mxq:dispatch``                 zset    lane -> last time tasks were published for it or
                                         work claimed from it (the scheduler re-publishes
                                         for lanes with ready work gone quiet)
``mxq:pending``                  hash    lane -> deliver tasks published, not yet started
``mxq:intake``                   zset    jobs stored but not yet split (large batches),
                                         score = last (re)publication of ``mxq.intake``
``mxq:down:{ip}:{port}``         string  failure memory of one exchange (``hoststatus``)
===============================  ======  ==================================================

Lanes and work items:

- a delivery lane is a normalised domain (IDNA A-label, lower case, or an
  address literal); its work item is ``{job}|{domain}``: the recipients of
  one job in one domain, delivered as one SMTP transaction;
- the report lane is ``!r``; its work items are ``!r|{job}|{index}|{event}``
  (event ``bounced``, ``expired`` or ``delayed``), handled by ``mxq.notify``.

Life of a work item: the producer (or ``mxq.intake``) RPUSHes it onto its
ready list; ``mxq.deliver`` LPOPs up to K of one lane and leases them (ZADD
``mxq:lease``) in the same script; a heartbeat renews the lease while the
task runs; the release script writes the recipients' new records (a final
state is never overwritten), then removes the lease and, if recipients are
still deferred, ZADDs the item to ``mxq:deferred`` by due time.  The
scheduler's tick moves expired leases back to the front of their ready list
and due deferred items to the back, and re-publishes tasks for lanes whose
ready work has gone quiet.  When ``left`` reaches 0 the job's keys get
``EXPIRE result_ttl`` (state, recipients, content and idempotency key go
together).

Redis commands per message stay low: one script per submitted batch, one
claim and one release per K messages of a domain, one tick per second.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from .settings import PipelineSettings

PREFIX = "mxq:"
REPORT_LANE = "!r"
FINAL_STATES = ("delivered", "bounced", "expired")

#: Redis errors worth retrying: the server restarting or loading its AOF.
#: (``BusyLoadingError`` is a ``ConnectionError`` in redis-py.)
TRANSIENT_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# ---------------------------------------------------------------- Lua scripts
# A shared prelude: key helpers and the dispatch computation.  Redis runs Lua
# 5.1 (no goto), scripts are atomic, and cjson is available.
_PRELUDE = r"""
local P = 'mxq:'
local function lane_of(wid)
  if string.sub(wid, 1, 1) == '!' then return '!r' end
  local bar = string.find(wid, '|', 1, true)
  return string.sub(wid, bar + 1)
end
local function job_of(wid)
  local bar = string.find(wid, '|', 1, true)
  return string.sub(wid, 1, bar - 1)
end
local function split(s)
  local out = {}
  for part in string.gmatch(s, '[^,]+') do table.insert(out, part) end
  return out
end
-- How many more tasks each lane needs: enough to drain it in batches of k,
-- at most maxpar queued at once, minus those already published and not
-- started.  force: treat the published ones as lost (the scheduler, for a
-- lane with ready work and no activity for a while).
local function dispatch(lanes, now, k, maxpar, force, out)
  for _, lane in ipairs(lanes) do
    local n = redis.call('LLEN', P .. 'ready:' .. lane)
    if n == 0 then
      redis.call('ZREM', P .. 'dispatch', lane)
    else
      local pend = 0
      if not force then pend = tonumber(redis.call('HGET', P .. 'pending', lane) or '0') end
      local want = math.min(math.ceil(n / k), maxpar) - pend
      if want > 0 then
        redis.call('HSET', P .. 'pending', lane, pend + want)
        redis.call('ZADD', P .. 'dispatch', now, lane)
        table.insert(out, lane)
        table.insert(out, want)
      else
        redis.call('ZADD', P .. 'dispatch', 'NX', now, lane)
      end
    end
  end
  return out
end
"""

# ARGV: now, mode ('split'|'intake'), k, maxpar, spec JSON, content...
# spec: [{"id", "idem", "meta": {...}, "rcpts": [json...], "domains": [...]}]
# Returns {ids, dispatch}.  Re-running it (a retried call) changes nothing.
_SUBMIT = _PRELUDE + r"""
local now, mode, k, maxpar = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local spec = cjson.decode(ARGV[5])
local ids, lanes, seen = {}, {}, {}
for i, job in ipairs(spec) do
  local id = job.id
  local existing = false
  if job.idem ~= '' then
    existing = redis.call('GET', P .. 'idem:' .. job.idem)
    if not existing then redis.call('SET', P .. 'idem:' .. job.idem, id, 'NX') end
  end
  if existing then
    ids[i] = existing
  elseif redis.call('EXISTS', P .. 'job:' .. id) == 1 then
    ids[i] = id
  else
    ids[i] = id
    redis.call('SET', P .. 'msg:' .. id, ARGV[5 + i])
    local flat = {}
    for f, v in pairs(job.meta) do table.insert(flat, f); table.insert(flat, v) end
    redis.call('HSET', P .. 'job:' .. id, unpack(flat))
    local rflat = {}
    for r, rec in ipairs(job.rcpts) do table.insert(rflat, tostring(r - 1)); table.insert(rflat, rec) end
    redis.call('HSET', P .. 'rcpt:' .. id, unpack(rflat))
    if mode == 'split' then
      for _, d in ipairs(job.domains) do
        redis.call('RPUSH', P .. 'ready:' .. d, id .. '|' .. d)
        if not seen[d] then seen[d] = true; table.insert(lanes, d) end
      end
    else
      redis.call('ZADD', P .. 'intake', now, id)
    end
  end
end
return {ids, dispatch(lanes, now, k, maxpar, false, {})}
"""

# ARGV: now, k, maxpar, job ids...  Splits stored jobs into their domain lanes.
_INTAKE = _PRELUDE + r"""
local now, k, maxpar = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lanes, seen = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', P .. 'intake', id) == 1 then
    local domains = redis.call('HGET', P .. 'job:' .. id, 'domains')
    if domains then
      for _, d in ipairs(split(domains)) do
        redis.call('RPUSH', P .. 'ready:' .. d, id .. '|' .. d)
        if not seen[d] then seen[d] = true; table.insert(lanes, d) end
      end
    end
  end
end
return dispatch(lanes, now, k, maxpar, false, {})
"""

# ARGV: now, lane, k, lease expiry, token.  Pops up to k items and leases them.
# Delivery lanes return {wid, meta (HGETALL), indexes, records, content} each;
# the report lane returns {wid} each.
_CLAIM = _PRELUDE + r"""
local now, lane, k, expiry, token = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local items = redis.call('LPOP', P .. 'ready:' .. lane, k)
local pend = tonumber(redis.call('HGET', P .. 'pending', lane) or '0')
if pend > 0 then redis.call('HSET', P .. 'pending', lane, pend - 1) end
if redis.call('LLEN', P .. 'ready:' .. lane) > 0 then
  redis.call('ZADD', P .. 'dispatch', now, lane)
else
  redis.call('ZREM', P .. 'dispatch', lane)
end
local out = {}
if not items then return out end
for _, wid in ipairs(items) do
  if lane == '!r' then
    redis.call('ZADD', P .. 'lease', expiry, wid)
    redis.call('HSET', P .. 'owner', wid, token)
    table.insert(out, {wid})
  else
    local job = job_of(wid)
    local meta = redis.call('HGETALL', P .. 'job:' .. job)
    if #meta > 0 then
      local m = {}
      for i = 1, #meta, 2 do m[meta[i]] = meta[i + 1] end
      local idx = m['d:' .. lane]
      if idx then
        local recs = redis.call('HMGET', P .. 'rcpt:' .. job, unpack(split(idx)))
        local content = redis.call('GET', P .. 'msg:' .. job)
        redis.call('ZADD', P .. 'lease', expiry, wid)
        redis.call('HSET', P .. 'owner', wid, token)
        table.insert(out, {wid, meta, idx, recs, content})
      end
    end
  end
end
return out
"""

# ARGV: expiry, token, wids...  Renews the leases this token still owns.
_RENEW = r"""
local P = 'mxq:'
local n = 0
for i = 3, #ARGV do
  if redis.call('HGET', P .. 'owner', ARGV[i]) == ARGV[2] then
    redis.call('ZADD', P .. 'lease', 'XX', tonumber(ARGV[1]), ARGV[i])
    n = n + 1
  end
end
return n
"""

# ARGV: now, token, result_ttl, k, maxpar, lane, payload JSON
# payload: [{"wid", "due" (-1: nothing left), "updates": [[index, record, final, event]]}]
# Returns {applied, dispatch}: applied is a list of "job|index" whose update
# was written (a final state already there is never overwritten).
_RELEASE = _PRELUDE + r"""
local now, token, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local k, maxpar, lane = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local payload = cjson.decode(ARGV[7])
local final = {delivered = true, bounced = true, expired = true}
local applied, lanes = {}, {lane}
local reported = false
for _, item in ipairs(payload) do
  local wid = item.wid
  local job = job_of(wid)
  local jk, rk = P .. 'job:' .. job, P .. 'rcpt:' .. job
  local alive = redis.call('EXISTS', jk) == 1
  if alive and item.updates then
    for _, u in ipairs(item.updates) do
      local idx, rec, isfinal, event = u[1], u[2], u[3], u[4]
      local cur = redis.call('HGET', rk, idx)
      if not (cur and final[cjson.decode(cur).state]) then
        redis.call('HSET', rk, idx, rec)
        table.insert(applied, job .. '|' .. idx)
        if event ~= '' then
          redis.call('RPUSH', P .. 'ready:!r', '!r|' .. job .. '|' .. idx .. '|' .. event)
          reported = true
        end
        if isfinal == 1 then
          local left = redis.call('HINCRBY', jk, 'left', -1)
          if left <= 0 then
            redis.call('HSET', jk, 'done', tostring(now))
            redis.call('EXPIRE', jk, ttl)
            redis.call('EXPIRE', rk, ttl)
            redis.call('EXPIRE', P .. 'msg:' .. job, ttl)
            local idem = redis.call('HGET', jk, 'idem')
            if idem and idem ~= '' then redis.call('EXPIRE', P .. 'idem:' .. idem, ttl) end
          end
        end
      end
    end
  end
  if redis.call('HGET', P .. 'owner', wid) == token then
    redis.call('ZREM', P .. 'lease', wid)
    redis.call('HDEL', P .. 'owner', wid)
    if alive and item.due >= 0 then redis.call('ZADD', P .. 'deferred', item.due, wid) end
  end
end
if reported then table.insert(lanes, '!r') end
return {applied, dispatch(lanes, now, k, maxpar, false, {})}
"""

# ARGV: now, limit, stale, k, maxpar.  The scheduler's one atomic step.
# Returns {requeued, moved, dispatch, intake job ids}.
_TICK = _PRELUDE + r"""
local now, limit, stale = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local k, maxpar = tonumber(ARGV[4]), tonumber(ARGV[5])
local lanes, seen = {}, {}
local function touch(l) if not seen[l] then seen[l] = true; table.insert(lanes, l) end end
local expired = redis.call('ZRANGEBYSCORE', P .. 'lease', '-inf', now, 'LIMIT', 0, limit)
for _, wid in ipairs(expired) do
  redis.call('ZREM', P .. 'lease', wid)
  redis.call('HDEL', P .. 'owner', wid)
  local l = lane_of(wid)
  redis.call('LPUSH', P .. 'ready:' .. l, wid)
  touch(l)
end
local due = redis.call('ZRANGEBYSCORE', P .. 'deferred', '-inf', now, 'LIMIT', 0, limit)
for _, wid in ipairs(due) do
  redis.call('ZREM', P .. 'deferred', wid)
  local l = lane_of(wid)
  redis.call('RPUSH', P .. 'ready:' .. l, wid)
  touch(l)
end
local out = dispatch(lanes, now, k, maxpar, false, {})
local quiet = redis.call('ZRANGEBYSCORE', P .. 'dispatch', '-inf', now - stale, 'LIMIT', 0, limit)
dispatch(quiet, now, k, maxpar, true, out)
local intake = redis.call('ZRANGEBYSCORE', P .. 'intake', '-inf', now - stale, 'LIMIT', 0, limit)
for _, id in ipairs(intake) do redis.call('ZADD', P .. 'intake', now, id) end
return {#expired, #due, out, intake}
"""


# ---------------------------------------------------------------- data types
@dataclass
class JobSpec:
    """One validated job ready to store: content bytes, meta fields, recipient records."""

    id: str
    content: bytes
    meta: dict[str, str]
    records: list[dict]
    domains: list[str]
    idem: str = ""


@dataclass
class Claimed:
    """One work item taken off a ready list under a lease: one job's recipients in one domain."""

    wid: str
    job: str
    domain: str
    meta: dict[str, str]
    indexes: list[str]
    records: list[dict | None]
    content: bytes


@dataclass
class Outcome:
    """What to write back for one work item: record updates and when to try again.

    ``updates`` are ``(index, record, event)``; ``event`` is ``bounced``,
    ``expired`` or ``delayed`` when a report is due, else "".  ``due`` is the
    time of the next attempt, or None when no recipient is left pending.
    """

    wid: str
    updates: list[tuple[str, dict, str]] = field(default_factory=list)
    due: float | None = None


@dataclass
class Tick:
    """What one scheduler step did and which tasks it wants published."""

    requeued: int
    moved: int
    dispatch: list[tuple[str, int]]
    intake: list[str]


def new_job_id() -> str:
    """A fresh job id (32 hex digits; never contains ``|``)."""
    return uuid.uuid4().hex


def idem_key(key: str) -> str:
    """The Redis key part for an idempotency key (hashed, so any string is a safe key)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def make_client(url: str) -> redis.Redis:
    """A Redis client that rides out a restart of the server (about 30 s of retries).

    Every script below is safe to run twice (it checks before it writes), so a
    command retried after a lost reply does no harm.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=40),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


def _s(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _pairs(flat) -> list[tuple[str, int]]:
    return [(_s(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


class Store:
    """mxq's Redis state; one per process (the client is thread-safe)."""

    def __init__(self, client: redis.Redis, settings: PipelineSettings | None = None):
        self.r = client
        self.settings = settings or PipelineSettings.from_env()
        self._submit = client.register_script(_SUBMIT)
        self._intake = client.register_script(_INTAKE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._tick = client.register_script(_TICK)

    @classmethod
    def from_settings(cls, settings: PipelineSettings) -> "Store":
        """A store on ``settings.redis_url``."""
        return cls(make_client(settings.redis_url), settings)

    # ------------------------------------------------------------ producer side
    def submit(self, jobs: list[JobSpec], *, split: bool = True, now: float | None = None):
        """Store a batch of jobs in one atomic script; return ``(job ids, dispatch)``.

        ``split`` pushes the work items onto their domain lanes now; otherwise
        the jobs wait in ``mxq:intake`` for ``mxq.intake``.  A job whose
        idempotency key exists is not stored: its id is the existing job's.
        """
        now = time.time() if now is None else now
        s = self.settings
        spec = [{"id": j.id, "idem": j.idem, "meta": j.meta,
                 "rcpts": [json.dumps(r, separators=(",", ":")) for r in j.records],
                 "domains": j.domains} for j in jobs]
        args = [now, "split" if split else "intake", s.batch_size, s.domain_concurrency,
                json.dumps(spec, separators=(",", ":"))] + [j.content for j in jobs]
        ids, disp = self._submit(args=args)
        return [_s(i) for i in ids], _pairs(disp)

    def intake(self, job_ids: list[str], *, now: float | None = None) -> list[tuple[str, int]]:
        """Split stored jobs into their domain lanes (once: a second call does nothing)."""
        now = time.time() if now is None else now
        s = self.settings
        return _pairs(self._intake(args=[now, s.batch_size, s.domain_concurrency, *job_ids]))

    # ------------------------------------------------------------ worker side
    def claim(self, lane: str, token: str, *, limit: int | None = None, now: float | None = None) -> list:
        """Take up to ``limit`` work items of ``lane`` under a lease held by ``token``.

        Delivery lanes give ``Claimed`` items; the report lane gives work item ids.
        """
        now = time.time() if now is None else now
        s = self.settings
        raw = self._claim(args=[now, lane, limit or s.batch_size, now + s.lease_seconds, token])
        if lane == REPORT_LANE:
            return [_s(it[0]) for it in raw]
        out = []
        for wid, meta, idx, recs, content in raw:
            wid = _s(wid)
            m = {_s(meta[i]): _s(meta[i + 1]) for i in range(0, len(meta), 2)}
            out.append(Claimed(wid=wid, job=wid.split("|", 1)[0], domain=lane, meta=m,
                               indexes=_s(idx).split(","),
                               records=[json.loads(r) if r is not None else None for r in recs],
                               content=content or b""))
        return out

    def renew(self, token: str, wids: list[str], *, now: float | None = None) -> int:
        """Extend the leases ``token`` still owns; return how many."""
        if not wids:
            return 0
        now = time.time() if now is None else now
        return int(self._renew(args=[now + self.settings.lease_seconds, token, *wids]))

    def release(self, token: str, lane: str, outcomes: list[Outcome], *, now: float | None = None):
        """Write outcomes, drop the leases, schedule what is left; return ``(applied, dispatch)``.

        ``applied`` holds ``"job|index"`` of each update actually written.
        """
        now = time.time() if now is None else now
        s = self.settings
        payload = [{"wid": o.wid, "due": -1 if o.due is None else o.due,
                    "updates": [[i, json.dumps(rec, separators=(",", ":")),
                                 1 if rec["state"] in FINAL_STATES else 0, ev]
                                for i, rec, ev in o.updates]} for o in outcomes]
        applied, disp = self._release(args=[now, token, s.result_ttl, s.batch_size, s.domain_concurrency,
                                            lane, json.dumps(payload, separators=(",", ":"))])
        return [_s(a) for a in applied], _pairs(disp)

    def tick(self, *, now: float | None = None, limit: int = 1000) -> Tick:
        """One scheduler step: expired leases back to the front of their lane, due
        deferred items to the back, quiet lanes re-dispatched, stalled intake re-published."""
        now = time.time() if now is None else now
        s = self.settings
        requeued, moved, disp, intake = self._tick(
            args=[now, limit, s.dispatch_stale, s.batch_size, s.domain_concurrency])
        return Tick(int(requeued), int(moved), _pairs(disp), [_s(i) for i in intake])

    # ------------------------------------------------------------ reading
    def job(self, job_id: str) -> tuple[dict[str, str], dict[int, dict]] | None:
        """``(meta, {index: record})`` of a job, or None when unknown or expired."""
        with self.r.pipeline(transaction=True) as p:
            p.hgetall(PREFIX + "job:" + job_id)
            p.hgetall(PREFIX + "rcpt:" + job_id)
            meta, recs = p.execute()
        if not meta:
            return None
        return ({_s(k): _s(v) for k, v in meta.items()},
                {int(k): json.loads(v) for k, v in recs.items()})

    def content(self, job_id: str) -> bytes | None:
        """The stored message, or None when the job is unknown or expired."""
        return self.r.get(PREFIX + "msg:" + job_id)


STATUS_FIELDS = ("address", "domain", "state", "code", "enhanced", "text", "exchange", "ip", "relay",
                 "attempts", "first_attempt", "last_attempt", "next_attempt")


def status_of(job_id: str, meta: dict[str, str], records: dict[int, dict]) -> dict:
    """The public status dict of a job (see ``tasks.status``)."""
    rows = [{f: records[i].get(f) for f in STATUS_FIELDS} for i in sorted(records)]
    if meta.get("done"):
        state = "done"
    elif all(r["state"] == "queued" and not r.get("runs") for r in records.values()):
        state = "queued"
    else:
        state = "active"
    return {"job": job_id, "state": state, "recipients": rows}


_stores: dict[tuple[int, str], Store] = {}


def get_store(settings: PipelineSettings | None = None) -> Store:
    """This process's store for ``settings`` (default: the environment); re-made after fork."""
    settings = settings or PipelineSettings.from_env()
    key = (os.getpid(), settings.redis_url)
    st = _stores.get(key)
    if st is None or st.settings != settings:
        st = _stores[key] = Store.from_settings(settings)
    return st

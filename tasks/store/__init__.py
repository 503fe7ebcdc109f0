"""All of mxq's state in Redis: jobs, recipients, work items, leases, the deferred queue.

mxq's state is the source of truth; Celery's queues only say "there may be
work in this lane".  Every state change is one Lua script (atomic, one round
trip), so a worker that dies at any instant leaves each work item in exactly
one place: a ready list, a leased batch, or the deferred queue.

The store layer is this package: this module (the queue: jobs, work items,
leases, records, the delivery scripts, ``Store``, the typed recipient ``Record``),
``keys`` (every key name: other modules build none by hand), ``items`` (the
work-item encoding: other modules read items through it), ``queue`` (the operator's scripts: ``mxq
queue`` drop, flush, hold, release, suspend, resume), ``hosts`` (the port-25
state's scripts) and ``lanes`` (the webhook senders' slots).  Every Lua script
of mxq is in it; the rest of ``mxq.tasks`` calls it.

Key layout (``mxq:`` prefix; one Redis database; not Redis Cluster-ready,
because the scripts build key names themselves):

===============================  ======  ==================================================
key                              type    contents
===============================  ======  ==================================================
``mxq:job:{job}``                hash    everything about one job, so it is written with one
                                         HSET and expires with one EXPIRE:
                                         ``c`` the message content (stored once, bytes);
                                         ``sender``, ``ret``, ``envid``, ``eightbit``,
                                         ``smtputf8``, ``size``, ``created``, ``n``
                                         (recipients), ``left`` (not yet final), ``idem``,
                                         ``domains`` (comma list), ``d:{domain}`` (indexes
                                         of that domain's recipients);
                                         ``r:{index}`` one JSON record per recipient:
                                         address, domain, state, code, enhanced, text,
                                         exchange, ip, relay, scope (what the deciding reply
                                         applied to: recipient, message, site), attempts, first_attempt,
                                         last_attempt, next_attempt, notify, orcpt, runs,
                                         exchanges, delay_reported.  Fields holding their
                                         default are not stored (``RECORD_DEFAULTS``,
                                         ``META_DEFAULTS``: a queued record is address,
                                         domain and state); this module's readers fill
                                         them in again
``mxq:idem:{sha256(key)}``       string  job id for an idempotency key (SET NX)
``mxq:stage:{token}``            hash    a large submission being stored (``Store.submit``):
                                         chunk number -> JSON spec of its jobs, whose
                                         hashes are written already (queued nowhere until
                                         the commit); after the commit, a string holding
                                         the job ids (1 hour)
``mxq:staging``                  zset    staged submissions not committed -> deadline
                                         (``STAGE_TTL``): past it the scheduler removes
                                         them and their job hashes (``Store.unstage``)
``mxq:ready:{lane}``             list    work items ready to run in that lane
``mxq:lease``                    zset    batch token -> lease expiry (work in flight)
``mxq:batch:{token}``            string  the lane and work items of one leased batch; once released,
                                         the release's reply (``REQ_TTL``: a retried release
                                         answers the same)
``mxq:deferred``                 zset    work item -> due time
``mxq:suppress:{address}``       string  a suppressed recipient (``mxq.tasks.suppress``): JSON
                                         reason, EXPIRE ``MXQ_SUPPRESS_TTL``
``mxq:hook:{id}``                hash    one webhook event (``mxq.tasks.webhooks``): ``b`` the JSON
                                         body, ``n`` failed POSTs so far
``mxq:guard``                    set     batch tokens whose release must check each record
                                         before writing (``mxq queue drop`` hit them in flight)
``mxq:dispatch``                 zset    lane -> last time tasks were published for it or
                                         work claimed from it (the scheduler re-publishes
                                         for lanes with ready work gone quiet)
``mxq:pending``                  hash    lane -> tasks published and not yet started
``mxq:intake``                   zset    jobs stored but not yet split (large batches),
                                         score = last (re)publication of ``mxq.intake``
``mxq:throttled``                zset    lane -> when the scheduler dispatches it again:
                                         work held back by traffic shaping (``mxq.tasks.shaping``)
``mxq:shape:conn:{domain}``      zset    concurrency slots: holder token -> expiry (Redis time)
``mxq:shape:tat:{domain}``       string  the domain's rate limiter state (GCRA, Redis time)
``mxq:down:{ip}:{port}``         string  failure memory of one exchange (``hoststatus``)
``mxq:port25``                   string  JSON verdict while outbound port 25 is concluded blocked
                                         (``hoststatus.RedisPort25State``, ``mxq.workers.port25``);
                                         ``mxq:port25:ev`` zset of recent failed connects
                                         (``kind|ip|domain`` -> time), ``mxq:port25:relay`` when
                                         the relay last worked, ``mxq:port25:probe`` whose turn
                                         it is to re-probe (NX EX the probe interval)
``mxq:sts:{domain}``             string  an MTA-STS policy, JSON ``{id, text}``, EX its max_age;
                                         ``mxq:stsfail:{domain}`` a failed fetch (5 min)
                                         (``hoststatus.RedisPolicyCache``)
``mxq:tlsrpt:{day}:{domain}``    hash    TLS-RPT session counts of one UTC day (``p:``, ``ok:``,
                                         ``fail:``, ``f:`` fields per policy); ``mxq:tlsrpt:{day}``
                                         set of that day's domains; 8 days
                                         (``hoststatus.RedisTLSReport``, ``mxq tlsrpt``)
``mxq:dns:*``                    string  the engine's shared DNS cache (``mxq.workers.dnscache``)
``mxq:dnslock:{type}:{name}``    string  the worker resolving that name now (2 s; the others
                                         wait for its answer: ``graph._shared_dns_cache``)
``mxq:hold:{lane}``              set     jobs whose recipients in that lane are on hold (``mxq queue
                                         hold``, ``mxq.tasks.admin``); the job hash has ``h:{lane}``
                                         = 1 too, which the claim reads with the records: a held
                                         work item popped from a ready list is parked, not claimed
``mxq:held``                     zset    parked (held) work items -> when they were parked; nothing
                                         else moves them: only ``mxq queue release`` (or drop)
``mxq:suspend:{lane}``           string  the lane is suspended (``mxq queue suspend``): JSON
                                         ``{since, expires, reason}``, PX its duration when it has
                                         one; dispatch publishes no task for it, acquire and claim
                                         refuse it, its mail stays on its ready list;
                                         ``mxq:suspended`` (set) indexes them (members whose
                                         key expired are let go by ``mxq queue``)
``mxq:req:{uuid}``               string  the reply of one script call (``_once``), so that the same
                                         call retried after a lost reply answers the same and
                                         writes nothing (``REQ_TTL``)
``mxq:final``                    zset    jobs that became final and whose outcome is not yet in
                                         Celery's result backend -> when a recorder may take
                                         them (``mxq.tasks.outcomes``; added by the script that
                                         made the job final)
===============================  ======  ==================================================

Lanes and work items:

- a delivery lane is a normalised domain (IDNA A-label, lower case, or an
  address literal); its work items are ``{job}|{domain}|{indexes}``: the
  recipients of one job in one domain, at most 100 (``ITEM_RCPTS``: a message
  to 10,000 recipients of one domain is 100 items, split the same way every
  time), delivered together over one connection;
- the report lane is ``!r``; its work items are ``!r|{job}|{index}|{event}``
  (event ``bounced``, ``expired`` or ``delayed``), handled by ``mxq.notify``;
- the webhook lane is ``!w``; its work items are ``!w|{id}`` (the event in
  ``mxq:hook:{id}``), handled by ``mxq.webhook`` (``mxq.tasks.webhooks``).

Final states: ``delivered``, ``bounced``, ``expired``, ``suppressed`` (refused
at submission, ``mxq.tasks.suppress``) and ``dropped`` (``mxq queue drop``).  The
release script writes a suppression entry for a recipient-level hard bounce
and a webhook event for each outcome ``MXQ_WEBHOOK_EVENTS`` asks for, in the
same atomic step as the record.

Life of a work item: the producer (or ``mxq.intake``) RPUSHes it onto its
ready list.  ``mxq.deliver`` LPOPs up to K items of one lane and leases them
as one batch (a token in ``mxq:lease`` scored by expiry, the items in
``mxq:batch:{token}``) in the same script; a heartbeat renews the lease
while the task runs.  The release script writes the recipients' new records
and removes the lease, and ZADDs items with recipients still deferred to
``mxq:deferred``.  While the batch still holds its lease nobody else can
have touched its items, so the records are written as computed; if the
lease was lost (the scheduler took the batch back), each record is checked
first and a final state is never overwritten.  The scheduler's tick moves
the items of expired leases back to the front of their ready list and due
deferred items to the back, and re-publishes tasks for lanes whose ready
work has gone quiet.  When ``left`` reaches 0 the job gets ``EXPIRE
result_ttl`` (state, recipients and content go together, with the
idempotency key).

Redis commands per delivered message stay low: per message one HSET and
(with one message per domain in a submission) one RPUSH at submission, one
HMGET at claim, one HSET (all of the job's recipients in the domain, and
``left`` when the item is the whole job; HINCRBY otherwise) and, for the
job's last recipient, one EXPIRE at release; the rest (the scripts
themselves, LPOP, lease, dispatch, shaping, the Celery task) is paid once per
batch of K or once per call.  ``dispatch`` costs a constant number of
commands per call whatever the number of lanes (one HMGET, HSET, ZADD each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TypedDict

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from mxq.workers.reply import printable

from ..app import DELIVERY, INTAKE, NOTIFICATIONS
from ..settings import PipelineSettings
from . import items as workitems

PREFIX = "mxq:"
#: Most bytes one Redis call of a submission carries (content, records, spec), or one job
#: when a single message is larger: far below Redis's 1 GB query buffer, which cuts the
#: connection (and redis-py then resends the whole payload, again and again).
CALL_BYTES = 16 * 1024 * 1024
#: Most jobs one Redis call of a submission stores: a script writing a job takes Redis ~20 us
#: (HSET of content, meta and records), so a call of 1,000 holds Redis ~20 ms, not the ~160 ms of
#: a 16 MB call of 2 KB messages (measured; every other client waits meanwhile).
CALL_JOBS = 1000
#: Most content bytes one claim's reply carries (or one message's, when it is larger): a
#: batch of 64 messages at the 35 MiB size limit would be a 2.2 GiB reply.
CLAIM_BYTES = 64 * 1024 * 1024
#: Seconds a staged submission may wait for its commit; past them the scheduler removes it
#: (``Store.submit``, ``Store.unstage``).
STAGE_TTL = 3600
#: The Redis lists where Celery's Redis transport keeps the tasks waiting in mxq's delivery,
#: notifications and intake queues (kombu names a queue's list after the queue).  The tick
#: re-publishes a quiet lane's tasks only while its queue is empty.
BROKER_QUEUES = (DELIVERY, NOTIFICATIONS, INTAKE)
REPORT_LANE = workitems.REPORT_LANE
FINAL_STATES = ("delivered", "bounced", "expired", "suppressed", "dropped")
#: The job hash fields that are not recipient records or content.
META_FIELDS = ("sender", "ret", "envid", "eightbit", "smtputf8", "size", "created", "n", "left", "idem")

#: Redis errors worth retrying: the server restarting or loading its AOF.
#: (``BusyLoadingError`` is a ``ConnectionError`` in redis-py.)
TRANSIENT_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# ---------------------------------------------------------------- Lua scripts
# A shared prelude: key helpers and the dispatch computation.  Redis runs Lua
# 5.1 (no goto, unpack() of at most a few thousand values), scripts are
# atomic, and cjson is available.
_PRELUDE = r"""
local P = 'mxq:'
local function lane_of(wid)
  if string.sub(wid, 1, 1) == '!' then return string.sub(wid, 1, 2) end   -- '!r' reports, '!w' webhooks
  local a = string.find(wid, '|', 1, true)
  local b = string.find(wid, '|', a + 1, true)
  return string.sub(wid, a + 1, b - 1)
end
local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, '[^' .. sep .. ']+') do table.insert(out, part) end
  return out
end
local function push(cmd, key, values)
  for i = 1, #values, 1000 do
    redis.call(cmd, key, unpack(values, i, math.min(i + 999, #values)))
  end
end
-- A job's recipients in one domain ('0,1,2,...') as work items of at most ITEM_RCPTS
-- recipients each, appended to out: '{job}|{d}|{indexes}'.  Deterministic (mxq queue
-- drop rebuilds the same ids), so a message to 10,000 recipients of one domain is 100
-- items, each claimed, delivered and released like any other, never one item whose
-- claim would unpack 10,000 fields (Postfix's qmgr splits the same way, by
-- default_destination_recipient_limit).
local ITEM_RCPTS = 100
local function work_items(job, d, idx, out)
  local _, commas = string.gsub(idx, ',', ',')
  if commas < ITEM_RCPTS then
    table.insert(out, job .. '|' .. d .. '|' .. idx)
    return out
  end
  local part = {}
  for i in string.gmatch(idx, '[^,]+') do
    table.insert(part, i)
    if #part == ITEM_RCPTS then
      table.insert(out, job .. '|' .. d .. '|' .. table.concat(part, ','))
      part = {}
    end
  end
  if #part > 0 then table.insert(out, job .. '|' .. d .. '|' .. table.concat(part, ',')) end
  return out
end
-- ---- destinations (the queue manager's per-domain state; see the module docstring) ----
-- mxq:policy (JSON, written by every worker at start: Store.publish_policy) says how
-- destinations are scheduled; these defaults apply until a worker wrote it.
local POLICY_DEFAULT = {d = 20, m = {}, i = 5, x = 1000, t = 0.5, f = 0.05, c = 1, s = {60}, idle = 600}
local _pol = nil
local function policy()
  if _pol == nil then
    local v = redis.call('GET', P .. 'policy')
    _pol = POLICY_DEFAULT
    if v then
      local ok, dec = pcall(cjson.decode, v)
      if ok and type(dec) == 'table' then _pol = dec end
    end
    for f, d in pairs(POLICY_DEFAULT) do if _pol[f] == nil then _pol[f] = d end end
  end
  return _pol
end
local function rtime()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function dest_key(lane) return P .. 'dest:' .. lane end
-- A lane's state as stored (a table; {} when none).  A lane quiet for pol.idle
-- seconds (and not dead) starts again from the initial window, as Postfix forgets
-- a destination whose queue emptied.
local function dest_decode(v, rnow)
  if not v then return {} end
  local st = cjson.decode(v)
  if not st.du and st.t and rnow and rnow - st.t > policy().idle then
    st.w = nil; st.fc = nil
  end
  return st
end
local function dest_load(lane, rnow) return dest_decode(redis.call('GET', dest_key(lane)), rnow) end
local function dest_save(lane, st, rnow)
  st.t = rnow
  local ttl = 3600
  if st.du and st.du > rnow then ttl = ttl + math.ceil(st.du - rnow) end
  redis.call('SET', dest_key(lane), cjson.encode(st), 'EX', ttl)
end
-- The lane's concurrency limit (MXQ_SHAPING's Nc): 0 when it has none.
local function climit(lane)
  local pol = policy()
  local v = pol.m[lane]
  if v == nil then v = pol.d end
  return tonumber(v) or 0
end
-- The lane's concurrency window now: from pol.i (initial), never above its limit.
local function window(lane, st)
  local pol = policy()
  local lim = climit(lane)
  if lim == 0 then lim = pol.x end
  local w = st.w or pol.i
  if w > lim then w = lim end
  if w < 1 then w = 1 end
  return math.floor(w)
end
-- Messages one connection gets through in pol.t seconds at the lane's measured seconds per
-- message (not capped: a fast lane's backlog is one connection's work), at least k for a lane
-- faster than pol.f seconds a message (qmgr.FAST_LATENCY: its chunks are k); unknown: k.
local function per_connection(st, k)
  local pol = policy()
  if not st.lat or st.lat <= 0 then return k end
  local per = math.max(1, math.floor(pol.t / st.lat))
  if st.lat < pol.f and per < k then per = k end
  return per
end
local function backoff(n)
  local s = policy().s
  return tonumber(s[math.min(math.max(n, 1), #s)]) or 60
end
-- How many more tasks each lane needs, minus those already published and not
-- started (mxq:pending).  A delivery lane wants as many connections as its ready
-- mail takes pol.t seconds each at its measured seconds per message (a slow lane's
-- mail spread wide, a fast lane's backlog on one connection; unknown latency: one
-- per k messages), at most its window, minus the tasks running (slot holders, as
-- its state counted them last); a dead lane one task at a time (it defers the
-- mail, or probes); the report lane at most maxpar, the webhook lane 1.
-- force: treat the published ones as lost and count the running ones again (the
-- scheduler, for a lane with ready work and no activity for a while).
-- lens (optional): lane -> its ready list's length, when the caller knows it (RPUSH returns it).
-- A constant number of commands whatever the number of lanes: one HMGET, one MGET, one
-- HSET, one ZADD, one ZADD NX, one ZREM, plus an LLEN per lane whose length is not known;
-- lanes without ready mail cost only that LLEN and the ZREM (a suspended one among them is
-- looked at again when mail comes: the dispatch that mail gets arms its end of suspension).
local function dispatch(lanes, now, k, maxpar, force, out, lens)
  if #lanes == 0 then return out end
  -- A lane with no ready mail needs nothing but leaving mxq:dispatch: its length first, and the
  -- reads below only for the others (a release or slot release that emptied its lane: 2 commands
  -- fewer).
  local uniq, once, ns, gone = {}, {}, {}, {}
  for _, lane in ipairs(lanes) do
    if not once[lane] then
      once[lane] = true
      local n = lens and lens[lane]
      if n == nil then n = redis.call('LLEN', P .. 'ready:' .. lane) end
      if n > 0 then table.insert(uniq, lane); ns[lane] = n else table.insert(gone, lane) end
    end
  end
  lanes = uniq
  local pends = {}
  if not force then
    for i = 1, #lanes, 1000 do      -- chunked: unpack() of 10,000 lanes would fail
      local part = redis.call('HMGET', P .. 'pending', unpack(lanes, i, math.min(i + 999, #lanes)))
      for j = 1, #part do pends[i + j - 1] = part[j] end
    end
  end
  -- a delivery lane's state and its suspension (mxq queue suspend) in the same MGET
  local dkeys, didx = {}, {}
  for i, lane in ipairs(lanes) do
    if string.sub(lane, 1, 1) ~= '!' then
      table.insert(dkeys, dest_key(lane)); table.insert(dkeys, P .. 'suspend:' .. lane); didx[i] = #dkeys - 1
    end
  end
  local dvals = {}
  for i = 1, #dkeys, 500 do
    local part = redis.call('MGET', unpack(dkeys, i, math.min(i + 499, #dkeys)))
    for _, v in ipairs(part) do table.insert(dvals, v) end
  end
  local rnow = nil
  if force and #dkeys > 0 then rnow = rtime() end
  local sets, touch, keep = {}, {}, {}
  for i, lane in ipairs(lanes) do
    local sus = didx[i] and dvals[didx[i] + 1]
    local n = ns[lane]
    if sus then
      -- Suspended: no task and no activity (no worker capacity held); its mail waits on its
      -- ready list.  mxq queue resume dispatches it, and so does the scheduler at the end
      -- of a suspension with a duration (mxq:throttled).
      table.insert(gone, lane)
      local ok, v = pcall(cjson.decode, sus)
      local ends = ok and type(v) == 'table' and tonumber(v.expires)
      if ends then
        if ends <= now then ends = now + 1 end      -- (clocks apart: look again in a second)
        redis.call('ZADD', P .. 'throttled', ends, lane)
      end
    elseif n == 0 then
      table.insert(gone, lane)
    else
      local pend = tonumber(pends[i] or '0') or 0
      local mp, kk, run = maxpar, k, 0
      if lane == '!w' then
        mp = 1                                -- webhooks: one task queued at a time (mxq.tasks.webhooks)
      elseif didx[i] then
        local st = dest_decode(dvals[didx[i]] or nil, rnow or now)   -- (the idle rule is coarse)
        if st.du then
          mp, kk = 1, n                       -- dead: one task (defers the mail, or probes)
        else
          mp, kk = window(lane, st), per_connection(st, k)
        end
        run = tonumber(st.run) or 0
        if force then
          redis.call('ZREMRANGEBYSCORE', P .. 'shape:conn:' .. lane, '-inf', rnow)
          run = redis.call('ZCARD', P .. 'shape:conn:' .. lane)
        end
      end
      local want = math.min(math.ceil(n / kk), mp) - pend - run
      if want > 0 then
        table.insert(sets, lane); table.insert(sets, pend + want)
        table.insert(touch, now); table.insert(touch, lane)
        table.insert(out, lane)
        table.insert(out, want)
      else
        table.insert(keep, now); table.insert(keep, lane)
      end
    end
  end
  if #sets > 0 then push('HSET', P .. 'pending', sets) end
  if #touch > 0 then push('ZADD', P .. 'dispatch', touch) end
  if #keep > 0 then
    for i = 1, #keep, 1000 do
      redis.call('ZADD', P .. 'dispatch', 'NX', unpack(keep, i, math.min(i + 999, #keep)))
    end
  end
  if #gone > 0 then push('ZREM', P .. 'dispatch', gone) end
  return out
end
-- Put a batch's items back on their ready lists (front) and drop its lease.
local function requeue(token, lanes, seen)
  local b = redis.call('GET', P .. 'batch:' .. token)
  redis.call('ZREM', P .. 'lease', token)
  redis.call('DEL', P .. 'batch:' .. token)
  redis.call('SREM', P .. 'guard', token)
  if not b then return end
  local items = split(b, '\n')
  local lane = table.remove(items, 1)
  if #items > 0 then
    local rev = {}
    for i = #items, 1, -1 do table.insert(rev, items[i]) end
    push('LPUSH', P .. 'ready:' .. lane, rev)
    if not seen[lane] then seen[lane] = true; table.insert(lanes, lane) end
  end
end
"""

# ---- running twice, and Redis at maxmemory ----
# A reply can be lost after Redis ran the script (a reset connection, a read timeout), and
# redis-py then sends the same EVALSHA again.  Every state-changing script is safe to run
# twice: the claim by its token (a batch already recorded under it is returned again,
# nothing popped), submit and commit by their ids, and the others by a request key, KEYS[1]
# = ``mxq:req:{uuid}`` made per call (``_req``): the first run stores its reply there
# (``REQ_TTL`` seconds), a second run returns it and writes nothing.
#
# Redis at maxmemory (noeviction) refuses a command that may grow memory (SET, HSET, RPUSH,
# ZADD...), but within a script only as its first write: once a script has written, Redis
# lets it finish (a script without flags, Redis 6.2 and 7).  So a script that takes work
# (claim, acquire) makes such a command its first write: when Redis is full it is refused
# whole, before anything is taken.  A script that gives back or finishes what was taken
# (release, record, renewals, slot release, refund, the tick) starts with a write Redis
# never refuses (a ZREM, GETDEL, or ``GIVES``: DEL of a key that does not exist): it runs
# when Redis is full, so what was claimed can always be released and a lease never runs out
# because Redis was full (the few bytes it adds are bounded by the work in flight).
GIVES = "redis.call('DEL', 'mxq:none')      -- a first write never refused: runs when Redis is full\n"
#: Seconds a request key keeps its script's reply (redis-py's retries last about 30 s).
REQ_TTL = 300


def _once(body: str, *, takes: bool = False, gives: bool = False) -> str:
    """``body`` (a script's code after its libraries) run at most once per request key KEYS[1].

    Two commands on the first run: the check and the reply's SET.  ``takes``: the check is a
    SET NX, refused when Redis is full (the script takes nothing then).  ``gives``: the check
    is a GETDEL, a write never refused (the script runs when Redis is full).
    """
    if takes:
        check = (f"  if not redis.call('SET', KEYS[1], '', 'NX', 'EX', {REQ_TTL}) then\n"
                 "    return cjson.decode(redis.call('GET', KEYS[1]))\n"
                 "  end\n")
    elif gives:
        check = ("  local m = redis.call('GETDEL', KEYS[1])\n"
                 f"  if m then redis.call('SET', KEYS[1], m, 'EX', {REQ_TTL}); return cjson.decode(m) end\n")
    else:
        check = ("  local m = redis.call('GET', KEYS[1])\n"
                 "  if m then return cjson.decode(m) end\n")
    return ("local function _run()\n" + body + "\nend\n"
            "if #KEYS > 0 then\n" + check + "end\n"
            "local out = _run()\n"
            f"if #KEYS > 0 then redis.call('SET', KEYS[1], cjson.encode(out), 'EX', {REQ_TTL}) end\n"
            "return out\n")


def _req() -> list[str]:
    """A fresh request key for one script call (``_once``): the keys argument of the call."""
    return [PREFIX + "req:" + uuid.uuid4().hex]


# Storing a submission: store_jobs() is the one atomic step, run by _SUBMIT (the
# whole batch in ARGV: small batches, one round trip) or by _COMMIT (a large batch
# whose job hashes were written beforehand by _STAGE, in calls of bounded size, see
# Store.submit).  spec: [{"id", "idem", "meta": {...}, "rcpts": [json...] (both only
# in _SUBMIT and _STAGE), "domains": [[domain, "0,1"], ...], "hooks"?, "expire"?}].
_SUBMIT_LIB = r"""
-- A job's hash, everything in one HSET: content, meta fields, recipient records.
local function write_job(jk, job, content)
  local flat = {'c', content}
  for f, v in pairs(job.meta) do table.insert(flat, f); table.insert(flat, v) end
  for r, rec in ipairs(job.rcpts) do table.insert(flat, 'r:' .. (r - 1)); table.insert(flat, rec) end
  push('HSET', jk, flat)
end
-- content_of(i): the i-th job's content (its hash is written here), or nil: the hash
-- was staged (written by _STAGE, not yet queued anywhere) and is kept as it is.
local function store_jobs(spec, now, mode, k, maxpar, content_of)
  local ids, lanes, work, intake, hooks = {}, {}, {}, {}, {}
  for i, job in ipairs(spec) do
    local id = job.id
    local jk = P .. 'job:' .. id
    local existing = false
    if job.had or (job.again and content_of and redis.call('EXISTS', jk) == 1) then
      existing = id           -- a retried id already stored (by the earlier call): that job, unchanged
    elseif job.idem ~= '' then
      existing = redis.call('GET', P .. 'idem:' .. job.idem)
      if not existing then redis.call('SET', P .. 'idem:' .. job.idem, id, 'NX') end
    end
    if existing then
      ids[i] = existing
      if not content_of and not job.had then redis.call('DEL', jk) end       -- staged for nothing
    else
      ids[i] = id
      if content_of then write_job(jk, job, content_of(i)) end
      if job.expire then          -- nothing left to deliver (every recipient suppressed): done now
        redis.call('EXPIRE', jk, job.expire)
        redis.call('ZADD', P .. 'final', now, id)             -- its outcome for the result backend
        if job.idem ~= '' then redis.call('EXPIRE', P .. 'idem:' .. job.idem, job.expire) end
      end
      if job.hooks then           -- webhook events (mxq.tasks.webhooks): [[id, body, ttl], ...]
        for _, h in ipairs(job.hooks) do
          redis.call('HSET', P .. 'hook:' .. h[1], 'b', h[2])
          redis.call('EXPIRE', P .. 'hook:' .. h[1], h[3])
          table.insert(hooks, '!w|' .. h[1])
        end
      end
      if mode == 'split' then
        for _, dx in ipairs(job.domains) do
          local d = dx[1]
          if not work[d] then work[d] = {}; table.insert(lanes, d) end
          work_items(id, d, dx[2], work[d])
        end
      elseif #job.domains > 0 then
        table.insert(intake, now); table.insert(intake, id)
      end
    end
  end
  local lens = {}
  for _, d in ipairs(lanes) do
    local w = work[d]
    for i = 1, #w, 1000 do
      lens[d] = redis.call('RPUSH', P .. 'ready:' .. d, unpack(w, i, math.min(i + 999, #w)))
    end
  end
  if #intake > 0 then push('ZADD', P .. 'intake', intake) end
  if #hooks > 0 then push('RPUSH', P .. 'ready:!w', hooks); table.insert(lanes, '!w') end
  return {ids, dispatch(lanes, now, k, maxpar, false, {}, lens)}
end
"""

# ARGV: now, mode ('split'|'intake'), k, maxpar, spec JSON, content...
# Returns {ids, dispatch}.  Re-running it (a retried call) changes nothing.
_SUBMIT = _PRELUDE + _SUBMIT_LIB + r"""
local now, mode, k, maxpar = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local spec = cjson.decode(ARGV[5])
-- A retried call (its reply was lost) finds the batch's first new job stored:
-- the script is atomic, so the whole batch was; answer with the ids, write
-- nothing.  (Jobs whose idempotency key belonged to an older job say nothing.)
local applied = false
for _, job in ipairs(spec) do
  if job.again then
    -- a retried id says nothing about this call (store_jobs looks at each)
  elseif job.idem == '' then
    applied = redis.call('EXISTS', P .. 'job:' .. job.id) == 1
    break
  end
  local v = redis.call('GET', P .. 'idem:' .. job.idem)
  if not v or v == job.id then
    applied = v == job.id
    break
  end
end
if applied then
  local ids = {}
  for i, job in ipairs(spec) do
    ids[i] = job.id
    if job.idem ~= '' then ids[i] = redis.call('GET', P .. 'idem:' .. job.idem) or job.id end
  end
  return {ids, {}}
end
return store_jobs(spec, now, mode, k, maxpar, function(i) return ARGV[5 + i] end)
"""

# ARGV: token, deadline, chunk number, spec JSON, content...  Stages one chunk of a large
# submission: each job's hash written whole (one HSET), the chunk's spec (without content,
# meta and records) in mxq:stage:{token} under its number, the token in mxq:staging scored
# by the deadline.  Nothing is queued: until the commit no work item names these jobs, and
# a submission never committed is removed by the scheduler after its deadline
# (_UNSTAGE).  Running it twice changes nothing (the chunk's number is there).  A job whose
# id is retried ("again", JobSpec.again) and exists already is not written: it is marked
# "had", so the commit takes it as stored and _UNSTAGE never removes it.  Refused whole at
# maxmemory (its first write is an HSET).
_STAGE = _PRELUDE + _SUBMIT_LIB + r"""
local sk = P .. 'stage:' .. ARGV[1]
local spec = cjson.decode(ARGV[4])
-- A retried call (its reply was lost) finds its chunk staged: the first run did it all.
if redis.call('HEXISTS', sk, ARGV[3]) == 1 then return #spec end
local common = {}
for i, job in ipairs(spec) do
  local jk = P .. 'job:' .. job.id
  if job.again and redis.call('EXISTS', jk) == 1 then
    job.had = 1               -- a retried id already stored: kept as it is, never unstaged
  else
    write_job(jk, job, ARGV[4 + i])
  end
  job.meta = nil; job.rcpts = nil; job.again = nil
  common[i] = job
end
redis.call('HSET', sk, ARGV[3], cjson.encode(common))
redis.call('ZADD', P .. 'staging', tonumber(ARGV[2]), ARGV[1])
return #spec
"""

# ARGV: token, now, mode, k, maxpar.  Commits a staged submission: mxq:stage:{token} is a
# hash of spec chunks (field = chunk number), every job hash is written already (_STAGE).
# All or nothing: if the submission is gone (the scheduler removed it past its deadline),
# nothing is stored.  Afterwards the key holds the ids (a string, 1 hour), so a retried
# commit answers the same.  Per job it costs nothing but its work items (and its
# idempotency key): the hashes stay as staged.  Returns {ids, dispatch}.
_COMMIT = _PRELUDE + _SUBMIT_LIB + r"""
local sk = P .. 'stage:' .. ARGV[1]
local now, mode, k, maxpar = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local kind = redis.call('TYPE', sk)['ok']
if kind == 'string' then return {cjson.decode(redis.call('GET', sk)), {}} end
if kind ~= 'hash' then
  return redis.error_reply('ERR mxq: staged submission ' .. ARGV[1] .. ' is gone; nothing was stored')
end
local flat = redis.call('HGETALL', sk)
local chunks = {}
for i = 1, #flat, 2 do chunks[tonumber(flat[i])] = flat[i + 1] end
local spec = {}
for n = 1, #flat / 2 do
  for _, job in ipairs(cjson.decode(chunks[n])) do table.insert(spec, job) end
end
local out = store_jobs(spec, now, mode, k, maxpar, nil)
redis.call('ZREM', P .. 'staging', ARGV[1])
redis.call('DEL', sk)
redis.call('SET', sk, cjson.encode(out[1]), 'EX', 3600)
return out
"""

# ARGV: now, most submissions[, token...].  Removes staged submissions whose deadline has
# passed (their producer died or gave up before the commit), or the tokens given whatever
# their deadline (the producer's own failure path): their job hashes and their spec.
# Returns how many submissions were looked at.  Never refused at maxmemory (it only
# deletes).
_UNSTAGE = r"""
local P = 'mxq:'
local tokens = {}
if #ARGV > 2 then
  for i = 3, #ARGV do tokens[i - 2] = ARGV[i] end
else
  tokens = redis.call('ZRANGEBYSCORE', P .. 'staging', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
end
for _, token in ipairs(tokens) do
  redis.call('ZREM', P .. 'staging', token)
  local sk = P .. 'stage:' .. token
  if redis.call('TYPE', sk)['ok'] == 'hash' then
    for _, chunk in ipairs(redis.call('HVALS', sk)) do
      local keys = {}
      for _, job in ipairs(cjson.decode(chunk)) do
        if not job.had then table.insert(keys, P .. 'job:' .. job.id) end
      end
      for i = 1, #keys, 1000 do redis.call('DEL', unpack(keys, i, math.min(i + 999, #keys))) end
    end
    redis.call('DEL', sk)
  end
end
return #tokens
"""

# ARGV: now, k, maxpar, job ids...  Splits stored jobs into their domain lanes (once).
_INTAKE = _PRELUDE + _once(r"""
local now, k, maxpar = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lanes, work = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', P .. 'intake', id) == 1 then
    local domains = redis.call('HGET', P .. 'job:' .. id, 'domains')
    if domains then
      local ds = split(domains, ',')
      local fields = {}
      for _, d in ipairs(ds) do table.insert(fields, 'd:' .. d) end
      for i = 1, #fields, 1000 do
        local idx = redis.call('HMGET', P .. 'job:' .. id, unpack(fields, i, math.min(i + 999, #fields)))
        for j = 1, #idx do
          local d = ds[i + j - 1]
          if not work[d] then work[d] = {}; table.insert(lanes, d) end
          work_items(id, d, idx[j], work[d])
        end
      end
    end
  end
end
for _, d in ipairs(lanes) do push('RPUSH', P .. 'ready:' .. d, work[d]) end
return dispatch(lanes, now, k, maxpar, false, {})
""")

# ARGV: now, lane, k, lease expiry, token, checked ('1': the caller's acquire just found the lane
#       not suspended, so the claim does not look again), most content bytes, meta field names...
# Pops up to k items, leases them as one batch.  Delivery lanes return
# {wid, content, packed} per item, packed being the JSON array of the HMGET
# of the meta fields then each recipient record (false when missing): one
# bulk string for Python to parse instead of a dozen RESP elements (the
# reply parser was the largest cost of a claim, profiled).  The report and
# webhook lanes return {wid} per item.
# Safe to run twice: a batch already recorded under the token (the first run's reply
# was lost) is returned again and nothing else happens (not even the hold and suspension
# checks: what the first run leased is the batch).  The contents returned total at
# most 'most content bytes' (or one item's, when one is larger): the items past it go
# back to the front of the lane, unread.  Refused whole at maxmemory: its first write is the
# ZADD of the lease.
_CLAIM = _PRELUDE + r"""
local now, lane, k, expiry, token = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local special = string.sub(lane, 1, 1) == '!'
local most = tonumber(ARGV[7])
local bk = P .. 'batch:' .. token
local items, again
-- The lease first: a write refused when Redis is full (before the LPOP), and it finds a
-- token that holds its lease already: this claim ran, its reply was lost.
if redis.call('ZADD', P .. 'lease', 'NX', expiry, token) == 0 then
  again = true
  items = split(redis.call('GET', bk) or lane, '\n')
  table.remove(items, 1)
else
  -- A suspended lane (mxq queue suspend) gives nothing: a connection under way ends after its chunk.
  if not special and ARGV[6] ~= '1' and redis.call('EXISTS', P .. 'suspend:' .. lane) == 1 then
    redis.call('ZREM', P .. 'lease', token)
    return {}
  end
  items = redis.call('LPOP', P .. 'ready:' .. lane, k)
  if special then
    -- a task of the report or webhook lane starts: no longer pending (a delivery task
    -- did that in its acquire, before its first claim)
    local pend = tonumber(redis.call('HGET', P .. 'pending', lane) or '0')
    if pend > 1 then
      redis.call('HSET', P .. 'pending', lane, pend - 1)
    elseif pend == 1 then
      redis.call('HDEL', P .. 'pending', lane)      -- no zero entries left behind for idle domains
    end
  end
end
local out = {}
if not items then
  redis.call('ZREM', P .. 'lease', token)
  redis.call('ZREM', P .. 'dispatch', lane)
  return out
end
local meta = {}
for i = 8, #ARGV do table.insert(meta, ARGV[i]) end
table.insert(meta, 'c')
local nmeta = #meta
table.insert(meta, 'h:' .. lane)          -- on hold (mxq queue hold), read with the rest
local held = {lane}
local bytes, back = 0, {}
for _, wid in ipairs(items) do
  if #back > 0 then
    table.insert(back, wid)
  elseif special then                            -- reports, webhooks: bare work item ids
    table.insert(held, wid)
    table.insert(out, {wid})
  else
    local bar = string.find(wid, '|', 1, true)
    local job = string.sub(wid, 1, bar - 1)
    local jk = P .. 'job:' .. job
    local idx = split(string.sub(wid, string.find(wid, '|', bar + 1, true) + 1), ',')
    local fields = {unpack(meta)}
    for _, i in ipairs(idx) do table.insert(fields, 'r:' .. i) end
    local values = redis.call('HMGET', jk, unpack(fields))
    local content = values[nmeta]
    if content and values[nmeta + 1] and not again then   -- on hold: parked until mxq queue release
      redis.call('ZADD', P .. 'held', 'NX', now, wid)
    elseif content and not again and #out > 0 and bytes + #content > most then
      table.insert(back, wid)                    -- this reply is full: the rest stays ready
    elseif content then                          -- the job still exists
      bytes = bytes + #content
      table.insert(held, wid)
      table.remove(values, nmeta + 1)
      table.remove(values, nmeta)
      table.insert(out, {wid, content, cjson.encode(values)})
    end
  end
end
if again then return out end
if #back > 0 then
  local rev = {}
  for i = #back, 1, -1 do table.insert(rev, back[i]) end
  push('LPUSH', P .. 'ready:' .. lane, rev)
end
-- LPOP took min(k, length): fewer than k means the list is empty now.
if #items == k or #back > 0 then
  redis.call('ZADD', P .. 'dispatch', now, lane)
else
  redis.call('ZREM', P .. 'dispatch', lane)
end
if #held > 1 then
  redis.call('SET', bk, table.concat(held, '\n'))
else
  redis.call('ZREM', P .. 'lease', token)
end
return out
"""

# ARGV: expiry, tokens...  Renews the batch leases these tokens still hold (also when Redis is
# full: GIVES).  Returns, per token, 1 when it holds its lease, 0 when it lost it.
_RENEW = GIVES + r"""
local out = {}
for i = 2, #ARGV do
  redis.call('ZADD', 'mxq:lease', 'XX', tonumber(ARGV[1]), ARGV[i])
  if redis.call('ZSCORE', 'mxq:lease', ARGV[i]) then out[i - 1] = 1 else out[i - 1] = 0 end
end
return out
"""

# ---- traffic shaping and destination concurrency (mxq.tasks.shaping, the module docstring) ----
# ARGV: now (the caller's clock, for mxq:dispatch / mxq:throttled, which the scheduler
#       compares with its own clock), lane, want, concurrency limit (0 = none), slot ttl,
#       token, emission interval (0 = no rate), bucket size, backstop seconds
# Returns {granted, wait, reason, mode, latency, window, dead wait, why, enhanced}:
#   reason "ok", "empty", "concurrency", "rate", "dead" (a probe of the dead lane is
#   under way) or "suspended" (mxq queue suspend; wait -1: until resumed); mode "deliver", "probe" (the one try of a dead lane whose wait is over:
#   one message) or "drain" (the lane is dead: defer its ready mail, no connection);
#   latency: the lane's seconds per message (-1 unknown); window: its concurrency window;
#   dead wait: seconds until a dead lane may be probed.  The task is no longer pending
#   whatever the answer.  Every limit is computed on Redis's TIME.
_ACQUIRE = _PRELUDE + _once(takes=True, body=r"""
local now, lane, want = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local lim, ttl, token = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local T, bucket, backstop = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local ready, slots, tatk = P .. 'ready:' .. lane, P .. 'shape:conn:' .. lane, P .. 'shape:tat:' .. lane
local rnow = rtime()
local n = redis.call('LLEN', ready)
local pend = tonumber(redis.call('HGET', P .. 'pending', lane) or '0')
if pend > 1 then
  redis.call('HSET', P .. 'pending', lane, pend - 1)
elseif pend == 1 then
  redis.call('HDEL', P .. 'pending', lane)
end
-- Refusing: the lane is active, and the scheduler looks at it again after the wait.
local function refuse(reason, wait)
  if n > 0 then
    redis.call('ZADD', P .. 'dispatch', now, lane)
    redis.call('ZADD', P .. 'throttled', 'LT', now + wait, lane)
  else
    redis.call('ZREM', P .. 'dispatch', lane)
  end
  return {0, string.format('%.6f', wait), reason, '', '-1', '0', '0', '', ''}
end
if n == 0 then return refuse('empty', 0) end
local got = redis.call('MGET', P .. 'suspend:' .. lane, dest_key(lane))      -- (one read for both)
local sus = got[1]
if sus then
  -- Suspended (mxq queue suspend): no connection, and no activity until resumed (or until the
  -- end of its duration, when the scheduler dispatches it: mxq:throttled).
  redis.call('ZREM', P .. 'dispatch', lane)
  local wait = -1
  local ok, v = pcall(cjson.decode, sus)
  local ends = ok and type(v) == 'table' and tonumber(v.expires)
  if ends then
    if ends <= now then ends = now + 1 end
    wait = ends - now
    redis.call('ZADD', P .. 'throttled', ends, lane)
  end
  return {0, string.format('%.6f', wait), 'suspended', '', '-1', '0', '0', '', ''}
end
local st = dest_decode(got[2], rnow)
local mode = 'deliver'
local lat = '-1'
if st.lat then lat = string.format('%.6f', st.lat) end
if st.du then
  if rnow < st.du then
    return {math.min(want, n), '0', 'ok', 'drain', lat, '0', string.format('%.6f', st.du - rnow),
            st.why or '', st.enh or ''}
  end
  if st.pr and st.pr ~= token and (st.pe or 0) > rnow then
    return refuse('dead', math.max(backstop, st.pe - rnow))
  end
  st.pr, st.pe, mode, want = token, rnow + ttl, 'probe', 1
end
local w = window(lane, st)
if lim > 0 and w > lim then w = lim end          -- the caller's limit wins over the published policy
local idle = P .. 'shape:idle:' .. lane
local run = 0
if lim > 0 then
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', rnow)      -- holders that died
  redis.call('ZREMRANGEBYSCORE', idle, '-inf', rnow)
  run = redis.call('ZCARD', slots)
  if mode ~= 'probe' and run + redis.call('ZCARD', idle) >= w then
    if tonumber(st.run) ~= run then
      st.run = run
      dest_save(lane, st, rnow)
    end
    return refuse('concurrency', backstop)
  end
end
local grant = math.min(want, n)
if T > 0 then
  local tat = tonumber(redis.call('GET', tatk) or '0')
  local base = math.max(tat, rnow)
  local avail = math.floor(bucket - (base - rnow) / T + 1e-9)
  if avail < 1 then
    if mode == 'probe' then st.pr, st.pe = nil, nil end
    return refuse('rate', (base - rnow) - (bucket - 1) * T)
  end
  grant = math.min(grant, avail)
  local tat2 = base + grant * T
  redis.call('SET', tatk, string.format('%.6f', tat2), 'PX', math.ceil((tat2 - rnow) * 1000) + 1000)
end
if lim > 0 then
  st.run = run + redis.call('ZADD', slots, rnow + ttl, token)     -- (ZADD counts the new holder)
  redis.call('PEXPIRE', slots, math.ceil(ttl * 1000) + 1000)
end
dest_save(lane, st, rnow)
return {grant, '0', 'ok', mode, lat, tostring(w), '0', '', ''}
""")

# ARGV: lane, ttl, token.  Extends the slot if the token still holds it (and a probe's claim).
_SLOT_RENEW = _PRELUDE + GIVES + r"""
local slots = P .. 'shape:conn:' .. ARGV[1]
local ttl, token = tonumber(ARGV[2]), ARGV[3]
local rnow = rtime()
redis.call('ZADD', slots, 'XX', 'CH', rnow + ttl, token)
if redis.call('ZSCORE', slots, token) then
  redis.call('PEXPIRE', slots, math.ceil(ttl * 1000) + 1000)
  return 1
end
return 0
"""

# ARGV: now, lane, token, park (1: the holder's connection goes idle in a connection cache
#       and keeps the slot: mxq:shape:idle:{lane}; 0: the slot is given back), ttl, k, maxpar.
# The lane's count of running tasks (its state's 'run') is updated, a probe held by the
# token is let go, and tasks are dispatched for the lane's ready work (nobody may be
# left to take it: the slot freed may be what an earlier task was refused for).  Returns
# {1 if the token held a slot, dispatch}.
_SLOT_RELEASE = _PRELUDE + _once(gives=True, body=r"""
local now, lane, token, park = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4] == '1'
local ttl, k, maxpar = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local slots, idle = P .. 'shape:conn:' .. lane, P .. 'shape:idle:' .. lane
local rn = nil
local function clock() rn = rn or rtime(); return rn end      -- Redis's TIME, read once, when needed
local removed = redis.call('ZREM', slots, token)
if park then
  if removed == 1 then
    redis.call('ZADD', idle, clock() + ttl, token)
    redis.call('PEXPIRE', idle, math.ceil(ttl * 1000) + 1000)
  end
else
  local parked = redis.call('ZREM', idle, token)
  if parked == 1 then
    -- A parked slot (its connection taken over by another task, or closed, in a process cache):
    -- the lane's running count is the same, and a probe's parked slot let its probe go when it
    -- parked.  No clock, no destination state.
    return {parked, dispatch({lane}, now, k, maxpar, false, {})}
  end
  removed = removed + parked
end
local v = redis.call('GET', dest_key(lane))
if v then
  local st = cjson.decode(v)
  local run = redis.call('ZCARD', slots)
  if tonumber(st.run) ~= run or st.pr == token then
    st.run = run
    if st.pr == token then st.pr, st.pe = nil, nil end
    dest_save(lane, st, clock())
  end
end
return {removed, dispatch({lane}, now, k, maxpar, false, {})}
""")

# ARGV: lane, tokens, emission interval.  Gives unused rate tokens back.
_REFUND = _once(gives=True, body=r"""
local k = 'mxq:shape:tat:' .. ARGV[1]
local tat = redis.call('GET', k)
if not tat then return 0 end
local v = tonumber(tat) - tonumber(ARGV[2]) * tonumber(ARGV[3])
redis.call('SET', k, string.format('%.6f', v), 'KEEPTTL')
return 1
""")

# The outcome writer shared by _RELEASE and _RECORD.
# payload: [{"wid", "due" (-1: nothing left), "idem", "left" (optional: the job's 'left' at
#            claim time when the item holds every recipient of the job; see Outcome),
#            "updates": [[index, record, final, event,
#            suppress, hook]]}]; suppress: [key, entry, ttl] or false (mxq.tasks.suppress),
#            hook: [id, body, ttl] or false (mxq.tasks.webhooks), both written only with the record.
# Writes the records (a final state already there is never overwritten when the
# batch may have been touched by someone else -- except that a recipient dropped
# while its transaction was in flight is recorded as delivered when it was: the
# truth, not counted twice in "left"), and, while the token holds its lease, the
# deferred items' due times (an item due now with no record written -- not attempted --
# goes back to the front of its ready list instead).  Fills applied ("job|index" of each update written)
# and returns the report and webhook work items to queue.
_WRITE = r"""
local FINAL = {delivered = true, bounced = true, expired = true, suppressed = true, dropped = true}
local function write_outcomes(payload, token, ttl, owner, applied, now, guarded, hide, mine)
  local reports, deferred, hooks, done, back = {}, {}, {}, {}, {}
  -- A batch 'mxq queue drop' hit while in flight: check each record as if the lease were lost.
  if guarded == nil then guarded = not owner or redis.call('SISMEMBER', P .. 'guard', token) == 1 end
  for _, item in ipairs(payload) do
    local wid = item.wid
    local job = string.sub(wid, 1, string.find(wid, '|', 1, true) - 1)
    local jk = P .. 'job:' .. job
    if #item.updates > 0 then
      local writes, finals = {}, 0
      for _, u in ipairs(item.updates) do
        local idx, rec, isfinal, event = u[1], u[2], u[3], u[4]
        local ok = not guarded
        if not ok then
          -- Lost the lease: someone else may have written since the claim.
          local cur = redis.call('HGET', jk, 'r:' .. idx)
          local state = cur and cjson.decode(cur).state
          ok = cur and not FINAL[state]
          if state == 'dropped' and isfinal == 1 and cjson.decode(rec).state == 'delivered' then
            -- dropped while the transaction was already under way, and it went through
            table.insert(writes, 'r:' .. idx); table.insert(writes, rec)
            table.insert(applied, job .. '|' .. idx)
          end
        end
        if ok then
          table.insert(writes, 'r:' .. idx); table.insert(writes, rec)
          table.insert(applied, job .. '|' .. idx)
          if isfinal == 1 then finals = finals + 1 end
          if event ~= '' then table.insert(reports, '!r|' .. job .. '|' .. idx .. '|' .. event) end
          local sup, hook = u[5], u[6]
          if sup then redis.call('SET', sup[1], sup[2], 'EX', sup[3]) end
          if hook then
            redis.call('HSET', P .. 'hook:' .. hook[1], 'b', hook[2])
            redis.call('EXPIRE', P .. 'hook:' .. hook[1], hook[3])
            table.insert(hooks, '!w|' .. hook[1])
          end
        end
      end
      if #writes > 0 then
        local left
        if item.left and not guarded then
          -- The item is the whole job (every recipient, one domain) and the lease is
          -- held: nobody else counts this job down, so 'left' is written with the records.
          left = item.left - finals
          table.insert(writes, 'left'); table.insert(writes, tostring(left))
          push('HSET', jk, writes)
        else
          push('HSET', jk, writes)
          if finals > 0 then left = redis.call('HINCRBY', jk, 'left', -finals) end
        end
        if finals > 0 and left <= 0 then
          redis.call('EXPIRE', jk, ttl)
          if hide and hide > 0 and item.whole and not guarded then
            -- The caller holds every record of the job (written just now): it writes the outcome
            -- itself, and the job stays hidden from other recorders until then (hide seconds).
            table.insert(done, now + hide); table.insert(mine, job)
          else
            table.insert(done, now)
          end
          table.insert(done, job)                             -- outcome for the result backend
          if item.idem ~= '' then redis.call('EXPIRE', P .. 'idem:' .. item.idem, ttl) end
        end
      end
    end
    if owner and item.due >= 0 then
      if #item.updates == 0 and item.due <= now then
        -- Not attempted (a chunk overdue or out of time, mxq.tasks.graph): back to the front of
        -- its lane at once, for the dispatch below, not through the deferred queue and a tick.
        local l = lane_of(wid)
        if not back[l] then back[l] = {}; table.insert(back, l) end
        table.insert(back[l], 1, wid)                       -- LPUSH below keeps their order
      else
        table.insert(deferred, item.due); table.insert(deferred, wid)
      end
    end
  end
  if #deferred > 0 then push('ZADD', P .. 'deferred', deferred) end
  for _, l in ipairs(back) do push('LPUSH', P .. 'ready:' .. l, back[l]) end
  if #done > 0 then push('ZADD', P .. 'final', done) end
  return reports, hooks, guarded
end
local function queue_events(reports, hooks, lanes)
  if #reports > 0 then
    push('RPUSH', P .. 'ready:!r', reports)
    table.insert(lanes, '!r')
  end
  if #hooks > 0 then
    push('RPUSH', P .. 'ready:!w', hooks)
    table.insert(lanes, '!w')
  end
end
-- Destination feedback after a delivery run (Postfix's qmgr): fb = {ok = transactions
-- that got a server verdict, fail = runs that reached no server (connection or
-- handshake failures), lat = seconds per message, why/enh = the failure's text and
-- status, probe = the probe's token or ''}.  Success grows the window by one per
-- message up to the limit and clears the failed cohorts (and revives a dead lane);
-- a failure shrinks it by one and adds 1/window to the failed cohorts: a full cohort
-- (pol.c) declares the lane dead until now + the retry schedule's step for that
-- many dead periods; only a failed probe makes a dead lane dead for longer (runs
-- under way when it was declared dead end with failures too).  Returns 'dead' or 'ok'.
local function feedback(lane, fb)
  local pol = policy()
  local rnow = rtime()
  local st = dest_load(lane, rnow)
  local lim = climit(lane)
  if lim == 0 then lim = pol.x end
  local w = st.w or pol.i
  if (fb.ok or 0) > 0 then
    if st.du then st.du = nil; st.dn = nil; w = pol.i end      -- the probe got through: alive again
    w = math.min(lim, w + fb.ok)
    st.fc = nil
    if fb.lat and fb.lat > 0 then        -- down half the way per message, up a fifth (qmgr.smooth)
      if not st.lat then st.lat = fb.lat
      elseif fb.lat > st.lat then st.lat = st.lat + (fb.lat - st.lat) * 0.2
      else st.lat = st.lat + (fb.lat - st.lat) * (1 - 0.5 ^ math.min(fb.ok, 30)) end
    end
  elseif (fb.fail or 0) > 0 then
    st.why, st.enh = fb.why, fb.enh
    if st.du then
      if fb.probe and fb.probe ~= '' then
        st.dn = (st.dn or 1) + 1                               -- a failed probe: dead for longer
        st.du = rnow + backoff(st.dn)
      end                  -- else a run started before the verdict: no new evidence, the period stands
    else
      for _ = 1, fb.fail do
        st.fc = (st.fc or 0) + 1 / math.max(1, w)
        w = math.max(1, w - 1)
      end
      if st.fc >= pol.c then
        st.du, st.dn, st.fc, w = rnow + backoff(1), 1, nil, pol.i
      end
    end
  end
  if fb.probe and fb.probe ~= '' and st.pr == fb.probe then st.pr = nil; st.pe = nil end
  st.w = w
  dest_save(lane, st, rnow)
  if st.du then return 'dead' end
  return 'ok'
end
"""

# ARGV: now, token, result_ttl, k, maxpar, lane, payload JSON, feedback JSON ('' for none),
#       spread ('0': no tasks for the lane itself: its task goes on and dispatches when it ends),
#       hide (seconds; 0: none): jobs made final whose every record is in the payload (an item
#       with 'left') go to mxq:final hidden that long, for the caller to record (mxq.tasks.outcomes)
# Writes the outcomes (see _WRITE), drops the lease, applies the destination feedback.
# Returns {applied, dispatch, lane status ('ok', 'dead' or '' without feedback), those jobs}.
_RELEASE = _PRELUDE + _WRITE + r"""
local now, token, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local k, maxpar, lane = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local payload = cjson.decode(ARGV[7])
local bk = P .. 'batch:' .. token
local owner = redis.call('ZSCORE', P .. 'lease', token) ~= false
if not owner then
  -- Ran already (its reply was lost): the batch key holds that reply.  Else the lease was lost.
  local b = redis.call('GET', bk)
  if b and string.sub(b, 1, 1) == '\n' then return cjson.decode(string.sub(b, 2)) end
end
-- The first write: one Redis never refuses, so the release runs when Redis is full.  It says too
-- whether 'mxq queue drop' hit the batch in flight (then each record is checked as if the lease
-- were lost).
local dropped = redis.call('SREM', P .. 'guard', token) == 1
local guarded = not owner or dropped
local applied, lanes = {}, {lane}
if ARGV[9] == '0' then lanes = {} end
local mine = {}
local reports, hooks = write_outcomes(payload, token, ttl, owner, applied, now, guarded,
                                      tonumber(ARGV[10] or '0'), mine)
if owner then redis.call('ZREM', P .. 'lease', token) end
local status = ''
if ARGV[8] ~= '' then status = feedback(lane, cjson.decode(ARGV[8])) end
queue_events(reports, hooks, lanes)
local out = {applied, dispatch(lanes, now, k, maxpar, false, {}), status, mine}
-- The batch key now holds the reply ('\n' first: no lane is empty) for a retried release.
if owner then redis.call('SET', bk, '\n' .. cjson.encode(out), 'EX', REQ_TTL) end
return out
""".replace("REQ_TTL", str(REQ_TTL))

# ARGV: now, token, result_ttl, k, maxpar, lane, payload JSON, hide (as _RELEASE's)
# Outcomes recorded while their batch is still under way (each message's as soon as its
# final reply arrived): written as by _RELEASE, and the items leave the batch, so the
# lease, if it ran out now, would put back only the others.  The lease stays.
# Returns {applied, dispatch (report and webhook lanes only), jobs made final hidden for the caller}.
_RECORD = _PRELUDE + _WRITE + r"""
local now, token, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local k, maxpar, lane = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local payload = cjson.decode(ARGV[7])
local owner = redis.call('ZSCORE', P .. 'lease', token) ~= false
local applied, lanes = {}, {}
if owner then
  -- The items recorded leave the batch.  An item of the payload no longer in it was recorded
  -- by this very call already (its reply was lost, redis-py sent it again): not written twice.
  -- (GETDEL, then SET at once: the first write is one Redis never refuses when it is full.)
  local bk = P .. 'batch:' .. token
  local b = redis.call('GETDEL', bk)
  if b then
    local held = {}
    local items = split(b, '\n')
    for i = 2, #items do held[items[i]] = true end
    local fresh, done = {}, {}
    for _, item in ipairs(payload) do
      if held[item.wid] then
        table.insert(fresh, item); done[item.wid] = true
      else
        for _, u in ipairs(item.updates) do
          table.insert(applied, string.sub(item.wid, 1, string.find(item.wid, '|', 1, true) - 1) .. '|' .. u[1])
        end
      end
    end
    local keep = {items[1]}
    for i = 2, #items do
      if not done[items[i]] then table.insert(keep, items[i]) end
    end
    redis.call('SET', bk, table.concat(keep, '\n'))
    payload = fresh
  end
else
  redis.call('DEL', 'mxq:none')       -- a first write never refused: runs when Redis is full
end
local mine = {}
local reports, hooks = write_outcomes(payload, token, ttl, owner, applied, now, nil, tonumber(ARGV[8] or '0'), mine)
queue_events(reports, hooks, lanes)
return {applied, dispatch(lanes, now, k, maxpar, false, {}), mine}
"""

# ARGV: now, limit, stale, k, maxpar, then the broker's list keys of the delivery,
# notifications and intake queues (BROKER_QUEUES).  The scheduler's one atomic step.
# Returns {requeued batches, moved, dispatch, intake job ids}.
_TICK = _PRELUDE + _once(gives=True, body=r"""
local now, limit, stale = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local k, maxpar = tonumber(ARGV[4]), tonumber(ARGV[5])
local lanes, seen = {}, {}
local expired = redis.call('ZRANGEBYSCORE', P .. 'lease', '-inf', now, 'LIMIT', 0, limit)
for _, token in ipairs(expired) do requeue(token, lanes, seen) end
local due = redis.call('ZRANGEBYSCORE', P .. 'deferred', '-inf', now, 'LIMIT', 0, limit)
if #due > 0 then
  push('ZREM', P .. 'deferred', due)
  local by = {}
  for _, wid in ipairs(due) do
    local l = lane_of(wid)
    if not by[l] then by[l] = {} end
    table.insert(by[l], wid)
    if not seen[l] then seen[l] = true; table.insert(lanes, l) end
  end
  for l, wids in pairs(by) do push('RPUSH', P .. 'ready:' .. l, wids) end
end
-- Lanes held back by traffic shaping (mxq.tasks.shaping) whose wait is over.
local throttled = redis.call('ZRANGEBYSCORE', P .. 'throttled', '-inf', now, 'LIMIT', 0, limit)
if #throttled > 0 then
  push('ZREM', P .. 'throttled', throttled)
  for _, l in ipairs(throttled) do
    if not seen[l] then seen[l] = true; table.insert(lanes, l) end
  end
end
local out = dispatch(lanes, now, k, maxpar, false, {})
-- Quiet lanes get their tasks again (one may have been lost) -- but only while the
-- broker's queue for them is empty: tasks still waiting there are not lost, only
-- behind others (10,000 domains submitted at once take minutes to wake), and
-- publishing them again would flood the queue that is already too long.
local busy = {delivery = redis.call('LLEN', ARGV[6]) > 0, reports = redis.call('LLEN', ARGV[7]) > 0}
local quiet = {}
for _, lane in ipairs(redis.call('ZRANGEBYSCORE', P .. 'dispatch', '-inf', now - stale, 'LIMIT', 0, limit)) do
  if not busy[string.sub(lane, 1, 1) == '!' and 'reports' or 'delivery'] then table.insert(quiet, lane) end
end
dispatch(quiet, now, k, maxpar, true, out)
local intake = {}
if redis.call('LLEN', ARGV[8]) == 0 then
  intake = redis.call('ZRANGEBYSCORE', P .. 'intake', '-inf', now - stale, 'LIMIT', 0, limit)
  for _, id in ipairs(intake) do redis.call('ZADD', P .. 'intake', now, id) end
end
return {#expired, #due, out, intake}
""")

# ARGV: job id.  Returns {meta values..., records...} without the content, or {} when unknown.
# ARGV: now, lease, limit, guess, meta fields (with 'n')...  Claims jobs of mxq:final (hidden for
# 'lease' seconds) and returns, per job, {job, n, meta values..., records...} ({job, -1} when it
# expired meanwhile).  One HMGET per job of up to 'guess' recipients: recording an outcome costs
# that read, the backend's write (Redis: SETEX and PUBLISH) and a share of one script per batch.
_FINAL = _once(r"""
local now, lease, limit, guess = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local meta = {}
for i = 5, #ARGV do table.insert(meta, ARGV[i]) end
local npos = 0
for i, f in ipairs(meta) do if f == 'n' then npos = i end end
local jobs = redis.call('ZRANGEBYSCORE', 'mxq:final', '-inf', now, 'LIMIT', 0, limit)
local out, again = {}, {}
for _, job in ipairs(jobs) do
  table.insert(again, now + lease); table.insert(again, job)
  local jk = 'mxq:job:' .. job
  -- One HMGET for the meta and the first 'guess' records (most jobs have that few recipients).
  local fields = {}
  for _, f in ipairs(meta) do table.insert(fields, f) end
  for i = 0, guess - 1 do table.insert(fields, 'r:' .. i) end
  local got = redis.call('HMGET', jk, unpack(fields))
  local n = tonumber(got[npos])
  if not n then
    table.insert(out, {job, -1})
  else
    local entry = {job, n}
    for i = 1, #meta + math.min(n, guess) do table.insert(entry, got[i] or false) end
    for i = guess, n - 1, 1000 do
      local more = {}
      for j = i, math.min(i + 999, n - 1) do table.insert(more, 'r:' .. j) end
      for _, v in ipairs(redis.call('HMGET', jk, unpack(more))) do table.insert(entry, v or false) end
    end
    table.insert(out, entry)
  end
end
if #again > 0 then redis.call('ZADD', 'mxq:final', unpack(again)) end
return out
""")

_JOB = r"""
local jk = 'mxq:job:' .. ARGV[1]
local n = redis.call('HGET', jk, 'n')
if not n then return {} end
local fields = {}
for i = 2, #ARGV do table.insert(fields, ARGV[i]) end
for i = 0, tonumber(n) - 1 do table.insert(fields, 'r:' .. i) end
local out = {}
for i = 1, #fields, 1000 do
  local part = redis.call('HMGET', jk, unpack(fields, i, math.min(i + 999, #fields)))
  for _, v in ipairs(part) do table.insert(out, v) end
end
return out
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
    #: webhook events to store with the job: ``[id, body, ttl]`` each (``mxq.tasks.webhooks``)
    hooks: list = field(default_factory=list)
    #: seconds to keep a job stored with nothing left to deliver (every recipient suppressed), else 0
    expire: int = 0
    #: the id was given to an earlier submission whose outcome is unknown (the client's retry after
    #: a failed call): the job is stored only if no job of that id exists, else it is that job
    again: bool = False


@dataclass
class Claimed:
    """One work item taken off a ready list under a lease: one job's recipients in one domain."""

    wid: str
    job: str
    domain: str
    meta: dict[str, str]
    indexes: list[str]
    records: list[Record | None]
    content: bytes


@dataclass
class Outcome:
    """What to write back for one work item: record updates and when to try again.

    ``updates`` are ``(index, record, event)``; ``event`` is ``bounced``,
    ``expired`` or ``delayed`` when a report is due, else "".  ``due`` is the
    time of the next attempt, or None when no recipient is left pending.
    ``idem`` is the job's idempotency key hash (expired with the job).
    ``left``: see the field.
    """

    wid: str
    updates: list[tuple[str, Record, str]] = field(default_factory=list)
    due: float | None = None
    idem: str = ""
    #: the job's ``left`` when claimed, set only when this item holds every
    #: recipient of the job: the release then writes ``left`` with the records
    #: (one HSET) instead of counting down with HINCRBY (while it holds the lease)
    left: int | None = None
    #: ``updates`` hold every recipient of the job (so the caller can tell its whole outcome:
    #: ``Store.finish``'s ``hide``)
    whole: bool = False


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


def job_ids(block: int = 256):
    """Fresh job ids as ``new_job_id`` makes them (128 random bits, 32 hex digits), from one
    ``os.urandom`` call per ``block`` ids: a batch's ids cost ~0.05 us each, not a system
    call each (~1.8 us, 3-12% of a batch's validation, profiled)."""
    while True:
        raw = os.urandom(16 * block).hex()
        for i in range(0, 32 * block, 32):
            yield raw[i:i + 32]


def idem_key(key: str) -> str:
    """The Redis key part for an idempotency key (hashed, so any string is a safe key)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


#: Redis connections one process's store client opens at most (``make_client``).
MAX_CONNECTIONS = 64


class DeadlineRetry(Retry):
    """Retries with back-off, never past ``seconds`` after the first try (a submission's bound).

    Nested uses (the client's command retry around the connection's connect
    retry) each stop at about the same moment, so the whole call gives up within
    ``seconds`` plus one connect attempt bounded by ``socket_connect_timeout``.
    """

    def __init__(self, seconds: float):
        super().__init__(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries=-1)
        self.seconds = seconds

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        deadline = time.monotonic() + self.seconds
        self._backoff.reset()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                wait = self._backoff.compute(failures)
                if time.monotonic() + wait >= deadline:
                    raise
                time.sleep(wait)


def make_client(url: str, *, deadline: float | None = None) -> redis.Redis:
    """A Redis client that rides out a restart of the server (about 30 s of retries).

    Every script below is safe to run twice (it checks before it writes), so a
    command retried after a lost reply does no harm.  ``deadline`` (a
    producer's ``MXQ_SUBMIT_TIMEOUT``): give up on an unreachable server after
    that many seconds instead.
    """
    # At most MAX_CONNECTIONS connections per process, waited for when all are busy: a gevent
    # worker runs hundreds of tasks at once, and each would otherwise open its own; a producer in a
    # threaded or gevent application submits from as many.  redis-py's default pool opens 100 and
    # then fails the others at once ("Too many connections", which redis-py does not retry).
    if deadline is not None:
        options = dict(socket_timeout=max(10.0, deadline), socket_connect_timeout=deadline,
                       retry=DeadlineRetry(deadline))
        queue = deadline
    else:
        options = dict(socket_timeout=10, socket_connect_timeout=5,
                       retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=40))
        queue = 30
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=queue, decode_responses=False, health_check_interval=15,
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError], **options)
    return redis.Redis(connection_pool=pool)


def _s(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _pairs(flat) -> list[tuple[str, int]]:
    return [(_s(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Record(TypedDict, total=False):
    """A recipient's record: the JSON in its job hash's ``r:{index}`` (what ``status`` shows).

    ``state`` is ``queued``, ``deferred`` or a final state (``FINAL_STATES``);
    ``code``/``enhanced``/``text`` are the last reply (``scope``: site, message
    or recipient); ``exchange``/``ip``/``relay`` where it was tried;
    ``attempts`` and ``runs`` (delivery runs that tried it), ``exchanges`` (the
    exchanges those runs tried, summed);
    ``notify``/``orcpt`` its DSN parameters (RFC 3461).  Times are Redis's.
    """

    address: str
    domain: str
    state: str
    code: int | None
    enhanced: str | None
    text: str
    scope: str | None
    exchange: str | None
    ip: str | None
    relay: bool
    attempts: int
    exchanges: int
    runs: int
    first_attempt: float | None
    last_attempt: float | None
    next_attempt: float | None
    notify: list[str] | None
    orcpt: str | None
    delay_reported: bool


#: A recipient record's fields that are left out of the stored JSON while they
#: hold these values (a queued record is then ``{"address", "domain", "state"}``,
#: a fifth of its full size); readers of this module get them back (``_record``).
#: Lua readers (``mxq.tasks.admin``) treat a missing field as null / false / 0.
RECORD_DEFAULTS = {"code": None, "enhanced": None, "text": "", "exchange": None, "ip": None, "relay": False,
                   "scope": None,
                   "attempts": 0, "first_attempt": None, "last_attempt": None, "next_attempt": None,
                   "notify": None, "orcpt": None, "runs": 0, "delay_reported": False}
#: Job hash fields left out while they hold these values (filled in again on reading).
META_DEFAULTS = {"ret": "", "envid": "", "eightbit": "0", "smtputf8": "0", "idem": ""}
_MISSING = object()


def _compact(rec: dict) -> str:
    """A record as stored: JSON without the fields that hold their default."""
    return _dumps({k: v for k, v in rec.items()
                   if RECORD_DEFAULTS.get(k, _MISSING) is _MISSING or v != RECORD_DEFAULTS[k]
                   or type(v) is not type(RECORD_DEFAULTS[k])})


def _record(raw) -> Record:
    """A stored record (JSON) with its left-out fields back; its ``text`` printable (records
    written before replies were sanitised at the source may hold control characters)."""
    rec = {**RECORD_DEFAULTS, **json.loads(raw)}
    text = rec["text"]
    if text and not (isinstance(text, str) and text.isprintable()):
        rec["text"] = printable(str(text))
    return rec


def _meta(values) -> dict[str, str]:
    """The meta fields read with HMGET (``META_FIELDS`` order) with left-out defaults back."""
    meta = {f: _s(v) for f, v in zip(META_FIELDS, values) if v is not None and v is not False}
    for f, v in META_DEFAULTS.items():
        meta.setdefault(f, v)
    return meta


@dataclass(frozen=True)
class Grant:
    """The answer to ``Destinations.acquire``: ``granted`` messages may be claimed (0: none).

    ``reason``: ``ok``, ``empty`` (nothing ready), ``concurrency`` (every slot
    of the window taken), ``rate`` (no token), ``dead`` (the lane is dead and
    its probe under way) or ``suspended`` (``mxq queue suspend``); ``wait``: seconds
    until the scheduler looks at the lane again (-1: a suspension without end).  ``slot``: whether a concurrency slot is held (and must be
    released).  ``mode``: ``deliver``; ``probe`` (the one try of a dead
    destination: one message); ``drain`` (the destination is dead: the task
    defers its ready mail without connecting; ``dead_wait`` seconds are left
    of its back-off, ``why`` / ``enhanced`` say why it was declared dead).
    ``latency``: the lane's measured seconds per message (None: unknown);
    ``window``: its concurrency window.
    """

    granted: int
    reason: str
    wait: float = 0.0
    slot: bool = False
    mode: str = "deliver"
    latency: float | None = None
    window: int = 0
    dead_wait: float = 0.0
    why: str = ""
    enhanced: str = ""


@dataclass
class Feedback:
    """What a delivery run tells the queue manager about its destination (``_WRITE``'s ``feedback``).

    ``ok``: transactions that got a server verdict; ``fail``: 1 when the run
    reached no server (connection or handshake failures only); ``latency``:
    seconds per message of the run; ``why`` / ``enhanced``: the failure;
    ``probe``: the token of a probe run.
    """

    ok: int = 0
    fail: int = 0
    latency: float = 0.0
    why: str = ""
    enhanced: str = ""
    probe: str = ""

    def to_json(self) -> str:
        return _dumps({"ok": self.ok, "fail": self.fail, "lat": round(self.latency, 6), "why": self.why[:300],
                       "enh": self.enhanced, "probe": self.probe})


#: Seconds between two readings of Redis's clock by one process (``RedisClock``).
CLOCK_REFRESH = 30.0


class RedisClock:
    """Redis's clock, as every time mxq stores or compares (leases, due times, dispatch and
    throttle times, job creation and lifetime) is taken: one clock for the whole fleet, so a
    worker, producer or scheduler whose own clock is off or steps causes no early requeue
    and no duplicate.

    Calling it returns Redis's ``TIME``, read at most every ``CLOCK_REFRESH``
    seconds and advanced by this process's monotonic clock in between (a
    reading costs one round trip; the monotonic clock never steps).  While
    Redis cannot be reached, the last reading goes on (and the next try waits
    ``CLOCK_REFRESH``); before the first one, the local clock stands in.
    ``peek()`` never reads: a producer's submission pays no round trip (and
    no wait on an unreachable Redis) for its clock.
    """

    def __init__(self, client: redis.Redis, refresh: float = CLOCK_REFRESH):
        self.r = client
        self.refresh = refresh
        self._at: tuple[float, float] | None = None       # (Redis time, monotonic time) of the last reading
        self._tried = float("-inf")                       # monotonic time of the last try

    def peek(self) -> float:
        """Redis's time as of the last reading (the local clock before any), without reading it."""
        at = self._at
        return time.time() if at is None else at[0] + (time.monotonic() - at[1])

    def read(self) -> None:
        """Read Redis's clock now."""
        before = time.monotonic()
        sec, usec = self.r.time()
        after = time.monotonic()
        self._at = (int(sec) + int(usec) / 1e6 + (after - before) / 2, after)

    def __call__(self) -> float:
        at = self._at
        m = time.monotonic()
        if (at is None or m - at[1] > self.refresh) and m - self._tried > self.refresh:
            self._tried = m
            try:
                self.read()
            except TRANSIENT_REDIS_ERRORS:
                pass
        return self.peek()


class Destinations:
    """The queue manager's state of each destination (lane) in Redis, shared by every worker.

    ``mxq:dest:{lane}`` (the window, failed cohorts, measured latency, dead or
    alive, the probe) and the shaping keys ``mxq:shape:conn:{lane}`` (slots)
    and ``mxq:shape:tat:{lane}`` (rate); see the module docstring.  The limits
    themselves come from the caller (``mxq.tasks.shaping.Shaper``).
    """

    def __init__(self, client: redis.Redis, settings: PipelineSettings | None = None,
                 clock: RedisClock | None = None):
        self.r = client
        self.settings = settings or PipelineSettings()
        self.now = clock or RedisClock(client)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_SLOT_RENEW)
        self._release = client.register_script(_SLOT_RELEASE)
        self._refund = client.register_script(_REFUND)

    def acquire(self, lane: str, token: str, want: int, *, concurrency: int, interval: float, bucket: int,
                slot_ttl: float, backstop: float, now: float) -> Grant:
        """A slot (within the lane's window), up to ``want`` rate tokens and the lane's mode, or a refusal.

        ``concurrency``: the lane's limit (0: none); ``interval``: seconds per
        message of its rate (0: none); ``bucket``: the rate's burst.  On
        refusal nothing is held, and the lane goes to ``mxq:throttled`` for the
        scheduler.  Either way the task is no longer counted in ``mxq:pending``.
        """
        granted, wait, reason, mode, lat, window, dead_wait, why, enh = self._acquire(keys=_req(), args=[
            repr(float(now)), lane, int(want), int(concurrency), repr(float(slot_ttl)), token,
            repr(float(interval)), int(bucket), repr(float(backstop))])
        granted = int(granted)
        mode = _s(mode)
        lat = float(lat)
        return Grant(granted, _s(reason), float(wait), slot=granted > 0 and concurrency > 0 and mode != "drain",
                     mode=mode or "deliver", latency=lat if lat > 0 else None, window=int(window),
                     dead_wait=float(dead_wait), why=_s(why), enhanced=_s(enh))

    def renew(self, lane: str, token: str, ttl: float) -> bool:
        """Extend ``token``'s slot; False when it holds none (expired, or no limit)."""
        return self._renew(args=[lane, repr(float(ttl)), token]) == 1

    def release(self, lane: str, token: str, *, park: bool = False, ttl: float = 45.0,
                now: float | None = None) -> tuple[bool, list[tuple[str, int]]]:
        """Give ``token``'s slot (and probe) back, or with ``park`` keep it for an idle cached connection.

        Returns ``(held, dispatch)``: whether the token held a slot, and the
        tasks to publish for the lane's ready work (no task may be left to take
        it).  A parked slot still counts against the window but not as a
        running task; ``release`` (without ``park``) frees it.
        """
        now = self.now() if now is None else now
        s = self.settings
        held, disp = self._release(keys=_req(), args=[repr(float(now)), lane, token, 1 if park else 0, repr(float(ttl)),
                                         s.batch_size, s.domain_concurrency])
        return int(held) == 1, _pairs(disp)

    def refund(self, lane: str, tokens: int, interval: float) -> None:
        """Give back ``tokens`` rate tokens granted but not used."""
        if tokens > 0 and interval > 0:
            self._refund(keys=_req(), args=[lane, int(tokens), repr(float(interval))])

    def holders(self, lane: str) -> int:
        """Slots of ``lane`` held now, by running tasks and parked idle connections (expired holders
        included until the next acquire)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(f"{PREFIX}shape:conn:{lane}")
        pipe.zcard(f"{PREFIX}shape:idle:{lane}")
        return sum(int(n) for n in pipe.execute())

    def state(self, lane: str) -> dict:
        """The lane's stored state (``{}`` when none): ``w`` window, ``fc`` failed cohorts, ``lat``
        seconds per message, ``du`` dead until (Redis time), ``dn`` dead periods, ``why``/``enh``
        the last failure, ``pr`` probe holder, ``run`` slot holders last counted, ``t`` last update."""
        v = self.r.get(f"{PREFIX}dest:{lane}")
        return json.loads(v) if v else {}


def _specs(jobs) -> tuple[list, list, list, int]:
    """What the submit scripts get of ``jobs``: ``(common, meta, rcpts, size)`` -- each job's id,
    idempotency key, lanes, hooks and expiry; its meta fields without their defaults; its records
    as stored (``_compact``); the bytes of content, meta and records."""
    common = [{"id": j.id, "idem": j.idem, "domains": [[d, j.meta[f"d:{d}"]] for d in j.domains],
               **({"hooks": j.hooks} if j.hooks else {}),
               **({"expire": int(j.expire)} if j.expire else {}),
               **({"again": 1} if j.again else {})} for j in jobs]
    meta = [{k: v for k, v in j.meta.items() if META_DEFAULTS.get(k) != v} for j in jobs]
    rcpts = [[_compact(r) for r in j.records] for j in jobs]
    size = sum(len(j.content) for j in jobs) + sum(sum(len(r) for r in rs) for rs in rcpts) \
        + sum(len(k) + len(v) for m in meta for k, v in m.items())
    return common, meta, rcpts, size


class Staging:
    """A large submission stored in bounded calls, then committed by one script (all or nothing).

    ``add`` stages validated jobs (``_STAGE`` calls of at most ``CALL_JOBS`` jobs and
    ``CALL_BYTES``, several per pipeline round trip); ``commit`` queues them all at once and
    returns ``(ids, dispatch)``; ``abort`` removes what was staged.  Nothing is queued before the
    commit.  With ``background``, the calls run on a thread of their own while the caller
    validates the next jobs (``mxq.tasks.producer``): Redis writes one chunk while Python checks
    the next; an error of a call is raised by the next ``add`` or by ``commit``.
    """

    def __init__(self, store: "Store", now: float, *, background: bool = False):
        self.store = store
        self.now = now
        self.token = uuid.uuid4().hex
        self.deadline = repr(float(now) + STAGE_TTL)
        self.n = 0
        self.pool = None
        self.pending: list = []
        if background:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mxq-stage")

    def add(self, jobs: list, specs: tuple | None = None) -> None:
        """Stage ``jobs`` (validated, suppression applied); ``specs``: their ``_specs`` if known."""
        self._raise_failed()
        common, meta, rcpts, _ = specs or _specs(jobs)
        calls, chunk, held = [], [], 0
        for j, c, m, rs in zip(jobs, common, meta, rcpts):
            size = len(j.content) + sum(len(r) for r in rs) + 200
            if chunk and (held + size > CALL_BYTES or len(chunk) >= CALL_JOBS):
                calls.append((chunk, held))
                chunk, held = [], 0
            chunk.append((dict(c, meta=m, rcpts=rs), j.content))
            held += size
        if chunk:
            calls.append((chunk, held))
        numbered = []
        for chunk, held in calls:
            self.n += 1
            numbered.append((self.n, chunk, held))
        if self.pool is None:
            self._send(numbered)
        else:
            self.pending.append(self.pool.submit(self._send, numbered))

    def _send(self, numbered: list) -> None:
        """The ``_STAGE`` calls, in pipelines of at most ``CALL_BYTES`` (or one larger call)."""
        st = self.store
        pipe, sent = st.r.pipeline(transaction=False), 0
        for n, chunk, held in numbered:
            if sent and sent + held > CALL_BYTES:
                pipe.execute()
                pipe, sent = st.r.pipeline(transaction=False), 0
            st._stage_chunk(self.token, self.deadline, n, chunk, pipe)
            sent += held
        pipe.execute()

    def _raise_failed(self, wait: bool = False) -> None:
        """Raise the error of a background call that failed (with ``wait``: after all have ended)."""
        while self.pending and (wait or self.pending[0].done()):
            self.pending.pop(0).result()

    def commit(self, *, split: bool) -> tuple[list[str], list[tuple[str, int]]]:
        """Queue everything staged (``split``: onto the lanes now; else for ``mxq.intake``)."""
        try:
            self._raise_failed(wait=True)
        except BaseException:
            self.abort()
            raise
        self._close()
        s = self.store.settings
        ids, disp = self.store._commit(args=[self.token, self.now, "split" if split else "intake",
                                             s.batch_size, s.domain_concurrency])
        return [_s(i) for i in ids], _pairs(disp)

    def abort(self) -> None:
        """Remove what was staged (best effort: else the scheduler does, past the deadline)."""
        for f in self.pending:
            try:
                f.result()
            except BaseException:       # noqa: BLE001 -- being taken back anyway
                pass
        self.pending = []
        self._close()
        try:
            self.store._unstage_now(self.token)
        except Exception:               # noqa: BLE001 -- Redis away: the scheduler removes it
            pass

    def _close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class Store:
    """mxq's Redis state; one per process (the client is thread-safe)."""

    def __init__(self, client: redis.Redis, settings: PipelineSettings | None = None):
        self.r = client
        self.settings = settings or PipelineSettings.from_env()
        self._submit = client.register_script(_SUBMIT)
        self._stage = client.register_script(_STAGE)
        self._commit = client.register_script(_COMMIT)
        self._unstage = client.register_script(_UNSTAGE)
        self._intake = client.register_script(_INTAKE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._tick = client.register_script(_TICK)
        self._job = client.register_script(_JOB)
        self._record = client.register_script(_RECORD)
        #: Redis's clock (``RedisClock``): every ``now`` this store writes or compares
        self.now = RedisClock(client)
        self.dest = Destinations(client, self.settings, self.now)
        self._final = client.register_script(_FINAL)

    @classmethod
    def from_settings(cls, settings: PipelineSettings) -> "Store":
        """A store on ``settings.redis_url``."""
        return cls(make_client(settings.redis_url), settings)

    # ------------------------------------------------------------ producer side
    def submit(self, jobs: list[JobSpec], *, split: bool = True, now: float | None = None):
        """Store a batch of jobs atomically; return ``(job ids, dispatch)``.

        ``split`` pushes the work items onto their domain lanes now; otherwise
        the jobs wait in ``mxq:intake`` for ``mxq.intake``.  A job whose
        idempotency key exists is not stored: its id is the existing job's.

        All or nothing, and no Redis call carries more than ``CALL_BYTES``
        (or one job, when a single message is larger): a batch that fits is
        one script call with everything in it; a larger one is staged --
        each job's hash written whole (one HSET) by ``_STAGE`` calls of at most
        ``CALL_BYTES``, its spec in ``mxq:stage:{token}`` -- then committed by
        one script that queues their work, or, if the staged submission is
        gone, stores nothing.  A failure while staging deletes what was staged
        (else the scheduler does, ``STAGE_TTL`` later: ``unstage``).
        """
        now = self.now.peek() if now is None else now
        s = self.settings
        mode = "split" if split else "intake"
        common, meta, rcpts, size = _specs(jobs)
        if size + len(jobs) * 200 > CALL_BYTES or len(jobs) > CALL_JOBS:
            staging = Staging(self, now)
            try:
                staging.add(jobs, (common, meta, rcpts, size))
            except BaseException:
                staging.abort()
                raise
            return staging.commit(split=split)
        spec = [dict(c, meta=m, rcpts=rs) for c, m, rs in zip(common, meta, rcpts)]
        args = [now, mode, s.batch_size, s.domain_concurrency, _dumps(spec)] + [j.content for j in jobs]
        ids, disp = self._submit(args=args)
        return [_s(i) for i in ids], _pairs(disp)

    def _stage_chunk(self, token: str, deadline: str, n: int, chunk: list, pipe) -> None:
        """One ``_STAGE`` call (in ``pipe``): the chunk's job hashes and its spec under number ``n``."""
        self._stage(args=[token, deadline, n, _dumps([spec for spec, _ in chunk]),
                          *[content for _, content in chunk]], client=pipe)

    def _unstage_now(self, token: str) -> None:
        """Remove a staged submission that will not be committed (its producer's failure path)."""
        self._unstage(args=[0, 0, token])

    def unstage(self, now: float, *, most: int = 10) -> int:
        """Remove up to ``most`` staged submissions past their deadline (``STAGE_TTL`` after they were
        staged) that were never committed: their producer died or gave up.  The scheduler's step."""
        return int(self._unstage(args=[repr(float(now)), int(most)]))

    def intake(self, job_ids: list[str], *, now: float | None = None) -> list[tuple[str, int]]:
        """Split stored jobs into their domain lanes (once: a second call does nothing)."""
        now = self.now() if now is None else now
        s = self.settings
        return _pairs(self._intake(keys=_req(), args=[now, s.batch_size, s.domain_concurrency, *job_ids]))

    # ------------------------------------------------------------ worker side
    def claim(self, lane: str, token: str, *, limit: int | None = None, now: float | None = None,
              checked: bool = False) -> list:
        """Take up to ``limit`` work items of ``lane`` as one batch leased to ``token``.

        Delivery lanes give ``Claimed`` items; the report and webhook lanes (``!r``,
        ``!w``) give work item ids.  Nothing from a suspended lane (``mxq queue suspend``),
        unless ``checked``: the caller's acquire has just looked (its first claim).  Work
        items on hold are parked, not returned.
        """
        now = self.now() if now is None else now
        s = self.settings
        raw = self._claim(args=[now, lane, limit or s.batch_size, now + s.lease_seconds, token,
                                "1" if checked else "0", CLAIM_BYTES, *META_FIELDS])
        if lane.startswith("!"):
            return [_s(it[0]) for it in raw]
        out = []
        nm = len(META_FIELDS)
        for wid, content, packed in raw:
            wid = _s(wid)
            job, _, indexes = workitems.delivery(wid)
            values = json.loads(packed)
            out.append(Claimed(wid=wid, job=job, domain=lane, meta=_meta(values[:nm]), indexes=indexes,
                               records=[_record(r) if r else None for r in values[nm:]],
                               content=content or b""))
        return out

    def ready_count(self, lane: str) -> int:
        """How many work items ``lane`` has ready (not claimed, not deferred): one LLEN."""
        return int(self.r.llen(f"{PREFIX}ready:{lane}"))

    def renew(self, token: str, *, now: float | None = None) -> bool:
        """Extend the lease of ``token``'s batch; False when it no longer holds one."""
        now = self.now() if now is None else now
        return self._renew(args=[now + self.settings.lease_seconds, token]) == [1]

    def _payload(self, lane: str, outcomes: list[Outcome], now: float) -> str:
        from .. import suppress, webhooks

        sup_ttl = suppress.auto_ttl()
        hooks = webhooks.current(strict=False)

        def extras(wid: str, rec: dict) -> list:
            if not (sup_ttl or hooks.enabled) or not workitems.is_delivery(wid):
                return [False, False]
            job = workitems.job_of(wid)
            return [suppress.release_arg(job, rec, now, sup_ttl), webhooks.hook_arg(hooks, job, rec, now)]

        return _dumps([{"wid": o.wid, "due": -1 if o.due is None else o.due, "idem": o.idem,
                        **({"left": int(o.left)} if o.left is not None else {}),
                        **({"whole": 1} if o.whole and o.left is not None else {}),
                        "updates": [[i, _compact(rec), 1 if rec["state"] in FINAL_STATES else 0, ev,
                                     *extras(o.wid, rec)]
                                    for i, rec, ev in o.updates]} for o in outcomes])

    def renew_many(self, tokens: list[str], *, slots: list[tuple[str, str]] = (),
                   now: float | None = None) -> set[str]:
        """Extend the leases of ``tokens`` and the concurrency slots ``[(lane, token)]`` in one round trip;
        return the tokens that no longer hold their lease (the scheduler took their batch back)."""
        if not tokens and not slots:
            return set()
        now = self.now() if now is None else now
        expiry = now + self.settings.lease_seconds
        pipe = self.r.pipeline(transaction=False)
        if tokens:
            self._renew(args=[expiry, *tokens], client=pipe)
        for lane, t in slots:
            self.dest._renew(args=[lane, repr(float(self.settings.lease_seconds)), t], client=pipe)
        got = pipe.execute()
        return {t for t, held in zip(tokens, got[0] if tokens else ()) if not int(held)}

    def release(self, token: str, lane: str, outcomes: list[Outcome], *, now: float | None = None):
        """Write outcomes, drop the lease, schedule what is left; return ``(applied, dispatch)``.

        ``applied`` holds ``"job|index"`` of each update actually written.  With
        each written record go, in the same script, a suppression entry for a
        recipient-level hard bounce (``mxq.tasks.suppress``) and a webhook event
        when ``MXQ_WEBHOOK_EVENTS`` asks for its state (``mxq.tasks.webhooks``).
        """
        applied, dispatch, _ = self.finish(token, lane, outcomes, now=now)
        return applied, dispatch

    def finish(self, token: str, lane: str, outcomes: list[Outcome], feedback: Feedback | None = None, *,
               now: float | None = None, spread: bool = True, mine: list[str] | None = None,
               hide: float = 0.0) -> tuple[list[str], list[tuple[str, int]], str]:
        """``release`` plus the destination feedback of the delivery run (``Feedback``).

        ``spread=False``: no tasks for the lane itself (its task goes on, and
        dispatches what is left when it ends).  ``hide`` > 0 (with a list
        ``mine``): a job made final by an outcome holding every recipient of
        the job (``Outcome.left`` set) goes to ``mxq:final`` hidden from other
        recorders for ``hide`` seconds and its id to ``mine``: the caller has
        every record and writes its outcome to the result backend itself
        (``mxq.tasks.outcomes.record_known``); if it dies first, a recorder
        takes the job when the time is up.  Returns ``(applied, dispatch,
        status)``; ``status`` is ``"dead"`` when the lane is (now) declared
        dead, ``"ok"`` when it is not, ``""`` without feedback.
        """
        now = self.now() if now is None else now
        s = self.settings
        fb = feedback.to_json() if feedback is not None else ""
        hide = hide if mine is not None else 0.0     # (the items marked whole: Outcome.whole)
        applied, disp, status, own = self._release(args=[
            now, token, s.result_ttl, s.batch_size, s.domain_concurrency, lane, self._payload(lane, outcomes, now),
            fb, "1" if spread else "0", repr(float(hide))])
        if mine is not None:
            mine.extend(_s(j) for j in own)
        return [_s(a) for a in applied], _pairs(disp), _s(status)

    def record(self, token: str, lane: str, outcomes: list[Outcome], *, now: float | None = None,
               mine: list[str] | None = None, hide: float = 0.0):
        """Write outcomes of a batch still under way; return ``(applied, dispatch)``.

        As ``release``, except that the lease stays: the items written leave the
        batch (a lease that ran out now would put back only the others), and
        only report and webhook work is dispatched.  A delivery task calls it as
        each message's final reply arrives, so a crash resends only what was in
        flight (and what arrived within the last moments).  ``mine`` and
        ``hide``: as for ``finish``.
        """
        now = self.now() if now is None else now
        s = self.settings
        hide = hide if mine is not None else 0.0
        applied, disp, own = self._record(args=[now, token, s.result_ttl, s.batch_size, s.domain_concurrency, lane,
                                                self._payload(lane, outcomes, now), repr(float(hide))])
        if mine is not None:
            mine.extend(_s(j) for j in own)
        return [_s(a) for a in applied], _pairs(disp)

    def publish_policy(self, policy: dict) -> None:
        """Write the destination scheduling policy every dispatch reads (``mxq:policy``, see ``_PRELUDE``)."""
        self.r.set(PREFIX + "policy", _dumps(policy))

    def tick(self, *, now: float | None = None, limit: int = 1000) -> Tick:
        """One scheduler step: items of expired leases back to the front of their lane,
        due deferred items to the back, quiet lanes re-dispatched, stalled intake re-published."""
        now = self.now() if now is None else now
        s = self.settings
        requeued, moved, disp, intake = self._tick(
            keys=_req(), args=[now, limit, s.dispatch_stale, s.batch_size, s.domain_concurrency, *BROKER_QUEUES])
        return Tick(int(requeued), int(moved), _pairs(disp), [_s(i) for i in intake])

    # ------------------------------------------------------------ reading
    def job(self, job_id: str) -> tuple[dict[str, str], dict[int, dict]] | None:
        """``(meta, {index: record})`` of a job (one script, no content), or None when unknown or expired."""
        values = self._job(args=[job_id, *META_FIELDS])
        if not values:
            return None
        nm = len(META_FIELDS)
        return _meta(values[:nm]), {i: _record(v) for i, v in enumerate(values[nm:]) if v is not None}

    def claim_final(self, *, limit: int = 200, lease: float = 60.0, now: float | None = None):
        """Jobs that became final and whose outcome is not recorded yet (``mxq.tasks.outcomes``):
        ``[(job, (meta, {index: record}) or None when expired)]``, hidden from other callers for
        ``lease`` seconds (until ``forget_final``)."""
        now = self.now() if now is None else now
        out = []
        nm = len(META_FIELDS)
        for entry in self._final(keys=_req(), args=[now, lease, limit, 8, *META_FIELDS]):
            job = _s(entry[0])
            if int(entry[1]) < 0:
                out.append((job, None))
                continue
            values = [v if v is not False else None for v in entry[2:]]
            out.append((job, (_meta(values[:nm]), {i: _record(v) for i, v in enumerate(values[nm:])
                                                   if v is not None})))
        return out

    def final_due(self, now: float) -> bool:
        """Does a job in ``mxq:final`` wait for a recorder now (not hidden)?  One ZRANGEBYSCORE: a
        delivery task whose jobs were all recorded by their own worker (the common case) asks this
        instead of running ``claim_final``'s script (four commands with its request key)."""
        return bool(self.r.zrangebyscore(PREFIX + "final", "-inf", now, start=0, num=1))

    def forget_final(self, jobs: list[str]) -> None:
        """The outcomes of ``jobs`` are recorded: take them off ``mxq:final``."""
        if jobs:
            self.r.zrem(PREFIX + "final", *jobs)

    def trim_final(self, now: float) -> int:
        """Take off ``mxq:final`` the jobs final for longer than ``MXQ_RESULT_TTL`` (their records have
        expired: nothing is left to record); return how many.  With the result backend off nobody
        records outcomes, and this is what keeps the set from growing for ever."""
        return int(self.r.zremrangebyscore(PREFIX + "final", "-inf", now - self.settings.result_ttl))

    def content(self, job_id: str) -> bytes | None:
        """The stored message, or None when the job is unknown or expired."""
        return self.r.hget(PREFIX + "job:" + job_id, "c")


STATUS_FIELDS = ("address", "domain", "state", "code", "enhanced", "text", "exchange", "ip", "relay",
                 "attempts", "first_attempt", "last_attempt", "next_attempt")


def status_of(job_id: str, meta: dict[str, str], records: dict[int, dict]) -> dict:
    """The public status dict of a job (see ``mxq.tasks.status``)."""
    rows = [{f: records[i].get(f) for f in STATUS_FIELDS} for i in sorted(records)]
    if meta.get("left") is not None and int(meta["left"]) <= 0:
        state = "done"
    elif all(r["state"] == "queued" and not r.get("runs") for r in records.values()):
        state = "queued"
    else:
        state = "active"
    return {"job": job_id, "state": state, "recipients": rows}


_stores: dict[tuple[int, str], Store] = {}


def get_submit_store(settings: PipelineSettings | None = None) -> Store:
    """The producer's store: like ``get_store`` but giving up on an unreachable Redis after
    ``MXQ_SUBMIT_TIMEOUT`` seconds (``make_client(deadline=...)``)."""
    settings = settings or PipelineSettings.from_env()
    key = (os.getpid(), settings.redis_url, "submit", settings.submit_timeout)
    st = _stores.get(key)
    if st is None or st.settings != settings:
        st = _stores[key] = Store(make_client(settings.redis_url, deadline=settings.submit_timeout), settings)
    _check_once((os.getpid(), settings.redis_url), st, unreachable_ok=False)
    return st


def get_store(settings: PipelineSettings | None = None) -> Store:
    """This process's store for ``settings`` (default: the environment); re-made after fork.

    The first time a process uses a Redis, ``check_redis`` looks at its settings:
    ``RedisUnfit`` (an eviction policy that can delete mxq's keys) is raised here,
    so nothing is submitted to, or delivered from, a Redis that can lose it.
    """
    settings = settings or PipelineSettings.from_env()
    key = (os.getpid(), settings.redis_url)
    st = _stores.get(key)
    if st is None or st.settings != settings:
        st = _stores[key] = Store.from_settings(settings)
    _check_once(key, st)
    return st


def _check_once(key: tuple[int, str], st: Store, *, unreachable_ok: bool = True) -> None:
    """``check_redis`` at a process's first use of a Redis (``RedisUnfit`` raised to the caller).

    An unreachable Redis is checked next time; ``unreachable_ok=False`` (the producer's store,
    whose client gives up after ``MXQ_SUBMIT_TIMEOUT``) raises the connection error at once,
    so a submission fails within one timeout, not two.
    """
    if key not in _checked:
        try:
            check_redis(st.r, warn=False)
        except TRANSIENT_REDIS_ERRORS:
            if not unreachable_ok:
                raise
        else:
            _checked.add(key)


_checked: set[tuple[int, str]] = set()
_log = logging.getLogger("mxq.store")


class RedisUnfit(RuntimeError):
    """This Redis can lose mxq's state: its ``maxmemory-policy`` lets it delete keys.  The message
    says why and what to set."""


#: The one ``maxmemory-policy`` under which Redis never deletes a key to make room.
SAFE_POLICY = "noeviction"


def check_redis(client, *, warn: bool = True) -> list[str]:
    """Refuse a Redis configured to lose mxq's keys; return warnings about weaker settings.

    Raises ``RedisUnfit`` when ``maxmemory-policy`` is anything but
    ``noeviction``: at ``maxmemory`` an ``allkeys-*`` policy deletes any key
    (queued mail, job state, leases, ready lists) and a ``volatile-*`` one any
    key with a TTL (webhook events not yet sent, suppression entries, staged
    submissions, finished jobs' outcomes), silently.  Under ``noeviction`` a
    full Redis refuses writes instead, which mxq reports and retries.  (Read
    with ``INFO``, which managed Redis services allow where ``CONFIG`` is not.)

    Warns (returned, and logged with ``warn``) when AOF is off: a Redis crash
    or restart then loses what was queued since the last snapshot.
    """
    try:
        memory = client.info("memory")
        persistence = client.info("persistence")
    except redis.exceptions.ResponseError as e:        # INFO refused (renamed): cannot tell
        _log.warning("cannot check Redis's settings (INFO refused: %s); mxq needs maxmemory-policy "
                     "noeviction and appendonly yes", e)
        return []
    policy = memory.get("maxmemory_policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy and policy != SAFE_POLICY:
        limit = int(memory.get("maxmemory") or 0)
        at = f"when it reaches maxmemory ({limit} bytes)" if limit else "once a maxmemory is set"
        what = ("any key" if policy.startswith("allkeys") else
                "any key with a TTL (webhook events not yet sent, suppression entries, finished jobs)")
        raise RedisUnfit(
            f"Redis maxmemory-policy is {policy}: {at} Redis deletes {what} to make room, and mxq's "
            f"queued mail and its state would vanish without a trace. Set maxmemory-policy noeviction "
            f"(CONFIG SET maxmemory-policy noeviction, and in redis.conf): a full Redis then refuses "
            f"writes, which mxq reports and retries, instead of losing mail.")
    warnings = []
    if str(persistence.get("aof_enabled", "1")) in ("0", "False", "false"):
        warnings.append("Redis runs without AOF (appendonly no): a crash or restart of Redis loses the mail "
                        "queued since its last snapshot; set appendonly yes (appendfsync everysec or always)")
    for w in warnings if warn else ():
        _log.warning("%s", w)
    return warnings


def check_on_start(url: str) -> None:
    """At a worker's or the scheduler's start: ``SystemExit`` naming the reason when the Redis at
    ``url`` is unfit (``check_redis``); a Redis not reachable yet is checked at first use."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        check_redis(client)
    except RedisUnfit as e:
        raise SystemExit(f"mxq: refusing to run: {e}") from None
    except TRANSIENT_REDIS_ERRORS as e:
        _log.warning("cannot reach Redis to check its settings (%s); checked at first use", e)
    finally:
        client.close()

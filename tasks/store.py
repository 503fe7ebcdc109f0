"""All of mxq's state in Redis: jobs, recipients, work items, leases, the deferred queue.

mxq's state is the source of truth; Celery's queues only say "there may be
work in this lane".  Every state change is one Lua script (atomic, one round
trip), so a worker that dies at any instant leaves each work item in exactly
one place: a ready list, a leased batch, or the deferred queue.

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
``mxq:ready:{lane}``             list    work items ready to run in that lane
``mxq:lease``                    zset    batch token -> lease expiry (work in flight)
``mxq:batch:{token}``            string  the lane and work items of one leased batch
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
===============================  ======  ==================================================

Lanes and work items:

- a delivery lane is a normalised domain (IDNA A-label, lower case, or an
  address literal); its work items are ``{job}|{domain}|{indexes}``: the
  recipients of one job in one domain, delivered as one SMTP transaction;
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
import os
import time
import uuid
from dataclasses import dataclass, field

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from mxq.workers.reply import printable

from .settings import PipelineSettings

PREFIX = "mxq:"
REPORT_LANE = "!r"
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
-- How many more tasks each lane needs: enough to drain it in batches of k,
-- at most maxpar queued at once, minus those already published and not
-- started.  force: treat the published ones as lost (the scheduler, for a
-- lane with ready work and no activity for a while).
-- lens (optional): lane -> its ready list's length, when the caller knows it (RPUSH returns it).
-- A constant number of commands whatever the number of lanes: one HMGET, one HSET,
-- one ZADD, one ZADD NX, one ZREM, plus an LLEN per lane whose length is not known.
local function dispatch(lanes, now, k, maxpar, force, out, lens)
  if #lanes == 0 then return out end
  local uniq, once = {}, {}
  for _, lane in ipairs(lanes) do
    if not once[lane] then once[lane] = true; table.insert(uniq, lane) end
  end
  lanes = uniq
  local pends = {}
  if not force then pends = redis.call('HMGET', P .. 'pending', unpack(lanes)) end
  local sets, touch, keep, gone = {}, {}, {}, {}
  for i, lane in ipairs(lanes) do
    local n = lens and lens[lane]
    if n == nil then n = redis.call('LLEN', P .. 'ready:' .. lane) end
    if n == 0 then
      table.insert(gone, lane)
    else
      local pend = tonumber(pends[i] or '0') or 0
      local mp = maxpar
      if lane == '!w' then mp = 1 end     -- webhooks: one task queued at a time (mxq.tasks.webhooks)
      local want = math.min(math.ceil(n / k), mp) - pend
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

# ARGV: now, mode ('split'|'intake'), k, maxpar, spec JSON, content...
# spec: [{"id", "idem", "meta": {...}, "rcpts": [json...], "domains": [[domain, "0,1"], ...]}]
# Returns {ids, dispatch}.  Re-running it (a retried call) changes nothing.
_SUBMIT = _PRELUDE + r"""
local now, mode, k, maxpar = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local spec = cjson.decode(ARGV[5])
local ids, lanes, work, intake, hooks = {}, {}, {}, {}, {}
-- A retried call (its reply was lost) finds the batch's first new job stored:
-- the script is atomic, so the whole batch was; answer with the ids, write
-- nothing.  (Jobs whose idempotency key belonged to an older job say nothing.)
local applied = false
for _, job in ipairs(spec) do
  if job.idem == '' then
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
  for i, job in ipairs(spec) do
    ids[i] = job.id
    if job.idem ~= '' then ids[i] = redis.call('GET', P .. 'idem:' .. job.idem) or job.id end
  end
  return {ids, {}}
end
for i, job in ipairs(spec) do
  local id = job.id
  local existing = false
  if job.idem ~= '' then
    existing = redis.call('GET', P .. 'idem:' .. job.idem)
    if not existing then redis.call('SET', P .. 'idem:' .. job.idem, id, 'NX') end
  end
  if existing then
    ids[i] = existing
  else
    ids[i] = id
    local flat = {'c', ARGV[5 + i]}
    for f, v in pairs(job.meta) do table.insert(flat, f); table.insert(flat, v) end
    for r, rec in ipairs(job.rcpts) do table.insert(flat, 'r:' .. (r - 1)); table.insert(flat, rec) end
    push('HSET', P .. 'job:' .. id, flat)
    if job.expire then          -- nothing left to deliver (every recipient suppressed): done now
      redis.call('EXPIRE', P .. 'job:' .. id, job.expire)
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
        table.insert(work[d], id .. '|' .. d .. '|' .. dx[2])
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
"""

# ARGV: now, k, maxpar, job ids...  Splits stored jobs into their domain lanes (once).
_INTAKE = _PRELUDE + r"""
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
      local idx = redis.call('HMGET', P .. 'job:' .. id, unpack(fields))
      for j, d in ipairs(ds) do
        if not work[d] then work[d] = {}; table.insert(lanes, d) end
        table.insert(work[d], id .. '|' .. d .. '|' .. idx[j])
      end
    end
  end
end
for _, d in ipairs(lanes) do push('RPUSH', P .. 'ready:' .. d, work[d]) end
return dispatch(lanes, now, k, maxpar, false, {})
"""

# ARGV: now, lane, k, lease expiry, token, meta field names...
# Pops up to k items, leases them as one batch.  Delivery lanes return
# {wid, content, packed} per item, packed being the JSON array of the HMGET
# of the meta fields then each recipient record (false when missing): one
# bulk string for Python to parse instead of a dozen RESP elements (the
# reply parser was the largest cost of a claim, profiled).  The report and
# webhook lanes return {wid} per item.
_CLAIM = _PRELUDE + r"""
local now, lane, k, expiry, token = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local items = redis.call('LPOP', P .. 'ready:' .. lane, k)
local pend = tonumber(redis.call('HGET', P .. 'pending', lane) or '0')
if pend > 1 then
  redis.call('HSET', P .. 'pending', lane, pend - 1)
elseif pend == 1 then
  redis.call('HDEL', P .. 'pending', lane)      -- no zero entries left behind for idle domains
end
-- LPOP took min(k, length): fewer than k means the list is empty now.
if items and #items == k then
  redis.call('ZADD', P .. 'dispatch', now, lane)
else
  redis.call('ZREM', P .. 'dispatch', lane)
end
local out = {}
if not items then return out end
local meta = {}
for i = 6, #ARGV do table.insert(meta, ARGV[i]) end
table.insert(meta, 'c')
local nmeta = #meta
local held = {lane}
for _, wid in ipairs(items) do
  if string.sub(lane, 1, 1) == '!' then      -- reports, webhooks: bare work item ids
    table.insert(held, wid)
    table.insert(out, {wid})
  else
    local bar = string.find(wid, '|', 1, true)
    local job = string.sub(wid, 1, bar - 1)
    local idx = split(string.sub(wid, string.find(wid, '|', bar + 1, true) + 1), ',')
    local fields = {unpack(meta)}
    for _, i in ipairs(idx) do table.insert(fields, 'r:' .. i) end
    local values = redis.call('HMGET', P .. 'job:' .. job, unpack(fields))
    local content = values[nmeta]
    if content then                       -- the job still exists
      table.insert(held, wid)
      table.remove(values, nmeta)
      table.insert(out, {wid, content, cjson.encode(values)})
    end
  end
end
if #held > 1 then
  redis.call('SET', P .. 'batch:' .. token, table.concat(held, '\n'))
  redis.call('ZADD', P .. 'lease', expiry, token)
end
return out
"""

# ARGV: expiry, token.  Renews the batch lease if this token still holds it.
_RENEW = r"""
return redis.call('ZADD', 'mxq:lease', 'XX', 'CH', tonumber(ARGV[1]), ARGV[2])
"""

# ARGV: now, token, result_ttl, k, maxpar, lane, payload JSON
# payload: [{"wid", "due" (-1: nothing left), "idem", "left" (optional: the job's 'left' at
#            claim time when the item holds every recipient of the job; see Outcome),
#            "updates": [[index, record, final, event,
#            suppress, hook]]}]; suppress: [key, entry, ttl] or false (mxq.tasks.suppress),
#            hook: [id, body, ttl] or false (mxq.tasks.webhooks), both written only with the record.
# Returns {applied, dispatch}: applied lists "job|index" of each update
# written (a final state already there is never overwritten -- except that a
# recipient dropped while its transaction was in flight is recorded as
# delivered when it was: the truth, not counted twice in "left").
_RELEASE = _PRELUDE + r"""
local now, token, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local k, maxpar, lane = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local payload = cjson.decode(ARGV[7])
local owner = redis.call('ZSCORE', P .. 'lease', token) ~= false
local final = {delivered = true, bounced = true, expired = true, suppressed = true, dropped = true}
local applied, lanes, reports, deferred, hooks = {}, {lane}, {}, {}, {}
-- A batch 'mxq queue drop' hit while in flight: check each record as if the lease were lost.
local guarded = not owner or redis.call('SISMEMBER', P .. 'guard', token) == 1
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
        ok = cur and not final[state]
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
        if item.idem ~= '' then redis.call('EXPIRE', P .. 'idem:' .. item.idem, ttl) end
      end
    end
  end
  if owner and item.due >= 0 then table.insert(deferred, item.due); table.insert(deferred, wid) end
end
if owner then
  redis.call('ZREM', P .. 'lease', token)
  redis.call('DEL', P .. 'batch:' .. token)
  if guarded then redis.call('SREM', P .. 'guard', token) end
  if #deferred > 0 then push('ZADD', P .. 'deferred', deferred) end
end
if #reports > 0 then
  push('RPUSH', P .. 'ready:!r', reports)
  table.insert(lanes, '!r')
end
if #hooks > 0 then
  push('RPUSH', P .. 'ready:!w', hooks)
  table.insert(lanes, '!w')
end
return {applied, dispatch(lanes, now, k, maxpar, false, {})}
"""

# ARGV: now, limit, stale, k, maxpar.  The scheduler's one atomic step.
# Returns {requeued batches, moved, dispatch, intake job ids}.
_TICK = _PRELUDE + r"""
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
local quiet = redis.call('ZRANGEBYSCORE', P .. 'dispatch', '-inf', now - stale, 'LIMIT', 0, limit)
dispatch(quiet, now, k, maxpar, true, out)
local intake = redis.call('ZRANGEBYSCORE', P .. 'intake', '-inf', now - stale, 'LIMIT', 0, limit)
for _, id in ipairs(intake) do redis.call('ZADD', P .. 'intake', now, id) end
return {#expired, #due, out, intake}
"""

# ARGV: job id.  Returns {meta values..., records...} without the content, or {} when unknown.
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
    ``idem`` is the job's idempotency key hash (expired with the job).
    ``left``: see the field.
    """

    wid: str
    updates: list[tuple[str, dict, str]] = field(default_factory=list)
    due: float | None = None
    idem: str = ""
    #: the job's ``left`` when claimed, set only when this item holds every
    #: recipient of the job: the release then writes ``left`` with the records
    #: (one HSET) instead of counting down with HINCRBY (while it holds the lease)
    left: int | None = None


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


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


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


def _record(raw) -> dict:
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
        self._job = client.register_script(_JOB)

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
        spec = [{"id": j.id, "idem": j.idem,
                 "meta": {k: v for k, v in j.meta.items() if META_DEFAULTS.get(k) != v},
                 "rcpts": [_compact(r) for r in j.records],
                 "domains": [[d, j.meta[f"d:{d}"]] for d in j.domains],
                 **({"hooks": j.hooks} if j.hooks else {}),
                 **({"expire": int(j.expire)} if j.expire else {})} for j in jobs]
        args = [now, "split" if split else "intake", s.batch_size, s.domain_concurrency,
                _dumps(spec)] + [j.content for j in jobs]
        ids, disp = self._submit(args=args)
        return [_s(i) for i in ids], _pairs(disp)

    def intake(self, job_ids: list[str], *, now: float | None = None) -> list[tuple[str, int]]:
        """Split stored jobs into their domain lanes (once: a second call does nothing)."""
        now = time.time() if now is None else now
        s = self.settings
        return _pairs(self._intake(args=[now, s.batch_size, s.domain_concurrency, *job_ids]))

    # ------------------------------------------------------------ worker side
    def claim(self, lane: str, token: str, *, limit: int | None = None, now: float | None = None) -> list:
        """Take up to ``limit`` work items of ``lane`` as one batch leased to ``token``.

        Delivery lanes give ``Claimed`` items; the report and webhook lanes (``!r``,
        ``!w``) give work item ids.
        """
        now = time.time() if now is None else now
        s = self.settings
        raw = self._claim(args=[now, lane, limit or s.batch_size, now + s.lease_seconds, token, *META_FIELDS])
        if lane.startswith("!"):
            return [_s(it[0]) for it in raw]
        out = []
        nm = len(META_FIELDS)
        for wid, content, packed in raw:
            wid = _s(wid)
            job, _, idx = wid.split("|", 2)
            values = json.loads(packed)
            out.append(Claimed(wid=wid, job=job, domain=lane, meta=_meta(values[:nm]), indexes=idx.split(","),
                               records=[_record(r) if r else None for r in values[nm:]],
                               content=content or b""))
        return out

    def renew(self, token: str, *, now: float | None = None) -> bool:
        """Extend the lease of ``token``'s batch; False when it no longer holds one."""
        now = time.time() if now is None else now
        return self._renew(args=[now + self.settings.lease_seconds, token]) == 1 or \
            self.r.zscore(PREFIX + "lease", token) is not None

    def release(self, token: str, lane: str, outcomes: list[Outcome], *, now: float | None = None):
        """Write outcomes, drop the lease, schedule what is left; return ``(applied, dispatch)``.

        ``applied`` holds ``"job|index"`` of each update actually written.  With
        each written record go, in the same script, a suppression entry for a
        recipient-level hard bounce (``mxq.tasks.suppress``) and a webhook event
        when ``MXQ_WEBHOOK_EVENTS`` asks for its state (``mxq.tasks.webhooks``).
        """
        from . import suppress, webhooks

        now = time.time() if now is None else now
        s = self.settings
        sup_ttl = suppress.auto_ttl()
        hooks = webhooks.current(strict=False)

        def extras(wid: str, rec: dict) -> list:
            if not (sup_ttl or hooks.enabled) or wid.startswith("!"):
                return [False, False]
            job = wid.split("|", 1)[0]
            return [suppress.release_arg(job, rec, now, sup_ttl), webhooks.hook_arg(hooks, job, rec, now)]

        payload = [{"wid": o.wid, "due": -1 if o.due is None else o.due, "idem": o.idem,
                    **({"left": int(o.left)} if o.left is not None else {}),
                    "updates": [[i, _compact(rec), 1 if rec["state"] in FINAL_STATES else 0, ev,
                                 *extras(o.wid, rec)]
                                for i, rec, ev in o.updates]} for o in outcomes]
        applied, disp = self._release(args=[now, token, s.result_ttl, s.batch_size, s.domain_concurrency,
                                            lane, _dumps(payload)])
        return [_s(a) for a in applied], _pairs(disp)

    def tick(self, *, now: float | None = None, limit: int = 1000) -> Tick:
        """One scheduler step: items of expired leases back to the front of their lane,
        due deferred items to the back, quiet lanes re-dispatched, stalled intake re-published."""
        now = time.time() if now is None else now
        s = self.settings
        requeued, moved, disp, intake = self._tick(
            args=[now, limit, s.dispatch_stale, s.batch_size, s.domain_concurrency])
        return Tick(int(requeued), int(moved), _pairs(disp), [_s(i) for i in intake])

    # ------------------------------------------------------------ reading
    def job(self, job_id: str) -> tuple[dict[str, str], dict[int, dict]] | None:
        """``(meta, {index: record})`` of a job (one script, no content), or None when unknown or expired."""
        values = self._job(args=[job_id, *META_FIELDS])
        if not values:
            return None
        nm = len(META_FIELDS)
        return _meta(values[:nm]), {i: _record(v) for i, v in enumerate(values[nm:]) if v is not None}

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


def get_store(settings: PipelineSettings | None = None) -> Store:
    """This process's store for ``settings`` (default: the environment); re-made after fork."""
    settings = settings or PipelineSettings.from_env()
    key = (os.getpid(), settings.redis_url)
    st = _stores.get(key)
    if st is None or st.settings != settings:
        st = _stores[key] = Store.from_settings(settings)
    return st

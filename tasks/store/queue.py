"""The operator's scripts on the queue: drop, flush, hold/release, suspend/resume (``mxq queue``).

Part of the store layer (keys as in ``mxq.tasks.store``'s table, the prelude's
helpers); ``mxq.tasks.admin.Admin`` calls ``QueueScripts``.  Each call carries a
request key (``_once``): a call retried after a lost reply answers what the
first run did and writes nothing more.
"""

from __future__ import annotations

from . import _PRELUDE, _once, _req

# Shared by the drop scripts: mark the non-final recipients ``idxs`` of one
# job dropped (all of them when idxs is nil), adjust ``left``, expire a job
# that is done, and enqueue a webhook event per dropped recipient when
# hookttl > 0.  Returns how many were dropped.
_DROP_LIB = r"""
local FINAL = {delivered = true, bounced = true, expired = true, suppressed = true, dropped = true}
local function nn(x) if x == nil then return cjson.null end return x end
local function drop_records(job, idxs, now, ttl, hookttl, text, enhanced, hooks)
  local jk = P .. 'job:' .. job
  if idxs == nil then
    local n = tonumber(redis.call('HGET', jk, 'n') or '0')
    idxs = {}
    for i = 0, n - 1 do table.insert(idxs, tostring(i)) end
  end
  local count, writes = 0, {}
  for c = 1, #idxs, 1000 do
    local fields = {}
    for j = c, math.min(c + 999, #idxs) do table.insert(fields, 'r:' .. idxs[j]) end
    local recs = redis.call('HMGET', jk, unpack(fields))
    for j, raw in ipairs(recs) do
      if raw then
        local r = cjson.decode(raw)
        if not FINAL[r.state] then
          r.state = 'dropped'; r.code = cjson.null; r.enhanced = enhanced; r.text = text
          r.next_attempt = cjson.null
          table.insert(writes, fields[j]); table.insert(writes, cjson.encode(r))
          count = count + 1
          if hookttl > 0 then
            local hid = job .. '-' .. string.sub(fields[j], 3) .. '-dropped'
            local body = cjson.encode({id = hid, job = job, recipient = nn(r.address), domain = nn(r.domain),
              state = 'dropped', code = cjson.null, enhanced = enhanced, text = text,
              exchange = nn(r.exchange), ip = nn(r.ip), relay = r.relay == true,
              attempts = tonumber(r.attempts) or 0, next_attempt = cjson.null, timestamp = now})
            redis.call('HSET', P .. 'hook:' .. hid, 'b', body)
            redis.call('EXPIRE', P .. 'hook:' .. hid, hookttl)
            table.insert(hooks, '!w|' .. hid)
          end
        end
      end
    end
  end
  if count > 0 then
    push('HSET', jk, writes)
    if redis.call('HINCRBY', jk, 'left', -count) <= 0 then
      redis.call('EXPIRE', jk, ttl)
      redis.call('ZADD', P .. 'final', now, job)      -- outcome for the result backend (mxq.tasks.outcomes)
      local idem = redis.call('HGET', jk, 'idem')
      if idem and idem ~= '' then redis.call('EXPIRE', P .. 'idem:' .. idem, ttl) end
    end
  end
  return count
end
-- The work item's job and indexes: '{job}|{domain}|{i,j,...}'.
local function parse_wid(wid)
  local a = string.find(wid, '|', 1, true)
  local b = string.find(wid, '|', a + 1, true)
  return string.sub(wid, 1, a - 1), split(string.sub(wid, b + 1), ',')
end
local function finish(hooks, now, k, maxpar, guardttl)
  if redis.call('EXISTS', P .. 'guard') == 1 then redis.call('EXPIRE', P .. 'guard', guardttl) end
  if #hooks > 0 then
    push('RPUSH', P .. 'ready:!w', hooks)
    return dispatch({'!w'}, now, k, maxpar, false, {})
  end
  return {}
end
"""

# ARGV: now, ttl, hookttl, text, enhanced, k, maxpar, guardttl, job.
# Returns {dropped (-1: unknown job), work items removed, batches in flight, dispatch}.
_DROP_JOB = r"""
local now, ttl, hookttl, text, enhanced = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local k, maxpar, guardttl, job = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local jk = P .. 'job:' .. job
if redis.call('EXISTS', jk) == 0 then return {-1, 0, 0, {}} end
local removed = 0
local domains = redis.call('HGET', jk, 'domains')
if domains then
  for _, d in ipairs(split(domains, ',')) do
    local idx = redis.call('HGET', jk, 'd:' .. d)
    if idx then
      for _, wid in ipairs(work_items(job, d, idx, {})) do
        removed = removed + redis.call('LREM', P .. 'ready:' .. d, 0, wid)
        removed = removed + redis.call('ZREM', P .. 'deferred', wid)
        removed = removed + redis.call('ZREM', P .. 'held', wid)
      end
    end
    redis.call('SREM', P .. 'hold:' .. d, job)
  end
end
redis.call('ZREM', P .. 'intake', job)
local inflight = 0
for _, token in ipairs(redis.call('ZRANGE', P .. 'lease', 0, -1)) do
  local b = redis.call('GET', P .. 'batch:' .. token)
  if b and string.find(b, '\n' .. job .. '|', 1, true) then
    redis.call('SADD', P .. 'guard', token)
    inflight = inflight + 1
  end
end
local hooks = {}
local n = drop_records(job, nil, now, ttl, hookttl, text, enhanced, hooks)
return {n, removed, inflight, finish(hooks, now, k, maxpar, guardttl)}
"""

# ARGV: now, ttl, hookttl, text, enhanced, k, maxpar, guardttl, domain.
# Returns {dropped, work items removed, work items in flight, dispatch}.
_DROP_DOMAIN = r"""
local now, ttl, hookttl, text, enhanced = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local k, maxpar, guardttl, d = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local items = redis.call('LRANGE', P .. 'ready:' .. d, 0, -1)
redis.call('DEL', P .. 'ready:' .. d)
redis.call('ZREM', P .. 'dispatch', d)
local removed = #items
local gone = {}
for _, wid in ipairs(redis.call('ZRANGE', P .. 'deferred', 0, -1)) do
  if lane_of(wid) == d then table.insert(gone, wid); table.insert(items, wid) end
end
if #gone > 0 then push('ZREM', P .. 'deferred', gone) end
removed = removed + #gone
-- on hold (mxq queue hold)
gone = {}
for _, wid in ipairs(redis.call('ZRANGE', P .. 'held', 0, -1)) do
  if lane_of(wid) == d then table.insert(gone, wid); table.insert(items, wid) end
end
if #gone > 0 then push('ZREM', P .. 'held', gone) end
redis.call('DEL', P .. 'hold:' .. d)
removed = removed + #gone
local inflight = 0
for _, token in ipairs(redis.call('ZRANGE', P .. 'lease', 0, -1)) do
  local b = redis.call('GET', P .. 'batch:' .. token)
  if b then
    local held = split(b, '\n')
    if held[1] == d then
      redis.call('SADD', P .. 'guard', token)
      for i = 2, #held do table.insert(items, held[i]); inflight = inflight + 1 end
    end
  end
end
local hooks, n = {}, 0
for _, wid in ipairs(items) do
  local job, idxs = parse_wid(wid)
  n = n + drop_records(job, idxs, now, ttl, hookttl, text, enhanced, hooks)
end
-- jobs stored and not split yet: their recipients in d
for _, job in ipairs(redis.call('ZRANGE', P .. 'intake', 0, -1)) do
  local idx = redis.call('HGET', P .. 'job:' .. job, 'd:' .. d)
  if idx then n = n + drop_records(job, split(idx, ','), now, ttl, hookttl, text, enhanced, hooks) end
end
return {n, removed, inflight, finish(hooks, now, k, maxpar, guardttl)}
"""

# ARGV: now, k, maxpar, domain ('' = every lane).  Returns {moved, dispatch}.
_FLUSH = r"""
local now, k, maxpar, only = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local by, lanes, moved = {}, {}, {}
for _, wid in ipairs(redis.call('ZRANGE', P .. 'deferred', 0, -1)) do
  local l = lane_of(wid)
  if only == '' or l == only then
    if not by[l] then by[l] = {}; table.insert(lanes, l) end
    table.insert(by[l], wid)
    table.insert(moved, wid)
  end
end
if #moved > 0 then push('ZREM', P .. 'deferred', moved) end
for _, l in ipairs(lanes) do push('RPUSH', P .. 'ready:' .. l, by[l]) end
return {#moved, dispatch(lanes, now, k, maxpar, false, {})}
"""

# ARGV: now, k, maxpar, job.  One job's deferred work items back to their ready lists.
# Returns {moved (-1: unknown job), dispatch}.
_FLUSH_JOB = r"""
local now, k, maxpar, job = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local jk = P .. 'job:' .. job
if redis.call('EXISTS', jk) == 0 then return {-1, {}} end
local lanes, moved = {}, 0
local domains = redis.call('HGET', jk, 'domains')
if domains then
  for _, d in ipairs(split(domains, ',')) do
    local idx = redis.call('HGET', jk, 'd:' .. d)
    if idx then
      local wid = job .. '|' .. d .. '|' .. idx
      if redis.call('ZREM', P .. 'deferred', wid) == 1 then
        redis.call('RPUSH', P .. 'ready:' .. d, wid)
        table.insert(lanes, d)
        moved = moved + 1
      end
    end
  end
end
return {moved, dispatch(lanes, now, k, maxpar, false, {})}
"""


# ---- hold / release (postsuper -h / -H) and suspend / resume (kcli suspend) ----
# A job's recipients in one domain are on hold when the job hash has h:{domain} = 1 (and the
# job is in mxq:hold:{domain}); their work items waiting on a ready list or in the deferred
# queue are parked in mxq:held at once, and any other (in flight now, not split yet) is parked
# by the claim that pops it (mxq.tasks.store's _CLAIM reads h:{lane} with the records).  A
# parked item is never claimed, retried or expired until it is released.
_HOLD_LIB = r"""
local FINAL = {delivered = true, bounced = true, expired = true, suppressed = true, dropped = true}
-- How many of the recipients idx ('0,1,...') of the job hash jk are not final.
local function pending_in(jk, idx)
  local ids, n = split(idx, ','), 0
  for c = 1, #ids, 1000 do
    local fields = {}
    for j = c, math.min(c + 999, #ids) do table.insert(fields, 'r:' .. ids[j]) end
    for _, raw in ipairs(redis.call('HMGET', jk, unpack(fields))) do
      if raw and not FINAL[cjson.decode(raw).state] then n = n + 1 end
    end
  end
  return n
end
local function mark(job, d)
  redis.call('HSET', P .. 'job:' .. job, 'h:' .. d, '1')
  redis.call('SADD', P .. 'hold:' .. d, job)
end
-- Park work items (in this order) in mxq:held.
local _seq = 0
local function park(wids, now)
  for _, wid in ipairs(wids) do
    _seq = _seq + 1
    redis.call('ZADD', P .. 'held', 'NX', now + _seq / 1000000, wid)
  end
end
-- Work items of batches in flight: {lane, {job = true, ...}, count} per matching batch.
local function in_flight(match)
  local n, jobs = 0, {}
  for _, token in ipairs(redis.call('ZRANGE', P .. 'lease', 0, -1)) do
    local b = redis.call('GET', P .. 'batch:' .. token)
    if b then
      local held = split(b, '\n')
      for i = 2, #held do
        local job = string.sub(held[i], 1, (string.find(held[i], '|', 1, true) or 1) - 1)
        if match(held[1], job) then n = n + 1; jobs[job] = true end
      end
    end
  end
  return n, jobs
end
"""

# ARGV: now, job.  Returns {recipients put on hold (-1: unknown job), items parked, items in flight}.
_HOLD_JOB = r"""
local now, job = tonumber(ARGV[1]), ARGV[2]
local jk = P .. 'job:' .. job
if redis.call('EXISTS', jk) == 0 then return {-1, 0, 0} end
local n, parked = 0, 0
local domains = redis.call('HGET', jk, 'domains')
for _, d in ipairs(domains and split(domains, ',') or {}) do
  local idx = redis.call('HGET', jk, 'd:' .. d)
  if idx then
    local p = pending_in(jk, idx)
    if p > 0 then
      n = n + p
      mark(job, d)
      local wids = {}
      for _, wid in ipairs(work_items(job, d, idx, {})) do
        if redis.call('LREM', P .. 'ready:' .. d, 0, wid) > 0 or redis.call('ZREM', P .. 'deferred', wid) == 1 then
          table.insert(wids, wid)
        end
      end
      park(wids, now)
      parked = parked + #wids
    end
  end
end
local inflight = in_flight(function(_, j) return j == job end)
return {n, parked, inflight}
"""

# ARGV: now, domain.  Every message waiting for the domain now (ready, deferred, in flight, not
# split yet) is put on hold; mail submitted afterwards is not (that is mxq queue suspend).
# Returns {recipients put on hold, items parked, items in flight}.
_HOLD_DOMAIN = r"""
local now, d = tonumber(ARGV[1]), ARGV[2]
local found, jobs = {}, {}
local function note(job) if not found[job] then found[job] = true; table.insert(jobs, job) end end
local waiting = redis.call('LRANGE', P .. 'ready:' .. d, 0, -1)
local gone = {}
for _, wid in ipairs(redis.call('ZRANGE', P .. 'deferred', 0, -1)) do
  if lane_of(wid) == d then table.insert(gone, wid); table.insert(waiting, wid) end
end
local inflight, busy = in_flight(function(lane, _) return lane == d end)
for job in pairs(busy) do note(job) end
for _, wid in ipairs(waiting) do note(string.sub(wid, 1, string.find(wid, '|', 1, true) - 1)) end
for _, job in ipairs(redis.call('ZRANGE', P .. 'intake', 0, -1)) do
  if redis.call('HEXISTS', P .. 'job:' .. job, 'd:' .. d) == 1 then note(job) end
end
local n, live = 0, {}
for _, job in ipairs(jobs) do
  local jk = P .. 'job:' .. job
  local idx = redis.call('HGET', jk, 'd:' .. d)
  local p = idx and pending_in(jk, idx) or 0
  if p > 0 then n = n + p; live[job] = true; mark(job, d) end
end
-- Park what waits; an item of a job with nothing left in d (or expired) would do nothing: let go.
local parked = {}
for _, wid in ipairs(waiting) do
  if live[string.sub(wid, 1, string.find(wid, '|', 1, true) - 1)] then table.insert(parked, wid) end
end
redis.call('DEL', P .. 'ready:' .. d)
redis.call('ZREM', P .. 'dispatch', d)
if #gone > 0 then push('ZREM', P .. 'deferred', gone) end
park(parked, now)
return {n, #parked, inflight}
"""

# ARGV: now, k, maxpar, job.  Returns {domains that were on hold (-1: unknown job), recipients
# released, items back on their ready lists, dispatch}.
_RELEASE_JOB = r"""
local now, k, maxpar, job = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local jk = P .. 'job:' .. job
if redis.call('EXISTS', jk) == 0 then return {-1, 0, 0, {}} end
local marked, n, moved, lanes = 0, 0, 0, {}
local domains = redis.call('HGET', jk, 'domains')
for _, d in ipairs(domains and split(domains, ',') or {}) do
  local idx = redis.call('HGET', jk, 'd:' .. d)
  if redis.call('HDEL', jk, 'h:' .. d) == 1 then
    marked = marked + 1
    if idx then n = n + pending_in(jk, idx) end
  end
  redis.call('SREM', P .. 'hold:' .. d, job)
  if idx then
    local back = {}
    for _, wid in ipairs(work_items(job, d, idx, {})) do
      if redis.call('ZREM', P .. 'held', wid) == 1 then table.insert(back, wid) end
    end
    if #back > 0 then
      push('RPUSH', P .. 'ready:' .. d, back)
      moved = moved + #back
      table.insert(lanes, d)
    end
  end
end
return {marked, n, moved, dispatch(lanes, now, k, maxpar, false, {})}
"""

# ARGV: now, k, maxpar, domain.  Returns {jobs that were on hold, recipients released, items back
# on the ready list, dispatch}.
_RELEASE_DOMAIN = r"""
local now, k, maxpar, d = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local jobs = redis.call('SMEMBERS', P .. 'hold:' .. d)
redis.call('DEL', P .. 'hold:' .. d)
local n = 0
for _, job in ipairs(jobs) do
  local jk = P .. 'job:' .. job
  if redis.call('HDEL', jk, 'h:' .. d) == 1 then
    local idx = redis.call('HGET', jk, 'd:' .. d)
    if idx then n = n + pending_in(jk, idx) end
  end
end
local back = {}
for _, wid in ipairs(redis.call('ZRANGE', P .. 'held', 0, -1)) do
  if lane_of(wid) == d then table.insert(back, wid) end
end
if #back > 0 then
  push('ZREM', P .. 'held', back)
  push('RPUSH', P .. 'ready:' .. d, back)
end
return {#jobs, n, #back, dispatch({d}, now, k, maxpar, false, {})}
"""

# ARGV: domain, value (JSON), milliseconds (0: until resumed), expires (the caller's clock; 0: none).
# Returns 1 when the domain was suspended already (its suspension replaced), else 0.
_SUSPEND = r"""
local d, value, ms, expires = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key = P .. 'suspend:' .. d
local was = redis.call('EXISTS', key)
if ms > 0 then redis.call('SET', key, value, 'PX', ms) else redis.call('SET', key, value) end
redis.call('SADD', P .. 'suspended', d)
redis.call('ZREM', P .. 'dispatch', d)
if expires > 0 then redis.call('ZADD', P .. 'throttled', expires, d) else redis.call('ZREM', P .. 'throttled', d) end
return was
"""

# ARGV: now, k, maxpar, domain.  Returns {1 if it was suspended, dispatch}.  The running-task count
# is taken again (force): nothing published before the suspension is waited for.
_RESUME = r"""
local now, k, maxpar, d = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local was = redis.call('DEL', P .. 'suspend:' .. d)
redis.call('SREM', P .. 'suspended', d)
redis.call('ZREM', P .. 'throttled', d)
return {was, dispatch({d}, now, k, maxpar, true, {})}
"""


class QueueScripts:
    """The scripts above, registered on one Redis client; each method is one call (one round trip)."""

    def __init__(self, client):
        self._drop_job = client.register_script(_PRELUDE + _DROP_LIB + _once(_DROP_JOB))
        self._drop_domain = client.register_script(_PRELUDE + _DROP_LIB + _once(_DROP_DOMAIN))
        self._flush = client.register_script(_PRELUDE + _once(_FLUSH))
        self._flush_job = client.register_script(_PRELUDE + _once(_FLUSH_JOB))
        self._hold_job = client.register_script(_PRELUDE + _HOLD_LIB + _once(_HOLD_JOB))
        self._hold_domain = client.register_script(_PRELUDE + _HOLD_LIB + _once(_HOLD_DOMAIN))
        self._release_job = client.register_script(_PRELUDE + _HOLD_LIB + _once(_RELEASE_JOB))
        self._release_domain = client.register_script(_PRELUDE + _HOLD_LIB + _once(_RELEASE_DOMAIN))
        self._suspend = client.register_script(_PRELUDE + _once(_SUSPEND))
        self._resume = client.register_script(_PRELUDE + _once(_RESUME))

    def drop_job(self, job: str, now, result_ttl, hook_ttl, text, enhanced, k, maxpar, guard_ttl) -> list:
        """``_DROP_JOB``: {dropped (-1: unknown job), removed, in flight, dispatch}."""
        return self._drop_job(keys=_req(), args=[now, result_ttl, hook_ttl, text, enhanced, k, maxpar, guard_ttl, job])

    def drop_domain(self, domain: str, now, result_ttl, hook_ttl, text, enhanced, k, maxpar, guard_ttl) -> list:
        """``_DROP_DOMAIN``: {dropped, removed, in flight, dispatch}."""
        return self._drop_domain(keys=_req(),
                                 args=[now, result_ttl, hook_ttl, text, enhanced, k, maxpar, guard_ttl, domain])

    def flush(self, domain: str, *, now, k, maxpar) -> list:
        """``_FLUSH`` (``domain`` "": every domain): {moved, dispatch}."""
        return self._flush(keys=_req(), args=[now, k, maxpar, domain])

    def flush_job(self, job: str, *, now, k, maxpar) -> list:
        """``_FLUSH_JOB``: {moved (-1: unknown job), dispatch}."""
        return self._flush_job(keys=_req(), args=[now, k, maxpar, job])

    def hold_job(self, job: str, *, now) -> list:
        """``_HOLD_JOB``: {held (-1: unknown job), parked, in flight}."""
        return self._hold_job(keys=_req(), args=[now, job])

    def hold_domain(self, domain: str, *, now) -> list:
        """``_HOLD_DOMAIN``: {held, parked, in flight}."""
        return self._hold_domain(keys=_req(), args=[now, domain])

    def release_job(self, job: str, *, now, k, maxpar) -> list:
        """``_RELEASE_JOB``: {domains on hold (-1: unknown job), released, moved, dispatch}."""
        return self._release_job(keys=_req(), args=[now, k, maxpar, job])

    def release_domain(self, domain: str, *, now, k, maxpar) -> list:
        """``_RELEASE_DOMAIN``: {jobs on hold, released, moved, dispatch}."""
        return self._release_domain(keys=_req(), args=[now, k, maxpar, domain])

    def suspend(self, domain: str, value: str, ms: int, expires) -> int:
        """``_SUSPEND``: 1 when the domain was suspended already."""
        return self._suspend(keys=_req(), args=[domain, value, ms, expires])

    def resume(self, domain: str, *, now, k, maxpar) -> list:
        """``_RESUME``: {1 if it was suspended, dispatch}."""
        return self._resume(keys=_req(), args=[now, k, maxpar, domain])

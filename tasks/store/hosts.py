"""The engine's shared port-25 state: its scripts (``mxq.tasks.hoststatus.RedisPort25State`` calls them).

Part of the store layer; the keys are ``mxq.tasks.store.keys``'s ``PORT25*``.
"""

from __future__ import annotations

from .keys import PORT25, PORT25_EVIDENCE, PORT25_PROBE, PORT25_RELAY

# KEYS: state, evidence, relay, probe.  ARGV: kind ('' when the relay worked), ip, domain, now, window,
# exchanges, domains, state_ttl, probe_interval.  Returns the new state (JSON) when this call concluded
# "blocked", else nil.  The rule is mxq.workers.port25.conclude's.
_PORT25_RECORD = r"""
local now, window = tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[1] == '' then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', math.ceil(window))
else
  redis.call('ZADD', KEYS[2], now, ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3])
  redis.call('EXPIRE', KEYS[2], math.ceil(window) + 1)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - window))
if redis.call('EXISTS', KEYS[1]) == 1 then return nil end
local relay = tonumber(redis.call('GET', KEYS[3]) or '')
if relay == nil or relay < now - window then return nil end
local ips, doms, nips, ndoms = {}, {}, {}, {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local a = string.find(m, '|', 1, true)
  local b = string.find(m, '|', a + 1, true)
  local kind, ip, dom = string.sub(m, 1, a - 1), string.sub(m, a + 1, b - 1), string.sub(m, b + 1)
  ips[kind] = ips[kind] or {}; doms[kind] = doms[kind] or {}
  if not ips[kind][ip] then ips[kind][ip] = true; nips[kind] = (nips[kind] or 0) + 1 end
  if not doms[kind][dom] then doms[kind][dom] = true; ndoms[kind] = (ndoms[kind] or 0) + 1 end
end
for _, kind in ipairs({'timeout', 'refused', 'unreachable'}) do
  if (nips[kind] or 0) >= tonumber(ARGV[6]) and (ndoms[kind] or 0) >= tonumber(ARGV[7]) then
    local state = cjson.encode({since = now, kind = kind, exchanges = nips[kind], domains = ndoms[kind]})
    if redis.call('SET', KEYS[1], state, 'NX', 'EX', math.ceil(tonumber(ARGV[8]))) then
      redis.call('SET', KEYS[4], '1', 'EX', math.ceil(tonumber(ARGV[9])))
      return state
    end
    return nil
  end
end
return nil
"""

# KEYS: state, evidence, probe.  A connect to port 25 worked: wipe everything; return the state it cleared.
_PORT25_SUCCESS = r"""
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then return nil end
local state = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return state
"""


class Port25Scripts:
    """The two scripts above on one Redis client (redis errors are the caller's)."""

    def __init__(self, client):
        self._record = client.register_script(_PORT25_RECORD)
        self._success = client.register_script(_PORT25_SUCCESS)

    def record(self, args: list):
        """``_PORT25_RECORD`` with ``args`` (its ARGV): the new state (JSON) when this call concluded "blocked"."""
        return self._record(keys=[PORT25, PORT25_EVIDENCE, PORT25_RELAY, PORT25_PROBE], args=args)

    def success(self):
        """``_PORT25_SUCCESS``: the state it cleared, if any."""
        return self._success(keys=[PORT25, PORT25_EVIDENCE, PORT25_PROBE])

-- release: give up open reservations of one API key whose request never reached the upstream
-- (Envoy's access log says so), so the reaper releases them charged nothing ("abandoned")
-- on its next pass instead of charging a claimed reservation at its deadline.
-- Units: time in ms (Redis TIME).
-- KEYS[1] reservations hash   KEYS[2] reservation expiry zset   KEYS[3] claimed set
-- ARGV[1..] reservation ids
-- Returns the number of reservations released.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for i = 1, #ARGV do
  local rid = ARGV[i]
  -- Rule: only an open reservation; one already settled or reaped is left as it is.
  if redis.call('HEXISTS', KEYS[1], rid) == 1 then
    -- Rule: unclaimed and due now: the reaper's "never reached the upstream" case.
    redis.call('SREM', KEYS[3], rid)
    redis.call('ZADD', KEYS[2], now, rid)
    n = n + 1
  end
end
return n

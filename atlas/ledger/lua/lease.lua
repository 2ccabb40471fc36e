-- lease: claim (or renew) open reservations of one API key for live ext_proc streams.
-- A claimed reservation's deadline moves to now + ttl; a claim for a reservation already
-- settled or reaped does nothing. Units: time in ms (Redis TIME).
-- KEYS[1] reservations hash   KEYS[2] reservation expiry zset   KEYS[3] claimed set
-- ARGV[1] reservation ttl ms   ARGV[2..] reservation ids
-- Returns the number of reservations claimed or renewed.

local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  local rid = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], rid) == 1 then
    redis.call('ZADD', KEYS[2], deadline, rid)
    redis.call('SADD', KEYS[3], rid)
    n = n + 1
  end
end
return n

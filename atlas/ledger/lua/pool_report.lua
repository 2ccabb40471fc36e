-- What the provider did with requests, from Envoy's access log (extproc/providers.py): cooling
-- and the numbers the health view reads. One provider per call (hash tag {p:<provider>}).
--
-- KEYS[1] cool   hash member -> "until_ms|reason" (member "*": the whole provider)
-- KEYS[2] use    prefix of per-minute use hashes (see pool_pick.lua): token corrections
-- KEYS[3] stats  prefix of per-minute hashes "<prefix><minute>"
-- ARGV: stats ttl s, count, then per observation: member ("" for none), cool ms (0: none),
--       cool scope ("member" | "provider"), reason, token correction, then field/amount pairs
--       count and the pairs ("<member>|<field>", amount) to add to this minute's stats.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local ttl = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local stats = KEYS[3] .. minute
local i = 3
for _ = 1, count do
  local member, cool_ms, scope, reason = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local correction = tonumber(ARGV[i + 4])
  local pairs_n = tonumber(ARGV[i + 5])
  i = i + 6
  if cool_ms > 0 then
    local field = scope == 'provider' and '*' or member
    local until_ms = now + cool_ms
    local old = redis.call('HGET', KEYS[1], field)
    local old_until = old and tonumber(string.match(old, '^(%d+)')) or 0
    -- Rule: cooling only ever extends (a shorter Retry-After does not cut a longer one short).
    if until_ms > old_until then
      redis.call('HSET', KEYS[1], field, until_ms .. '|' .. reason)
    end
  end
  if correction ~= 0 and member ~= '' then
    -- Rule: the tokens a pick counted by estimate become the tokens used (never below 0).
    -- (into this minute's hash, which always gets its expiry: a late correction never
    -- leaves a key without one)
    local use = KEYS[2] .. minute
    local f = member .. '|t'
    local v = redis.call('HINCRBY', use, f, correction)
    if v < 0 then redis.call('HSET', use, f, 0) end
    redis.call('PEXPIRE', use, 180000)
  end
  for _ = 1, pairs_n do
    redis.call('HINCRBY', stats, ARGV[i], tonumber(ARGV[i + 1]))
    i = i + 2
  end
end
redis.call('EXPIRE', stats, ttl)
-- Rule: entries whose time has passed are dropped as they are seen, so the hash stays small.
local entries = redis.call('HGETALL', KEYS[1])
for j = 1, #entries, 2 do
  local u = tonumber(string.match(entries[j + 1], '^(%d+)')) or 0
  if u <= now then redis.call('HDEL', KEYS[1], entries[j]) end
end
return 1

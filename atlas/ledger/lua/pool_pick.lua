-- Pick the member of one provider's key pool that serves a request (atlas/providers/pool.py).
-- Every key of the pool shares the hash tag {p:<provider>}: one slot, one atomic step, the same
-- answer for every authz replica.
--
-- KEYS[1] cool  hash member -> "until_ms|reason" (member "*": the whole provider)
-- KEYS[2] use   prefix of per-minute hashes "<prefix><minute>": "<member>|r" / "<member>|t",
--               requests and tokens of that minute (each hash expires after 3 minutes)
-- KEYS[3] rr    integer: the round-robin cursor
-- ARGV: strategy ("round_robin" | "least_used"), estimated tokens, member count, then per
--       member: id, requests/min limit (0: none), tokens/min limit (0: none)
-- Returns {member id or "", wait ms, why ("" | "provider_cooling" | "cooling" | "over_limit")}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local to_next_minute = (minute + 1) * 60000 - now
local strategy, estimate, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local use = KEYS[2] .. minute

local function until_of(entry)
  if not entry then return 0 end
  return tonumber(string.match(entry, '^(%d+)')) or 0
end

-- Rule: a provider cooling as a whole (5xx, connection failures) serves nobody until then.
local whole = until_of(redis.call('HGET', KEYS[1], '*'))
if whole > now then return {'', whole - now, 'provider_cooling'} end

-- Rule: a provider without a pool (no credential) serves whenever it is not cooling.
if n == 0 then return {'', 0, ''} end

local ids, rpm, tpm, order = {}, {}, {}, {}
for i = 1, n do
  ids[i] = ARGV[1 + 3 * i]
  rpm[i] = tonumber(ARGV[2 + 3 * i])
  tpm[i] = tonumber(ARGV[3 + 3 * i])
end
local fields = {}
for i = 1, n do
  fields[#fields + 1] = ids[i]
end
local cool = redis.call('HMGET', KEYS[1], unpack(fields))
local counts = {}
for i = 1, n do
  counts[#counts + 1] = ids[i] .. '|r'
  counts[#counts + 1] = ids[i] .. '|t'
end
local used = redis.call('HMGET', use, unpack(counts))
local reqs, toks = {}, {}
for i = 1, n do
  reqs[i] = tonumber(used[2 * i - 1]) or 0
  toks[i] = tonumber(used[2 * i]) or 0
end

-- Rule: round robin starts after the member the last pick chose; least used tries members
-- by this minute's requests, fewest first (ties in file order).
local start = 0
if strategy == 'round_robin' then
  start = (tonumber(redis.call('GET', KEYS[3])) or 0) % n
end
for i = 1, n do order[i] = ((start + i - 1) % n) + 1 end
if strategy == 'least_used' then
  table.sort(order, function(a, b)
    if reqs[a] ~= reqs[b] then return reqs[a] < reqs[b] end
    return a < b
  end)
end

local wait, why = nil, 'cooling'
for _, i in ipairs(order) do
  local u = until_of(cool[i])
  if u > now then
    -- Rule: a cooling member (429, 401/403 from the provider) is skipped until its time.
    if not wait or u - now < wait then wait, why = u - now, 'cooling' end
  elseif rpm[i] > 0 and reqs[i] >= rpm[i] then
    -- Rule: a member at its requests/min waits for the next minute.
    if not wait or to_next_minute < wait then wait, why = to_next_minute, 'over_limit' end
  elseif tpm[i] > 0 and toks[i] > 0 and toks[i] + estimate > tpm[i] then
    -- Rule: a member whose tokens/min this request would cross waits too (a first request
    -- larger than the whole limit still goes: it could never go otherwise).
    if not wait or to_next_minute < wait then wait, why = to_next_minute, 'over_limit' end
  else
    -- Rule: the chosen member counts the request and its estimate now (settlement corrects
    -- the tokens), so concurrent picks see each other.
    redis.call('HINCRBY', use, ids[i] .. '|r', 1)
    redis.call('HINCRBY', use, ids[i] .. '|t', estimate)
    redis.call('PEXPIRE', use, 180000)
    if strategy == 'round_robin' then redis.call('SET', KEYS[3], i, 'PX', 86400000) end
    return {ids[i], 0, ''}
  end
end
return {'', wait or 1000, why}

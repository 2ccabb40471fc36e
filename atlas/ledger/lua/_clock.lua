-- Shared prelude, prepended to every script at load time (Lua scripts cannot import).
-- Time is in milliseconds, from Redis TIME, so every replica of authz/extproc shares one clock.
-- Calendar windows are in a time zone that Python describes per call (atlas/windows.py
-- `ZoneSpec`): Lua has no zone rules, so it gets the offsets and the instants they change and
-- picks by Redis TIME. Days use Hinnant's civil algorithms.

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- A zone argument (ARGV text): integers separated by spaces,
--   "<history hour offset s> <offset s> [<transition epoch s> <offset s from then on>]...",
-- offsets in seconds east of UTC. One number alone is a fixed offset for both (the old ARGV).
local function zone(text)
  local n = {}
  for v in string.gmatch(text, '%-?%d+') do n[#n + 1] = tonumber(v) end
  if #n == 1 then n[2] = n[1] end
  local z = {hour_off = n[1], offsets = {n[2]}, starts = {-math.huge}}
  for i = 3, #n - 1, 2 do
    z.starts[#z.starts + 1] = n[i]
    z.offsets[#z.offsets + 1] = n[i + 1]
  end
  return z
end

-- The zone a key's windows are in: the one admit stored for it (its own, or the default it
-- had), else `fallback` (a key no admission described yet, or not for ZONE_TTL_S).
-- settle and reap run without the key's record, so admit leaves them this.
local ZONE_TTL_S = 30 * 86400
local function key_zone(prefix, fallback)
  return zone(redis.call('GET', prefix .. 'tz') or fallback)
end

-- admit: remember the key's zone argument for settle and reap; written only when it changed
-- (it changes as a transition comes within the spec's weeks, or the key's zone is edited).
-- Rule: Python's spec covers 40 days (atlas/windows.py SPEC_AFTER_S), more than ZONE_TTL_S.
local function store_zone(prefix, text)
  if redis.call('GET', prefix .. 'tz') ~= text then
    redis.call('SET', prefix .. 'tz', text, 'EX', ZONE_TTL_S)
  end
end

-- Index of the offset in effect at `sec`.
local function segment(z, sec)
  local i = 1
  while i < #z.starts and z.starts[i + 1] <= sec do i = i + 1 end
  return i
end

-- Rule: a day (or month) starts at the first instant whose local time reaches its midnight,
-- searched from segment i on: a 23- or 25-hour day is one day; where DST skips midnight the
-- day starts at the transition; where the clock falls back over it, at its first occurrence.
local function first_local(z, i, wall)
  while true do
    local at = wall - z.offsets[i]
    if at < z.starts[i] then at = z.starts[i] end
    if i == #z.starts or at < z.starts[i + 1] then return at end
    i = i + 1
  end
end

-- The names/resets of the windows instant `sec` (epoch s, plus usec) falls in: days and
-- months in the zone's local time, history hours on the fixed-offset grid.
local function clock_at(sec, usec, z)
  local i = segment(z, sec)
  local days = math.floor((sec + z.offsets[i]) / 86400)
  local y, m, d = civil_from_days(days)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  local hour_s = sec + z.hour_off
  local hy, hm, hd = civil_from_days(math.floor(hour_s / 86400))
  return {
    now_ms = sec * 1000 + math.floor(usec / 1000),
    day = string.format('%04d%02d%02d', y, m, d),
    month = string.format('%04d%02d', y, m),
    hour = string.format('%04d%02d%02d%02d', hy, hm, hd, math.floor((hour_s % 86400) / 3600)),
    day_reset_s = first_local(z, i, (days + 1) * 86400),
    month_reset_s = first_local(z, i, days_from_civil(ny, nm, 1) * 86400),
  }
end

-- Current instant (Redis TIME) and the windows it falls in.
local function clock(z)
  local t = redis.call('TIME')
  return clock_at(tonumber(t[1]), tonumber(t[2]), z)
end

-- Window hashes expire well after they close; hourly history is kept for forecasting.
local DAY_TTL_S = 35 * 86400
local MONTH_TTL_S = 400 * 86400

-- Tokens available in a bucket after refilling at rate_per_ms up to cap since its last update.
local function refill(key, rate_per_ms, cap, now_ms)
  local b = redis.call('HMGET', key, 't', 'ts')
  local t, ts = tonumber(b[1]), tonumber(b[2])
  if t == nil or ts == nil then return cap end
  local elapsed = now_ms - ts
  if elapsed < 0 then elapsed = 0 end
  return math.min(cap, t + elapsed * rate_per_ms)
end

local function store_bucket(key, tokens, rate_per_ms, cap, now_ms)
  redis.call('HSET', key, 't', tostring(tokens), 'ts', now_ms)
  -- Once full again the bucket carries no information: let it expire then.
  local deficit = cap - tokens
  redis.call('PEXPIRE', key, math.ceil(deficit / rate_per_ms) + 1000)
end

local function incr_window(key, field, by, ttl_s)
  if by ~= 0 then
    redis.call('HINCRBY', key, field, by)
    redis.call('EXPIRE', key, ttl_s)
  end
end

-- An integer as its decimal digits. Lua's `..` and tostring() format numbers with %.14g, so
-- 10^14 would become '1e+14', which no later parse (nor HINCRBY) takes: every number a
-- script stores in a string or concatenates goes through int().
local function int(x)
  return string.format('%.0f', x)
end

-- Never let a counter go below zero (a late correction may refund more than a window holds).
local function decr_floor(key, field, by)
  local v = tonumber(redis.call('HGET', key, field) or '0') or 0
  local n = v - by
  if n < 0 then n = 0 end
  redis.call('HSET', key, field, int(n))
end

-- A reservation entry "amount|day|month|cost|[u<end user tag>|]priority|model" -> amount,
-- day, month, cost, end user tag (nil: none), or nil when it is malformed. Entries written
-- before int() (amount '1e+14') still parse: the amount is read as a number and floored.
local function parse_reservation(entry)
  local amount, rday, rmonth, rcost = string.match(entry, '^([^|]+)|(%d%d%d%d%d%d%d%d)|(%d%d%d%d%d%d)|([^|]+)|')
  local a, cost = tonumber(amount), tonumber(rcost)
  if a == nil or cost == nil or a ~= a or a < 0 or a == math.huge
    or cost ~= cost or cost < 0 or cost == math.huge then
    return nil
  end
  local eu = string.match(entry, '^[^|]+|%d+|%d+|[^|]+|u(%x+)|')
  return math.floor(a), rday, rmonth, math.floor(cost), eu
end

-- Charge or release an end user's day (window prefix + eu:d:<day>): `field` is u or r.
local function end_user_add(prefix, eu, day, field, by)
  if eu == nil or by == 0 then return end
  local key = prefix .. 'eu:d:' .. day
  if by > 0 then
    incr_window(key, eu .. ':' .. field, by, DAY_TTL_S)
  elseif redis.call('EXISTS', key) == 1 then  -- never recreate an expired day without a TTL
    decr_floor(key, eu .. ':' .. field, -by)
  end
end

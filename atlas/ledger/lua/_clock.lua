-- Shared prelude, prepended to every script at load time (Lua scripts cannot import).
-- Time is in milliseconds, from Redis TIME, so every replica of authz/extproc shares one clock.
-- Calendar windows are in a fixed UTC offset (tz, seconds); days use Hinnant's civil algorithms.

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

-- Current instant and the names/resets of the windows it falls in.
local function clock(tz)
  local t = redis.call('TIME')
  local sec = tonumber(t[1])
  local local_s = sec + tz
  local days = math.floor(local_s / 86400)
  local y, m, d = civil_from_days(days)
  local hour = math.floor((local_s % 86400) / 3600)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return {
    now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000),
    day = string.format('%04d%02d%02d', y, m, d),
    month = string.format('%04d%02d', y, m),
    hour = string.format('%04d%02d%02d%02d', y, m, d, hour),
    day_reset_s = (days + 1) * 86400 - tz,
    month_reset_s = days_from_civil(ny, nm, 1) * 86400 - tz,
  }
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

-- A reservation entry "amount|day|month|cost|priority|model" -> amount, day, month, cost, or
-- nil when it is malformed. Entries written before int() (amount '1e+14') still parse: the
-- amount is read as a number and floored.
local function parse_reservation(entry)
  local amount, rday, rmonth, rcost = string.match(entry, '^([^|]+)|(%d%d%d%d%d%d%d%d)|(%d%d%d%d%d%d)|([^|]+)|')
  local a, cost = tonumber(amount), tonumber(rcost)
  if a == nil or cost == nil or a ~= a or a < 0 or a == math.huge
    or cost ~= cost or cost < 0 or cost == math.huge then
    return nil
  end
  return math.floor(a), rday, rmonth, math.floor(cost)
end

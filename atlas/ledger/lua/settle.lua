-- settle: charge what a request really used, release its reservation, refund the rest.
-- Idempotent by reservation id: a `done:<rid>` marker records the outcome.
-- Units: tokens are integers, time in ms (Redis TIME).
-- KEYS[1] reservations hash   KEYS[2] reservation expiry zset   KEYS[3] token bucket
-- KEYS[4] window prefix (d:/m:/h:/done: keys built from TIME and the rid; tz: the key's zone
--   argument admit stored)   KEYS[5] claimed set
-- A key of a team only: KEYS[6] the team's limits hash   KEYS[7] its token bucket
--   KEYS[8] its window prefix
-- ARGV[1] reservation id   ARGV[2] prompt tokens   ARGV[3] completion tokens
-- ARGV[4] default zone argument (_clock.lua `zone`), for a key with no stored zone
-- ARGV[5] tokens_per_minute (0 none)   ARGV[6] exact (1) or estimated (0)
-- ARGV[7] done-marker ttl s   ARGV[8] history ttl s   ARGV[9] cost of the actual usage, micro-USD
-- ARGV[10] cached tokens   ARGV[11] cache-write tokens (both parts of ARGV[2])
-- ARGV[12] reasoning tokens (part of ARGV[3])   ARGV[13] quotas count cached tokens (1) or not (0)
-- ARGV[14] the request's idempotency key tag ('' none)   ARGV[15] what becomes of it: store
--   (ARGV[16] is the response to replay) | unstored (completed, too big to keep) | drop (the
--   request failed: a retry runs)   ARGV[17] how long a completed one is kept, s
-- Returns {status, charged, refunded, now_ms, hour}; status is one of
--   settled | duplicate | late (corrected a reaped charge) | unreserved (no reservation found)
--   | malformed (an unreadable reservation entry: removed, usage charged, nothing released)

local rid = ARGV[1]
local prompt = tonumber(ARGV[2])
local completion = tonumber(ARGV[3])
local tpm = tonumber(ARGV[5])
local exact = ARGV[6] == '1'
local done_ttl = tonumber(ARGV[7])
local hist_ttl = tonumber(ARGV[8])
local cost = tonumber(ARGV[9])
local cached = tonumber(ARGV[10])
local cache_write = tonumber(ARGV[11])
local reasoning = tonumber(ARGV[12])
-- Rule: quotas and the tokens/minute bucket are charged prompt + completion, cached tokens
-- included unless the deployment counts them out (ATLAS_QUOTA_COUNTS_CACHED=false).
local actual = prompt + completion
if ARGV[13] == '0' then actual = actual - cached end

-- Rule: usage is charged in the windows of now, in the key's own zone.
local c = clock(key_zone(KEYS[4], ARGV[4]))
local done_key = KEYS[4] .. 'done:' .. rid
local day_key = KEYS[4] .. 'd:' .. c.day
local month_key = KEYS[4] .. 'm:' .. c.month
local hour_key = KEYS[4] .. 'h:' .. c.hour
-- Rule: a team's windows are charged, released and corrected exactly as its key's are.
local team = #KEYS >= 8
local tday_key = team and (KEYS[8] .. 'd:' .. c.day) or ''
local tmonth_key = team and (KEYS[8] .. 'm:' .. c.month) or ''

-- Rule: cached, cache-write and reasoning tokens are recorded in every window beside the
-- charge (reports and /v1/usage), whether or not the quota counts them.
local function record_kinds(key, ttl)
  incr_window(key, 'cached', cached, ttl)
  incr_window(key, 'cache_write', cache_write, ttl)
  incr_window(key, 'reasoning', reasoning, ttl)
end

local function record_history(charged_delta, refunded, requests)
  incr_window(hour_key, 'requests', requests, hist_ttl)
  incr_window(hour_key, 'prompt', prompt, hist_ttl)
  incr_window(hour_key, 'completion', completion, hist_ttl)
  incr_window(hour_key, 'refunded', refunded, hist_ttl)
  incr_window(hour_key, 'spend', cost, hist_ttl)
  if not exact then incr_window(hour_key, 'estimated', 1, hist_ttl) end
  record_kinds(hour_key, hist_ttl)
  record_kinds(day_key, DAY_TTL_S)
  record_kinds(month_key, MONTH_TTL_S)
end

-- Rule: the idempotency record of this request (and only this request's: its rid) keeps
-- the response for duplicates, or goes when the request failed so that a retry runs.
if ARGV[14] ~= '' then
  local ik = KEYS[4] .. 'idem:' .. ARGV[14]
  if redis.call('HGET', ik, 'rid') == rid then
    if ARGV[15] == 'drop' then
      redis.call('DEL', ik)
    else
      redis.call('HSET', ik, 'state', ARGV[15] == 'store' and 'done' or 'unstored',
        'resp', ARGV[15] == 'store' and ARGV[16] or '')
      redis.call('EXPIRE', ik, tonumber(ARGV[17]))
    end
  end
end

-- Rule: a reservation settles once; replays (journal, retries) change nothing.
local done = redis.call('GET', done_key)
if done then
  local kind, amount, reaped_cost, reaped_eu =
    string.match(done, '^(%a+):(%-?%d+):?(%-?%d*):?(%x*)$')
  if kind ~= 'reaped' then return {'duplicate', 0, 0, c.now_ms, c.hour} end
  local cost_delta = cost - (tonumber(reaped_cost) or 0)
  if cost_delta > 0 then
    incr_window(month_key, 'spend', cost_delta, MONTH_TTL_S)
    if team then incr_window(tmonth_key, 'spend', cost_delta, MONTH_TTL_S) end
  elseif cost_delta < 0 then
    decr_floor(month_key, 'spend', -cost_delta)
    if team then decr_floor(tmonth_key, 'spend', -cost_delta) end
  end
  -- Rule: a settlement arriving after the reaper corrects the reaped charge to the actual
  -- (the end user's day too, when the reaper charged one).
  local delta = actual - tonumber(amount)
  if reaped_eu ~= nil and reaped_eu ~= '' then end_user_add(KEYS[4], reaped_eu, c.day, 'u', delta) end
  if delta > 0 then
    incr_window(day_key, 'used', delta, DAY_TTL_S)
    incr_window(month_key, 'used', delta, MONTH_TTL_S)
    if team then
      incr_window(tday_key, 'used', delta, DAY_TTL_S)
      incr_window(tmonth_key, 'used', delta, MONTH_TTL_S)
    end
  elseif delta < 0 then
    decr_floor(day_key, 'used', -delta)
    decr_floor(month_key, 'used', -delta)
    if team then
      decr_floor(tday_key, 'used', -delta)
      decr_floor(tmonth_key, 'used', -delta)
    end
  end
  redis.call('SET', done_key, 'settled:' .. int(actual), 'EX', done_ttl)
  -- History: the reaped estimate is replaced by the real usage.
  incr_window(hour_key, 'reaped_tokens', -tonumber(amount), hist_ttl)
  record_history(delta, 0, 0)
  return {'late', delta, 0, c.now_ms, c.hour}
end

local resv = redis.call('HGET', KEYS[1], rid)
local reserved = 0
local eu = nil
local status = 'unreserved'
redis.call('SREM', KEYS[5], rid)
if resv then
  local amount, rday, rmonth, rcost, resv_eu = parse_reservation(resv)
  if amount == nil then
    -- Rule: an unreadable entry must not make the settlement fail (it would be retried and
    -- journaled forever): remove it, charge the usage, count it; its windows stay as they are.
    status = 'malformed'
    incr_window(hour_key, 'malformed', 1, hist_ttl)
  else
    status = 'settled'
    reserved = amount
    eu = resv_eu
    end_user_add(KEYS[4], eu, rday, 'r', -reserved)
    -- Rule: release the reservation in the windows it was taken from (it may be yesterday's).
    decr_floor(KEYS[4] .. 'd:' .. rday, 'reserved', reserved)
    decr_floor(KEYS[4] .. 'm:' .. rmonth, 'reserved', reserved)
    decr_floor(KEYS[4] .. 'm:' .. rmonth, 'spend_reserved', rcost)
    if team then
      decr_floor(KEYS[8] .. 'd:' .. rday, 'reserved', reserved)
      decr_floor(KEYS[8] .. 'm:' .. rmonth, 'reserved', reserved)
      decr_floor(KEYS[8] .. 'm:' .. rmonth, 'spend_reserved', rcost)
    end
  end
  redis.call('HDEL', KEYS[1], rid)
  redis.call('ZREM', KEYS[2], rid)
end

-- Rule: usage is charged to the windows in which it is settled (the end user's day too).
end_user_add(KEYS[4], eu, c.day, 'u', actual)
incr_window(day_key, 'used', actual, DAY_TTL_S)
incr_window(month_key, 'used', actual, MONTH_TTL_S)
incr_window(month_key, 'spend', cost, MONTH_TTL_S)
if team then
  incr_window(tday_key, 'used', actual, DAY_TTL_S)
  incr_window(tmonth_key, 'used', actual, MONTH_TTL_S)
  incr_window(tmonth_key, 'spend', cost, MONTH_TTL_S)
end

-- Rule: the tokens/minute bucket gets back what was reserved and not used (or pays the excess).
if tpm > 0 and status == 'settled' then
  local rate = tpm / 60000
  local t = refill(KEYS[3], rate, tpm, c.now_ms)
  store_bucket(KEYS[3], math.min(tpm, t + reserved - actual), rate, tpm, c.now_ms)
end
if team and status == 'settled' then
  local t_tpm = tonumber(redis.call('HGET', KEYS[6], 'tpm') or '0') or 0
  if t_tpm > 0 then
    local rate = t_tpm / 60000
    local t = refill(KEYS[7], rate, t_tpm, c.now_ms)
    store_bucket(KEYS[7], math.min(t_tpm, t + reserved - actual), rate, t_tpm, c.now_ms)
  end
end

local refunded = reserved - actual
if refunded < 0 then refunded = 0 end
redis.call('SET', done_key, 'settled:' .. int(actual), 'EX', done_ttl)
record_history(actual, refunded, 1)
return {status, actual, refunded, c.now_ms, c.hour}

-- reap: settle the reservations of one API key whose TTL passed without a settlement
-- (extproc crashed, the gRPC stream was lost). Units: time in ms (Redis TIME), tokens.
-- KEYS[1] reservations hash   KEYS[2] reservation expiry zset   KEYS[3] window prefix
-- ARGV[1] tz offset s   ARGV[2] charge (1 = charge the reserved amount, 0 = release only)
-- ARGV[3] max reservations per call   ARGV[4] done-marker ttl s   ARGV[5] history ttl s
-- Returns {reaped count, tokens charged, tokens released from reservations}

local tz = tonumber(ARGV[1])
local charge = ARGV[2] == '1'
local done_ttl = tonumber(ARGV[4])
local hist_ttl = tonumber(ARGV[5])
local c = clock(tz)
local hour_key = KEYS[3] .. 'h:' .. c.hour

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', c.now_ms, 'LIMIT', 0, tonumber(ARGV[3]))
local charged_total = 0
local released_total = 0
for _, rid in ipairs(expired) do
  local resv = redis.call('HGET', KEYS[1], rid)
  if resv then
    local amount, rday, rmonth, rcost = string.match(resv, '^(%d+)|(%d+)|(%d+)|(%d+)|')
    local reserved = tonumber(amount)
    decr_floor(KEYS[3] .. 'd:' .. rday, 'reserved', reserved)
    decr_floor(KEYS[3] .. 'm:' .. rmonth, 'reserved', reserved)
    decr_floor(KEYS[3] .. 'm:' .. rmonth, 'spend_reserved', tonumber(rcost))
    -- Rule: an unsettled request is charged what it reserved (the safe side for a quota);
    -- a late settlement corrects it via the `reaped:` marker.
    local charged = charge and reserved or 0
    incr_window(KEYS[3] .. 'd:' .. c.day, 'used', charged, DAY_TTL_S)
    incr_window(KEYS[3] .. 'm:' .. c.month, 'used', charged, MONTH_TTL_S)
    local charged_cost = charge and tonumber(rcost) or 0
    incr_window(KEYS[3] .. 'm:' .. c.month, 'spend', charged_cost, MONTH_TTL_S)
    incr_window(hour_key, 'reaped', 1, hist_ttl)
    incr_window(hour_key, 'reaped_tokens', charged, hist_ttl)
    redis.call('SET', KEYS[3] .. 'done:' .. rid, 'reaped:' .. charged .. ':' .. charged_cost,
      'EX', done_ttl)
    charged_total = charged_total + charged
    released_total = released_total + reserved
    redis.call('HDEL', KEYS[1], rid)
  end
  redis.call('ZREM', KEYS[2], rid)
end
return {#expired, charged_total, released_total}

-- reap: settle the reservations of one API key whose deadline passed without a settlement.
-- Units: time in ms (Redis TIME), tokens.
-- An UNCLAIMED reservation (no ext_proc stream ever claimed it: the client reset before Envoy
-- sent the request on) is released and charged 0 ("abandoned"). A CLAIMED one (extproc
-- crashed, the gRPC stream was lost) is charged what it reserved when ARGV[2] says so.
-- KEYS[1] reservations hash   KEYS[2] reservation expiry zset   KEYS[3] window prefix (also of
--   tz, the key's zone argument admit stored)
-- KEYS[4] claimed set   KEYS[5], a key of a team only: the team's window prefix (its windows
--   are released and charged as the key's)
-- ARGV[1] default zone argument (_clock.lua `zone`), for a key with no stored zone
-- ARGV[2] charge (1 = charge the reserved amount, 0 = release only)
-- ARGV[3] max reservations per call   ARGV[4] done-marker ttl s   ARGV[5] history ttl s
-- Returns {reaped count, tokens charged, tokens released from reservations, abandoned count,
--   malformed entries removed, the reservations reaped}: the last a flat list of rid,
--   charged, claimed (1/0), priority and model for each (its request log record)

local charge = ARGV[2] == '1'
local done_ttl = tonumber(ARGV[4])
local hist_ttl = tonumber(ARGV[5])
-- Rule: charges land in the windows of now, in the key's own zone.
local c = clock(key_zone(KEYS[3], ARGV[1]))
local hour_key = KEYS[3] .. 'h:' .. c.hour
local team = #KEYS >= 5

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', c.now_ms, 'LIMIT', 0, tonumber(ARGV[3]))
local charged_total = 0
local released_total = 0
local abandoned = 0
local malformed = 0
local reaped = {}
for _, rid in ipairs(expired) do
  local resv = redis.call('HGET', KEYS[1], rid)
  local claimed = redis.call('SREM', KEYS[4], rid) == 1
  if resv then
    local reserved, rday, rmonth, rcost, eu = parse_reservation(resv)
    if reserved == nil then
      -- Rule: an entry no script can read is removed and counted, never left to block the
      -- key's reaping; its windows cannot be released (the amount is unknown).
      malformed = malformed + 1
      incr_window(hour_key, 'malformed', 1, hist_ttl)
      redis.call('SET', KEYS[3] .. 'done:' .. rid, 'reaped:0:0', 'EX', done_ttl)
    else
      decr_floor(KEYS[3] .. 'd:' .. rday, 'reserved', reserved)
      decr_floor(KEYS[3] .. 'm:' .. rmonth, 'reserved', reserved)
      decr_floor(KEYS[3] .. 'm:' .. rmonth, 'spend_reserved', rcost)
      if team then
        decr_floor(KEYS[5] .. 'd:' .. rday, 'reserved', reserved)
        decr_floor(KEYS[5] .. 'm:' .. rmonth, 'reserved', reserved)
        decr_floor(KEYS[5] .. 'm:' .. rmonth, 'spend_reserved', rcost)
      end
      -- Rule: a claimed, unsettled request is charged what it reserved (the safe side for a
      -- quota); an unclaimed one never reached the upstream and is charged nothing. A late
      -- settlement corrects either via the `reaped:` marker.
      local charged, charged_cost = 0, 0
      if claimed and charge then charged, charged_cost = reserved, rcost end
      if not claimed then
        abandoned = abandoned + 1
        incr_window(hour_key, 'abandoned', 1, hist_ttl)
      end
      -- Rule: an end user's day is released and charged as the key's.
      end_user_add(KEYS[3], eu, rday, 'r', -reserved)
      end_user_add(KEYS[3], eu, c.day, 'u', charged)
      incr_window(KEYS[3] .. 'd:' .. c.day, 'used', charged, DAY_TTL_S)
      incr_window(KEYS[3] .. 'm:' .. c.month, 'used', charged, MONTH_TTL_S)
      incr_window(KEYS[3] .. 'm:' .. c.month, 'spend', charged_cost, MONTH_TTL_S)
      if team then
        incr_window(KEYS[5] .. 'd:' .. c.day, 'used', charged, DAY_TTL_S)
        incr_window(KEYS[5] .. 'm:' .. c.month, 'used', charged, MONTH_TTL_S)
        incr_window(KEYS[5] .. 'm:' .. c.month, 'spend', charged_cost, MONTH_TTL_S)
      end
      incr_window(hour_key, 'reaped', 1, hist_ttl)
      incr_window(hour_key, 'reaped_tokens', charged, hist_ttl)
      -- The marker names the end user charged, so a late settlement corrects its day too.
      redis.call('SET', KEYS[3] .. 'done:' .. rid,
        'reaped:' .. int(charged) .. ':' .. int(charged_cost) .. (eu and (':' .. eu) or ''),
        'EX', done_ttl)
      -- What the entry says about the request after its numbers:
      -- [u<tag>|][i<tag>|]priority|model.
      local rest = string.match(resv, '^[^|]*|[^|]*|[^|]*|[^|]*|(.*)$') or ''
      rest = string.gsub(rest, '^u%x+|', '')
      -- Rule: a reaped request never completed: its idempotency key is freed for a retry
      -- (if it is still this request's).
      local idem = string.match(rest, '^i(%x+)|')
      if idem then
        rest = string.gsub(rest, '^i%x+|', '')
        local ik = KEYS[3] .. 'idem:' .. idem
        if redis.call('HGET', ik, 'rid') == rid then redis.call('DEL', ik) end
      end
      local priority, model = string.match(rest, '^([^|]*)|(.*)$')
      for _, v in ipairs({rid, int(charged), claimed and 1 or 0, priority or '', model or ''}) do
        reaped[#reaped + 1] = v
      end
      charged_total = charged_total + charged
      released_total = released_total + reserved
    end
    redis.call('HDEL', KEYS[1], rid)
  end
  redis.call('ZREM', KEYS[2], rid)
end
return {#expired, charged_total, released_total, abandoned, malformed, reaped}

-- admit: every admission rule and the reservation, all or nothing, in one call.
-- Units: time in ms (Redis TIME), tokens are integers, rate_per_sec in requests/s.
-- KEYS[1] request bucket   KEYS[2] token bucket   KEYS[3] reservations hash
-- KEYS[4] reservation expiry zset   KEYS[5] window prefix (d:/m:/h: keys built from TIME, and
--   tz: the key's zone argument kept for settle and reap)
-- KEYS[6] claimed set
-- A key of a team only (atlas/ledger/keys.py: the same hash tag): KEYS[7] the team's limits
--   hash {rate, burst, tpm, daily, monthly, budget (micro-USD); 0 or absent = none}
--   KEYS[8] its request bucket   KEYS[9] its token bucket   KEYS[10] its window prefix
--   (d:/m:, in the key's zone)
-- ARGV[1] reservation id        ARGV[2] prompt estimate        ARGV[3] completion estimate
-- ARGV[4] rate_per_sec          ARGV[5] burst                  ARGV[6] tokens_per_minute (0 none)
-- ARGV[7] daily_limit           ARGV[8] monthly_limit          ARGV[9] quota ceiling (0..1)
-- ARGV[10] max_concurrent (0 none)  ARGV[11] reservation ttl ms
-- ARGV[12] the key's zone argument (see `zone` in _clock.lua: history hour offset, offsets
--   and their transitions, from atlas/windows.py)
-- ARGV[13] shadow (1 = record the verdict but admit)  ARGV[14] clamp (1 = lower max_tokens)
-- ARGV[15] priority   ARGV[16] model   ARGV[17] history ttl s
-- ARGV[18] monthly budget in micro-USD (0 none)   ARGV[19] cost of the estimate in micro-USD
-- ARGV[20] claim timeout ms: a new reservation is "unclaimed" and reaped (charged 0) unless
--   an ext_proc stream claims it (lease.lua) by then   ARGV[21] choices (completions generated)
-- ARGV[22] unattended (settled from Envoy's access log, which no stream claims: claimed at
--   admission; 1 = for claim_ms, 2 = a stream, for ttl_ms)
-- ARGV[23] the end user's tag (hex of a hash of whom the request names; '' = no end-user
--   limit applies)   ARGV[24] an end user's daily token quota (0 none)
-- ARGV[25] an end user's requests/minute (0 none); both per key, under its hash tag
--   (window prefix + eu:d:<day> {<tag>:u used, <tag>:r reserved}, eu:rpm:<tag> bucket)
-- ARGV[26] the idempotency key's tag (hex of a hash; '' = the request sent none)
-- ARGV[27] a hash of the request's body   ARGV[28] how long an in-flight record lives, ms
--   (window prefix + idem:<tag> {body, state inflight|done|unstored, rid, resp})
-- Rule (precedence): every limit on the path must pass, the key's, its team's and its end
--   user's; the reason reported is the first that fails in this order: requests/s (key, team)
--   and end user's requests/minute, quotas (the smallest room of the key's, the team's and
--   the end user's), budgets (key, team), tokens/minute (key, team), concurrency. A team's
--   reasons start `team_`, an end user's `end_user_`.
-- Returns {admitted, reason, retry_after_ms, granted_completion (-1 = unchanged), reserved,
--   req_remaining, req_reset_ms, tok_remaining (-1 none), tok_reset_ms,
--   day_used, day_reserved, day_reset_s, month_used, month_reserved, month_reset_s, now_ms,
--   month_spend (micro-USD), the stored response of a replayed request ('' otherwise)}

local rid = ARGV[1]
local prompt = tonumber(ARGV[2])
local completion = tonumber(ARGV[3])
local rate = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local daily_limit = tonumber(ARGV[7])
local monthly_limit = tonumber(ARGV[8])
local ceiling = tonumber(ARGV[9])
local max_concurrent = tonumber(ARGV[10])
local ttl_ms = tonumber(ARGV[11])
local z = zone(ARGV[12])
local shadow = ARGV[13] == '1'
local clamp = ARGV[14] == '1'
local hist_ttl = tonumber(ARGV[17])
local budget = tonumber(ARGV[18])
local est_cost = tonumber(ARGV[19])
local claim_ms = math.min(tonumber(ARGV[20]), ttl_ms)
local choices = tonumber(ARGV[21])
local unattended = ARGV[22] == '1' or ARGV[22] == '2'
-- Rule: an unattended stream (no lease renews it) holds its reservation for the TTL, as a
-- claimed stream would between renewals; a plain completion for the claim timeout.
local unattended_ms = ARGV[22] == '2' and ttl_ms or claim_ms
local eu = ARGV[23]
local eu_daily = tonumber(ARGV[24])
local eu_rpm = tonumber(ARGV[25])
local idem = ARGV[26]

local team = #KEYS >= 10
local t_rate, t_burst, t_tpm, t_daily, t_monthly, t_budget = 0, 0, 0, 0, 0, 0
if team then
  local l = redis.call('HMGET', KEYS[7], 'rate', 'burst', 'tpm', 'daily', 'monthly', 'budget')
  t_rate, t_burst, t_tpm = tonumber(l[1]) or 0, tonumber(l[2]) or 0, tonumber(l[3]) or 0
  t_daily, t_monthly, t_budget = tonumber(l[4]) or 0, tonumber(l[5]) or 0, tonumber(l[6]) or 0
end

local c = clock(z)
store_zone(KEYS[5], ARGV[12])
local now = c.now_ms
local day_key = KEYS[5] .. 'd:' .. c.day
local month_key = KEYS[5] .. 'm:' .. c.month
local hour_key = KEYS[5] .. 'h:' .. c.hour

-- Rule: an idempotency key admits one request: a duplicate is never charged nor counted.
-- It is refused while the first is in flight (retry after it), refused when its body
-- differs, and answered from the stored response once the first completed (`unstored`: it
-- completed but its response was too big to keep).
local idem_key = ''
if idem ~= '' then
  idem_key = KEYS[5] .. 'idem:' .. idem
  local rec = redis.call('HMGET', idem_key, 'body', 'state', 'resp')
  if rec[1] then
    local why = 'idempotency_in_progress'
    local wait = math.max(1000, math.min(redis.call('PTTL', idem_key), 5000))
    if rec[1] ~= ARGV[27] then why, wait = 'idempotency_mismatch', 0
    elseif rec[2] == 'done' then why, wait = 'idempotency_replay', 0
    elseif rec[2] == 'unstored' then why, wait = 'idempotency_completed', 0 end
    local resp = ''
    if why == 'idempotency_replay' then resp = rec[3] or '' end
    return {0, why, wait, -1, 0, 0, 0, -1, 0, 0, 0, c.day_reset_s, 0, 0, c.month_reset_s,
      now, 0, resp}
  end
end

local reason = ''
local retry_ms = 0
local estimate = prompt + completion
local granted = -1

-- Rule: requests/s with burst (token bucket of requests, capacity = burst).
local req_rate = rate / 1000
local req_tokens = refill(KEYS[1], req_rate, burst, now)
if req_tokens < 1 then
  reason = 'rate_limit_requests'
  retry_ms = math.ceil((1 - req_tokens) / req_rate)
end
-- Rule: the team's requests/s with burst, over all its keys (when the team sets one).
local t_req_rate, t_req_tokens = 0, 0
if t_rate > 0 and t_burst > 0 then
  t_req_rate = t_rate / 1000
  t_req_tokens = refill(KEYS[8], t_req_rate, t_burst, now)
  if reason == '' and t_req_tokens < 1 then
    reason = 'team_rate_limit_requests'
    retry_ms = math.ceil((1 - t_req_tokens) / t_req_rate)
  end
end

-- Rule: an end user's requests/minute within the key (a bucket per end user, capacity = the
-- minute's requests).
local eu_bucket, eu_req_rate, eu_req_tokens = '', 0, 0
if eu ~= '' and eu_rpm > 0 then
  eu_bucket = KEYS[5] .. 'eu:rpm:' .. eu
  eu_req_rate = eu_rpm / 60000
  eu_req_tokens = refill(eu_bucket, eu_req_rate, eu_rpm, now)
  if reason == '' and eu_req_tokens < 1 then
    reason = 'end_user_rate_limit_requests'
    retry_ms = math.ceil((1 - eu_req_tokens) / eu_req_rate)
  end
end

-- Rule: daily and monthly quota; a priority may only fill its ceiling share of each.
local day = redis.call('HMGET', day_key, 'used', 'reserved')
local day_used, day_res = tonumber(day[1] or '0'), tonumber(day[2] or '0')
local mon = redis.call('HMGET', month_key, 'used', 'reserved', 'spend', 'spend_reserved')
local mon_used, mon_res = tonumber(mon[1] or '0'), tonumber(mon[2] or '0')
local spend, spend_res = tonumber(mon[3] or '0'), tonumber(mon[4] or '0')
local day_room = math.floor(daily_limit * ceiling) - day_used - day_res
local mon_room = math.floor(monthly_limit * ceiling) - mon_used - mon_res
local room = math.min(day_room, mon_room)
-- Rule: a team's day and month quotas are rooms too (the priority's ceiling share of each).
local tday_key, tmonth_key = '', ''
local t_spend, t_spend_res = 0, 0
local room_reason, room_reset = '', 0
if team then
  tday_key = KEYS[10] .. 'd:' .. c.day
  tmonth_key = KEYS[10] .. 'm:' .. c.month
  local td = redis.call('HMGET', tday_key, 'used', 'reserved')
  local tm = redis.call('HMGET', tmonth_key, 'used', 'reserved', 'spend', 'spend_reserved')
  t_spend, t_spend_res = tonumber(tm[3] or '0'), tonumber(tm[4] or '0')
  if t_daily > 0 then
    local r = math.floor(t_daily * ceiling) - tonumber(td[1] or '0') - tonumber(td[2] or '0')
    if r < room then room, room_reason, room_reset = r, 'team_quota_daily', c.day_reset_s end
  end
  if t_monthly > 0 then
    local r = math.floor(t_monthly * ceiling) - tonumber(tm[1] or '0') - tonumber(tm[2] or '0')
    if r < room then
      room, room_reason, room_reset = r, 'team_quota_monthly', c.month_reset_s
    end
  end
end
-- Rule: an end user's daily quota within the key is a room too (its used + reserved).
local eu_day_key = ''
if eu ~= '' and eu_daily > 0 then
  eu_day_key = KEYS[5] .. 'eu:d:' .. c.day
  local e = redis.call('HMGET', eu_day_key, eu .. ':u', eu .. ':r')
  local r = eu_daily - (tonumber(e[1]) or 0) - (tonumber(e[2]) or 0)
  if r < room then room, room_reason, room_reset = r, 'end_user_quota_daily', c.day_reset_s end
end
if reason == '' and estimate > room then
  -- Rule: clamp lowers max_tokens to what is left, if the prompt and one token per choice
  -- still fit. max_tokens is per choice: the request generates `choices` completions.
  local per_choice = math.floor((room - prompt) / choices)
  if clamp and per_choice >= 1 then
    granted = per_choice
    estimate = prompt + per_choice * choices
  else
    if room_reason ~= '' then
      reason = room_reason
      retry_ms = room_reset * 1000 - now
    elseif day_room <= mon_room then
      reason = 'quota_daily'
      retry_ms = c.day_reset_s * 1000 - now
    else
      reason = 'quota_monthly'
      retry_ms = c.month_reset_s * 1000 - now
    end
  end
end

-- Rule: a monthly budget in dollars is a quota on cost (spent plus reserved).
if reason == '' and budget > 0 and spend + spend_res + est_cost > budget then
  reason = 'budget_monthly'
  retry_ms = c.month_reset_s * 1000 - now
end
-- Rule: the team's monthly budget over all its keys.
if reason == '' and t_budget > 0 and t_spend + t_spend_res + est_cost > t_budget then
  reason = 'team_budget_monthly'
  retry_ms = c.month_reset_s * 1000 - now
end

-- Rule: tokens/minute; a request needs its estimate (at most a full bucket) available.
local tok_rate, tok_tokens = 0, -1
if tpm > 0 then
  tok_rate = tpm / 60000
  tok_tokens = refill(KEYS[2], tok_rate, tpm, now)
  local need = math.min(estimate, tpm)
  if reason == '' and tok_tokens < need then
    reason = 'rate_limit_tokens'
    retry_ms = math.ceil((need - tok_tokens) / tok_rate)
  end
end
-- Rule: the team's tokens/minute, as the key's.
local t_tok_rate, t_tok_tokens = 0, 0
if t_tpm > 0 then
  t_tok_rate = t_tpm / 60000
  t_tok_tokens = refill(KEYS[9], t_tok_rate, t_tpm, now)
  local need = math.min(estimate, t_tpm)
  if reason == '' and t_tok_tokens < need then
    reason = 'team_rate_limit_tokens'
    retry_ms = math.ceil((need - t_tok_tokens) / t_tok_rate)
  end
end

-- Rule: at most max_concurrent open reservations.
if reason == '' and max_concurrent > 0 and redis.call('HLEN', KEYS[3]) >= max_concurrent then
  reason = 'concurrency'
  retry_ms = 1000
end

local admitted = reason == '' or shadow
if admitted then
  req_tokens = req_tokens - 1
  if req_tokens < 0 then req_tokens = 0 end
  store_bucket(KEYS[1], req_tokens, req_rate, burst, now)
  if tpm > 0 then
    -- May go negative: an over-estimate-sized request leaves a debt later requests wait out.
    tok_tokens = tok_tokens - estimate
    store_bucket(KEYS[2], tok_tokens, tok_rate, tpm, now)
  end
  if eu_bucket ~= '' then
    store_bucket(eu_bucket, math.max(0, eu_req_tokens - 1), eu_req_rate, eu_rpm, now)
  end
  -- Rule: an end user with a daily quota has the reservation in its day too; the entry
  -- names the end user (u<tag>) so settle and reap release and charge it there.
  local eu_field = ''
  if eu_day_key ~= '' then
    incr_window(eu_day_key, eu .. ':r', estimate, DAY_TTL_S)
    eu_field = 'u' .. eu .. '|'
  end
  -- Rule: the entry of an idempotent request names its key (i<tag>), so the reaper frees the
  -- key of a request that never settles.
  if idem_key ~= '' then eu_field = eu_field .. 'i' .. idem .. '|' end
  -- The reservation remembers the windows it was counted in, so settle releases exactly there.
  -- amount|day|month|cost|[u<end user tag>|][i<idempotency tag>|]priority|model: the model
  -- (client input) last.
  redis.call('HSET', KEYS[3], rid, int(estimate) .. '|' .. c.day .. '|' .. c.month .. '|'
    .. int(est_cost) .. '|' .. eu_field .. ARGV[15] .. '|' .. ARGV[16])
  -- Rule: the reservation lives claim_ms unless an ext_proc stream claims it (then ttl_ms,
  -- renewed while the stream lives): a request Envoy never sent on is not held for the TTL.
  -- Rule: an unattended one (settled from Envoy's access log) is claimed now, until then:
  -- its entry settles it, or releases it when the upstream never got the request; past the
  -- deadline the reaper charges what it reserved (a lost entry, or an answer Envoy dropped),
  -- and a later entry corrects that charge to the real usage (a `late` settlement).
  redis.call('ZADD', KEYS[4], now + (unattended and unattended_ms or claim_ms), rid)
  if unattended then redis.call('SADD', KEYS[6], rid) end
  -- Rule: the first request of an idempotency key holds it in flight until it settles (or
  -- for the reservation's TTL if it never does).
  if idem_key ~= '' then
    redis.call('HSET', idem_key, 'body', ARGV[27], 'state', 'inflight', 'rid', rid)
    redis.call('PEXPIRE', idem_key, tonumber(ARGV[28]))
  end
  incr_window(day_key, 'reserved', estimate, DAY_TTL_S)
  incr_window(day_key, 'requests', 1, DAY_TTL_S)
  incr_window(month_key, 'reserved', estimate, MONTH_TTL_S)
  incr_window(month_key, 'requests', 1, MONTH_TTL_S)
  incr_window(month_key, 'spend_reserved', est_cost, MONTH_TTL_S)
  if team then
    -- Rule: the team's windows count its keys' reservations and requests alike (settle and
    -- reap release and charge them there too).
    if t_req_rate > 0 then
      store_bucket(KEYS[8], math.max(0, t_req_tokens - 1), t_req_rate, t_burst, now)
    end
    if t_tpm > 0 then store_bucket(KEYS[9], t_tok_tokens - estimate, t_tok_rate, t_tpm, now) end
    incr_window(tday_key, 'reserved', estimate, DAY_TTL_S)
    incr_window(tday_key, 'requests', 1, DAY_TTL_S)
    incr_window(tmonth_key, 'reserved', estimate, MONTH_TTL_S)
    incr_window(tmonth_key, 'requests', 1, MONTH_TTL_S)
    incr_window(tmonth_key, 'spend_reserved', est_cost, MONTH_TTL_S)
  end
  day_res = day_res + estimate
  mon_res = mon_res + estimate
else
  incr_window(hour_key, 'denied', 1, hist_ttl)
  estimate = 0
end
if shadow and reason ~= '' then
  incr_window(hour_key, 'shadow_denied', 1, hist_ttl)
end

local req_reset_ms = math.ceil((burst - req_tokens) / req_rate)
local tok_reset_ms = 0
if tpm > 0 and tok_tokens < tpm then tok_reset_ms = math.ceil((tpm - tok_tokens) / tok_rate) end
return {admitted and 1 or 0, reason, retry_ms, granted, estimate,
  math.floor(req_tokens), req_reset_ms, math.floor(tok_tokens), tok_reset_ms,
  day_used, day_res, c.day_reset_s, mon_used, mon_res, c.month_reset_s, now, spend, ''}

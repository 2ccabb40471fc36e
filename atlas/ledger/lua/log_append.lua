-- log_append: append one batch of request records to a day's request log stream and keep
-- the day within its record bound. One entry holds the whole batch (its rows as one JSON
-- array), so the writer sends one command per batch, not one per record.
-- KEYS[1] the day's stream   KEYS[2] the day's record count (same hash tag)
-- ARGV[1] format   ARGV[2] column names   ARGV[3] rows (JSON)   ARGV[4] records in the rows
-- ARGV[5] records kept at most   ARGV[6] the keys' lifetime, s
-- Returns the records the day holds after the append.

local n = tonumber(ARGV[4])
local max = tonumber(ARGV[5])
-- Rule: the entry carries its record count, so trimming it later subtracts exactly that.
redis.call('XADD', KEYS[1], '*', 'v', ARGV[1], 'n', n, 'cols', ARGV[2], 'rows', ARGV[3])
local total = redis.call('INCRBY', KEYS[2], n)
-- Rule: over the bound, the oldest entries go first; the entry just added always stays.
while total > max and redis.call('XLEN', KEYS[1]) > 1 do
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  local fields = oldest[2]
  local held = 0
  for i = 1, #fields, 2 do
    if fields[i] == 'n' then held = tonumber(fields[i + 1]) or 0 end
  end
  redis.call('XDEL', KEYS[1], oldest[1])
  total = redis.call('INCRBY', KEYS[2], -held)
end
-- Rule: both keys expire together, the bound's count never outliving its stream.
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return total

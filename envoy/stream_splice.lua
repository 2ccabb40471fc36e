-- Atlas's `splice` exchanges (atlas/grant.py ProcMode.SPLICE): an OpenAI chat or completions
-- stream whose client did not ask for usage, settled from Envoy's access log instead of an
-- ext_proc stream (extproc/accesslog.py). Envoy runs this script only for them: a matcher on
-- authz's x-atlas-proc metadata (atlas/envoy_filters.py). Before naming the mode, authz
-- checked the body is one non-empty UTF-8 JSON object with a Content-Length and no
-- `stream_options` member (authz/access_logged.py).
--
-- What crosses to the access log, in dynamic metadata namespace atlas.usage:
--   prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details.cached_tokens,
--   completion_tokens_details.reasoning_tokens: the upstream's usage chunk;
--   streamed_events, streamed_chars: the events that carried text and the characters of
--   that text (JSON-escaped), for a stream cut before its usage.

local USAGE = "atlas.usage"
local INJECTED = ',"stream_options":{"include_usage":true}'
-- An unfinished event waits here for its end (so a usage chunk split across reads is still
-- cut out whole); one longer than this is passed on as it comes: usage chunks are small.
local MAX_HELD = 65536
-- Token counts are bounded at the edge: longer digit runs are not numbers Atlas charges.
local MAX_DIGITS = 12
-- The members whose string values are generated text (chat deltas, completions, tool calls,
-- reasoning models' thoughts).
local TEXT_KEYS = { '"content"', '"text"', '"arguments"', '"reasoning_content"', '"refusal"' }
local USAGE_FIELDS = {
  { '"prompt_tokens"%s*:%s*(%d+)', "prompt_tokens" },
  { '"completion_tokens"%s*:%s*(%d+)', "completion_tokens" },
  { '"total_tokens"%s*:%s*(%d+)', "total_tokens" },
  { '"cached_tokens"%s*:%s*(%d+)', "prompt_tokens_details.cached_tokens" },
  { '"reasoning_tokens"%s*:%s*(%d+)', "completion_tokens_details.reasoning_tokens" },
}
local BLANK = { [32] = true, [9] = true, [13] = true, [10] = true }

function envoy_on_request(handle)
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  -- Rule: the object's closing brace is its last non-blank byte (JSON blanks only).
  local close = #text
  while close > 0 and BLANK[text:byte(close)] do
    close = close - 1
  end
  if close == 0 or text:byte(close) ~= 125 then
    return -- not the object authz read: sent as it came (no usage comes, none is cut)
  end
  -- Rule: ask the upstream for usage by appending the member before that brace; authz saw no
  -- earlier stream_options, and JSON readers keep the last of duplicate keys anyway.
  -- setBytes also sets the request's Content-Length.
  body:setBytes(text:sub(1, close - 1) .. INJECTED .. text:sub(close))
end

-- The index of the first byte at or after `i` that is not a JSON blank. The scans below use
-- plain searches and string.byte only: LuaJIT compiles those, not pattern matching, and every
-- event of every stream passes through them.
local function skip_blanks(data, i)
  while BLANK[data:byte(i)] do
    i = i + 1
  end
  return i
end

-- The index just after `"key"` at `b` (its closing quote) and a colon, blanks skipped, or nil.
local function after_colon(data, b)
  local i = skip_blanks(data, b + 1)
  if data:byte(i) ~= 58 then
    return nil
  end
  return skip_blanks(data, i + 1)
end

-- The length of the JSON string that starts at `from` (just after its opening quote).
local function string_length(data, from)
  local i = from
  while true do
    local q = data:find('"', i, true)
    if q == nil then
      return #data - from + 1 -- unterminated: what there is
    end
    -- Rule: a quote after an odd run of backslashes is escaped, part of the string.
    local k = q - 1
    while k >= from and data:byte(k) == 92 do
      k = k - 1
    end
    if (q - 1 - k) % 2 == 0 then
      return q - from
    end
    i = q + 1
  end
end

-- The strings of generated text in `data` (whole events), and their characters.
local function count_text(data)
  local strings, chars = 0, 0
  for _, needle in ipairs(TEXT_KEYS) do
    local pos = 1
    while true do
      local _, b = data:find(needle, pos, true)
      if b == nil then
        break
      end
      pos = b + 1
      local v = after_colon(data, b)
      if v ~= nil and data:byte(v) == 34 then
        local n = string_length(data, v + 1)
        if n > 0 then
          strings, chars = strings + 1, chars + n
        end
        pos = v + 1 + n
      end
    end
  end
  return strings, chars
end

-- Where the next event boundary (a blank line, LF or CRLF) ends at or after `from`, or nil.
local function boundary_after(data, from)
  local _, lf = data:find("\n\n", from, true)
  local _, crlf = data:find("\r\n\r\n", from, true)
  if lf == nil or (crlf ~= nil and crlf < lf) then
    return crlf
  end
  return lf
end

-- Where the last whole event in `data` ends (0: none). Envoy mostly passes whole events: the
-- end is checked first.
local function whole_events_end(data)
  local n = #data
  if n >= 2 and data:byte(n) == 10 and (data:byte(n - 1) == 10 or data:byte(n - 2) == 10) then
    return n -- LF LF, or LF CR LF
  end
  local last, e = 0, boundary_after(data, 1)
  while e ~= nil do
    last, e = e, boundary_after(data, e + 1)
  end
  return last
end

-- Where the next `"usage": {` in `data` is at or after `from` (`"usage": null` is not one).
local function usage_object(data, from)
  local pos = from
  while true do
    local a, b = data:find('"usage"', pos, true)
    if a == nil then
      return nil
    end
    local v = after_colon(data, b)
    if v ~= nil and data:byte(v) == 123 then
      return a
    end
    pos = b + 1
  end
end

-- Records the usage in `event`; true when it is the usage-only chunk include_usage added
-- (`choices` empty, null or absent), which the client never asked for.
local function take_usage(handle, event)
  local at = usage_object(event, 1)
  local meta = handle:streamInfo():dynamicMetadata()
  for _, f in ipairs(USAGE_FIELDS) do
    local digits = event:match(f[1], at)
    if digits ~= nil and #digits <= MAX_DIGITS then
      meta:set(USAGE, f[2], tonumber(digits))
    end
  end
  -- Rule: an event with choices keeps them (and its text counts): only a bare usage goes.
  return event:find('"choices"%s*:%s*%[%s*[^%]%s]') == nil
end

-- `whole` (whole events) without the usage-only events, their usage recorded.
local function cut_usage(handle, whole)
  local at = usage_object(whole, 1)
  if at == nil then
    return whole
  end
  local kept, from = {}, 1
  while at ~= nil do
    -- The event around `at`: from just after the boundary before it to the one after it.
    local start, e = from, boundary_after(whole, from)
    while e ~= nil and e < at do
      start, e = e + 1, boundary_after(whole, e + 1)
    end
    e = e or #whole
    if take_usage(handle, whole:sub(start, e)) then
      kept[#kept + 1] = whole:sub(from, start - 1)
    else
      kept[#kept + 1] = whole:sub(from, e)
    end
    from = e + 1
    at = usage_object(whole, from)
  end
  kept[#kept + 1] = whole:sub(from)
  return table.concat(kept)
end

-- Adds the generated text in `data` to `totals` and, when there was any, sets the running
-- totals for the access log: a response cut here is charged at least that.
local function add_text(handle, totals, data)
  local n, c = count_text(data)
  if n > 0 then
    totals.strings, totals.chars = totals.strings + n, totals.chars + c
    local meta = handle:streamInfo():dynamicMetadata()
    meta:set(USAGE, "streamed_events", totals.strings)
    meta:set(USAGE, "streamed_chars", totals.chars)
  end
end

-- A 200 that is not a stream (an upstream that ignored `stream`, or answered JSON): passed as
-- it comes, its usage lifted where it appears and its text counted, so it is charged what the
-- upstream reported, or at least its text.
local function read_answer(handle)
  local tail, totals = "", { strings = 0, chars = 0 }
  for chunk in handle:bodyChunks() do
    local bytes = chunk:getBytes(0, chunk:length())
    local data = tail .. bytes
    local at = usage_object(data, 1)
    if at ~= nil then
      take_usage(handle, data:sub(at))
    end
    add_text(handle, totals, bytes)
    tail = data:sub(-1024) -- a usage object split across reads is found whole in the next
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get(":status") ~= "200" then
    return -- an error answer: settled from its status (refunded)
  end
  local ctype = headers:get("content-type")
  if ctype == nil or not ctype:find("text/event-stream", 1, true) then
    read_answer(handle)
    return
  end
  -- Envoy's objects (headers, metadata) are valid only until the script yields: each chunk
  -- asks for them again.
  local held = ""
  local totals = { strings = 0, chars = 0 }
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    local bytes = chunk:getBytes(0, size)
    local data = held ~= "" and held .. bytes or bytes
    -- Rule: only whole events pass; an unfinished one waits for its end, so a usage chunk
    -- split across reads is still cut out whole.
    local cut = whole_events_end(data)
    local whole = cut == #data and data or data:sub(1, cut)
    held = cut == #data and "" or data:sub(cut + 1)
    -- Rule: an empty chunk is the end of the stream (Envoy passes no other): whatever is
    -- held goes with it, as the upstream sent it; so does an event too long to be usage.
    local tail = ""
    if held ~= "" and (#held > MAX_HELD or size == 0) then
      tail, held = held, ""
    end
    local out = cut_usage(handle, whole)
    if tail ~= "" then
      out = out .. tail
    end
    if out ~= bytes then -- Lua strings are interned: equal content, one object
      chunk:setBytes(out)
    end
    add_text(handle, totals, whole)
  end
end

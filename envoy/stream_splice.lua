-- Atlas's `splice` exchanges (atlas/grant.py ProcMode.SPLICE): an OpenAI chat or completions
-- stream whose client did not ask for usage, settled from Envoy's access log instead of an
-- ext_proc stream (extproc/accesslog.py). Envoy runs this script only for them: a matcher on
-- authz's x-atlas-proc metadata (atlas/envoy_filters.py). Before naming the mode, authz
-- checked the body is one non-empty UTF-8 JSON object with a Content-Length and no
-- `stream_options` member (authz/splice.py).
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
local TEXT_KEYS = { "content", "text", "arguments", "reasoning_content", "refusal" }
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

-- The length of the JSON string that starts at `from` (just after its opening quote).
local function string_length(event, from)
  local i = from
  while true do
    local q = event:find('["\\]', i)
    if q == nil then
      return #event - from + 1 -- unterminated: what there is
    end
    if event:byte(q) == 34 then
      return q - from
    end
    i = q + 2 -- an escape: skip the escaped character
  end
end

-- The characters of generated text in one event (0: none).
local function text_chars(event)
  local chars = 0
  for _, key in ipairs(TEXT_KEYS) do
    local _, e = event:find('"' .. key .. '"%s*:%s*"')
    if e ~= nil then
      chars = chars + string_length(event, e + 1)
    end
  end
  return chars
end

-- Records the usage an event carries; true when the event is the usage-only chunk that
-- include_usage added (`choices` empty, null or absent), which the client never asked for.
local function take_usage(handle, event)
  local at = event:find('"usage"%s*:%s*{')
  if at == nil then
    return false
  end
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

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get(":status") ~= "200" then
    return -- an error answer: settled from its status (refunded)
  end
  local ctype = headers:get("content-type")
  if ctype == nil or not ctype:find("text/event-stream", 1, true) then
    return
  end
  -- Envoy's objects (headers, metadata) are valid only until the script yields: each chunk
  -- asks for them again.
  local held = ""
  local events, chars = 0, 0
  for chunk in handle:bodyChunks() do
    local data = held .. chunk:getBytes(0, chunk:length())
    local kept = {}
    local changed = held ~= ""
    local counted = false
    local pos = 1
    while true do
      -- Rule: events end at a blank line (LF or CRLF line ends).
      local _, e = data:find("\r?\n\r?\n", pos)
      if e == nil then
        break
      end
      local event = data:sub(pos, e)
      if take_usage(handle, event) then
        changed = true
      else
        kept[#kept + 1] = event
        local n = text_chars(event)
        if n > 0 then
          events, chars, counted = events + 1, chars + n, true
        end
      end
      pos = e + 1
    end
    held = data:sub(pos)
    if held ~= "" then
      changed = true
      -- Rule: an empty chunk is the end of the stream (Envoy passes no other): whatever is
      -- held goes with it, as the upstream sent it.
      if #held > MAX_HELD or chunk:length() == 0 then
        kept[#kept + 1] = held
        held = ""
      end
    end
    if changed then
      chunk:setBytes(table.concat(kept))
    end
    if counted then
      -- Running totals: a stream cut here is charged at least what it carried.
      local meta = handle:streamInfo():dynamicMetadata()
      meta:set(USAGE, "streamed_events", events)
      meta:set(USAGE, "streamed_chars", chars)
    end
  end
end

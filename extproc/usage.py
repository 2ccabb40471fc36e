"""Token usage of OpenAI-compatible responses: exact when the upstream reports it, else estimated.

Everything here takes untrusted upstream or client bytes and never raises on them.  The stream
path runs once per SSE event, so it avoids ``json.loads`` unless an event carries a usage object
or is a terminal Responses API event; generated text is measured by scanning the JSON string
literals of the few keys that hold it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from atlas import tokens
from atlas.jsonbound import loads_bounded, object_at
from atlas.requestbody import CHARS_PER_TOKEN, estimate_prompt_tokens, tokens_for_chars
from extproc.sse import Event

__all__ = [
    "Endpoint",
    "JsonBodyAccountant",
    "StreamAccountant",
    "Usage",
    "endpoint_for_path",
    "estimate_prompt_tokens",
    "json_completion_texts",
    "scan_usage",
    "usage_from_json",
]

# Counters end up in int64 ledger fields; anything larger is garbage, not a token count.
_MAX_TOKENS = (1 << 63) - 1
# Client bodies are parsed JSON; bounding the walk keeps a hostile, deeply nested body from
# costing more than its size or hitting the recursion limit.
_MAX_DEPTH = 8


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"  # Anthropic
    GEMINI = "gemini"  # generateContent / streamGenerateContent


def endpoint_for_path(path: str) -> Endpoint | None:
    """Map a request ``:path`` (query string allowed, any prefix before ``/v1``) to its kind."""
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith(":generateContent") or p.endswith(":streamGenerateContent"):
        return Endpoint.GEMINI
    if p.endswith("/messages"):
        return Endpoint.MESSAGES
    if p.endswith("/chat/completions"):
        return Endpoint.CHAT
    if p.endswith("/completions"):
        return Endpoint.COMPLETIONS
    if p.endswith("/embeddings"):
        return Endpoint.EMBEDDINGS
    if p.endswith("/responses"):
        return Endpoint.RESPONSES
    return None


@dataclass(slots=True)
class Usage:
    """Reported token counts; a field the upstream did not report (validly) is None, never 0.

    ``prompt_tokens`` is every input token the upstream processed, cached ones included
    (Responses/Anthropic ``input_tokens`` map here; Anthropic's cache reads and writes are
    added to it). ``cached_tokens`` (read from a prompt cache) and ``cache_write_tokens``
    (Anthropic ``cache_creation_input_tokens``) are parts of it; ``reasoning_tokens`` is part
    of ``completion_tokens``. ``total_tokens`` is taken as reported, not derived.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_write_tokens: int | None = None


def _count(value: object) -> int | None:
    # type() rather than isinstance(): JSON true/false arrive as bool, a subclass of int.
    if type(value) is int and 0 <= value <= _MAX_TOKENS:
        return value
    return None


def _first_count(obj: dict[Any, Any], key: str, alt: str) -> int | None:
    n = _count(obj.get(key))
    return n if n is not None else _count(obj.get(alt))


def _detail(obj: dict[Any, Any], keys: tuple[str, str], field: str) -> int | None:
    """`obj[keys[i]][field]` for the first of the two detail objects that has it."""
    for key in keys:
        details = obj.get(key)
        if isinstance(details, dict):
            n = _count(details.get(field))
            if n is not None:
                return n
    return None


_PROMPT_DETAILS = ("prompt_tokens_details", "input_tokens_details")
_COMPLETION_DETAILS = ("completion_tokens_details", "output_tokens_details")


def _usage_from_obj(obj: object) -> Usage | None:
    """A usage object of any API: OpenAI's (chat, completions, embeddings, Responses) with its
    details, Anthropic's (input/output and cache tokens, no total) or Gemini's
    ``usageMetadata``."""
    if not isinstance(obj, dict):
        return None
    if "promptTokenCount" in obj or "totalTokenCount" in obj or "candidatesTokenCount" in obj:
        return _gemini_usage(obj)
    prompt = _first_count(obj, "prompt_tokens", "input_tokens")
    completion = _first_count(obj, "completion_tokens", "output_tokens")
    total = _count(obj.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    if total is None and "input_tokens" in obj and "total_tokens" not in obj:
        return _anthropic_usage(obj)
    return Usage(
        prompt,
        completion,
        total,
        cached_tokens=_detail(obj, _PROMPT_DETAILS, "cached_tokens"),
        reasoning_tokens=_detail(obj, _COMPLETION_DETAILS, "reasoning_tokens"),
    )


def _anthropic_usage(obj: dict[Any, Any]) -> Usage | None:
    """Anthropic: ``input_tokens`` excludes the cache, so the prompt is input + cache reads +
    cache writes; there is no total, so it is prompt + output once both are known."""
    uncached = _count(obj.get("input_tokens"))
    read = _count(obj.get("cache_read_input_tokens"))
    write = _count(obj.get("cache_creation_input_tokens"))
    out = _count(obj.get("output_tokens"))
    prompt = None if uncached is None else uncached + (read or 0) + (write or 0)
    total = None if prompt is None or out is None else prompt + out
    return Usage(prompt, out, total, cached_tokens=read, cache_write_tokens=write)


def _gemini_usage(obj: dict[Any, Any]) -> Usage | None:
    """Gemini: thoughts are billed as output beside the candidates; the prompt includes the
    cached content and any tool-use prompt."""
    prompt = _count(obj.get("promptTokenCount"))
    tool_prompt = _count(obj.get("toolUsePromptTokenCount")) or 0
    candidates = _count(obj.get("candidatesTokenCount"))
    thoughts = _count(obj.get("thoughtsTokenCount"))
    total = _count(obj.get("totalTokenCount"))
    if prompt is not None:
        prompt += tool_prompt
    completion = None
    if candidates is not None or thoughts is not None:
        completion = (candidates or 0) + (thoughts or 0)
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    if prompt is None and completion is None and total is None:
        return None
    return Usage(
        prompt,
        completion,
        total,
        cached_tokens=_count(obj.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _body_usage(obj: object) -> Usage | None:
    """The usage of a parsed response body: ``usage`` (OpenAI, Anthropic), ``usageMetadata``
    (Gemini; a streamGenerateContent answer without ``alt=sse`` is an array of chunks, whose
    last usage is the whole)."""
    if isinstance(obj, list):
        for item in reversed(obj[-64:]):
            usage = _body_usage(item)
            if usage is not None:
                return usage
        return None
    if not isinstance(obj, dict):
        return None
    found = obj.get("usage")
    if found is None:
        found = obj.get("usageMetadata")
    return _usage_from_obj(found)


def _loads(data: bytes | bytearray) -> object:
    return loads_bounded(data)


def usage_from_json(body: bytes | bytearray) -> Usage | None:
    """Usage of a whole non-streaming response body (chat, completions, embeddings,
    responses), parsed with bounded work; see `JsonBodyAccountant` for bodies of any size."""
    if not isinstance(body, bytes | bytearray) or (
        b'"usage"' not in body and b'"usageMetadata"' not in body
    ):
        return None
    return _body_usage(_loads(body))


#: Bytes after a `"usage":{` taken to decode its object (a usage object is ~300 bytes).
_USAGE_CAPTURE = 4096
#: `"usage":{` candidates tried per scan, from the last one back.
_USAGE_TRIES = 8


def _usage_at(buf: bytes | bytearray, brace: int) -> Usage | None:
    """The usage object whose `{` is at `brace` in `buf`, read from a bounded slice."""
    return _usage_from_obj(object_at(buf, brace, _USAGE_CAPTURE))


def scan_usage(buf: bytes | bytearray) -> Usage | None:
    """The last decodable `"usage": {...}` object in `buf`, without parsing the rest.

    Only a real object key can match (inside a JSON string every quote is escaped), so
    generated text cannot forge one. Linear in `buf`; each candidate reads <= 4 KiB."""
    starts = [m.end() - 1 for m in _USAGE_OBJECT.finditer(buf)]
    for brace in reversed(starts[-_USAGE_TRIES:]):
        usage = _usage_at(buf, brace)
        if usage is not None:
            return usage
    return None


def _texts(parts: object, key: str = "text") -> list[str]:
    if not isinstance(parts, list):
        return []
    return [t for p in parts if isinstance(p, dict) and isinstance(t := p.get(key), str)]


def _str(value: object) -> list[str]:
    return [value] if isinstance(value, str) and value else []


def json_completion_texts(obj: object) -> list[str]:
    """Generated text of a parsed JSON response (any endpoint), for an estimate without usage.

    Chat: message ``content``, ``reasoning_content`` (else ``reasoning``), ``refusal``, tool
    call ``arguments``; completions: choice ``text``; Responses: ``output[]`` message
    ``content[].text``, reasoning ``summary[].text`` and ``content[].text``, function call
    ``arguments``, custom tool call ``input`` (else the SDK-style ``output_text``);
    Anthropic: ``content[]`` text, thinking and tool_use input; Gemini: candidates' parts."""
    if isinstance(obj, list):  # Gemini's streamGenerateContent without alt=sse
        return [t for item in obj if isinstance(item, dict) for t in json_completion_texts(item)]
    if not isinstance(obj, dict):
        return []
    out: list[str] = []
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        out += _str(choice.get("text"))
        msg = choice.get("message")
        if not isinstance(msg, dict):
            continue
        out += _str(msg.get("content")) + _str(msg.get("refusal"))
        out += _str(msg.get("reasoning_content")) or _str(msg.get("reasoning"))
        calls = msg.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                out += _str(fn.get("arguments"))
    output = obj.get("output")
    responses: list[str] = []
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        responses += _texts(item.get("content")) + _texts(item.get("summary"))
        responses += _str(item.get("arguments")) + _str(item.get("input"))
    out += responses or _str(obj.get("output_text"))
    if obj.get("type") == "message":  # Anthropic
        blocks = obj.get("content")
        out += _texts(blocks) + _texts(blocks, "thinking")
        for block in blocks if isinstance(blocks, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_use":
                out += _str(json.dumps(block.get("input"), separators=(",", ":")))
    candidates = obj.get("candidates")  # Gemini
    for cand in candidates if isinstance(candidates, list) else ():
        content = cand.get("content") if isinstance(cand, dict) else None
        if isinstance(content, dict):
            out += _texts(content.get("parts"))
    return out


def json_completion_tokens(obj: object) -> int:
    return sum(tokens.count_text(t) for t in json_completion_texts(obj))


class JsonBodyAccountant:
    """Follows a JSON (non-streamed) response body of any size, in bounded memory.

    A body up to ``max_whole`` bytes is kept and parsed (with bounded work) once it is
    complete. Every chunk is also scanned for ``"usage":{`` as it passes, so the usage of a
    bigger body is still read (it sits at the end of the JSON); the last few candidates are
    kept (<= 4 KiB each). Without usage, the estimate is the tokenized text of a parsed body,
    else of a regex scan of the kept body; a body too big to keep is charged all its bytes at
    the tokens per byte of the text in its first 64 KiB (``ceil(bytes / 4)`` when no text
    could be read there): never 0 for a non-empty body.
    """

    __slots__ = ("_caps", "_carry", "_head", "_max", "_whole", "bytes", "overflowed")

    def __init__(self, max_whole: int) -> None:
        self._max = max_whole
        self._whole = bytearray()
        self.overflowed = False
        self.bytes = 0
        self._carry = b""
        self._caps: list[bytearray] = []
        self._head = b""  # the first bytes of a body too big to keep, for its text's rate

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.bytes += len(chunk)
        for cap in self._caps:
            if len(cap) < _USAGE_CAPTURE:
                cap += chunk[: _USAGE_CAPTURE - len(cap)]
        if not self.overflowed:
            if len(self._whole) + len(chunk) <= self._max:
                self._whole += chunk
                return
            # Too big to keep: from here on only the usage candidates are.
            self.overflowed = True
            window, seen = bytes(self._whole) + chunk, 0
            self._whole = bytearray()
            self._head = window[:MAX_KEPT_TEXT]
        else:
            window, seen = self._carry + chunk, len(self._carry)
        for m in _USAGE_OBJECT.finditer(window):
            if m.end() <= seen:
                continue  # matched in the previous chunk already
            self._caps.append(bytearray(window[m.end() - 1 : m.end() - 1 + _USAGE_CAPTURE]))
            del self._caps[:-_USAGE_TRIES]
        # Enough for `"usage"`, blanks and `:{` straddling two chunks.
        self._carry = window[-64:]

    @property
    def body(self) -> bytes | None:
        """The whole body when it was small enough to keep."""
        return None if self.overflowed else bytes(self._whole)

    def result(self) -> tuple[Usage | None, int]:
        """(usage, estimated completion tokens), once the body is complete."""
        body = self.body
        if body is not None:
            obj = loads_bounded(body)
            if isinstance(obj, dict | list):
                usage = _body_usage(obj)
                return usage, json_completion_tokens(obj)
            usage = scan_usage(body)
            if usage is not None:
                return usage, 0
        for cap in reversed(self._caps):
            usage = _usage_at(cap, 0)
            if usage is not None:
                return usage, 0
        if body is not None:
            text = _Text()
            for m in _CHAT_TEXT.finditer(body):
                text.add(m.group(2))
            for m in _COMPLETIONS_TEXT.finditer(body):
                text.add(m.group(1))
            if text.chars or not body.strip():
                return None, text.tokens()
        return None, self._extrapolated()

    def _extrapolated(self) -> int:
        """A body too big to keep: the tokens per byte of the text in its first bytes, over
        all of it (a JSON answer is almost all text); bytes / 4 when none could be read."""
        text = _Text()
        for m in _CHAT_TEXT.finditer(self._head):
            text.add(m.group(2))
        for m in _COMPLETIONS_TEXT.finditer(self._head):
            text.add(m.group(1))
        if not text.chars:  # one string longer than the head: its open start is text
            opened = _OPEN_TEXT.search(self._head)
            if opened is not None:
                text.add(self._head[opened.end() :].rstrip(b"\\"))
        if not text.chars or not text.kept:
            return tokens_for_chars(self.bytes)
        # Tokens per byte of the text itself (not of the head, whose JSON around the text
        # would dilute it), over every byte of the body: the envelope is charged as text.
        return math.ceil(text.tokens() * self.bytes / len(text.kept))


# The body of a JSON string literal, unrolled so matching stays linear on hostile input.
_JSON_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'
# Inside a JSON string every quote is escaped, so `"key":` can only match a real object key.
_CHAT_TEXT = re.compile(
    rb'"(content|reasoning_content|reasoning|refusal|arguments)"\s*:\s*' + _JSON_STRING,
    re.DOTALL,
)
_COMPLETIONS_TEXT = re.compile(rb'"text"\s*:\s*' + _JSON_STRING, re.DOTALL)
_ANTHROPIC_TEXT = re.compile(rb'"(text|partial_json|thinking)"\s*:\s*' + _JSON_STRING, re.DOTALL)
_OPEN_TEXT = re.compile(
    rb'"(?:content|text|reasoning_content|reasoning|refusal|arguments)"\s*:\s*"'
)
_DELTA_TEXT = re.compile(rb'"delta"\s*:\s*' + _JSON_STRING, re.DOTALL)
_USAGE_OBJECT = re.compile(rb'"usage(?:Metadata)?"\s*:\s*\{')
_TYPE = re.compile(rb'"type"\s*:\s*"([^"\\]*)"')

# Responses API events whose `delta` is generated text (audio deltas are base64, not text).
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.audio.transcript.delta",
    }
)
# Every way a Responses stream ends; each carries the final `response` object with its usage.
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


#: What is kept of an event over the decoder's limit: its first bytes name its type, its
#: last bytes hold a terminal event's usage (Responses: `response.usage` ends the object).
_OVERFLOW_HEAD = 4096
_OVERFLOW_TAIL = 64 << 10
_EVENT_FIELD = re.compile(rb"^event:[ ]?([^\r\n]*)", re.MULTILINE)


def _overflow_event_type(head: bytes) -> str | None:
    """The type of an oversized event from its first bytes: its `event:` field, else the
    `"type"` its data starts with."""
    m = _EVENT_FIELD.search(head) or _TYPE.search(head)
    return m.group(1).decode("utf-8", "replace") if m else None


def _string_chars(literal: bytes) -> int:
    """Characters of the decoded JSON string whose body (between the quotes) is `literal`."""
    if b"\\" in literal:
        try:
            return len(json.loads(b'"' + literal + b'"'))
        except ValueError:
            return len(literal)
    if literal.isascii():
        return len(literal)
    return len(literal.decode("utf-8", "replace"))


#: Bytes of generated text (JSON string bodies) kept to be tokenized at settlement time; the
#: characters past it are estimated at the kept text's tokens per character.
MAX_KEPT_TEXT = 64 << 10


class _Text:
    """Generated text seen so far, as the JSON string bodies it came in (decoded once, when
    an estimate is needed), bounded by `MAX_KEPT_TEXT`."""

    __slots__ = ("chars", "dropped", "kept")

    def __init__(self) -> None:
        self.kept = bytearray()
        self.chars = 0
        self.dropped = 0  # characters seen but not kept

    def add(self, literal: bytes) -> int:
        """Keep one JSON string body; its decoded character count."""
        n = _string_chars(literal)
        self.chars += n
        if len(self.kept) + len(literal) <= MAX_KEPT_TEXT:
            self.kept += literal  # whole literals only: escapes never split
        else:
            self.dropped += n
        return n

    def add_unread(self, chars: int) -> None:
        """Text too big to read (an oversized event): counted, not kept."""
        self.chars += chars
        self.dropped += chars

    def tokens(self) -> int:
        if not self.chars:
            return 0
        kept = bytes(self.kept)
        try:
            text = json.loads(b'"' + kept + b'"') if b"\\" in kept else kept.decode()
        except ValueError:
            text = kept.decode("utf-8", "replace")
        # Off the request path (a settlement without usage): all the kept text is tokenized.
        n = tokens.counter().count(text, exact_up_to=MAX_KEPT_TEXT) if text else 0
        if self.dropped:
            kept_chars = self.chars - self.dropped
            rate = n / kept_chars if kept_chars > 0 and n else 1 / CHARS_PER_TOKEN
            n += math.ceil(self.dropped * rate)
        return n


#: Every `_CHAT_TEXT` match starts with one of these, so none can start before the first.
_CHAT_TEXT_KEYS = (b'"content"', b'"reasoning', b'"refusal"', b'"arguments"')


def _first_text_key(data: bytes) -> int:
    """Where the first `_CHAT_TEXT` key could start in `data` (-1: none): substring finds
    skip the id/model/created prefix the regex would otherwise try at every quote."""
    first = -1
    for key in _CHAT_TEXT_KEYS:
        i = data.find(key)
        if i >= 0 and (first < 0 or i < first):
            first = i
    return first


def _is_done(data: bytes) -> bool:
    return data == b"[DONE]" or (len(data) < 32 and data.strip() == b"[DONE]")


class StreamAccountant:
    """Follows the events of one streamed response and tracks its token usage.

    ``usage``: the last valid usage object seen (chat/completions: a chunk's top-level
    ``usage``, normally the final usage chunk, or every chunk with vLLM's continuous usage
    stats; responses: ``response.usage`` of the terminal event).
    ``content_chars``: characters of generated text seen (chat ``delta.content``,
    ``reasoning_content`` or else ``reasoning``, ``refusal``, tool-call ``arguments``;
    completions ``text``; responses text ``*.delta`` events), the basis of
    ``estimated_completion_tokens`` when no usage arrives.
    ``content_chunks``: events that carried generated text (vLLM sends one token per chunk).
    ``saw_done``: ``data: [DONE]`` or a terminal Responses event (completed/incomplete/failed).

    An event over the decoder's size limit arrives as ``overflow`` parts: its first bytes (for
    the event type) and last 64 KiB (where a terminal event's usage sits) are kept and read
    when the block ends; its bytes count as generated text unless it is a Responses event
    that repeats text already counted.
    """

    __slots__ = (
        "_chat",
        "_endpoint",
        "_ov_bytes",
        "_ov_head",
        "_ov_tail",
        "_start_usage",
        "_text",
        "content_chunks",
        "prompt_seen",
        "saw_done",
        "usage",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        # Embeddings never stream; treating them like chat keeps observe() total.
        self._chat = endpoint is not Endpoint.COMPLETIONS
        self.usage: Usage | None = None
        self._text = _Text()
        self.content_chunks = 0
        #: Prompt tokens the upstream reported before its final usage (Anthropic's
        #: message_start): exact even when the stream ends before the usage does.
        self.prompt_seen: int | None = None
        self._start_usage: dict[str, Any] = {}
        self.saw_done = False
        self._ov_head = b""
        self._ov_tail = b""
        self._ov_bytes = 0

    @property
    def content_chars(self) -> int:
        return self._text.chars

    @property
    def estimated_completion_tokens(self) -> int:
        """The generated text's tokens (the process's tokenizer, else the calibrated
        estimate), and never fewer than one per chunk of text: upstreams stream one token
        (or more) per chunk."""
        return max(self.content_chunks, self._text.tokens())

    def observe(self, ev: Event) -> bool:
        """Account for `ev`; True when it is a usage-only chunk the caller may strip.

        A usage-only chunk is a chat/completions chunk with a valid non-null ``usage`` whose
        ``choices`` is ``[]``, null or absent: it carries nothing but the usage that
        ``stream_options.include_usage`` asked for.
        """
        if ev.overflow:
            self._observe_overflow(ev)
            return False
        if ev.comment:
            return False
        data = ev.data
        if _is_done(data):
            self.saw_done = True
            return False
        if self._endpoint is Endpoint.RESPONSES:
            self._observe_responses(ev.event, data)
            return False
        if self._endpoint is Endpoint.MESSAGES:
            self._observe_anthropic(ev.event, data)
            return False
        if self._endpoint is Endpoint.GEMINI:
            self._observe_gemini(data)
            return False
        self._count_text(data)
        # Most chunks carry no usage key (or `"usage":null`): a substring test rules them out
        # before the regex, which can only match at a `"usage"`.
        at = data.find(b'"usage"')
        if at < 0 or _USAGE_OBJECT.search(data, at) is None:
            return False
        obj = _loads(data)
        if not isinstance(obj, dict):
            return False
        usage = _usage_from_obj(obj.get("usage"))
        if usage is None:
            return False
        self.usage = usage
        choices = obj.get("choices")
        return choices is None or choices == []

    def _observe_overflow(self, ev: Event) -> None:
        raw = ev.raw
        if self._ov_bytes < _OVERFLOW_HEAD:
            self._ov_head += raw[: _OVERFLOW_HEAD - self._ov_bytes]
        self._ov_bytes += len(raw)
        tail = self._ov_tail + raw if len(raw) < _OVERFLOW_TAIL else raw
        self._ov_tail = tail[-_OVERFLOW_TAIL:]
        if ev.continued:
            return
        head, tail, size = self._ov_head, self._ov_tail, self._ov_bytes
        self._ov_head, self._ov_tail, self._ov_bytes = b"", b"", 0
        usage = scan_usage(tail)
        event_type = _overflow_event_type(head)
        if self._endpoint is Endpoint.RESPONSES:
            if event_type in _RESPONSES_TERMINAL:
                self.saw_done = True
            elif event_type in _RESPONSES_TEXT_DELTAS:
                self._text.add_unread(size)
                self.content_chunks += 1
        else:
            # Chat/completions: too big to read, so all of it counts as text (conservative).
            self._text.add_unread(size)
            self.content_chunks += 1
        if usage is not None:
            self.usage = usage

    def _count_text(self, data: bytes) -> None:
        if not self._chat:
            start = data.find(b'"text"')
            if start < 0:
                return
            chars = 0
            for m in _COMPLETIONS_TEXT.finditer(data, start):
                chars += self._text.add(m.group(1))
            if chars:
                self.content_chunks += 1
            return
        start = _first_text_key(data)
        if start < 0:
            return
        chars = 0
        reasoning: list[bytes] = []
        has_reasoning_content = False
        for m in _CHAT_TEXT.finditer(data, start):
            key = m.group(1)
            # Servers migrating from `reasoning_content` to `reasoning` may send both with the
            # same text; count it once.
            if key == b"reasoning":
                reasoning.append(m.group(2))
                continue
            if key == b"reasoning_content":
                has_reasoning_content = True
            chars += self._text.add(m.group(2))
        if not has_reasoning_content:
            for literal in reasoning:
                chars += self._text.add(literal)
        if chars:
            self.content_chunks += 1

    def _observe_anthropic(self, event_type: str | None, data: bytes) -> None:
        """Anthropic Messages: text/tool-input/thinking deltas are generated text;
        ``message_start`` holds the input usage, each ``message_delta`` the cumulative output
        (and, from newer servers, cumulative input fields): merged, they are the usage."""
        if event_type is None:
            m = _TYPE.search(data)
            if m is None:
                return
            event_type = m.group(1).decode("utf-8", "replace")
        if event_type == "content_block_delta":
            chars = 0
            for m in _ANTHROPIC_TEXT.finditer(data):
                chars += self._text.add(m.group(2))
            if chars:
                self.content_chunks += 1
        elif event_type == "message_start":
            obj = _loads(data)
            msg = obj.get("message") if isinstance(obj, dict) else None
            usage = msg.get("usage") if isinstance(msg, dict) else None
            if isinstance(usage, dict):
                self._start_usage = usage
                start = _anthropic_usage(usage)
                self.prompt_seen = start.prompt_tokens if start is not None else None
        elif event_type == "message_delta":
            obj = _loads(data)
            usage = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(usage, dict):
                merged = {**self._start_usage, **{k: v for k, v in usage.items() if v is not None}}
                final = _anthropic_usage(merged)
                if final is not None and final.total_tokens is not None:
                    self.usage = final
        elif event_type == "message_stop":
            self.saw_done = True

    def _observe_gemini(self, data: bytes) -> None:
        """Gemini (``alt=sse``): every chunk carries its parts' text and the cumulative
        ``usageMetadata``; the last chunk has a ``finishReason``."""
        start = data.find(b'"text"')
        if start >= 0:
            chars = 0
            for m in _COMPLETIONS_TEXT.finditer(data, start):
                chars += self._text.add(m.group(1))
            if chars:
                self.content_chunks += 1
        if b'"usageMetadata"' in data:
            obj = _loads(data)
            if isinstance(obj, dict):
                usage = _usage_from_obj(obj.get("usageMetadata"))
                if usage is not None and usage.total_tokens is not None:
                    self.usage = usage
                    self.prompt_seen = usage.prompt_tokens
        if b'"finishReason"' in data:
            self.saw_done = True

    def _observe_responses(self, event_type: str | None, data: bytes) -> None:
        if event_type is None:
            m = _TYPE.search(data)
            if m is None:
                return
            event_type = m.group(1).decode("utf-8", "replace")
        if event_type in _RESPONSES_TEXT_DELTAS:
            d = _DELTA_TEXT.search(data)
            if d is not None and self._text.add(d.group(1)):
                self.content_chunks += 1
        elif event_type in _RESPONSES_TERMINAL:
            self.saw_done = True
            obj = _loads(data)
            if isinstance(obj, dict):
                response = obj.get("response")
                if isinstance(response, dict):
                    usage = _usage_from_obj(response.get("usage"))
                    if usage is not None:
                        self.usage = usage

"""Token usage of OpenAI-compatible responses: exact when the upstream reports it, else estimated.

Everything here takes untrusted upstream or client bytes and never raises on them.  The stream
path runs once per SSE event, so it avoids ``json.loads`` unless an event carries a usage object
or is a terminal Responses API event; generated text is measured by scanning the JSON string
literals of the few keys that hold it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from atlas.jsonbound import loads_bounded, object_at
from atlas.requestbody import estimate_prompt_tokens, tokens_for_chars
from extproc.sse import Event

__all__ = [
    "Endpoint",
    "JsonBodyAccountant",
    "StreamAccountant",
    "Usage",
    "endpoint_for_path",
    "estimate_prompt_tokens",
    "json_completion_chars",
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


def endpoint_for_path(path: str) -> Endpoint | None:
    """Map a request ``:path`` (query string allowed, any prefix before ``/v1``) to its kind."""
    p = path.split("?", 1)[0].rstrip("/")
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
    """OpenAI's usage object (chat, completions, embeddings, Responses) with its details."""
    if not isinstance(obj, dict):
        return None
    prompt = _first_count(obj, "prompt_tokens", "input_tokens")
    completion = _first_count(obj, "completion_tokens", "output_tokens")
    total = _count(obj.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    return Usage(
        prompt,
        completion,
        total,
        cached_tokens=_detail(obj, _PROMPT_DETAILS, "cached_tokens"),
        reasoning_tokens=_detail(obj, _COMPLETION_DETAILS, "reasoning_tokens"),
    )


def _loads(data: bytes | bytearray) -> object:
    return loads_bounded(data)


def usage_from_json(body: bytes | bytearray) -> Usage | None:
    """Usage of a whole non-streaming response body (chat, completions, embeddings,
    responses), parsed with bounded work; see `JsonBodyAccountant` for bodies of any size."""
    if not isinstance(body, bytes | bytearray) or b'"usage"' not in body:
        return None
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None
    return _usage_from_obj(obj.get("usage"))


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


def _text_len(value: object) -> int:
    return len(value) if isinstance(value, str) else 0


def _parts_text(parts: object) -> int:
    if not isinstance(parts, list):
        return 0
    return sum(_text_len(p.get("text")) for p in parts if isinstance(p, dict))


def json_completion_chars(obj: object) -> int:
    """Generated text of a parsed JSON response (any endpoint), for an estimate without usage.

    Chat: message ``content``, ``reasoning_content`` (else ``reasoning``), ``refusal``, tool
    call ``arguments``; completions: choice ``text``; Responses: ``output[]`` message
    ``content[].text``, reasoning ``summary[].text`` and ``content[].text``, function call
    ``arguments``, custom tool call ``input`` (else the SDK-style ``output_text``)."""
    if not isinstance(obj, dict):
        return 0
    chars = 0
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        chars += _text_len(choice.get("text"))
        msg = choice.get("message")
        if not isinstance(msg, dict):
            continue
        chars += _text_len(msg.get("content")) + _text_len(msg.get("refusal"))
        chars += _text_len(msg.get("reasoning_content")) or _text_len(msg.get("reasoning"))
        calls = msg.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                chars += _text_len(fn.get("arguments"))
    output = obj.get("output")
    out_chars = 0
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        out_chars += _parts_text(item.get("content")) + _parts_text(item.get("summary"))
        out_chars += _text_len(item.get("arguments")) + _text_len(item.get("input"))
    return chars + (out_chars or _text_len(obj.get("output_text")))


class JsonBodyAccountant:
    """Follows a JSON (non-streamed) response body of any size, in bounded memory.

    A body up to ``max_whole`` bytes is kept and parsed (with bounded work) once it is
    complete. Every chunk is also scanned for ``"usage":{`` as it passes, so the usage of a
    bigger body is still read (it sits at the end of the JSON); the last few candidates are
    kept (<= 4 KiB each). Without usage, the estimate is the text of a parsed body, else a
    regex scan of the kept body, else ``ceil(bytes / 4)`` of everything that passed: never 0
    for a non-empty body we could not read.
    """

    __slots__ = ("_caps", "_carry", "_max", "_whole", "bytes", "overflowed")

    def __init__(self, max_whole: int) -> None:
        self._max = max_whole
        self._whole = bytearray()
        self.overflowed = False
        self.bytes = 0
        self._carry = b""
        self._caps: list[bytearray] = []

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
            if isinstance(obj, dict):
                usage = _usage_from_obj(obj.get("usage"))
                return usage, tokens_for_chars(json_completion_chars(obj))
            usage = scan_usage(body)
            if usage is not None:
                return usage, 0
        for cap in reversed(self._caps):
            usage = _usage_at(cap, 0)
            if usage is not None:
                return usage, 0
        if body is not None:
            chars = sum(_string_chars(m.group(2)) for m in _CHAT_TEXT.finditer(body))
            chars += sum(_string_chars(m.group(1)) for m in _COMPLETIONS_TEXT.finditer(body))
            if chars or not body.strip():
                return None, tokens_for_chars(chars)
        return None, tokens_for_chars(self.bytes)


# The body of a JSON string literal, unrolled so matching stays linear on hostile input.
_JSON_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'
# Inside a JSON string every quote is escaped, so `"key":` can only match a real object key.
_CHAT_TEXT = re.compile(
    rb'"(content|reasoning_content|reasoning|refusal|arguments)"\s*:\s*' + _JSON_STRING,
    re.DOTALL,
)
_COMPLETIONS_TEXT = re.compile(rb'"text"\s*:\s*' + _JSON_STRING, re.DOTALL)
_DELTA_TEXT = re.compile(rb'"delta"\s*:\s*' + _JSON_STRING, re.DOTALL)
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
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
        "content_chars",
        "content_chunks",
        "saw_done",
        "usage",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        # Embeddings never stream; treating them like chat keeps observe() total.
        self._chat = endpoint is not Endpoint.COMPLETIONS
        self.usage: Usage | None = None
        self.content_chars = 0
        self.content_chunks = 0
        self.saw_done = False
        self._ov_head = b""
        self._ov_tail = b""
        self._ov_bytes = 0

    @property
    def estimated_completion_tokens(self) -> int:
        """``max(content_chunks, ceil(content_chars / 4))``: at least one token per chunk of
        text, since upstreams stream one token (or more) per chunk."""
        return max(self.content_chunks, tokens_for_chars(self.content_chars))

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
                self.content_chars += size
                self.content_chunks += 1
        else:
            # Chat/completions: too big to read, so all of it counts as text (conservative).
            self.content_chars += size
            self.content_chunks += 1
        if usage is not None:
            self.usage = usage

    def _count_text(self, data: bytes) -> None:
        if not self._chat:
            start = data.find(b'"text"')
            if start < 0:
                return
            before = self.content_chars
            for m in _COMPLETIONS_TEXT.finditer(data, start):
                self.content_chars += _string_chars(m.group(1))
            if self.content_chars != before:
                self.content_chunks += 1
            return
        chars = 0
        reasoning = 0
        has_reasoning_content = False
        start = _first_text_key(data)
        if start < 0:
            return
        for m in _CHAT_TEXT.finditer(data, start):
            n = _string_chars(m.group(2))
            key = m.group(1)
            # Servers migrating from `reasoning_content` to `reasoning` may send both with the
            # same text; count it once.
            if key == b"reasoning":
                reasoning += n
                continue
            if key == b"reasoning_content":
                has_reasoning_content = True
            chars += n
        if not has_reasoning_content:
            chars += reasoning
        if chars:
            self.content_chars += chars
            self.content_chunks += 1

    def _observe_responses(self, event_type: str | None, data: bytes) -> None:
        if event_type is None:
            m = _TYPE.search(data)
            if m is None:
                return
            event_type = m.group(1).decode("utf-8", "replace")
        if event_type in _RESPONSES_TEXT_DELTAS:
            d = _DELTA_TEXT.search(data)
            if d is not None:
                n = _string_chars(d.group(1))
                if n:
                    self.content_chars += n
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

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

from atlas.requestbody import CHARS_PER_TOKEN as _CHARS_PER_TOKEN
from atlas.requestbody import estimate_prompt_tokens
from extproc.sse import Event

__all__ = [
    "Endpoint",
    "StreamAccountant",
    "Usage",
    "endpoint_for_path",
    "estimate_prompt_tokens",
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

    Responses API ``input_tokens``/``output_tokens`` map to ``prompt_tokens``/
    ``completion_tokens``.  ``total_tokens`` is taken as reported, not derived.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


def _count(value: object) -> int | None:
    # type() rather than isinstance(): JSON true/false arrive as bool, a subclass of int.
    if type(value) is int and 0 <= value <= _MAX_TOKENS:
        return value
    return None


def _first_count(obj: dict[Any, Any], key: str, alt: str) -> int | None:
    n = _count(obj.get(key))
    return n if n is not None else _count(obj.get(alt))


def _usage_from_obj(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    prompt = _first_count(obj, "prompt_tokens", "input_tokens")
    completion = _first_count(obj, "completion_tokens", "output_tokens")
    total = _count(obj.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    return Usage(prompt, completion, total)


def _loads(data: bytes | bytearray) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def usage_from_json(body: bytes | bytearray) -> Usage | None:
    """Usage of a non-streaming response body (chat, completions, embeddings, responses)."""
    if not isinstance(body, bytes | bytearray) or b'"usage"' not in body:
        return None
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None
    return _usage_from_obj(obj.get("usage"))


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


def _ceil_tokens(chars: int) -> int:
    return -(-chars // _CHARS_PER_TOKEN)


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
    ``saw_done``: ``data: [DONE]`` or a terminal Responses event (completed/incomplete/failed).
    """

    __slots__ = ("_chat", "_endpoint", "content_chars", "saw_done", "usage")

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        # Embeddings never stream; treating them like chat keeps observe() total.
        self._chat = endpoint is not Endpoint.COMPLETIONS
        self.usage: Usage | None = None
        self.content_chars = 0
        self.saw_done = False

    @property
    def estimated_completion_tokens(self) -> int:
        """``ceil(content_chars / 4)``."""
        return _ceil_tokens(self.content_chars)

    def observe(self, ev: Event) -> bool:
        """Account for `ev`; True when it is a usage-only chunk the caller may strip.

        A usage-only chunk is a chat/completions chunk with a valid non-null ``usage`` whose
        ``choices`` is ``[]``, null or absent: it carries nothing but the usage that
        ``stream_options.include_usage`` asked for.
        """
        if ev.comment or ev.overflow:
            return False
        data = ev.data
        if _is_done(data):
            self.saw_done = True
            return False
        if self._endpoint is Endpoint.RESPONSES:
            self._observe_responses(ev.event, data)
            return False
        self._count_text(data)
        if _USAGE_OBJECT.search(data) is None:
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

    def _count_text(self, data: bytes) -> None:
        if not self._chat:
            for m in _COMPLETIONS_TEXT.finditer(data):
                self.content_chars += _string_chars(m.group(1))
            return
        chars = 0
        reasoning = 0
        has_reasoning_content = False
        for m in _CHAT_TEXT.finditer(data):
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
        self.content_chars += chars

    def _observe_responses(self, event_type: str | None, data: bytes) -> None:
        if event_type is None:
            m = _TYPE.search(data)
            if m is None:
                return
            event_type = m.group(1).decode("utf-8", "replace")
        if event_type in _RESPONSES_TEXT_DELTAS:
            d = _DELTA_TEXT.search(data)
            if d is not None:
                self.content_chars += _string_chars(d.group(1))
        elif event_type in _RESPONSES_TERMINAL:
            self.saw_done = True
            obj = _loads(data)
            if isinstance(obj, dict):
                response = obj.get("response")
                if isinstance(response, dict):
                    usage = _usage_from_obj(response.get("usage"))
                    if usage is not None:
                        self.usage = usage

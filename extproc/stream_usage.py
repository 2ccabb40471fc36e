"""Token usage of a streamed (SSE) answer, event by event: the usage each wire API reports
in its stream, else an estimate from the generated text that passed.

This runs once per SSE event, so it avoids ``json.loads`` unless an event carries a usage
object or is a terminal event; generated text is measured by scanning the JSON string
literals of the few keys that hold it (`extproc.text`).
"""

from __future__ import annotations

import re
from typing import Any

from atlas.jsonbound import loads_bounded
from extproc.sse import Event
from extproc.text import (
    ANTHROPIC_TEXT,
    CHAT_TEXT,
    COMPLETIONS_TEXT,
    DELTA_TEXT,
    TYPE_FIELD,
    Text,
    first_text_key,
)
from extproc.usage import USAGE_OBJECT, Endpoint, Usage, anthropic_usage, scan_usage, usage_from_obj

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
    m = _EVENT_FIELD.search(head) or TYPE_FIELD.search(head)
    return m.group(1).decode("utf-8", "replace") if m else None


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
        self._text = Text()
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
        if at < 0 or USAGE_OBJECT.search(data, at) is None:
            return False
        obj = loads_bounded(data)
        if not isinstance(obj, dict):
            return False
        usage = usage_from_obj(obj.get("usage"))
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
            for m in COMPLETIONS_TEXT.finditer(data, start):
                chars += self._text.add(m.group(1))
            if chars:
                self.content_chunks += 1
            return
        start = first_text_key(data)
        if start < 0:
            return
        chars = 0
        reasoning: list[bytes] = []
        has_reasoning_content = False
        for m in CHAT_TEXT.finditer(data, start):
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
            m = TYPE_FIELD.search(data)
            if m is None:
                return
            event_type = m.group(1).decode("utf-8", "replace")
        if event_type == "content_block_delta":
            chars = 0
            for m in ANTHROPIC_TEXT.finditer(data):
                chars += self._text.add(m.group(2))
            if chars:
                self.content_chunks += 1
        elif event_type == "message_start":
            obj = loads_bounded(data)
            msg = obj.get("message") if isinstance(obj, dict) else None
            usage = msg.get("usage") if isinstance(msg, dict) else None
            if isinstance(usage, dict):
                self._start_usage = usage
                start = anthropic_usage(usage)
                self.prompt_seen = start.prompt_tokens if start is not None else None
        elif event_type == "message_delta":
            obj = loads_bounded(data)
            usage = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(usage, dict):
                merged = {**self._start_usage, **{k: v for k, v in usage.items() if v is not None}}
                final = anthropic_usage(merged)
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
            for m in COMPLETIONS_TEXT.finditer(data, start):
                chars += self._text.add(m.group(1))
            if chars:
                self.content_chunks += 1
        if b'"usageMetadata"' in data:
            obj = loads_bounded(data)
            if isinstance(obj, dict):
                usage = usage_from_obj(obj.get("usageMetadata"))
                if usage is not None and usage.total_tokens is not None:
                    self.usage = usage
                    self.prompt_seen = usage.prompt_tokens
        if b'"finishReason"' in data:
            self.saw_done = True

    def _observe_responses(self, event_type: str | None, data: bytes) -> None:
        if event_type is None:
            m = TYPE_FIELD.search(data)
            if m is None:
                return
            event_type = m.group(1).decode("utf-8", "replace")
        if event_type in _RESPONSES_TEXT_DELTAS:
            d = DELTA_TEXT.search(data)
            if d is not None and self._text.add(d.group(1)):
                self.content_chunks += 1
        elif event_type in _RESPONSES_TERMINAL:
            self.saw_done = True
            obj = loads_bounded(data)
            if isinstance(obj, dict):
                response = obj.get("response")
                if isinstance(response, dict):
                    usage = usage_from_obj(response.get("usage"))
                    if usage is not None:
                        self.usage = usage

"""Token usage of a JSON (non-streamed) answer of any size: its usage object when it has
one, else an estimate from its generated text. The body is parsed at most once."""

from __future__ import annotations

import json
import math

from atlas import tokens
from atlas.jsonbound import loads_bounded
from atlas.requestbody import tokens_for_chars
from extproc.text import CHAT_TEXT, COMPLETIONS_TEXT, MAX_KEPT_TEXT, OPEN_TEXT, Text
from extproc.usage import (
    USAGE_CAPTURE,
    USAGE_OBJECT,
    USAGE_TRIES,
    Usage,
    body_usage,
    scan_usage,
    usage_at,
)


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

    __slots__ = (
        "_caps",
        "_carry",
        "_error",
        "_head",
        "_max",
        "_result",
        "_whole",
        "bytes",
        "overflowed",
    )

    def __init__(self, max_whole: int) -> None:
        self._max = max_whole
        self._whole = bytearray()
        self.overflowed = False
        self.bytes = 0
        self._carry = b""
        self._caps: list[bytearray] = []
        self._head = b""  # the first bytes of a body too big to keep, for its text's rate
        self._result: tuple[Usage | None, int] | None = None
        self._error = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._result = None
        self.bytes += len(chunk)
        for cap in self._caps:
            if len(cap) < USAGE_CAPTURE:
                cap += chunk[: USAGE_CAPTURE - len(cap)]
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
        for m in USAGE_OBJECT.finditer(window):
            if m.end() <= seen:
                continue  # matched in the previous chunk already
            self._caps.append(bytearray(window[m.end() - 1 : m.end() - 1 + USAGE_CAPTURE]))
            del self._caps[:-USAGE_TRIES]
        # Enough for `"usage"`, blanks and `:{` straddling two chunks.
        self._carry = window[-64:]

    @property
    def body(self) -> bytes | None:
        """The whole body when it was small enough to keep."""
        return None if self.overflowed else bytes(self._whole)

    def result(self) -> tuple[Usage | None, int]:
        """(usage, estimated completion tokens) of what was fed, once the body is complete;
        asked again, the same answer (the body is parsed once)."""
        if self._result is None:
            self._result = self._count()
        return self._result

    @property
    def is_error(self) -> bool:
        """Whether the kept body is an OpenAI-style error answer: `{"error": {...}}` without
        usage."""
        self.result()
        return self._error

    def _count(self) -> tuple[Usage | None, int]:
        body = self.body
        self._error = False
        if body is not None:
            obj = loads_bounded(body)
            self._error = _is_error(body, obj)
            if isinstance(obj, dict | list):
                usage = body_usage(obj)
                return usage, json_completion_tokens(obj)
            usage = scan_usage(body)
            if usage is not None:
                return usage, 0
        for cap in reversed(self._caps):
            usage = usage_at(cap, 0)
            if usage is not None:
                return usage, 0
        if body is not None:
            text = _text_in(body)
            if text.chars or not body.strip():
                return None, text.tokens()
        return None, self._extrapolated()

    def _extrapolated(self) -> int:
        """A body too big to keep: the tokens per byte of the text in its first bytes, over
        all of it (a JSON answer is almost all text); bytes / 4 when none could be read."""
        text = _text_in(self._head)
        if not text.chars:  # one string longer than the head: its open start is text
            opened = OPEN_TEXT.search(self._head)
            if opened is not None:
                text.add(self._head[opened.end() :].rstrip(b"\\"))
        if not text.chars or not text.kept:
            return tokens_for_chars(self.bytes)
        # Tokens per byte of the text itself (not of the head, whose JSON around the text
        # would dilute it), over every byte of the body: the envelope is charged as text.
        return math.ceil(text.tokens() * self.bytes / len(text.kept))


def _text_in(buf: bytes) -> Text:
    """The chat and completions text literals of `buf`, by regex."""
    text = Text()
    for m in CHAT_TEXT.finditer(buf):
        text.add(m.group(2))
    for m in COMPLETIONS_TEXT.finditer(buf):
        text.add(m.group(1))
    return text


def _is_error(body: bytes, obj: object) -> bool:
    """`obj`, parsed from `body`, is `{"error": {...}}` without usage, its `"error"` key in
    the first 4 KiB."""
    head = body[:64].lstrip()
    if not head.startswith(b"{") or b'"error"' not in body[:4096]:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "usage" not in obj

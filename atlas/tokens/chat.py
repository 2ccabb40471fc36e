"""Prompt tokens of a parsed request body, wire format included, for every API Atlas reads.

The text is counted by `atlas.tokens.TextTokens` (a real tokenizer or the calibrated
estimator); the format around it follows OpenAI's published counting, since the chat template
is tokens the model processes too:

* chat: 3 tokens per message plus its role and content (a `name` costs its tokens plus 1),
  3 to prime the reply; tool calls cost their name and arguments plus 3; tool definitions and
  `response_format` JSON schemas cost the tokens of their JSON (OpenAI renders them as a
  TypeScript-like namespace; the JSON is a slight over-count) plus 12 (tools) or 8 (a
  schema) for the wrapper; Responses input items and Gemini turns carry no frame;
* images: OpenAI's tile rule (`detail: low` is 85 tokens; otherwise 85 + 170 per 512-px tile
  of the image scaled to fit 2048x2048 then its short side to 768) when the size is known
  from a data: URL's header (PNG, GIF, JPEG, WebP), else the documented default of a
  1024x1024 image at high detail, 765 tokens; Anthropic images `w*h/750`, capped at 1,600;
  Gemini inline images 258;
* audio parts: 10 tokens per second of audio, the second estimated from the base64 size at
  the 32 kB/s of 16 kHz 16-bit PCM (a wav) when the format says nothing better;
* Anthropic `system` and content blocks (text, image, tool_use input, tool_result) and
  tools (name, description, input_schema); Gemini `contents[].parts[]` and
  `systemInstruction`, `tools[].functionDeclarations`;
* completions `prompt`, embeddings `input`, Responses `input`/`instructions`/`tools`/
  `text.format`; token-id lists count one token per id.

Work is bounded: the walk stops after `MAX_VISITS` values or `MAX_DEPTH` levels and says so
(`whole=False`), and the caller falls back on the body's byte size; text beyond the counter's
exact budget is estimated by character class.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

from atlas.tokens import TextTokens

MAX_DEPTH = 8
#: Values the walk visits before it stops (the rest is estimated from the body's size).
MAX_VISITS = 200_000

PER_MESSAGE = 3  # <|start|>role<|message|> ... <|end|>
PER_NAME = 1
REPLY_PRIMING = 3  # <|start|>assistant<|message|>
PER_TOOL_CALL = 3
TOOLS_WRAPPER = 12  # the namespace header around tool definitions
DEFINITIONS_WRAPPER = 8  # ... and around a response_format schema

IMAGE_LOW = 85
IMAGE_TILE = 170
IMAGE_DEFAULT = IMAGE_LOW + 4 * IMAGE_TILE  # 1024x1024 at high detail: 2x2 tiles
ANTHROPIC_IMAGE_MAX = 1600
ANTHROPIC_IMAGE_DEFAULT = 1600
GEMINI_IMAGE = 258
AUDIO_TOKENS_PER_S = 10
AUDIO_BYTES_PER_S = 32_000  # 16 kHz, 16-bit, mono PCM
#: Bytes of a data: URL decoded to find an image's size (headers sit at the start; JPEG's
#: SOF marker may follow EXIF data, so a few KiB are read).
_IMAGE_HEADER_B64 = 16 << 10


class _Walk:
    """One body's count: tokens so far, the visit budget and whether it ran out."""

    __slots__ = ("budget", "exact_left", "text", "tokens", "truncated")

    def __init__(self, text: TextTokens) -> None:
        self.text = text
        self.tokens = 0
        self.budget = MAX_VISITS
        self.exact_left = text.max_exact_chars
        self.truncated = False

    def visit(self) -> bool:
        self.budget -= 1
        if self.budget < 0:
            self.truncated = True
            return False
        return True

    def add_text(self, s: object) -> None:
        if not isinstance(s, str) or not s:
            return
        # The tokenizer's budget is for the whole body, so a prompt of many parts cannot
        # cost more than one long one.
        if self.exact_left >= len(s):
            self.exact_left -= len(s)
            self.tokens += self.text.count(s)
        else:
            self.exact_left = 0
            self.tokens += self.text.fallback(s)

    def add_json(self, value: object) -> None:
        """Tokens of `value` as compact JSON (schemas, tool inputs), bounded by the budget."""
        if value is None:
            return
        if isinstance(value, str):
            self.add_text(value)
            return
        if not self._fits(value, 0):
            return
        try:
            self.add_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        except (TypeError, ValueError):
            return

    def _fits(self, value: object, depth: int) -> bool:
        """Charge the visit budget for `value`'s nodes (so `json.dumps` is bounded too)."""
        if not self.visit():
            return False
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                self.truncated = True
                return False
            items = value.values() if isinstance(value, dict) else value
            return all(self._fits(v, depth + 1) for v in items)
        return True

    def add_ids(self, ids: list[Any]) -> None:
        self.tokens += len(ids)
        self.budget -= len(ids)


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and type(value[0]) is int


# ---- images and audio ---------------------------------------------------------------


def image_size(url: object) -> tuple[int, int] | None:
    """(width, height) of a base64 data: URL image from its header, else None."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 200)
    if comma < 0 or ";base64" not in url[:comma]:
        return None
    head = url[comma + 1 : comma + 1 + _IMAGE_HEADER_B64]
    head = head[: len(head) // 4 * 4]
    try:
        data = base64.b64decode(head, validate=False)
    except (binascii.Error, ValueError):
        return None
    return _dimensions(data)


def _dimensions(b: bytes) -> tuple[int, int] | None:
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24:
        w, h = struct.unpack(">II", b[16:24])
        return (w, h) if w and h else None
    if b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        w, h = struct.unpack("<HH", b[6:10])
        return (w, h) if w and h else None
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP" and len(b) >= 30:
        return _webp(b)
    if b[:2] == b"\xff\xd8":
        return _jpeg(b)
    return None


def _webp(b: bytes) -> tuple[int, int] | None:
    kind = b[12:16]
    if kind == b"VP8 " and len(b) >= 30:
        w, h = struct.unpack("<HH", b[26:30])
        w, h = w & 0x3FFF, h & 0x3FFF
        return (w, h) if w and h else None
    if kind == b"VP8L" and len(b) >= 25:
        bits = int.from_bytes(b[21:25], "little")
        return ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X" and len(b) >= 30:
        return (int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1)
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        # Start-of-frame markers (baseline, progressive, ...) hold the size; C4/C8/CC do not.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return (w, h) if w and h else None
        i += 2 + length
    return None


def openai_image_tokens(detail: object, size: tuple[int, int] | None) -> int:
    """OpenAI's rule for GPT-4o-class vision input."""
    if detail == "low":
        return IMAGE_LOW
    if size is None:
        return IMAGE_DEFAULT
    scale = min(1.0, 2048 / max(size))
    w, h = size[0] * scale, size[1] * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return IMAGE_LOW + IMAGE_TILE * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image_tokens(size: tuple[int, int] | None) -> int:
    if size is None:
        return ANTHROPIC_IMAGE_DEFAULT
    return min(ANTHROPIC_IMAGE_MAX, max(1, math.ceil(size[0] * size[1] / 750)))


def audio_tokens(b64: object) -> int:
    if not isinstance(b64, str):
        return 0
    seconds = len(b64) * 3 / 4 / AUDIO_BYTES_PER_S
    return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_S))


# ---- content parts ------------------------------------------------------------------


def _part(w: _Walk, part: object, depth: int) -> None:
    """One content part or block of any of the APIs."""
    if isinstance(part, str):
        w.add_text(part)
        return
    if isinstance(part, list):
        _content(w, part, depth + 1)
        return
    if not isinstance(part, dict) or not w.visit():
        return
    kind = part.get("type")
    if kind in ("image_url", "input_image"):
        image = part.get("image_url")
        if isinstance(image, dict):
            w.tokens += openai_image_tokens(image.get("detail"), image_size(image.get("url")))
        else:  # Responses: image_url is the URL string, detail beside it
            w.tokens += openai_image_tokens(part.get("detail"), image_size(image))
        return
    if kind == "image":  # Anthropic
        source = part.get("source")
        size = None
        if isinstance(source, dict) and isinstance(source.get("data"), str):
            size = image_size(f"data:{source.get('media_type')};base64,{source['data'][:32768]}")
        w.tokens += anthropic_image_tokens(size)
        return
    if kind in ("input_audio",):
        audio = part.get("input_audio")
        w.tokens += audio_tokens(audio.get("data") if isinstance(audio, dict) else None)
        return
    if kind == "tool_use":  # Anthropic assistant tool call
        w.add_text(part.get("name"))
        w.add_json(part.get("input"))
        w.tokens += PER_TOOL_CALL
        return
    if "inline_data" in part or "inlineData" in part:  # Gemini
        w.tokens += GEMINI_IMAGE
        return
    if "functionCall" in part or "functionResponse" in part:  # Gemini tool traffic
        w.add_json(part.get("functionCall") or part.get("functionResponse"))
        return
    for key in ("text", "output", "arguments", "thinking", "refusal"):
        w.add_text(part.get(key))
    content = part.get("content")  # Anthropic tool_result, Responses message items
    if content is not None:
        _content(w, content, depth + 1)


def _content(w: _Walk, content: object, depth: int) -> None:
    if isinstance(content, str):
        w.add_text(content)
    elif isinstance(content, list):
        if depth >= MAX_DEPTH:
            w.truncated = True
            return
        for part in content:
            if not w.visit():
                return
            _part(w, part, depth)
            if w.truncated:
                return
    elif isinstance(content, dict):
        _part(w, content, depth)


def _tool_calls(w: _Walk, calls: object) -> None:
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict) or not w.visit():
            continue
        fn = call.get("function")
        if isinstance(fn, dict):
            w.add_text(fn.get("name"))
            w.add_text(fn.get("arguments"))
        w.tokens += PER_TOOL_CALL


def _messages(w: _Walk, messages: object, framed: bool = True) -> None:
    """Chat (OpenAI) and Anthropic messages (`framed`: each in its template's frame);
    Responses input items and Gemini contents (not framed)."""
    frame = PER_MESSAGE if framed else 0
    if isinstance(messages, str):
        w.add_text(messages)
        w.tokens += frame
        return
    if not isinstance(messages, list):
        return
    for m in messages:
        if w.truncated:
            return
        if not isinstance(m, dict):
            _part(w, m, 1)
            continue
        if not w.visit():
            return
        if framed:
            w.tokens += PER_MESSAGE
            w.add_text(m.get("role"))
        name = m.get("name")
        if isinstance(name, str) and name:
            w.add_text(name)
            w.tokens += PER_NAME
        _content(w, m.get("content"), 1)
        _tool_calls(w, m.get("tool_calls"))
        # Responses items: function_call_output `output`, function_call `arguments`
        for key in ("output", "arguments"):
            w.add_text(m.get(key))
        if "parts" in m:  # Gemini contents
            _content(w, m.get("parts"), 1)


def _definitions(w: _Walk, tools: object) -> None:
    if isinstance(tools, list) and tools:
        w.add_json(tools)
        w.tokens += TOOLS_WRAPPER


def prompt_tokens(body: dict[str, Any], text: TextTokens) -> tuple[int, bool]:
    """(estimated prompt tokens, whether the walk saw all of the body)."""
    w = _Walk(text)
    chat = False
    messages = body.get("messages")
    if isinstance(messages, list | str) and messages:
        chat = True
        _messages(w, messages)
    system = body.get("system")  # Anthropic: a string or text blocks
    if system is not None:  # framed as a system message
        w.tokens += PER_MESSAGE
        w.add_text("system")
        _content(w, system, 1)
    contents = body.get("contents")  # Gemini: no per-turn frame is reported
    if isinstance(contents, dict):
        contents = [contents]
    if isinstance(contents, list) and contents:
        _messages(w, contents, framed=False)
    instruction = body.get("systemInstruction") or body.get("system_instruction")
    if instruction is not None:
        _messages(w, [instruction] if isinstance(instruction, dict) else instruction, False)
    for key in ("prompt", "input"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            w.add_text(value)
        elif _is_ids(value):
            w.add_ids(value)
        elif isinstance(value, list):
            if key == "input" and any(isinstance(v, dict) for v in value[:8]):
                _messages(w, value, framed=False)  # Responses input items
                continue
            for item in value:
                if isinstance(item, str):
                    w.add_text(item)
                elif _is_ids(item):
                    w.add_ids(item)
                if not w.visit():
                    break
    w.add_text(body.get("instructions"))
    _definitions(w, body.get("tools"))
    _definitions(w, body.get("functions"))
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict):
        w.add_json(fmt["json_schema"])
        w.tokens += DEFINITIONS_WRAPPER
    text_opts = body.get("text")  # Responses structured output
    if isinstance(text_opts, dict) and isinstance(text_opts.get("format"), dict):
        w.add_json(text_opts["format"])
    if chat:
        w.tokens += REPLY_PRIMING
    return w.tokens, not w.truncated

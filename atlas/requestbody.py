"""What authz and extproc need from an OpenAI-style request body, parsed defensively.

The body is hostile input: anything that is not the JSON we expect yields a `LLMRequest` with
`parsed=False` and a size-based estimate, never an exception.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

#: ~4 characters per token for English text with BPE tokenizers (OpenAI's rule of thumb).
CHARS_PER_TOKEN = 4


@dataclass(slots=True, frozen=True)
class LLMRequest:
    parsed: bool
    model: str
    stream: bool
    include_usage: bool  # the client asked for stream_options.include_usage
    max_tokens: int | None  # max_tokens / max_completion_tokens / max_output_tokens
    n: int
    prompt_tokens: int  # estimate


_MAX_DEPTH = 8

# Keys under which request bodies hold prompt text: message/part `content` and `text`, tool
# call `arguments` (via `tool_calls`/`function`) and Responses `function_call_output` `output`.
# Everything else (image URLs, base64 audio/files, ids, roles) is skipped on purpose.
_TEXT_KEYS = ("content", "text", "tool_calls", "function", "arguments", "output")
_PROMPT_KEYS = ("messages", "prompt", "input", "instructions")


def _tally(value: object, depth: int, acc: list[int]) -> None:
    """Add the characters of `value` to acc[0] and its token ids to acc[1]."""
    if isinstance(value, str):
        acc[0] += len(value)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        acc[1] += 1
    elif depth >= _MAX_DEPTH:
        return
    elif isinstance(value, list):
        for item in value:
            _tally(item, depth + 1, acc)
    elif isinstance(value, dict):
        for key in _TEXT_KEYS:
            item = value.get(key)
            if item is not None:
                _tally(item, depth + 1, acc)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Estimate the prompt tokens of a parsed request body, for any of the four endpoints.

    Counts chat ``messages`` text, completions ``prompt``, embeddings/responses ``input`` and
    responses ``instructions`` as ``ceil(chars / 4)``; integers in token-id arrays count one
    token each.  A body with a non-empty prompt field is at least 1; anything malformed is 0.
    """
    if not isinstance(body, dict):
        return 0
    acc = [0, 0]
    present = False
    for key in _PROMPT_KEYS:
        value = body.get(key)
        if value is None:
            continue
        _tally(value, 0, acc)
        if not present and isinstance(value, str | list | dict) and len(value) > 0:
            present = True
    tokens = math.ceil(acc[0] / CHARS_PER_TOKEN) + acc[1]
    return max(tokens, 1) if present else tokens


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def parse_llm_request(body: bytes, *, complete: bool = True, size: int = 0) -> LLMRequest:
    """:param complete: False when Envoy sent only the first bytes of a larger body.
    :param size: the whole body's length in bytes when known (Content-Length)."""
    fallback = LLMRequest(
        parsed=False,
        model="",
        stream=False,
        include_usage=False,
        max_tokens=None,
        n=1,
        prompt_tokens=math.ceil(max(size, len(body)) / CHARS_PER_TOKEN),
    )
    if not body or not complete:
        return fallback
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return fallback
    if not isinstance(data, dict):
        return fallback
    model = data.get("model")
    opts = data.get("stream_options")
    max_tokens = None
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        max_tokens = _positive_int(data.get(field))
        if max_tokens is not None:
            break
    return LLMRequest(
        parsed=True,
        model=model if isinstance(model, str) else "",
        stream=data.get("stream") is True,
        include_usage=isinstance(opts, dict) and opts.get("include_usage") is True,
        max_tokens=max_tokens,
        n=min(_positive_int(data.get("n")) or 1, 128),
        prompt_tokens=estimate_prompt_tokens(data),
    )

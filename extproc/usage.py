"""Token usage as upstreams report it: the `Usage` type and the readers of each wire API's
usage object (OpenAI chat/completions/embeddings/Responses, Anthropic Messages, Gemini).

Everything here takes untrusted upstream bytes and never raises on them. How a whole JSON
answer is followed is `extproc.json_usage`; a streamed one, `extproc.stream_usage`; the
generated text they estimate from when no usage comes, `extproc.text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from atlas.jsonbound import object_at

# Counters end up in int64 ledger fields; anything larger is garbage, not a token count.
_MAX_TOKENS = (1 << 63) - 1
#: A usage object's key (`usageMetadata`: Gemini). Inside a JSON string every quote is
#: escaped, so only a real object key can match.
USAGE_OBJECT = re.compile(rb'"usage(?:Metadata)?"\s*:\s*\{')


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


def usage_from_obj(obj: object) -> Usage | None:
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
    # Anthropic's shape only when its input count is one: an unreadable `input_tokens` beside
    # OpenAI's `prompt_tokens` must not lose the prompt count read above.
    if total is None and "total_tokens" not in obj and _count(obj.get("input_tokens")) is not None:
        return anthropic_usage(obj)
    return Usage(
        prompt,
        completion,
        total,
        cached_tokens=_detail(obj, _PROMPT_DETAILS, "cached_tokens"),
        reasoning_tokens=_detail(obj, _COMPLETION_DETAILS, "reasoning_tokens"),
    )


def anthropic_usage(obj: dict[Any, Any]) -> Usage | None:
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


def body_usage(obj: object) -> Usage | None:
    """The usage of a parsed response body: ``usage`` (OpenAI, Anthropic), ``usageMetadata``
    (Gemini; a streamGenerateContent answer without ``alt=sse`` is an array of chunks, whose
    last usage is the whole)."""
    if isinstance(obj, list):
        for item in reversed(obj[-64:]):
            usage = body_usage(item)
            if usage is not None:
                return usage
        return None
    if not isinstance(obj, dict):
        return None
    found = obj.get("usage")
    if found is None:
        found = obj.get("usageMetadata")
    return usage_from_obj(found)


#: Bytes after a `"usage":{` taken to decode its object (a usage object is ~300 bytes).
USAGE_CAPTURE = 4096
#: `"usage":{` candidates tried per scan, from the last one back.
USAGE_TRIES = 8


def usage_at(buf: bytes | bytearray, brace: int) -> Usage | None:
    """The usage object whose `{` is at `brace` in `buf`, read from a bounded slice."""
    return usage_from_obj(object_at(buf, brace, USAGE_CAPTURE))


def scan_usage(buf: bytes | bytearray) -> Usage | None:
    """The last decodable `"usage": {...}` object in `buf`, without parsing the rest.

    Only a real object key can match (inside a JSON string every quote is escaped), so
    generated text cannot forge one. Linear in `buf`; each candidate reads <= 4 KiB."""
    starts = [m.end() - 1 for m in USAGE_OBJECT.finditer(buf)]
    for brace in reversed(starts[-USAGE_TRIES:]):
        usage = usage_at(buf, brace)
        if usage is not None:
            return usage
    return None

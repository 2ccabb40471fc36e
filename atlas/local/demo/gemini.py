"""Gemini generateContent / streamGenerateContent: prompt counting, usage and the answer."""

from __future__ import annotations

import base64
from typing import Any, Final

from atlas.local.demo.common import (
    MAX_CHOICES,
    MAX_COMPLETION_TOKENS,
    _dumps_google,
    _dumps_google_pretty,
    _id_bytes,
)
from atlas.local.demo.counting import _PER_CALL, _TOOLS_OVERHEAD, _json_tokens, count_tokens
from atlas.local.demo.hooks import _Counts, _counts, _Hooks, _plan
from atlas.local.demo.images import _base64_image_size, _gemini_image_tokens
from atlas.local.demo.protocol import _Request
from atlas.local.demo.responses import _ApiError, _Result, _StreamPlan

_GEMINI_PREFIXES: Final = ("/v1beta/models/", "/v1/models/")
_GEMINI_METHODS: Final = (":generateContent", ":streamGenerateContent")


def _is_gemini_path(path: str) -> bool:
    return path.startswith(_GEMINI_PREFIXES) and path.endswith(_GEMINI_METHODS)


def _gfield(obj: dict[str, Any], camel: str, snake: str) -> Any:
    # Google's JSON mapping accepts the proto's snake_case names as well as camelCase.
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _gemini_error(message: str) -> _ApiError:
    return _ApiError(400, message)


def _gemini_parts_tokens(content: Any, where: str) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, dict):
        raise _gemini_error(f"Invalid value at '{where}': expected a Content object")
    parts = content.get("parts")
    if not isinstance(parts, list):
        raise _gemini_error(
            f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty\n"
        )
    total = 0
    for part in parts:
        if not isinstance(part, dict):
            raise _gemini_error(f"Invalid value at '{where}.parts': expected a Part object")
        text = part.get("text")
        if isinstance(text, str):
            total += count_tokens(text)
            continue
        inline = _gfield(part, "inlineData", "inline_data")
        if isinstance(inline, dict):
            mime = _gfield(inline, "mimeType", "mime_type")
            data = inline.get("data")
            if isinstance(mime, str) and mime.startswith("image/"):
                size = _base64_image_size(data) if isinstance(data, str) else None
                total += _gemini_image_tokens(size)
            continue
        file_data = _gfield(part, "fileData", "file_data")
        if isinstance(file_data, dict):
            mime = _gfield(file_data, "mimeType", "mime_type")
            total += _gemini_image_tokens(None) if str(mime).startswith("image/") else 0
            continue
        for camel, snake, payload in (
            ("functionCall", "function_call", "args"),
            ("functionResponse", "function_response", "response"),
        ):
            call = _gfield(part, camel, snake)
            if isinstance(call, dict):
                name = call.get("name")
                total += _PER_CALL + (count_tokens(name) if isinstance(name, str) else 0)
                total += _json_tokens(call.get(payload, {}))
    return total


def _gemini_prompt_tokens(body: dict[str, Any], contents: list[Any]) -> int:
    total = 0
    for i, content in enumerate(contents):
        total += _gemini_parts_tokens(content, f"contents[{i}]")
    system = _gfield(body, "systemInstruction", "system_instruction")
    if system is not None:
        total += _gemini_parts_tokens(system, "system_instruction")
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _TOOLS_OVERHEAD + _json_tokens(tools)
    return total


def _gemini_usage(counts: _Counts, candidates: int) -> dict[str, Any]:
    """usageMetadata in Gemini's field order; thoughts are apart from candidates."""
    usage: dict[str, Any] = {
        "promptTokenCount": counts.prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": counts.prompt + candidates + counts.reasoning,
    }
    if counts.cached:
        usage["cachedContentTokenCount"] = counts.cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": counts.prompt}]
    if counts.cached:
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": counts.cached}]
    if counts.reasoning:
        usage["thoughtsTokenCount"] = counts.reasoning
    return usage


def _gemini(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    model, _, method = req.path.rsplit("/", 1)[1].partition(":")
    stream = method == "streamGenerateContent"
    if hooks.json_tokens is not None and stream:
        raise _gemini_error("x-demo-json-tokens is for non-streamed responses")
    sse = "alt=sse" in req.query.split("&")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _gemini_error("* GenerateContentRequest.contents: contents is not specified\n")
    prompt = _gemini_prompt_tokens(body, contents)
    config = _gfield(body, "generationConfig", "generation_config") or {}
    if not isinstance(config, dict):
        raise _gemini_error("Invalid value at 'generation_config': expected an object")
    limit = _gfield(config, "maxOutputTokens", "max_output_tokens")
    n_candidates = _gfield(config, "candidateCount", "candidate_count") or 1
    for name, value in (("max_output_tokens", limit), ("candidate_count", n_candidates)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise _gemini_error(f"Invalid value at 'generation_config.{name}' ({value!r})")
    n_candidates = min(n_candidates, MAX_CHOICES)
    n_tokens, finish = _plan(None if limit is None else min(limit, MAX_COMPLETION_TOKENS), hooks)
    finish_reason = "MAX_TOKENS" if finish == "length" else "STOP"
    counts = _counts(prompt, n_candidates * n_tokens, hooks)
    response_id = base64.urlsafe_b64encode(_id_bytes()).decode()[:22]
    vocab = hooks.vocab

    def chunk(text: str, last: bool, candidates_so_far: int) -> dict[str, Any]:
        candidates = []
        for i in range(n_candidates):
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
            if last:
                candidate["finishReason"] = finish_reason
            candidate["index"] = i
            candidates.append(candidate)
        out: dict[str, Any] = {"candidates": candidates}
        if not hooks.no_usage:
            out["usageMetadata"] = _gemini_usage(counts, candidates_so_far)
        out["modelVersion"] = model
        out["responseId"] = response_id
        return out

    if not stream:
        whole = chunk(vocab.text(n_tokens), True, counts.visible)
        return (_dumps_google_pretty(whole) + "\n").encode(), None

    # One token a chunk (real Gemini sends a few); an empty answer is one empty final chunk.
    pieces = [(vocab.pieces[t % len(vocab.pieces)], t + 1) for t in range(n_tokens)] or [("", 0)]
    objects = [
        chunk(text, i == len(pieces) - 1, n_candidates * so_far)
        for i, (text, so_far) in enumerate(pieces)
    ]
    if not sse:
        # Without alt=sse the stream is one JSON array, its elements arriving one by one.
        body_text = "[" + ",\r\n".join(_dumps_google_pretty(o) for o in objects) + "]"
        return body_text.encode(), None
    # Google ends every SSE event with CRLF CRLF.
    events = [(f"data: {_dumps_google(o)}\r\n\r\n", n_tokens > 0) for o in objects]
    return None, _StreamPlan(events, done_marker=False)

"""Anthropic Messages: prompt counting, usage and the answer (JSON or SSE)."""

from __future__ import annotations

from typing import Any, Final

from atlas.local.demo.common import MAX_COMPLETION_TOKENS, _base62_id, _dumps
from atlas.local.demo.counting import (
    _PER_CALL,
    _PER_MESSAGE,
    _PRIMING,
    _TOOLS_OVERHEAD,
    _json_tokens,
    count_tokens,
)
from atlas.local.demo.hooks import _Counts, _counts, _Hooks, _plan
from atlas.local.demo.images import _anthropic_image_tokens, _base64_image_size
from atlas.local.demo.protocol import _Request
from atlas.local.demo.responses import _ApiError, _Result, _sse_typed, _StreamPlan

_ANTHROPIC_FIELDS_REQUIRED: Final = ("model", "max_tokens", "messages")


def _anthropic_error(message: str) -> _ApiError:
    return _ApiError(400, message)


def _anthropic_content_tokens(content: Any, where: str) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, list):
        raise _anthropic_error(f"{where}: Input should be a valid list")
    total = 0
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise _anthropic_error(f"{where}.{i}: Input should be a valid dictionary")
        btype = block.get("type")
        if btype == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _anthropic_error(f"{where}.{i}.text: Field required")
            total += count_tokens(text)
        elif btype == "image":
            source = block.get("source")
            size = None
            if isinstance(source, dict) and source.get("type") == "base64":
                data = source.get("data")
                size = _base64_image_size(data) if isinstance(data, str) else None
            total += _anthropic_image_tokens(size)
        elif btype == "tool_use":
            name = block.get("name")
            total += _PER_CALL + (count_tokens(name) if isinstance(name, str) else 0)
            total += _json_tokens(block.get("input", {}))
        elif btype == "tool_result":
            inner = block.get("content")
            if inner is not None:
                total += _anthropic_content_tokens(inner, f"{where}.{i}.content")
        elif btype == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str):
                total += count_tokens(thinking)
        elif not isinstance(btype, str):
            raise _anthropic_error(f"{where}.{i}.type: Field required")
    return total


def _anthropic_prompt_tokens(body: dict[str, Any], messages: list[Any]) -> int:
    total = _PRIMING
    system = body.get("system")
    if system is not None:
        total += _PER_MESSAGE + count_tokens("system")
        total += _anthropic_content_tokens(system, "system")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _anthropic_error(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _anthropic_error(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise _anthropic_error(f"messages.{i}.content: Field required")
        total += _PER_MESSAGE + count_tokens(role)
        total += _anthropic_content_tokens(message["content"], f"messages.{i}.content")
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _TOOLS_OVERHEAD + _json_tokens(tools)
    return total


def _anthropic_usage(counts: _Counts, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": counts.prompt - counts.cached - counts.cache_write,
        "cache_creation_input_tokens": counts.cache_write,
        "cache_read_input_tokens": counts.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": counts.cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _messages(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    for name in _ANTHROPIC_FIELDS_REQUIRED:
        if name not in body:
            raise _anthropic_error(f"{name}: Field required")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise _anthropic_error("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _anthropic_error("max_tokens: Input should be greater than or equal to 1")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _anthropic_error("messages: at least one message is required")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _anthropic_error("stream: Input should be a valid boolean")
    prompt = _anthropic_prompt_tokens(body, messages)
    n_tokens, _ = _plan(min(max_tokens, MAX_COMPLETION_TOKENS), hooks)
    stop_reason = "max_tokens" if n_tokens >= max_tokens else "end_turn"
    counts = _counts(prompt, n_tokens, hooks)
    mid = _base62_id("msg_01", 22)

    if not stream:
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": hooks.vocab.text(n_tokens)}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not hooks.no_usage:
            message["usage"] = _anthropic_usage(counts, counts.completion)
        return message, None

    start: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if not hooks.no_usage:
        # Anthropic reports the input at the start and output_tokens 1 until message_delta.
        start["usage"] = _anthropic_usage(counts, 1)
    events: list[tuple[str, bool]] = [
        (_sse_typed("message_start", _dumps({"type": "message_start", "message": start})), False),
        (
            _sse_typed(
                "content_block_start",
                '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
            ),
            False,
        ),
        # Anthropic's ping carries a space after the colon, unlike every other event.
        (_sse_typed("ping", '{"type": "ping"}'), False),
    ]
    head = 'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
    token_json = hooks.vocab.token_json
    for t in range(n_tokens):
        events.append((f'{head}{{"type":"text_delta","text":{token_json(t)}}}}}\n\n', True))
    events.append(
        (_sse_typed("content_block_stop", '{"type":"content_block_stop","index":0}'), False)
    )
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
    }
    if not hooks.no_usage:
        delta["usage"] = {"output_tokens": counts.completion}
    events.append((_sse_typed("message_delta", _dumps(delta)), False))
    events.append((_sse_typed("message_stop", '{"type":"message_stop"}'), False))
    return None, _StreamPlan(events, done_marker=False)

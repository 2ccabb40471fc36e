"""The OpenAI endpoints: chat completions, completions, embeddings and responses."""

from __future__ import annotations

import base64
import itertools
import json
import math
import struct
import time
import zlib
from typing import Any

from atlas.local.demo.common import (
    EMBEDDING_DIMENSIONS,
    MAX_CHOICES,
    MAX_COMPLETION_TOKENS,
    MAX_EMBEDDING_DIMENSIONS,
    _dumps,
    _next_id,
)
from atlas.local.demo.counting import (
    _chat_prompt_tokens,
    _prompt_list,
    _prompt_tokens,
    _responses_definitions_tokens,
    _responses_input_tokens,
    _Vocabulary,
    count_tokens,
)
from atlas.local.demo.hooks import (
    _CHAT_FIELDS,
    _COMPLETIONS_FIELDS,
    _EMBEDDINGS_FIELDS,
    _RESPONSES_FIELDS,
    _bool_field,
    _check_strict,
    _Counts,
    _counts,
    _Hooks,
    _int_field,
    _model,
    _plan,
    _stream_options,
)
from atlas.local.demo.protocol import _Request
from atlas.local.demo.responses import _ApiError, _Result, _sse_typed, _StreamPlan


def _usage_dict(counts: _Counts, hooks: _Hooks) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": counts.prompt,
        "completion_tokens": counts.completion,
        "total_tokens": counts.prompt + counts.completion,
    }
    if hooks.details:
        usage["prompt_tokens_details"] = {"cached_tokens": counts.cached, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": counts.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def _choice_chunks(
    obj: str,
    rid: str,
    created: int,
    model: str,
    n_choices: int,
    n_tokens: int,
    finish: str,
    usage: str | None,
    vocab: _Vocabulary,
    *,
    chat: bool,
    continuous_prompt: int | None = None,
) -> list[tuple[str, bool]]:
    """SSE events of a chat/text completion stream, laid out like vLLM's.

    Chat streams open each choice with a role delta; every chunk carries ``"usage":null`` when
    usage was asked for, and a final ``"choices":[]`` chunk then carries the totals. With
    ``continuous_prompt`` (vLLM's ``continuous_usage_stats``) every chunk carries its choice's
    cumulative usage instead of null.
    """
    meta = f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{json.dumps(model)}'
    pre = f'{meta},"choices":[{{"index":'
    if continuous_prompt is None:
        end = '}],"usage":null}\n\n' if usage is not None else "}]}\n\n"
        ends = [end] * (n_tokens + 1)
    else:
        p = continuous_prompt
        # vLLM's key order: prompt, total, completion.
        ends = [
            f'}}],"usage":{{"prompt_tokens":{p},"total_tokens":{p + c},'
            f'"completion_tokens":{c}}}}}\n\n'
            for c in range(n_tokens + 1)
        ]
    events: list[tuple[str, bool]] = []
    if chat:
        role = '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        events.extend((f"{pre}{c},{role}{ends[0]}", False) for c in range(n_choices))
    token_json = vocab.json
    k = len(token_json)
    for t in range(n_tokens):
        tok = token_json[t % k]
        body = f'"delta":{{"content":{tok}}}' if chat else f'"text":{tok}'
        end = ends[t + 1]
        for c in range(n_choices):
            events.append((f'{pre}{c},{body},"logprobs":null,"finish_reason":null{end}', True))
    empty = '"delta":{}' if chat else '"text":""'
    end = ends[n_tokens]
    for c in range(n_choices):
        events.append((f'{pre}{c},{empty},"logprobs":null,"finish_reason":"{finish}"{end}', False))
    if usage is not None:
        events.append((f'{meta},"choices":[],"usage":{usage}}}\n\n', False))
    return events


def _chat(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    _check_strict(body, _CHAT_FIELDS, hooks)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty array", "messages")
    prompt_tokens = _chat_prompt_tokens(body, messages)
    limit = _int_field(body, "max_completion_tokens", 1, MAX_COMPLETION_TOKENS)
    if limit is None:
        limit = _int_field(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
    n_choices = _int_field(body, "n", 1, MAX_CHOICES) or 1
    model = _model(body)
    stream = _bool_field(body, "stream")
    include_usage, continuous = _stream_options(body)
    include_usage = include_usage and not hooks.no_usage
    n_tokens, finish = _plan(limit, hooks)
    counts = _counts(prompt_tokens, n_choices * n_tokens, hooks)
    rid = _next_id("chatcmpl-")
    created = int(time.time())

    if not stream:
        text = hooks.vocab.text(n_tokens)
        response: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i in range(n_choices)
            ],
            "system_fingerprint": None,
        }
        if not hooks.no_usage:
            response["usage"] = _usage_dict(counts, hooks)
        return response, None

    events = _choice_chunks(
        "chat.completion.chunk", rid, created, model, n_choices, n_tokens, finish,
        _dumps(_usage_dict(counts, hooks)) if include_usage else None, hooks.vocab, chat=True,
        continuous_prompt=prompt_tokens if include_usage and continuous else None,
    )  # fmt: skip
    return None, _StreamPlan(events, done_marker=True)


def _completions(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    _check_strict(body, _COMPLETIONS_FIELDS, hooks)
    if "prompt" not in body:
        raise _ApiError(400, "'prompt' is required", "prompt")
    prompts = _prompt_list(body["prompt"], "prompt")
    prompt_tokens = _prompt_tokens(prompts)
    limit = _int_field(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
    n_per_prompt = _int_field(body, "n", 1, MAX_CHOICES) or 1
    n_choices = n_per_prompt * len(prompts)
    model = _model(body)
    stream = _bool_field(body, "stream")
    include_usage, continuous = _stream_options(body)
    include_usage = include_usage and not hooks.no_usage
    n_tokens, finish = _plan(limit, hooks)
    counts = _counts(prompt_tokens, n_choices * n_tokens, hooks)
    rid = _next_id("cmpl-")
    created = int(time.time())

    if not stream:
        text = hooks.vocab.text(n_tokens)
        response: dict[str, Any] = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i in range(n_choices)
            ],
            "system_fingerprint": None,
        }
        if not hooks.no_usage:
            response["usage"] = _usage_dict(counts, hooks)
        return response, None

    events = _choice_chunks(
        "text_completion", rid, created, model, n_choices, n_tokens, finish,
        _dumps(_usage_dict(counts, hooks)) if include_usage else None, hooks.vocab, chat=False,
        continuous_prompt=prompt_tokens if include_usage and continuous else None,
    )  # fmt: skip
    return None, _StreamPlan(events, done_marker=True)


def _embedding_vector(item: str | list[int], dims: int) -> list[float]:
    seed_bytes = item.encode() if isinstance(item, str) else repr(item).encode()
    state = zlib.crc32(seed_bytes) or 1
    values: list[float] = []
    for _ in range(dims):
        # xorshift32: deterministic across processes, unlike hash().
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        values.append(state / 2147483648.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _embeddings(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    _check_strict(body, _EMBEDDINGS_FIELDS, hooks)
    if "input" not in body:
        raise _ApiError(400, "'input' is required", "input")
    items = _prompt_list(body["input"], "input")
    dims = _int_field(body, "dimensions", 1, MAX_EMBEDDING_DIMENSIONS) or EMBEDDING_DIMENSIONS
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _ApiError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        vector = _embedding_vector(item, dims)
        embedding: list[float] | str = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    response: dict[str, Any] = {"object": "list", "data": data, "model": _model(body)}
    if not hooks.no_usage:
        prompt_tokens = _prompt_tokens(items)
        response["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return response, None


def _response_object(
    rid: str,
    created: int,
    model: str,
    body: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def _message_item(mid: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def _responses(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    if hooks.strict:
        unknown = [key for key in body if key not in _RESPONSES_FIELDS]
        if unknown:
            # The Responses API words it differently from Chat Completions.
            raise _ApiError(
                400, f"Unknown parameter: '{unknown[0]}'.", unknown[0], "unknown_parameter"
            )
    if "input" not in body:
        raise _ApiError(400, "'input' is required", "input")
    input_tokens = _responses_input_tokens(body["input"])
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        input_tokens += count_tokens(instructions)
    elif instructions is not None:
        raise _ApiError(400, "'instructions' must be a string", "instructions")
    input_tokens += _responses_definitions_tokens(body)
    limit = _int_field(body, "max_output_tokens", 1, MAX_COMPLETION_TOKENS)
    model = _model(body)
    stream = _bool_field(body, "stream")
    n_tokens, _ = _plan(limit, hooks)
    counts = _counts(input_tokens, n_tokens, hooks)
    text = hooks.vocab.text(n_tokens)
    usage: dict[str, Any] | None = None
    if not hooks.no_usage:
        usage = {
            "input_tokens": counts.prompt,
            "input_tokens_details": {"cached_tokens": counts.cached},
            "output_tokens": counts.completion,
            "output_tokens_details": {"reasoning_tokens": counts.reasoning},
            "total_tokens": counts.prompt + counts.completion,
        }
    rid = _next_id("resp_")
    mid = _next_id("msg_")
    created = int(time.time())
    done_item = _message_item(mid, "completed", text)
    final = _response_object(rid, created, model, body, "completed", [done_item], usage)
    if not stream:
        return final, None

    seq = itertools.count()
    events: list[tuple[str, bool]] = []

    def add(event: str, payload: dict[str, Any], content: bool = False) -> None:
        payload = {"type": event, "sequence_number": next(seq), **payload}
        events.append((_sse_typed(event, _dumps(payload)), content))

    pending = _response_object(rid, created, model, body, "in_progress", [], None)
    add("response.created", {"response": pending})
    add("response.in_progress", {"response": pending})
    add(
        "response.output_item.added",
        {"output_index": 0, "item": _message_item(mid, "in_progress", None)},
    )
    part_ids = {"item_id": mid, "output_index": 0, "content_index": 0}
    add(
        "response.content_part.added",
        {**part_ids, "part": {"type": "output_text", "text": "", "annotations": []}},
    )
    delta_head = '{"type":"response.output_text.delta","sequence_number":'
    delta_ids = f',"item_id":"{mid}","output_index":0,"content_index":0,"delta":'
    token_json = hooks.vocab.token_json
    for t in range(n_tokens):
        delta = f'{delta_head}{next(seq)}{delta_ids}{token_json(t)},"logprobs":[]}}'
        events.append((_sse_typed("response.output_text.delta", delta), True))
    add("response.output_text.done", {**part_ids, "text": text, "logprobs": []})
    add(
        "response.content_part.done",
        {**part_ids, "part": {"type": "output_text", "text": text, "annotations": []}},
    )
    add("response.output_item.done", {"output_index": 0, "item": done_item})
    add("response.completed", {"response": final})
    return None, _StreamPlan(events, done_marker=False)

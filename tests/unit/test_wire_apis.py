"""Anthropic Messages and Gemini usage, JSON and streamed, as extproc reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from extproc.json_usage import JsonBodyAccountant
from extproc.sse import SSEDecoder
from extproc.stream_usage import StreamAccountant
from extproc.usage import Endpoint, Usage, endpoint_for_path
from tests.unit.usage_helpers import usage_from_json


def sse(events: list[tuple[str | None, dict[str, Any]]], crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    out = ""
    for name, data in events:
        if name is not None:
            out += f"event: {name}{nl}"
        out += f"data: {json.dumps(data)}{nl}{nl}"
    return out.encode()


def stream(endpoint: Endpoint, raw: bytes, step: int = 0) -> StreamAccountant:
    acc = StreamAccountant(endpoint)
    dec = SSEDecoder()
    chunks = [raw] if not step else [raw[i : i + step] for i in range(0, len(raw), step)]
    for chunk in chunks:
        for ev in dec.feed(chunk):
            acc.observe(ev)
    for ev in dec.flush():
        acc.observe(ev)
    return acc


ANTHROPIC_USAGE = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188,
    "cache_read_input_tokens": 1024,
    "output_tokens": 1,
}


def anthropic_stream(words: list[str], final_output: int | None) -> bytes:
    events: list[tuple[str | None, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-sonnet-4-5",
                    "stop_reason": None,
                    "usage": ANTHROPIC_USAGE,
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    for w in words:
        events.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
        )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if final_output is not None:
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": final_output},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(events)


def test_paths_name_their_api() -> None:
    assert endpoint_for_path("/v1/messages") is Endpoint.MESSAGES
    assert endpoint_for_path("/v1beta/models/gemini-2.5-flash:generateContent") is Endpoint.GEMINI
    assert (
        endpoint_for_path("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse")
        is Endpoint.GEMINI
    )


def test_anthropic_json_usage_adds_the_cache_to_the_prompt() -> None:
    body = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hi!"}],
        "usage": {**ANTHROPIC_USAGE, "output_tokens": 12},
    }
    usage = usage_from_json(json.dumps(body).encode())
    assert usage == Usage(21 + 188 + 1024, 12, 21 + 188 + 1024 + 12, 1024, None, 188)


def test_anthropic_stream_merges_start_and_cumulative_delta() -> None:
    raw = anthropic_stream([" Hello", " there", "!"], final_output=3)
    for step in (0, 1, 7):
        acc = stream(Endpoint.MESSAGES, raw, step)
        assert acc.usage == Usage(1233, 3, 1236, 1024, None, 188), step
        assert acc.saw_done and acc.content_chunks == 3


def test_anthropic_stream_cut_before_its_usage_keeps_the_exact_prompt() -> None:
    acc = stream(Endpoint.MESSAGES, anthropic_stream([" a"] * 40, final_output=None))
    assert acc.usage is None and not acc.saw_done
    assert acc.prompt_seen == 1233  # message_start said so: never the estimate
    assert acc.estimated_completion_tokens == 40  # one token per chunk at least


def test_anthropic_tool_input_and_thinking_are_generated_text() -> None:
    events: list[tuple[str | None, dict[str, Any]]] = [
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me think."},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"location": "Paris"}'},
            },
        ),
    ]
    acc = stream(Endpoint.MESSAGES, sse(events))
    assert acc.content_chunks == 2  # the signature is not text
    assert acc.content_chars == len("Let me think.") + len('{"location": "Paris"}')


GEMINI_CHUNKS = [
    {
        "candidates": [{"content": {"parts": [{"text": "The sky"}], "role": "model"}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2, "totalTokenCount": 11},
        "modelVersion": "gemini-2.5-flash",
    },
    {
        "candidates": [
            {
                "content": {"parts": [{"text": " is blue."}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 9,
            "candidatesTokenCount": 5,
            "totalTokenCount": 40,
            "cachedContentTokenCount": 4,
            "thoughtsTokenCount": 26,
        },
        "modelVersion": "gemini-2.5-flash",
    },
]


def test_gemini_stream_takes_the_last_cumulative_usage_with_thoughts() -> None:
    raw = sse([(None, c) for c in GEMINI_CHUNKS], crlf=True)
    for step in (0, 1, 5):
        acc = stream(Endpoint.GEMINI, raw, step)
        assert acc.usage == Usage(9, 5 + 26, 40, 4, 26, None), step
        assert acc.saw_done and acc.content_chunks == 2


def test_gemini_stream_cut_early_has_the_usage_so_far() -> None:
    acc = stream(Endpoint.GEMINI, sse([(None, GEMINI_CHUNKS[0])]))
    assert acc.usage == Usage(9, 2, 11) and not acc.saw_done


def test_gemini_json_and_json_array_answers() -> None:
    whole = usage_from_json(json.dumps(GEMINI_CHUNKS[1]).encode())
    assert whole == Usage(9, 31, 40, 4, 26, None)
    acc = JsonBodyAccountant(1 << 20)
    acc.feed(json.dumps(GEMINI_CHUNKS).encode())  # streamGenerateContent without alt=sse
    usage, estimate = acc.result()
    assert usage == whole and estimate > 0


def test_gemini_without_usage_is_estimated_from_its_text() -> None:
    chunk = {"candidates": [{"content": {"parts": [{"text": "Hello there, friend."}]}}]}
    acc = JsonBodyAccountant(1 << 20)
    acc.feed(json.dumps(chunk).encode())
    usage, estimate = acc.result()
    assert usage is None and estimate == 5  # "Hello there, friend." in cl100k


BODIES = Path(__file__).parents[1] / "data" / "bodies"


def test_recorded_json_answers_byte_by_byte() -> None:
    want = {
        "anthropic_message.json": Usage(1233, 16, 1249, 1024, None, 188),
        "gemini_generate.json": Usage(1043, 67, 1110, 1024, 48, None),
    }
    for name, usage in want.items():
        raw = (BODIES / name).read_bytes()
        assert usage_from_json(raw) == usage, name
        for step in (1, 7, 4096):
            acc = JsonBodyAccountant(1 << 20)
            for i in range(0, len(raw), step):
                acc.feed(raw[i : i + step])
            assert acc.result()[0] == usage, (name, step)
        # Too big to keep whole: the usage is still read from the scan as it passes.
        acc = JsonBodyAccountant(16)
        acc.feed(raw)
        assert acc.result()[0] == usage, name

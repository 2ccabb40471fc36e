"""extproc's per-exchange state machine, without gRPC or Envoy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

from extproc.exchange import Exchange

STREAMS = Path(__file__).resolve().parents[1] / "data" / "streams"
GRANT = {
    "key_id": "key_1",
    "reservation_id": "r1",
    "reserved": 100.0,
    "prompt_estimate": 5.0,
    "model": "m",
    "tpm": 0.0,
    "granted_completion": -1.0,
}


def started(
    body: dict[str, Any] | None = None,
    path: str = "/v1/chat/completions",
    grant: dict[str, Any] | None = GRANT,
) -> Exchange:
    ex = Exchange()
    ex.on_request_headers({":path": path}, grant or {})
    if body is not None:
        ex.on_request_body(json.dumps(body).encode())
    return ex


def body_of(reply: Any, field: str) -> bytes | None:
    common = getattr(reply, field).response
    if common.body_mutation.clear_body:
        return b""
    return common.body_mutation.body if common.body_mutation.HasField("body") else None


def test_local_reply_without_request_state_settles_nothing() -> None:
    ex = Exchange()
    reply = ex.on_response_headers({":status": "401", "content-type": "application/json"}, False)
    assert reply.mode_override.response_body_mode == pm.ProcessingMode.NONE
    assert ex.settlement() is None


def test_streaming_request_gets_include_usage_and_a_matching_content_length() -> None:
    ex = Exchange()
    ex.on_request_headers({":path": "/v1/chat/completions"}, GRANT)
    reply = ex.on_request_body(b'{"model":"m","stream":true,"messages":[]}')
    new = body_of(reply, "request_body")
    assert new is not None and json.loads(new)["stream_options"] == {"include_usage": True}
    cl = reply.request_body.response.header_mutation.set_headers[0].header
    assert (cl.key, cl.raw_value) == ("content-length", str(len(new)).encode())
    assert ex.injected_usage


def test_client_options_are_kept_and_unchanged_bodies_pass() -> None:
    ex = Exchange()
    ex.on_request_headers({":path": "/v1/chat/completions"}, GRANT)
    body = b'{"stream":true,"stream_options":{"include_usage":true}}'
    assert body_of(ex.on_request_body(body), "request_body") is None
    assert not ex.injected_usage


def test_hostile_request_bodies_pass_through() -> None:
    for body in (b"\xff\xfe", b"[1]", b'{"stream": "yes"}', b"{" * 10_000):
        ex = Exchange()
        ex.on_request_headers({":path": "/v1/chat/completions"}, GRANT)
        assert body_of(ex.on_request_body(body), "request_body") is None


def test_clamp_rewrites_max_tokens() -> None:
    ex = Exchange()
    ex.on_request_headers({":path": "/v1/chat/completions"}, {**GRANT, "granted_completion": 7})
    new = body_of(ex.on_request_body(b'{"max_completion_tokens": 500}'), "request_body")
    assert new is not None and json.loads(new) == {"max_completion_tokens": 7}


def test_injected_usage_chunk_is_stripped_at_every_split_point() -> None:
    raw = (STREAMS / "openai_chat_usage.sse").read_bytes()
    expected = None
    for cut in range(1, len(raw)):
        ex = started({"stream": True, "messages": []})
        ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
        out = bytearray()
        for piece, eos in ((raw[:cut], False), (raw[cut:], False), (b"", True)):
            new = body_of(ex.on_response_body(piece, eos), "response_body")
            out += piece if new is None else new
        assert b'"choices":[]' not in out
        expected = expected or bytes(out)
        assert bytes(out) == expected
        s = ex.settlement()
        assert s is not None and s.exact and (s.prompt_tokens, s.completion_tokens) == (19, 10)
    assert expected is not None and expected.endswith(b"data: [DONE]\n\n")


def test_stream_without_usage_is_estimated_and_disconnect_is_partial() -> None:
    raw = (STREAMS / "openai_chat_no_usage.sse").read_bytes()
    ex = started({"stream": True, "stream_options": {"include_usage": True}, "messages": []})
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    ex.on_response_body(raw[: len(raw) // 2], False)
    s = ex.settlement()
    assert s is not None and s.outcome == "disconnected" and not s.exact
    assert s.completion_tokens > 0


def test_json_response_and_upstream_error() -> None:
    ex = started({"model": "m"})
    reply = ex.on_response_headers(
        {":status": "200", "content-type": "application/json", "content-length": "80"}, False
    )
    assert reply.mode_override.response_body_mode == pm.ProcessingMode.BUFFERED
    ex.on_response_body(
        b'{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}', True
    )
    s = ex.settlement()
    assert s is not None and (s.prompt_tokens, s.completion_tokens, s.outcome) == (
        3,
        4,
        "completed",
    )
    big = started({"model": "m"})
    reply = big.on_response_headers({":status": "200", "content-type": "application/json"}, False)
    assert reply.mode_override.response_body_mode == pm.ProcessingMode.STREAMED
    err = started({"model": "m"})
    err.on_response_headers({":status": "503", "content-type": "application/json"}, False)
    s = err.settlement()
    assert s is not None and s.outcome == "upstream_error"
    assert s.prompt_tokens + s.completion_tokens == 0


def test_request_body_is_skipped_only_when_nothing_needs_it() -> None:
    parsed = {**GRANT, "body_parsed": True}
    cases = [
        (parsed, False, pm.ProcessingMode.NONE),  # plain JSON request: authz read it all
        ({**parsed, "stream": True}, False, 0),  # include_usage must be injected
        ({**parsed, "stream": True, "include_usage": True}, False, pm.ProcessingMode.NONE),
        ({**parsed, "granted_completion": 9}, False, 0),  # clamp rewrites max_tokens
        (GRANT, False, 0),  # authz saw only part of the body
        (parsed, True, 0),  # routing by model reads the body
    ]
    for grant, route, mode in cases:
        reply = Exchange(route_by_model=route).on_request_headers(
            {":path": "/v1/chat/completions"}, grant
        )
        assert reply.mode_override.request_body_mode == mode, (grant, route)
        assert list(reply.request_headers.response.header_mutation.remove_headers) == [
            "accept-encoding"
        ]


def test_route_by_model_sets_the_header_and_clears_the_route_cache() -> None:
    ex = Exchange(route_by_model=True)
    ex.on_request_headers({":path": "/v1/chat/completions"}, GRANT)
    reply = ex.on_request_body(b'{"model": "llama-3\\n-8b\\u0000"}')
    common = reply.request_body.response
    assert common.clear_route_cache
    (hdr,) = common.header_mutation.set_headers
    assert (hdr.header.key, hdr.header.raw_value) == ("x-atlas-model", b"llama-3-8b")

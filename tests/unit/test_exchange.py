"""extproc's per-exchange state machine, without gRPC or Envoy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

from atlas import tokens
from atlas.grant import GRANT_HEADER, Grant, ProcMode
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
    ex.start(Grant.from_dict(grant or {}), path)
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
    ex.start(Grant.from_dict(GRANT), "/v1/chat/completions")
    reply = ex.on_request_body(b'{"model":"m","stream":true,"messages":[]}')
    new = body_of(reply, "request_body")
    assert new is not None and json.loads(new)["stream_options"] == {"include_usage": True}
    cl = reply.request_body.response.header_mutation.set_headers[0].header
    assert (cl.key, cl.raw_value) == ("content-length", str(len(new)).encode())
    assert ex.injected_usage


def test_client_options_are_kept_and_unchanged_bodies_pass() -> None:
    ex = Exchange()
    ex.start(Grant.from_dict(GRANT), "/v1/chat/completions")
    body = b'{"stream":true,"stream_options":{"include_usage":true}}'
    assert body_of(ex.on_request_body(body), "request_body") is None
    assert not ex.injected_usage


def test_continuous_usage_is_asked_only_of_the_upstreams_that_take_it() -> None:
    for client_opts, injected in (({"include_usage": True}, False), (None, True)):
        ex = Exchange()
        ex.start(Grant.from_dict({**GRANT, "continuous_usage": True}), "/v1/chat/completions")
        body: dict[str, Any] = {"model": "m", "stream": True, "messages": []}
        if client_opts is not None:
            body["stream_options"] = client_opts
        new = body_of(ex.on_request_body(json.dumps(body).encode()), "request_body")
        assert new is not None
        opts = json.loads(new)["stream_options"]
        assert opts == {"include_usage": True, "continuous_usage_stats": True}
        assert ex.injected_usage is injected  # the final usage chunk is the client's if asked
    plain = Exchange()  # any other upstream
    plain.start(Grant.from_dict(GRANT), "/v1/chat/completions")
    new = body_of(plain.on_request_body(b'{"model":"m","stream":true}'), "request_body")
    assert new is not None and b"continuous_usage_stats" not in new


def test_hostile_request_bodies_pass_through() -> None:
    for body in (b"\xff\xfe", b"[1]", b'{"stream": "maybe"}', b"{" * 10_000):
        ex = Exchange()
        ex.start(Grant.from_dict(GRANT), "/v1/chat/completions")
        assert body_of(ex.on_request_body(body), "request_body") is None


def test_clamp_rewrites_max_tokens() -> None:
    ex = Exchange()
    ex.start(Grant.from_dict({**GRANT, "granted_completion": 7}), "/v1/chat/completions")
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


def test_route_by_model_sets_the_header_and_clears_the_route_cache() -> None:
    ex = Exchange(route_by_model=True)
    ex.start(Grant.from_dict(GRANT), "/v1/chat/completions")
    reply = ex.on_request_body(b'{"model": "llama-3\\n-8b\\u0000"}')
    common = reply.request_body.response
    assert common.clear_route_cache
    (hdr,) = common.header_mutation.set_headers
    assert (hdr.header.key, hdr.header.raw_value) == ("x-atlas-model", b"llama-3-8b")


# ---- request rewrites by splicing (items 4, 8, 16 of issue 11) --------------------------
PARSED = {**GRANT, "body_parsed": True}


def rewritten(body: bytes, grant: dict[str, Any], path: str = "/v1/chat/completions") -> bytes:
    ex = Exchange()
    ex.start(Grant.from_dict(grant), path)
    new = body_of(ex.on_request_body(body), "request_body")
    assert new is not None
    return new


def test_include_usage_is_spliced_in_and_strings_pass_byte_for_byte() -> None:
    # A lone surrogate escape made json.dumps(ensure_ascii=False).encode() throw: the usage
    # was never asked for and the stream was estimated.
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"\\ud800 x"}]} \n'
    ex = Exchange()
    ex.start(Grant.from_dict({**PARSED, "stream": True}), "/v1/chat/completions")
    new = body_of(ex.on_request_body(body), "request_body")
    assert new is not None and ex.injected_usage
    assert new.startswith(body.rstrip()[:-1])  # the client's bytes, untouched
    assert json.loads(new)["stream_options"] == {"include_usage": True}
    assert json.loads(new)["messages"][0]["content"] == "\ud800 x"


def test_client_stream_options_are_kept_and_overridden_last() -> None:
    body = b'{"stream":1,"stream_options":{"continuous_usage_stats":true,"include_usage":false}}'
    for grant in ({**PARSED, "stream": True}, GRANT):  # authz parsed it, or extproc did
        new = rewritten(body, grant)
        assert json.loads(new)["stream_options"] == {
            "continuous_usage_stats": True,
            "include_usage": True,
        }


def test_clamp_writes_the_field_the_upstream_reads_per_endpoint() -> None:
    cases = [
        ("/v1/chat/completions", b'{"max_completion_tokens":500,"n":3}', "max_completion_tokens"),
        ("/v1/chat/completions", b'{"max_tokens":"4096","n":3}', "max_tokens"),
        ("/v1/chat/completions", b"{}", "max_tokens"),
        ("/v1/completions", b'{"max_tokens":500,"prompt":"p"}', "max_tokens"),
        ("/v1/responses", b'{"max_output_tokens":500,"input":"i"}', "max_output_tokens"),
        ("/v1/responses", b'{"input":"i"}', "max_output_tokens"),
    ]
    for path, body, field in cases:
        for grant in (PARSED, GRANT):
            new = json.loads(rewritten(body, {**grant, "granted_completion": 7}, path))
            assert new[field] == 7, (path, body)  # per choice: n is the upstream's business
            others = {"max_tokens", "max_completion_tokens", "max_output_tokens"} - {field}
            assert all(new.get(f) != 7 for f in others), (path, body)


def test_utf16_bodies_are_rewritten_too() -> None:
    body = '{"max_tokens": 500, "messages": []}'.encode("utf-16")
    assert json.loads(rewritten(body, {**PARSED, "granted_completion": 7}))["max_tokens"] == 7


def test_pathological_body_is_not_parsed_and_is_estimated_by_size() -> None:
    body = b'{"messages":' + b"[]," * 1_000_000 + b"[]}"  # ~3 MB of tiny arrays
    ex = Exchange()
    ex.start(Grant.from_dict(GRANT), "/v1/chat/completions")
    assert body_of(ex.on_request_body(body), "request_body") is None
    assert ex.prompt_estimate == -(-len(body) // 4)


def test_a_parsed_body_is_not_parsed_again(monkeypatch: Any) -> None:
    import extproc.exchange as exchange

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(exchange, "loads_bounded", boom)
    monkeypatch.setattr(json, "loads", boom)
    new = rewritten(b'{"stream":true}', {**PARSED, "stream": True})
    assert new == b'{"stream":true,"stream_options":{"include_usage":true}}'


# ---- JSON responses of any size (items 2 and 9) ------------------------------------------
def json_exchange(path: str = "/v1/chat/completions", length: int | None = None) -> Exchange:
    ex = started(path=path)
    headers = {":status": "200", "content-type": "application/json"}
    if length is not None:
        headers["content-length"] = str(length)
    ex.on_response_headers(headers, False)
    return ex


def feed(ex: Exchange, body: bytes, chunk: int = 1 << 16, eos: bool = True) -> None:
    for i in range(0, len(body), chunk):
        ex.on_response_body(body[i : i + chunk], False)
    if eos:
        ex.on_response_body(b"", True)


PROSE = "The quick brown fox jumps over the lazy dog. "  # 10 cl100k tokens


def prose(chars: int) -> str:
    return (PROSE * (chars // len(PROSE) + 1))[:chars]


def big_completion(chars: int, usage: bool = True) -> bytes:
    obj: dict[str, Any] = {
        "id": "c",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": prose(chars)}}],
    }
    if usage:
        obj["usage"] = {"prompt_tokens": 3, "completion_tokens": chars // 4, "total_tokens": 0}
        obj["usage"]["total_tokens"] = 3 + chars // 4
    obj["prompt_logprobs"] = None
    return json.dumps(obj).encode()


def test_usage_of_a_json_body_of_any_size_is_read() -> None:
    for chars in (100, 4 << 20, 18_000_000):
        for chunk in (1 << 14, 1 << 20):
            ex = json_exchange()
            feed(ex, big_completion(chars), chunk)
            s = ex.settlement()
            assert s is not None and s.exact, chars
            assert (s.prompt_tokens, s.completion_tokens) == (3, chars // 4)


def test_json_body_without_usage_is_estimated_never_zero() -> None:
    for chars in (400, 18_000_000):
        ex = json_exchange()
        body = big_completion(chars, usage=False)
        feed(ex, body)
        s = ex.settlement()
        assert s is not None and not s.exact
        # Tokenized (a small body) or extrapolated from its first 64 KiB (a huge one).
        truth = chars * 10 / len(PROSE)
        assert abs(s.completion_tokens - truth) <= 0.02 * truth + 1, chars


def test_json_body_cut_off_is_charged_what_passed() -> None:
    body = big_completion(8_000_000)
    ex = json_exchange()
    feed(ex, body[: len(body) // 2], eos=False)
    s = ex.settlement()
    assert s is not None and s.outcome == "disconnected"
    assert s.completion_tokens >= len(body) // 2 // 4 - 100


def test_pathological_json_response_is_not_parsed_and_still_counted() -> None:
    body = b'{"choices":[{"message":{"content":"hello world!"}}],"x":' + b"[]," * 200_000 + b"[]"
    body += b',"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}'
    ex = json_exchange()
    feed(ex, body)
    s = ex.settlement()
    assert s is not None and s.exact and s.completion_tokens == 3


def test_responses_json_without_usage_is_estimated_from_its_output() -> None:
    body = {
        "object": "response",
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t" * 40}]},
            {"type": "function_call", "arguments": '{"a":"' + "b" * 34 + '"}'},
            {"type": "message", "content": [{"type": "output_text", "text": "w" * 400}]},
        ],
        "usage": None,
    }
    ex = json_exchange("/v1/responses", length=2000)
    feed(ex, json.dumps(body).encode())
    s = ex.settlement()
    texts = ["t" * 40, '{"a":"' + "b" * 34 + '"}', "w" * 400]
    assert s is not None and not s.exact
    assert s.completion_tokens == sum(tokens.count_text(t) for t in texts)


# ---- streams that hang up or overflow (item 8) -------------------------------------------
def test_hang_up_right_after_finish_reason_is_charged_at_least_a_token_per_chunk() -> None:
    raw = (STREAMS / "openai_chat_usage.sse").read_bytes()
    cut = raw.index(b'"finish_reason":"stop"')
    cut = raw.index(b"\n\n", cut) + 2
    ex = started({"stream": True, "messages": []})
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    ex.on_response_body(raw[:cut], False)
    s = ex.settlement()
    assert s is not None and s.outcome == "disconnected" and not s.exact
    assert s.completion_tokens >= 9  # 9 chunks of text (the upstream counted 10 tokens)


def test_responses_terminal_event_over_the_decoder_limit_still_settles_exactly() -> None:
    text = "w" * (3 << 20)
    final = {
        "type": "response.completed",
        "response": {
            "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
            "usage": {"input_tokens": 4, "output_tokens": len(text) // 4, "total_tokens": 0},
            "metadata": {},
        },
    }
    final["response"]["usage"]["total_tokens"] = 4 + len(text) // 4  # type: ignore[index]
    stream = b"event: response.completed\ndata: " + json.dumps(final).encode() + b"\n\n"
    ex = started(path="/v1/responses")
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    feed(ex, stream, 1 << 16)
    s = ex.settlement()
    assert s is not None and s.exact and s.completion_tokens == len(text) // 4


# ---- bounded model names (item 10) -------------------------------------------------------
async def test_a_thousand_model_names_make_at_most_max_tracked_plus_two_labels() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from google.protobuf import struct_pb2

    from atlas import metrics
    from atlas.modelnames import ModelNames
    from extproc.server import ExternalProcessor
    from extproc.settler import Settler
    from tests.unit.fakes import FakeLedger

    ledger = FakeLedger()
    settler = Settler(ledger)
    processor = ExternalProcessor(settler, models=ModelNames(max_tracked=10))
    key_id = "key_cardinality"

    async def one(i: int) -> None:
        md = struct_pb2.Struct()
        grant = {**GRANT, "key_id": key_id, "reservation_id": f"r{i}", "model": f"m{i}"}
        md.update({GRANT_HEADER: json.dumps(grant)})
        req = ep.ProcessingRequest()
        req.request_headers.headers.headers.add(key=":path", raw_value=b"/v1/chat/completions")
        req.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(md)
        bodies = [req, ep.ProcessingRequest()]
        bodies[1].response_headers.end_of_stream = True

        async def messages() -> Any:
            for m in bodies:
                yield m

        async for _ in processor.Process(messages(), None):
            pass

    for i in range(1000):
        await one(i)
    await settler.drain()
    assert len(ledger.settlements) == 1000
    assert len({s.model for s in ledger.settlements}) <= 10 + 2
    labels = {
        sample.labels["model"]
        for family in metrics.REQUESTS.collect()
        for sample in family.samples
        if sample.labels.get("key_id") == key_id
    }
    assert 0 < len(labels) <= 10 + 2


# ---- response headers skipped (issue 12): the grant and the body say what comes ----------
def test_a_stream_is_read_without_its_response_headers() -> None:
    raw = (STREAMS / "openai_chat_usage.sse").read_bytes()
    ex = started({"stream": True, "messages": []}, grant={**GRANT, "stream": True})
    for i in range(0, len(raw), 97):
        ex.on_response_body(raw[i : i + 97], False)
    ex.on_response_body(b"", True)
    s = ex.settlement()
    assert ex.streaming_response and s is not None and s.exact and s.outcome == "completed"


def test_an_error_answer_to_a_stream_request_is_refunded_without_headers() -> None:
    ex = started({"stream": True, "messages": []}, grant={**GRANT, "stream": True})
    body = b'{"error": {"message": "model overloaded", "type": "server_error"}}'
    ex.on_response_body(body, True)
    s = ex.settlement()
    assert not ex.streaming_response and s is not None and s.outcome == "upstream_error"
    assert s.prompt_tokens + s.completion_tokens == 0


def test_the_clamped_field_is_one_authz_reads_the_limit_from() -> None:
    from atlas.requestbody import _MAX_TOKENS_KEYS
    from extproc.rewrite import clamp_field
    from extproc.usage import Endpoint

    written = {
        clamp_field(e, body, data)
        for e in (*Endpoint, None)
        for body, data in ((b"{}", None), (b'{"max_completion_tokens":1}', None), (b"{}", {}))
    }
    assert written == set(_MAX_TOKENS_KEYS)


def counting_json_loads(monkeypatch: Any) -> list[int]:
    """Counts `json.loads` calls on whole bodies (of 64 bytes or more) from here on."""
    calls: list[int] = []
    real = json.loads

    def counted(s: Any, *args: Any, **kw: Any) -> Any:
        if len(s) >= 64:
            calls.append(len(s))
        return real(s, *args, **kw)

    monkeypatch.setattr(json, "loads", counted)
    return calls


def test_each_body_is_parsed_once(monkeypatch: Any) -> None:
    calls = counting_json_loads(monkeypatch)
    # An answer without its headers: whether it is an error, and its usage, from one parse.
    ex = started(grant={**GRANT, "stream": True})
    body = b'{"error": {"message": "model overloaded", "type": "server_error"}}'
    ex.on_response_body(body, True)
    s, again = ex.settlement(), ex.settlement()
    assert s is not None and s.outcome == "upstream_error" and again == s
    assert calls == [len(body)]
    # A request body authz did not parse: parsed here once, then rewritten by splicing.
    calls.clear()
    request = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    ex = started(grant={**GRANT, "granted_completion": 7.0})
    new = body_of(ex.on_request_body(request), "request_body")
    assert calls == [len(request)]
    assert new is not None and json.loads(new)["max_tokens"] == 7
    # A JSON answer cut off before its end: counted once, however often it is asked.
    calls.clear()
    ex = json_exchange()
    feed(ex, big_completion(100)[:-1], eos=False)
    first, second = ex.settlement(), ex.settlement()
    assert first is not None and first.outcome == "disconnected" and second == first
    assert len(calls) == 1


def test_mesh_request_headers_answer_keeps_the_whole_mode() -> None:
    """An override replaces Envoy's whole processing mode: the rewrite answer must keep the
    request body BUFFERED, the others drop it; no configuration sends response headers."""
    cases = {
        ProcMode.REWRITE: pm.ProcessingMode.BUFFERED,
        ProcMode.JSON: pm.ProcessingMode.NONE,
        ProcMode.OBSERVE: pm.ProcessingMode.NONE,
    }
    parsed = {**GRANT, "body_parsed": True, "route": "chat"}
    grants = {
        ProcMode.REWRITE: {**parsed, "stream": True},
        ProcMode.JSON: parsed,
        ProcMode.OBSERVE: {**parsed, "stream": True, "include_usage": True},
    }
    for mode, body_mode in cases.items():
        ex = Exchange()
        reply = ex.on_request_headers(
            {":path": "/v1/chat/completions", GRANT_HEADER: json.dumps(grants[mode])}
        )
        o = reply.mode_override
        assert o.request_body_mode == body_mode, mode
        assert o.response_header_mode == pm.ProcessingMode.SKIP, mode
        assert o.response_body_mode == pm.ProcessingMode.STREAMED, mode
        assert list(reply.request_headers.response.header_mutation.remove_headers) == [GRANT_HEADER]

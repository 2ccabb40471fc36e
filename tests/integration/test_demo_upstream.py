"""The demo upstream over real sockets: httpx, raw HTTP/1.1 and the real openai SDK."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from atlas.demo_upstream import VOCABULARY, DemoUpstream, serve

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def completion_text(n: int) -> str:
    return "".join(VOCABULARY[i % len(VOCABULARY)] for i in range(n))


@pytest.fixture
async def upstream() -> AsyncIterator[DemoUpstream]:
    server = DemoUpstream("127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http(upstream: DemoUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url, timeout=10) as client:
        yield client


@pytest.fixture
async def oai(upstream: DemoUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=f"{upstream.url}/v1", api_key="x", max_retries=0, timeout=10
    )
    try:
        yield client
    finally:
        await client.close()


async def raw_exchange(port: int, payload: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def split_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers, body


def decode_chunked(body: bytes) -> tuple[list[bytes], bytes]:
    """HTTP chunks of a chunked body, and whatever follows the terminating zero chunk."""
    chunks: list[bytes] = []
    while True:
        line, sep, body = body.partition(b"\r\n")
        assert sep, "chunked body ended without the zero chunk"
        size = int(line, 16)
        if size == 0:
            assert body[:2] == b"\r\n"
            return chunks, body[2:]
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


# --- plain endpoints --------------------------------------------------------------------------


async def test_health_models_and_routing_errors(
    http: httpx.AsyncClient, oai: openai.AsyncOpenAI
) -> None:
    r = await http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}

    models = await oai.models.list()
    assert [m.id for m in models.data] == ["demo-small", "demo-large"]

    r = await http.get("/v1/nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"

    r = await http.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["message"]

    r = await http.post("/health")
    assert r.status_code == 405


# --- chat completions -------------------------------------------------------------------------


async def test_chat_non_stream_usage(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="any-model-name",
        messages=[
            {"role": "system", "content": "Be brief."},  # 9 chars
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hello there, "},  # 13 chars
                    {"type": "text", "text": "upstream!"},  # 9 chars
                ],
            },
        ],
        max_tokens=5,
    )
    assert resp.model == "any-model-name"
    assert resp.object == "chat.completion"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == " the fox and run sky"
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    # ceil(31 / 4) = 8
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (8, 5)
    assert resp.usage.total_tokens == 13


async def test_chat_default_length_and_max_completion_tokens(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.choices[0].message.content == completion_text(16)
    assert len(resp.choices[0].message.content or "") == 64
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (1, 16)

    resp = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=9,
        max_completion_tokens=2,
    )
    assert resp.choices[0].message.content == " the fox"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 2


async def test_chat_stream_with_include_usage(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Count to four, please."}]  # 22 chars
    full = await oai.chat.completions.create(model="m", messages=messages, max_tokens=4)
    stream = await oai.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert len(chunks) == 1 + 4 + 1 + 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.usage is None for c in chunks[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == full.choices[0].message.content == " the fox and run"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 5 + ["length"]

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (6, 4)
    assert last.usage.total_tokens == 10


async def test_chat_stream_without_usage(http: httpx.AsyncClient, oai: openai.AsyncOpenAI) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    stream = await oai.chat.completions.create(**body, max_tokens=3)
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " the fox and"

    r = await http.post("/v1/chat/completions", json={**body, "max_tokens": 3})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["transfer-encoding"] == "chunked"
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert len(data) == 1 + 3 + 1 + 1
    for item in data[:-1]:
        chunk = json.loads(item)
        assert "usage" not in chunk
        assert chunk["choices"][0]["logprobs"] is None


async def test_stream_is_one_http_chunk_per_sse_event(upstream: DemoUpstream) -> None:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    raw = await raw_exchange(
        upstream.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    status, headers, payload = split_response(raw)
    assert status == "HTTP/1.1 200 OK"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["connection"] == "close"
    chunks, rest = decode_chunked(payload)
    assert rest == b""
    # role, 2 tokens, finish, usage, [DONE]
    assert len(chunks) == 6
    for chunk in chunks:
        assert chunk.startswith(b"data: ")
        assert chunk.endswith(b"\n\n")
        assert chunk.count(b"\n\n") == 1
    assert chunks[-1] == b"data: [DONE]\n\n"
    usage = json.loads(chunks[-2][len(b"data: ") :])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_n_choices(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "abcdefgh"}]
    resp = await oai.chat.completions.create(model="m", messages=messages, n=2, max_tokens=3)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content == " the fox and" for c in resp.choices)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2, 6)

    stream = await oai.chat.completions.create(
        model="m",
        messages=messages,
        n=2,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    usage = None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert texts == {0: " the fox and", 1: " the fox and"}
    assert finish == {0: "length", 1: "length"}
    assert usage is not None
    assert usage.completion_tokens == 6


# --- completions, embeddings, responses -----------------------------------------------------


async def test_completions(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.completions.create(model="m", prompt="Say this is a test", max_tokens=3)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == " the fox and"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    # ceil(18 / 4) = 5
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 3)

    batch = await oai.completions.create(model="m", prompt=["abcd", "efghijkl"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage is not None
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (3, 4)

    stream = await oai.completions.create(
        model="m",
        prompt="Say this is a test",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " the fox and"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 8


async def test_embeddings(http: httpx.AsyncClient, oai: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 by default and decodes it.
    resp = await oai.embeddings.create(model="emb", input=["hello world", "abc"])
    assert resp.model == "emb"
    assert [d.index for d in resp.data] == [0, 1]
    vectors = [d.embedding for d in resp.data]
    assert all(len(v) == 8 for v in vectors)
    assert vectors[0] != vectors[1]
    assert resp.usage.prompt_tokens == 4  # ceil(14 / 4)
    assert resp.usage.total_tokens == 4

    r = await http.post("/v1/embeddings", json={"input": "hello world", "model": "emb"})
    floats = r.json()["data"][0]["embedding"]
    assert floats == pytest.approx(vectors[0], abs=1e-6)
    assert sum(v * v for v in floats) == pytest.approx(1.0, abs=1e-4)
    again = await http.post("/v1/embeddings", json={"input": "hello world"})
    assert again.json()["data"][0]["embedding"] == floats

    r = await http.post(
        "/v1/embeddings", json={"input": "x", "dimensions": 4, "encoding_format": "base64"}
    )
    decoded = struct.unpack("<4f", base64.b64decode(r.json()["data"][0]["embedding"]))
    assert len(decoded) == 4


async def test_responses_non_stream(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model="m", input="Tell me a story", max_output_tokens=6)
    assert resp.object == "response"
    assert resp.status == "completed"
    assert resp.model == "m"
    assert resp.output_text == completion_text(6)
    assert resp.usage is not None
    # ceil(15 / 4) = 4
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (4, 6)
    assert resp.usage.total_tokens == 10

    resp = await oai.responses.create(
        model="m",
        instructions="ijkl",
        input=[
            {"role": "user", "content": "abcd"},
            {"role": "user", "content": [{"type": "input_text", "text": "efgh"}]},
        ],
    )
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (3, 16)


async def test_responses_stream(http: httpx.AsyncClient, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="m", input="Tell me a story", max_output_tokens=3, stream=True
    )
    events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 3
    assert "response.output_text.done" in types
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == " the fox and"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed"
    usage = completed.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 3, 7)

    # The SDK's accumulating helper needs the item/part lifecycle events to be present.
    async with oai.responses.stream(model="m", input="abcd", max_output_tokens=2) as helper:
        final = await helper.get_final_response()
    assert final.output_text == " the fox"

    r = await http.post("/v1/responses", json={"input": "abcd", "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b]
    assert "[DONE]" not in r.text
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ")
        assert json.loads(data_line[len("data: ") :])["type"] == event_line[len("event: ") :]


# --- HTTP handling ----------------------------------------------------------------------------


async def test_chunked_request_body(http: httpx.AsyncClient, upstream: DemoUpstream) -> None:
    payload = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 2}
    ).encode()

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    r = await http.post("/v1/chat/completions", content=body())
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    seen = upstream.requests[-1]
    assert seen["headers"]["transfer-encoding"] == "chunked"
    assert seen["body"] == json.loads(payload)

    # Chunk extensions and trailers are legal and must be skipped.
    raw = await raw_exchange(
        upstream.port,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b'6;ext=1\r\n{"inpu\r\n'
        b'B\r\nt": "abcd"}\r\n'
        b"0\r\nx-trailer: 1\r\n\r\n",
    )
    status, _, body_bytes = split_response(raw)
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body_bytes)["usage"]["prompt_tokens"] == 1


async def test_keep_alive_pipelining_and_connection_close(upstream: DemoUpstream) -> None:
    raw = await raw_exchange(
        upstream.port,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    first, second = raw.split(b"HTTP/1.1 200 OK")[1:]
    assert b"connection: close" not in first
    assert b'{"status":"ok"}' in first
    assert b"connection: close" in second
    assert b"demo-large" in second


@pytest.mark.parametrize("extra", [b"", b"x-demo-chunk-delay-ms: 1\r\n"])
async def test_http10_stream_is_close_delimited(upstream: DemoUpstream, extra: bytes) -> None:
    body = b'{"prompt": "x", "stream": true, "max_tokens": 2}'
    raw = await raw_exchange(
        upstream.port,
        b"POST /v1/completions HTTP/1.0\r\nConnection: keep-alive\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (extra, len(body), body),
    )
    status, headers, payload = split_response(raw)
    assert status == "HTTP/1.1 200 OK"
    assert "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    data = sse_data(payload.decode())
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == " the fox"


async def test_expect_100_continue(upstream: DemoUpstream) -> None:
    body = b'{"input": "abcd"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
    try:
        writer.write(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_malformed_request_gets_400_and_server_survives(
    upstream: DemoUpstream, http: httpx.AsyncClient, request_bytes: bytes
) -> None:
    raw = await raw_exchange(upstream.port, request_bytes)
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    r = await http.get("/health")
    assert r.status_code == 200


async def test_bad_json_body_is_openai_400_and_connection_stays_usable(
    upstream: DemoUpstream,
) -> None:
    raw = await raw_exchange(
        upstream.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{bad}"
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, second = raw.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"400 ")
    error = json.loads(first.partition(b"\r\n\r\n")[2])
    assert error == {
        "error": {
            "message": error["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert second.startswith(b"200 ")


async def test_faulty_connection_does_not_disturb_a_running_stream(
    upstream: DemoUpstream, http: httpx.AsyncClient
) -> None:
    async def slow_stream() -> str:
        r = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 5},
            headers={"x-demo-chunk-delay-ms": "20"},
        )
        return r.text

    task = asyncio.create_task(slow_stream())
    await asyncio.sleep(0.03)
    raw = await raw_exchange(upstream.port, b"\x00\x01garbage\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    text = await task
    assert sse_data(text)[-1] == "[DONE]"
    assert "".join(
        json.loads(d)["choices"][0]["delta"].get("content", "") for d in sse_data(text)[:-1]
    ) == completion_text(5)


# --- header hooks -----------------------------------------------------------------------------


async def test_status_hook(oai: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.InternalServerError) as err:
        await oai.chat.completions.create(
            model="m", messages=messages, extra_headers={"x-demo-status": "500"}
        )
    assert err.value.status_code == 500
    assert isinstance(err.value.body, dict)
    assert err.value.body["type"] == "server_error"

    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(
            model="m", messages=messages, stream=True, extra_headers={"x-demo-status": "429"}
        )

    r = await http.post("/v1/responses", json={"input": "x"}, headers={"x-demo-status": "503"})
    assert r.status_code == 503
    assert "usage" not in r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def collect_chat_content(stream: Any, into: list[str]) -> None:
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            into.append(chunk.choices[0].delta.content)


async def test_abort_after_breaks_the_stream(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        stream=True,
        extra_headers={"x-demo-abort-after": "3"},
    )
    received: list[str] = []
    # SDK 1.x lets the transport error through, later ones wrap it in APIConnectionError.
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)) as err:
        await collect_chat_content(stream, received)
    cause = err.value.__cause__ if isinstance(err.value, openai.APIError) else err.value
    assert type(cause).__name__ == "RemoteProtocolError"
    assert "incomplete chunked read" in str(cause)
    assert "".join(received) == " the fox and"

    # The Responses stream counts its delta events the same way.
    async with http.stream(
        "POST",
        "/v1/responses",
        json={"input": "x", "stream": True},
        headers={"x-demo-abort-after": "1"},
    ) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await r.aread()

    r = await http.get("/health")
    assert r.status_code == 200


async def test_no_usage_hook(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    no_usage = {"x-demo-no-usage": "1"}
    resp = await oai.chat.completions.create(
        model="m", messages=messages, max_tokens=2, extra_headers=no_usage
    )
    assert resp.usage is None
    assert resp.choices[0].message.content == " the fox"

    stream = await oai.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=no_usage,
    )
    chunks = [c async for c in stream]
    assert all(c.usage is None and c.choices for c in chunks)

    responses = await oai.responses.create(model="m", input="x", extra_headers=no_usage)
    assert responses.usage is None


async def test_tokens_hook(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    over = await oai.chat.completions.create(
        model="m", messages=messages, max_tokens=3, extra_headers={"x-demo-tokens": "7"}
    )
    assert over.choices[0].message.content == completion_text(7)
    assert over.choices[0].finish_reason == "length"
    assert over.usage is not None
    assert over.usage.completion_tokens == 7

    under = await oai.chat.completions.create(
        model="m", messages=messages, max_tokens=10, extra_headers={"x-demo-tokens": "2"}
    )
    assert under.choices[0].finish_reason == "stop"
    assert under.usage is not None
    assert under.usage.completion_tokens == 2


async def test_chunk_delay(http: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 3}
    start = time.monotonic()
    r = await http.post("/v1/chat/completions", json=body, headers={"x-demo-chunk-delay-ms": "40"})
    elapsed = time.monotonic() - start
    # role, three tokens and finish are each followed by a 40 ms pause
    assert elapsed >= 0.18
    assert sse_data(r.text)[-1] == "[DONE]"

    async with (
        DemoUpstream(chunk_delay_s=0.04) as slow,
        httpx.AsyncClient(base_url=slow.url, timeout=10) as client,
    ):
        start = time.monotonic()
        r = await client.post("/v1/chat/completions", json=body)
        assert time.monotonic() - start >= 0.18
        assert len(sse_data(r.text)) == 6


async def test_demo_requests_records_and_clears(
    http: httpx.AsyncClient, oai: openai.AsyncOpenAI
) -> None:
    await oai.chat.completions.create(
        model="recorded",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Custom-Thing": "abc"},
    )
    await http.post("/v1/embeddings?trace=1", content=b"not json at all")
    await http.get("/health")

    seen = (await http.get("/demo/requests")).json()
    assert [(s["method"], s["path"]) for s in seen] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
    ]
    chat, embed = seen
    assert chat["headers"]["x-custom-thing"] == "abc"
    assert chat["headers"]["authorization"] == "Bearer x"
    assert chat["body"]["model"] == "recorded"
    assert chat["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert embed["body"] == "not json at all"
    assert embed["query"] == "trace=1"

    r = await http.delete("/demo/requests")
    assert r.json() == {"deleted": 2}
    assert (await http.get("/demo/requests")).json() == []


# --- entry points -----------------------------------------------------------------------------


async def test_serve_until_cancelled() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = asyncio.Event()
    task = asyncio.create_task(serve("127.0.0.1", port, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{port}/health")
            assert r.status_code == 200
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_main_prints_ready_line_and_exits_cleanly(sig: signal.Signals) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "atlas.demo_upstream",
        "--port",
        "0",
        "--chunk-delay-ms",
        "1",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        prefix = "demo-upstream listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        port = int(line[len(prefix) :])
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{port}/health")
            assert r.status_code == 200
        proc.send_signal(sig)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

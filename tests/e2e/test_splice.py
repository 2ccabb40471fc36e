"""Streams Atlas asks for usage without an ext_proc stream (ProcMode.SPLICE, issue 12): Envoy's
Lua filter (envoy/stream_splice.lua) appends `stream_options.include_usage` to the request,
cuts the usage-only chunk out of the response and lifts its usage for the access log, which
extproc settles from. Served by an upstream of our own that shapes its stream the ways real
ones (and hostile ones) do: events split across reads, CRLF line ends, no usage at all, an
error, a slow stream the client hangs up on. Everything through the real Envoy, with the
openai SDK where a client would use it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.ports import free_port
from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens, tokens_for_chars
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import extproc_messages, settled

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
BODY = {"model": "m", "messages": MESSAGES, "stream": True}
PROMPT = estimate_prompt_tokens(BODY)
INJECTED = b',"stream_options":{"include_usage":true}'
#: What the upstream reports (its own counts: what Atlas must charge, exactly).
USAGE = {
    "prompt_tokens": 13,
    "completion_tokens": 6,
    "total_tokens": 19,
    "prompt_tokens_details": {"cached_tokens": 0},
}
WORDS = ["Foxes", " are", " small", " wild", " canids", "."]
#: Generated text per shape: one event bigger than the script holds back, and text that
#: spells a usage chunk (JSON-escaped inside its string, so it must not be cut).
SHAPE_WORDS = {
    "big": [*WORDS, " " + "a" * 100_000],
    "tricky": [*WORDS, ' "usage": {"prompt_tokens": 1}, "choices": []\n\ndata: x'],
}


def _events(shape: str, asked: bool) -> list[bytes]:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    extra = {"usage": None} if asked else {}
    out = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant"}}], **extra}]
    out += [
        {**head, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}], **extra}
        for w in SHAPE_WORDS.get(shape, WORDS)
    ]
    out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra})
    if asked and shape != "silent":
        out.append({**head, "choices": [], "usage": USAGE})
    end = b"\r\n\r\n" if shape == "crlf" else b"\n\n"
    return [b"data: " + json.dumps(e).encode() + end for e in out] + [b"data: [DONE]" + end]


class Upstream:
    """HTTP/1.1 keep-alive. `x-shape` picks the stream: normal, split (every event in three
    reads, the usage chunk cut inside its JSON), crlf, big and tricky (SHAPE_WORDS), silent
    (ignores include_usage), json (ignores `stream`), error, slow (20 ms between events).
    Records each request's headers and body."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)
                }
                if headers.get("transfer-encoding") == "chunked":
                    body = b""
                    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readuntil(b"\r\n")
                else:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append((headers, body))
                await self._answer(writer, headers.get("x-shape", "normal"), json.loads(body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, shape: str, req: dict[str, Any]) -> None:
        if shape == "json":  # an upstream that ignores `stream`
            message = {"role": "assistant", "content": "".join(WORDS)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            answer = {"id": "c1", "object": "chat.completion", "choices": [choice], "usage": USAGE}
            body = json.dumps(answer).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            return
        if shape == "error":
            body = b'{"error": {"message": "overloaded", "type": "server_error"}}'
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            return
        asked = (req.get("stream_options") or {}).get("include_usage") is True
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for event in _events(shape, asked):
            if shape == "split":
                cut = event.find(b'"usage": {') + 5 if b'"usage": {' in event else len(event) // 2
                pieces = [event[:7], event[7:cut], event[cut:]]
            else:
                pieces = [event]
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                if shape in ("split", "slow"):
                    await asyncio.sleep(0.02 if shape == "slow" else 0.005)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    up = Upstream()
    port = free_port()
    server = await asyncio.start_server(up.serve, "127.0.0.1", port)
    try:
        yield up, port
    finally:
        server.close()
        await server.wait_closed()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def spliced(upstream: tuple[Upstream, int]) -> AsyncIterator[Stack]:
    async with running_stack(upstream=f"http://127.0.0.1:{upstream[1]}") as st:
        yield st


async def _key(st: Stack) -> tuple[str, str]:
    async with httpx.AsyncClient(
        base_url=st.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        r = await admin.post("/v1/admin/keys", json={"name": "splice", "daily_limit": 100_000})
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["api_key"]


async def _used(st: Stack, key_id: str) -> int:
    async with httpx.AsyncClient(
        base_url=st.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        used: int = (await settled(admin, key_id))["daily"]["used"]
        return used


def _client(st: Stack, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=st.proxy_url + "/v1", api_key=secret, max_retries=0)


async def _create(
    client: openai.AsyncOpenAI, shape: str, max_tokens: int | openai.NotGiven = openai.NOT_GIVEN
) -> Any:
    """A chat completion stream the upstream shapes as `shape`."""
    return await client.chat.completions.create(
        model="m",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        max_tokens=max_tokens,
        extra_headers={"x-shape": shape},
    )


async def _stream(st: Stack, secret: str, shape: str) -> list[Any]:
    client = _client(st, secret)
    try:
        return [c async for c in await _create(client, shape)]
    finally:
        await client.close()


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_streams_are_spliced_by_envoy_and_charged_the_upstreams_usage(
    spliced: Stack, upstream: tuple[Upstream, int]
) -> None:
    """Whole events, events cut across reads (the usage chunk inside its JSON), CRLF line
    ends, a 100 kB event and text that spells a usage chunk: the client gets every word and
    never the usage chunk; the upstream got the
    client's body with include_usage appended (and a matching Content-Length); the charge is
    the upstream's usage; not one ext_proc message."""
    up, _ = upstream
    key_id, secret = await _key(spliced)
    before = await extproc_messages(spliced)
    for n, shape in enumerate(("normal", "split", "crlf", "big", "tricky"), start=1):
        chunks = await _stream(spliced, secret, shape)
        assert _text(chunks) == "".join(SHAPE_WORDS.get(shape, WORDS)), shape
        assert all(c.choices and c.usage is None for c in chunks), shape
        headers, body = up.seen[-1]
        assert body.endswith(INJECTED + b"}") and int(headers["content-length"]) == len(body)
        assert json.loads(body)["stream_options"] == {"include_usage": True}
        assert await _used(spliced, key_id) == n * USAGE["total_tokens"], shape
    assert await extproc_messages(spliced) == before


async def test_the_body_passes_byte_for_byte_but_for_the_appended_member(
    spliced: Stack, upstream: tuple[Upstream, int]
) -> None:
    up, _ = upstream
    _, secret = await _key(spliced)
    raw = (
        '\n {"model": "m", "stream": true, "messages": [{"role": "user", "content": '
        '"F\u00fcchse \u72d0 \\"quoted\\" \\ud83e\\udd8a"}]}\r\n\t '
    ).encode()
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            spliced.proxy_url + "/v1/chat/completions", content=raw, headers=headers
        )
    assert r.status_code == 200 and b'"usage": {' not in r.content
    close = raw.rindex(b"}")
    assert up.seen[-1][1] == raw[:close] + INJECTED + raw[close:]


async def test_an_upstream_ignoring_include_usage_is_charged_what_it_streamed(
    spliced: Stack,
) -> None:
    """No usage chunk (an upstream that ignores stream_options): charged authz's prompt
    estimate and the text it streamed, never fewer than a token per event of text."""
    key_id, secret = await _key(spliced)
    chunks = await _stream(spliced, secret, "silent")
    assert _text(chunks) == "".join(WORDS)
    chars = sum(len(w) for w in WORDS)
    assert await _used(spliced, key_id) == PROMPT + max(len(WORDS), tokens_for_chars(chars))


async def test_an_upstream_answering_json_to_a_stream_is_charged_its_usage(
    spliced: Stack,
) -> None:
    """An upstream that ignores `stream: true` answers one JSON completion: it passes as it
    came and its usage is lifted all the same (never charged the prompt alone)."""
    key_id, secret = await _key(spliced)
    headers = {"authorization": f"Bearer {secret}", "x-shape": "json"}
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(spliced.proxy_url + "/v1/chat/completions", json=BODY, headers=headers)
    assert r.status_code == 200 and r.json()["usage"] == USAGE
    assert await _used(spliced, key_id) == USAGE["total_tokens"]


async def test_an_upstream_error_is_refunded(spliced: Stack) -> None:
    key_id, secret = await _key(spliced)
    client = _client(spliced, secret)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await _create(client, "error")
        assert info.value.status_code == 500
    finally:
        await client.close()
    assert await _used(spliced, key_id) == 0


async def test_a_client_hanging_up_is_charged_what_reached_it_not_the_reservation(
    spliced: Stack,
) -> None:
    """Cut before the usage chunk: the prompt estimate and the events of text Envoy passed on
    (a running count in the access log's metadata), far below max_tokens' reservation."""
    key_id, secret = await _key(spliced)
    client = _client(spliced, secret)
    try:
        stream = await _create(client, "slow", max_tokens=1000)
        words = 0
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                words += 1
                if words == 2:
                    break
        await stream.close()
    finally:
        await client.close()
    used = await _used(spliced, key_id)
    assert PROMPT + 2 <= used <= PROMPT + len(WORDS), used


async def test_bodies_the_script_cannot_append_to_go_through_extprocs_rewrite(
    spliced: Stack, upstream: tuple[Upstream, int]
) -> None:
    """A chunked request (no Content-Length) and a client's own stream_options: extproc
    rewrites them (ext_proc messages), the usage chunk is still cut, the charge exact."""
    up, _ = upstream
    key_id, secret = await _key(spliced)
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    own = {**BODY, "stream_options": {"include_usage": False}}

    async def chunked() -> AsyncIterator[bytes]:
        yield json.dumps(BODY).encode()

    before = await extproc_messages(spliced)
    async with httpx.AsyncClient(base_url=spliced.proxy_url, headers=headers, timeout=10) as http:
        for n, content in enumerate((chunked(), json.dumps(own).encode()), start=1):
            r = await http.post("/v1/chat/completions", content=content)
            assert r.status_code == 200 and b'"usage": {' not in r.content
            assert json.loads(up.seen[-1][1])["stream_options"]["include_usage"] is True
            assert await _used(spliced, key_id) == n * USAGE["total_tokens"]
    assert await extproc_messages(spliced) > before

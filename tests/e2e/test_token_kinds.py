"""Cached and reasoning tokens through the real Envoy: an upstream that reports them (as
OpenAI does, in `*_tokens_details`) is settled with them on both settlement paths, the access
log's (json_to_metadata lifting the nested details) and ext_proc's (a stream), and priced."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest_asyncio

from atlas.local.ports import free_port
from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import settled

MODEL = "reasoner"
#: USD per 1M tokens = micro-USD per token.
PRICES = {MODEL: {"prompt": 2, "completion": 8, "cached_prompt": 0.5, "reasoning": 4}}
CHAT_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 50,
    "total_tokens": 170,
    "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 30, "audio_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 40,
    "input_tokens_details": {"cached_tokens": 32},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 8},
    "total_tokens": 52,
}


def _chat(usage: dict[str, object]) -> dict[str, object]:
    message = {"role": "assistant", "content": "Foxes."}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": usage,
    }


def _response(usage: dict[str, object]) -> dict[str, object]:
    text = {"type": "output_text", "text": "Foxes.", "annotations": []}
    item = {"type": "message", "id": "m1", "role": "assistant", "status": "completed"}
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": MODEL,
        "status": "completed",
        "output": [{**item, "content": [text]}],
        "usage": usage,
    }


def _stream() -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    delta = {"index": 0, "delta": {"content": "Foxes."}, "finish_reason": "stop"}
    events = [
        {**chunk, "choices": [delta]},
        {**chunk, "choices": [], "usage": CHAT_USAGE},
    ]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: JSON with a Content-Length, streams chunked."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = next(
                (
                    int(v)
                    for k, _, v in (ln.partition(":") for ln in lines[1:])
                    if k.strip().lower() == "content-length"
                ),
                0,
            )
            request = json.loads(await reader.readexactly(length) or b"{}")
            if request.get("stream"):
                body = _stream()
                chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + chunked
                )
            else:
                answer = (
                    _response(RESPONSES_USAGE) if path.endswith("/responses") else _chat(CHAT_USAGE)
                )
                body = json.dumps(answer).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def kinds_stack() -> AsyncIterator[Stack]:
    port = free_port()
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    try:
        async with running_stack(upstream=f"http://127.0.0.1:{port}", model_prices=PRICES) as s:
            yield s
    finally:
        server.close()
        await server.wait_closed()


async def test_cached_and_reasoning_tokens_are_settled_on_both_paths(kinds_stack: Stack) -> None:
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=kinds_stack.admin_url, headers=auth, timeout=10) as admin:
        r = await admin.post("/v1/admin/keys", json={"name": "kinds", "daily_limit": 100_000})
        assert r.status_code == 201, r.text
        key = r.json()
        client = openai.AsyncOpenAI(
            base_url=kinds_stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
        )
        try:
            messages = [{"role": "user", "content": "Tell me about foxes."}]
            plain = await client.chat.completions.create(model=MODEL, messages=messages)
            assert plain.usage is not None and plain.usage.prompt_tokens_details is not None
            assert plain.usage.prompt_tokens_details.cached_tokens == 100
            answer = await client.responses.create(model=MODEL, input="Tell me about foxes.")
            assert answer.usage is not None and answer.usage.input_tokens == 40
            # Spliced (Envoy's Lua filter reads the usage), then read by extproc (the client
            # asks for usage itself).
            for options in (None, {"include_usage": True}):
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    stream=True,
                    stream_options=options if options else openai.NOT_GIVEN,
                )
                async for _ in stream:
                    pass
        finally:
            await client.close()
        u = await settled(admin, key["id"])
        day = u["daily"]
        assert day["requests"] == 4
        assert day["used"] == 3 * 170 + 52  # cached tokens count toward the quota
        assert (day["cached"], day["reasoning"], day["cache_write"]) == (3 * 100 + 32, 98, 0)
        chat_micros = 20 * 2 + 100 * 0.5 + 20 * 8 + 30 * 4
        responses_micros = 8 * 2 + 32 * 0.5 + 4 * 8 + 8 * 4
        assert u["monthly"]["spend_usd"] == round((3 * chat_micros + responses_micros) / 1e6, 6)
        hour = (await admin.get(f"/v1/admin/keys/{key['id']}/history?hours=1")).json()["hours"]
        assert (hour[0]["cached"], hour[0]["reasoning"]) == (332, 98)
    # The two JSON answers and the spliced stream were settled from the access log
    # (json_to_metadata's details, the Lua filter's).
    port = kinds_stack.settings.extproc_metrics_port
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    assert 'atlas_decisions_total{decision="access_log_settled",service="extproc"} 3.0' in text
    for kind, n in (("cached", 332), ("reasoning", 98)):
        labels = f'key_id="{key["id"]}",kind="{kind}",model="{MODEL}"'
        assert f"atlas_tokens_used_total{{{labels}}} {n}.0" in text

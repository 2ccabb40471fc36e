"""Opt-in stream fast path (issue 12): with ATLAS_STREAM_USAGE_FROM_ENVOY a stream whose client
asked for usage opens no ext_proc stream. Envoy 1.40's sse_to_metadata lifts the last usage
into dynamic metadata and the gRPC access log carries it to extproc, which settles it; streams
Atlas asks for usage are spliced by Envoy's Lua filter (tests/e2e/test_splice.py), opt-in or
not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import extproc_messages, settled

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
PROMPT = estimate_prompt_tokens({"model": "demo-small", "messages": MESSAGES})
USAGE = {"include_usage": True}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sse_stack() -> AsyncIterator[Stack]:
    async with running_stack(stream_usage_from_envoy=True) as st:
        yield st


@pytest_asyncio.fixture(loop_scope="session")
async def sse_admin(sse_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sse_stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as c:
        yield c


async def _key(admin: httpx.AsyncClient) -> tuple[dict[str, Any], Any]:
    r = await admin.post("/v1/admin/keys", json={"name": "sse", "rate_per_sec": 50, "burst": 50})
    assert r.status_code == 201, r.text
    return r.json(), r.json()["api_key"]


def _client(st: Stack, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=st.proxy_url + "/v1", api_key=secret, max_retries=0)


async def test_a_stream_asking_for_usage_opens_no_ext_proc_stream_and_settles_exactly(
    sse_stack: Stack, sse_admin: httpx.AsyncClient
) -> None:
    key, secret = await _key(sse_admin)
    before = await extproc_messages(sse_stack)
    reported = 0
    async with _client(sse_stack, secret) as client:
        for max_tokens in (5, 17, 40):
            stream = await client.chat.completions.create(
                model="demo-small",
                messages=MESSAGES,
                max_tokens=max_tokens,
                stream=True,
                stream_options=USAGE,
            )
            chunks = [c async for c in stream]
            usage = chunks[-1].usage
            assert chunks[-1].choices == [] and usage is not None
            assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT, max_tokens)
            reported += usage.total_tokens
    u = await settled(sse_admin, key["id"])
    assert u["daily"]["used"] == reported  # the upstream's own usage, exactly
    assert u["daily"]["requests"] == 3
    assert await extproc_messages(sse_stack) == before  # not one ext_proc message


async def test_a_stream_without_include_usage_is_spliced_without_ext_proc(
    sse_stack: Stack, sse_admin: httpx.AsyncClient
) -> None:
    """Atlas injects include_usage and strips the chunk: Envoy's Lua filter does both."""
    key, secret = await _key(sse_admin)
    before = await extproc_messages(sse_stack)
    async with _client(sse_stack, secret) as client:
        stream = await client.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=9, stream=True
        )
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert (await settled(sse_admin, key["id"]))["daily"]["used"] == PROMPT + 9
    assert await extproc_messages(sse_stack) == before


async def test_a_stream_without_usage_is_charged_its_reservation(
    sse_stack: Stack, sse_admin: httpx.AsyncClient
) -> None:
    """Envoy saw no token counts: a client hanging up before the usage chunk, an upstream that
    ignores include_usage or one that drops the connection mid-stream is charged what it
    reserved (never less), and nothing stays reserved."""
    key, secret = await _key(sse_admin)
    async with _client(sse_stack, secret) as client:
        stream = await client.chat.completions.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=200,
            stream=True,
            stream_options=USAGE,
            extra_headers={"x-demo-chunk-delay-ms": "10"},
        )
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 5:
                break
        await stream.close()
        hung_up = (await settled(sse_admin, key["id"]))["daily"]["used"]
        stream = await client.chat.completions.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=30,
            stream=True,
            stream_options=USAGE,
            extra_headers={"x-demo-no-usage": "1"},
        )
        chunks = [c async for c in stream]
        no_usage = (await settled(sse_admin, key["id"]))["daily"]["used"] - hung_up
        stream = await client.chat.completions.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=40,
            stream=True,
            stream_options=USAGE,
            extra_headers={"x-demo-abort-after": "3"},  # the upstream drops the connection
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    assert chunks and all(c.usage is None for c in chunks)
    assert (hung_up, no_usage) == (PROMPT + 200, PROMPT + 30)
    u = await settled(sse_admin, key["id"])
    assert u["daily"]["used"] == hung_up + no_usage + PROMPT + 40
    assert u["daily"]["requests"] == 3


async def test_an_upstream_error_on_a_stream_is_refunded(
    sse_stack: Stack, sse_admin: httpx.AsyncClient
) -> None:
    key, secret = await _key(sse_admin)
    async with _client(sse_stack, secret) as client:
        try:
            await client.chat.completions.create(
                model="demo-small",
                messages=MESSAGES,
                max_tokens=50,
                stream=True,
                stream_options=USAGE,
                extra_headers={"x-demo-status": "500"},
            )
        except openai.InternalServerError:
            pass
        else:
            raise AssertionError("expected a 500")
    u = await settled(sse_admin, key["id"])
    assert u["daily"]["used"] == 0 and u["daily"]["requests"] == 1

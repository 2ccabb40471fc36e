"""JSON responses of any size through the real Envoy: the client gets every byte, and the
settlement is the upstream's usage (read at the end of the body) or a conservative estimate
from the bytes that passed, never the prompt alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from tests.e2e.conftest import MakeKey, running_stack
from tests.e2e.helpers import settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
#: The demo's text is 4 characters a token; sizes around extproc's and Envoy's limits:
#: 4 MiB (BUFFERED when the length is known), 9 MiB (Envoy's buffer), 16 MiB (old copy limit).
SIZES = {"1MiB": 1 * MiB, "4MiB": 4 * MiB - 4096, "11.5MB": 11_500_000, "18MB": 18_000_000}
#: "skipped": extproc needs neither the request body nor the response headers (the body's
#: size is unknown to it); "seen": a clamped max_tokens makes it rewrite the request and see
#: the response's Content-Length (BUFFERED up to 4 MiB, STREAMED beyond).
DAILY_LIMIT = {"skipped": 10**12, "seen": 1000}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack() -> AsyncIterator[Stack]:
    """This module's stack (conftest's admin and make_key use it): clamping on."""
    async with running_stack(clamp_max_tokens=True) as the_stack:
        yield the_stack


async def _complete(
    stack: Stack, key: dict[str, object], tokens: int, *, usage: bool = True
) -> httpx.Response:
    headers = {
        "authorization": f"Bearer {key['api_key']}",
        "x-demo-json-tokens": str(tokens),
    }
    if not usage:
        headers["x-demo-no-usage"] = "1"
    body = {
        "model": "demo-small",
        "max_tokens": 4000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            stack.proxy_url + "/v1/chat/completions", json=body, headers=headers
        )


@pytest.mark.parametrize("path", sorted(DAILY_LIMIT))
@pytest.mark.parametrize("size", list(SIZES))
async def test_big_json_completion_is_delivered_and_charged_its_usage(
    make_key: MakeKey, stack: Stack, admin: httpx.AsyncClient, size: str, path: str
) -> None:
    key = await make_key(daily_limit=DAILY_LIMIT[path], monthly_limit=10**12)
    tokens = SIZES[size] // 4
    r = await _complete(stack, key, tokens)
    assert r.status_code == 200
    data = r.json()  # every byte arrived: the JSON is whole
    assert len(data["choices"][0]["message"]["content"]) == 4 * tokens
    usage = data["usage"]
    u = await settled(admin, str(key["id"]))
    assert u["daily"]["used"] == usage["total_tokens"]
    assert usage["completion_tokens"] == tokens


async def test_big_json_completion_without_usage_is_estimated_from_its_bytes(
    make_key: MakeKey, stack: Stack, admin: httpx.AsyncClient
) -> None:
    key = await make_key(daily_limit=10**12, monthly_limit=10**12)
    tokens = SIZES["18MB"] // 4
    r = await _complete(stack, key, tokens, usage=False)
    assert r.status_code == 200 and "usage" not in r.json()
    u = await settled(admin, str(key["id"]))
    # Too big to keep: extproc takes the tokens per byte of the text in the body's first
    # bytes over all of it. The body is one uniform text (one cl100k token per 4 characters)
    # plus ~260 bytes of JSON, so that rate never falls short of the truth and the JSON adds a
    # few dozen tokens at most (the prompt, "hi", is 8).
    assert tokens <= u["daily"]["used"] <= tokens + 1000

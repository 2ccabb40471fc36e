"""Reservations through the real Envoy: a request Envoy never sends on is released after the
claim timeout and charged nothing; a stream longer than the reservation TTL keeps its
reservation (and its max_concurrent slot) until it ends, then settles exactly."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from atlas.ledger import keys
from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import charged_vs_window, send_and_reset, settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: 13 prompt tokens with cl100k: 6 of text, 3 for the message, 1 for the role, 3 priming.
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
#: authz's estimate of MESSAGES (what a reservation holds for the prompt); for text this short
#: it is also exactly what the demo upstream reports (cl100k with OpenAI's chat frame).
PROMPT = estimate_prompt_tokens({"model": "m", "messages": MESSAGES})
CLAIM_TIMEOUT_S = 1.0
TTL_S = 2
REAP_INTERVAL_S = 0.3


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def short_lived() -> AsyncIterator[Stack]:
    async with running_stack(
        claim_timeout_s=CLAIM_TIMEOUT_S, reservation_ttl_s=TTL_S, reap_interval_s=REAP_INTERVAL_S
    ) as stack:
        yield stack


@pytest_asyncio.fixture(loop_scope="session")
async def admin(short_lived: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=short_lived.admin_url,
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    ) as client:
        yield client


async def new_key(admin: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"name": "lifecycle", "rate_per_sec": 1000, "burst": 1000, **fields}
    r = await admin.post("/v1/admin/keys", json=body)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def hour_fields(stack: Stack, key_id: str) -> dict[str, int]:
    """Today's hourly history of a key, summed (abandoned, reaped, requests, ...)."""
    r = aioredis.Redis.from_url(stack.settings.redis_url, decode_responses=True)
    try:
        out: dict[str, int] = {}
        async for name in r.scan_iter(match=f"{keys.window_prefix(key_id)}h:*"):
            for f, v in (await r.hgetall(name)).items():
                out[f] = out.get(f, 0) + int(v)
        return out
    finally:
        await r.aclose()


async def test_requests_reset_right_after_sending_are_released_and_charged_only_if_served(
    short_lived: Stack, admin: httpx.AsyncClient
) -> None:
    key = await new_key(admin)
    model = f"rst-{key['id']}"
    fields = {"model": model, "messages": MESSAGES, "max_tokens": 50}
    reservation = estimate_prompt_tokens(fields) + 50
    body = json.dumps(fields).encode()
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: atlas\r\n"
        f"authorization: Bearer {key['api_key']}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    attempts = 40
    port = short_lived.settings.proxy_port
    for i in range(attempts):  # resets 0-3 ms after the request is written
        await send_and_reset(port, request, after_s=(i % 4) / 1000)
    started = time.monotonic()
    u = await settled(admin, key["id"], timeout_s=CLAIM_TIMEOUT_S + 5 * REAP_INTERVAL_S + 5)
    assert time.monotonic() - started < TTL_S + 5  # released by the claim bound, not the TTL
    h = await hour_fields(short_lived, key["id"])
    async with httpx.AsyncClient() as up:
        seen = (await up.get(short_lived.upstream_url + "/demo/requests")).json()
    served = sum(1 for r in seen if isinstance(r["body"], dict) and r["body"].get("model") == model)
    admitted = u["daily"]["requests"]
    # Every admitted request was settled (by its access-log entry), or abandoned: the
    # upstream never got it, or authz saw Envoy close the Check's connection before its
    # answer. One race is left: an answer written just as Envoy gave up reaches nobody, and
    # that reservation (claimed at admission, so a lost entry is never charged less) is
    # reaped charged. It stays rare and bounded.
    reaped = h.get("reaped", 0) - h.get("abandoned", 0)  # `reaped` counts abandoned ones too
    assert h.get("abandoned", 0) >= 1, h
    assert h.get("requests", 0) + h.get("abandoned", 0) + reaped == admitted, h
    assert reaped <= max(1, admitted // 8), h
    assert h.get("reaped_tokens", 0) == reservation * reaped, h  # at most its own reservation
    charged, window = await charged_vs_window(short_lived.settings.redis_url, key["id"])
    assert charged == u["daily"]["used"] == int(window.get("used", 0))
    # Abandoned requests cost nothing; those the upstream answered at most the prompt + 50;
    # those extproc saw but that got no answer (reset while Envoy forwarded them) their prompt
    # only.
    unanswered = h.get("requests", 0) - served
    assert unanswered >= 0, (h, served)
    assert u["daily"]["used"] <= served * (PROMPT + 50) + unanswered * PROMPT + reservation * reaped


#: A stream of this many tokens, one every SLOW_DELAY_MS: ~3.6 s, longer than the 2 s TTL
#: plus a reap pass.
SLOW_TOKENS, SLOW_DELAY_MS = 12, 300


def _client(stack: Stack, key: dict[str, Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0, timeout=30
    )


async def _slow_stream(c: openai.AsyncOpenAI, options: Any) -> Any:
    """A stream longer than the reservation TTL, with `stream_options` (or NOT_GIVEN)."""
    return await c.chat.completions.create(
        model="m",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=SLOW_TOKENS,
        stream=True,
        stream_options=options,
        extra_headers={"x-demo-chunk-delay-ms": str(SLOW_DELAY_MS)},
    )


async def test_a_stream_longer_than_the_ttl_keeps_its_reservation_and_settles_exactly(
    short_lived: Stack, admin: httpx.AsyncClient
) -> None:
    key = await new_key(admin, max_concurrent=1)
    c = _client(short_lived, key)
    try:
        tokens = SLOW_TOKENS
        # The client asks for usage: an ext_proc stream reads it and renews its lease (the
        # next test: a stream Envoy settles has none).
        stream = await _slow_stream(c, {"include_usage": True})
        started = time.monotonic()
        checked = False
        received = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if not checked and time.monotonic() - started > TTL_S + 3 * REAP_INTERVAL_S:
                checked = True
                r = await admin.get(f"/v1/admin/keys/{key['id']}/usage")
                u = r.json()
                assert (u["open_reservations"], u["daily"]["reserved"]) == (1, PROMPT + tokens), u
                with pytest.raises(openai.RateLimitError):  # the max_concurrent slot is held
                    await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
        assert checked and received == tokens
        u = await settled(admin, key["id"])
        assert u["daily"]["used"] == PROMPT + tokens  # exactly the usage, not the reservation
        h = await hour_fields(short_lived, key["id"])
        assert h.get("reaped", 0) == 0 and h.get("abandoned", 0) == 0, h
    finally:
        await c.close()


async def test_a_spliced_stream_longer_than_the_ttl_is_reaped_then_charged_exactly(
    short_lived: Stack, admin: httpx.AsyncClient
) -> None:
    """A stream Envoy settles from its access log (ProcMode.SPLICE) has no lease to renew: the
    TTL is its deadline. Past it the reaper charges what it reserved and frees its slot; its
    access-log entry then corrects the charge to the upstream's usage (a late settlement)."""
    key = await new_key(admin, max_concurrent=1)
    c = _client(short_lived, key)
    try:
        tokens = SLOW_TOKENS
        stream = await _slow_stream(c, openai.NOT_GIVEN)
        chunks = [chunk async for chunk in stream]
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == tokens
        assert all(ch.usage is None for ch in chunks)  # the usage Atlas asked for is cut out
        deadline = time.monotonic() + 10
        while True:
            u = await settled(admin, key["id"])
            if u["daily"]["used"] == PROMPT + tokens:
                break
            assert time.monotonic() < deadline, u
            await asyncio.sleep(0.05)
        assert (await hour_fields(short_lived, key["id"])).get("reaped", 0) == 1
    finally:
        await c.close()

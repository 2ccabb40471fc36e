"""Stack-wide modes through the real Envoy: clamping max_tokens and global shadow mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import ADMIN_TOKEN, running_stack

#: 13 prompt tokens with cl100k: 6 of text, 3 for the message, 1 for the role, 3 priming.
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


#: $0.001 a token: budgets in cents are a few dozen tokens.
PRICES = {"*": {"prompt": 1000.0, "completion": 1000.0}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def modes_stack() -> AsyncIterator[Stack]:
    async with running_stack(clamp_max_tokens=True, model_prices=PRICES) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shadow_stack() -> AsyncIterator[Stack]:
    async with running_stack(shadow_mode=True) as s:
        yield s


async def test_clamp_lowers_max_tokens_so_the_quota_is_never_overshot(
    modes_stack: Stack,
) -> None:
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=modes_stack.admin_url, headers=auth) as admin:
        key = (
            await admin.post(
                "/v1/admin/keys", json={"name": "clamp", "daily_limit": 100, "priority": "high"}
            )
        ).json()
        client = openai.AsyncOpenAI(
            base_url=modes_stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
        )
        try:
            first = await client.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=60
            )
            deadline = time.monotonic() + 5
            while (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()[
                "open_reservations"
            ]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            # 13 + 60 used: 27 left, so max_tokens=60 is clamped to 27 - 13 (prompt) = 14.
            second = await client.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=60
            )
        finally:
            await client.close()
        assert first.usage is not None and first.usage.completion_tokens == 60
        body = {"model": "demo-small", "messages": MESSAGES, "max_tokens": 60}
        prompt = estimate_prompt_tokens(body)  # what authz reserves for the second prompt
        clamped = 100 - first.usage.total_tokens - prompt
        assert 0 < clamped < 60
        assert second.usage is not None and second.usage.completion_tokens == clamped
        assert second.choices[0].finish_reason == "length"
        while (u := (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json())[
            "open_reservations"
        ]:
            await asyncio.sleep(0.02)
        assert u["daily"]["used"] == first.usage.total_tokens + second.usage.total_tokens
        # Exactly the quota: the clamp's prompt estimate is the upstream's count for this text.
        assert second.usage.prompt_tokens == prompt and u["daily"]["used"] == 100


async def test_global_shadow_mode_admits_what_it_would_refuse(shadow_stack: Stack) -> None:
    client = openai.AsyncOpenAI(
        base_url=shadow_stack.proxy_url + "/v1", api_key="sk-atlas-not-a-real-key", max_retries=0
    )
    try:
        got = await client.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=3
        )
    finally:
        await client.close()
    assert got.usage is not None and got.usage.completion_tokens == 3
    port = shadow_stack.settings.authz_metrics_port
    async with httpx.AsyncClient() as raw:
        text = (await raw.get(f"http://127.0.0.1:{port}/metrics")).text
    assert 'decision="shadow_invalid_api_key"' in text


async def test_monthly_budget_in_dollars_is_enforced_like_a_quota(modes_stack: Stack) -> None:
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=modes_stack.admin_url, headers=auth) as admin:
        key = (
            await admin.post("/v1/admin/keys", json={"name": "budget", "monthly_budget_usd": 0.05})
        ).json()
        client = openai.AsyncOpenAI(
            base_url=modes_stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
        )
        try:
            first = await client.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=20
            )  # 13 + 20 tokens: $0.033
            assert first.usage is not None and first.usage.completion_tokens == 20
            deadline = time.monotonic() + 5
            while (u := (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json())[
                "open_reservations"
            ]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert u["monthly"]["spend_usd"] == first.usage.total_tokens / 1000
            with pytest.raises(openai.RateLimitError) as info:  # 13 + 30: $0.043 does not fit
                await client.chat.completions.create(
                    model="demo-small", messages=MESSAGES, max_tokens=30
                )
        finally:
            await client.close()
    assert info.value.code == "insufficient_quota"
    assert "budget" in info.value.message

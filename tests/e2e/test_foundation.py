"""Issue 2: the stack answers through the real Envoy with the real openai SDK."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from atlas.local.stack import Stack
from tests.e2e.conftest import MakeKey
from tests.e2e.helpers import settled as _settled_usage

MESSAGES = [{"role": "user", "content": "Say something about foxes, please."}]


async def test_unknown_key_is_401_with_openai_error(
    client_for: Callable[[str], openai.AsyncOpenAI], stack: Stack
) -> None:
    client = client_for("sk-atlas-not-a-key")
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="demo-small", messages=MESSAGES)
    assert info.value.status_code == 401
    async with httpx.AsyncClient() as raw:
        r = await raw.post(stack.proxy_url + "/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 401
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["code"] == "invalid_api_key"


async def test_missing_key_is_401(stack: Stack) -> None:
    async with httpx.AsyncClient() as raw:
        r = await raw.post(stack.proxy_url + "/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 401
    assert "Missing API key" in r.json()["error"]["message"]


async def test_admin_routes_require_the_token(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.admin_url) as raw:
        assert (await raw.post("/v1/admin/keys", json={"name": "x"})).status_code == 401
        assert (await raw.get("/v1/admin/keys")).status_code == 401
        wrong = {"authorization": "Bearer wrong"}
        assert (await raw.get("/v1/admin/keys", headers=wrong)).status_code == 401


async def test_key_secret_is_shown_once_and_stored_hashed(
    make_key: MakeKey, admin: httpx.AsyncClient
) -> None:
    key = await make_key(
        daily_limit=5000, monthly_limit=50000, rate_per_sec=5, burst=10, priority="high"
    )
    assert key["api_key"].startswith("sk-atlas-")
    assert key["daily_limit"] == 5000 and key["priority"] == "high"
    again = (await admin.get(f"/v1/admin/keys/{key['id']}")).json()
    assert "api_key" not in again and "secret_hash" not in again
    assert again["secret_hint"] == "sk-atlas-…" + key["api_key"][-4:]


async def test_completion_through_envoy(
    make_key: MakeKey, client_for: Callable[[str], openai.AsyncOpenAI], stack: Stack
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    direct = openai.AsyncOpenAI(base_url=stack.upstream_url + "/v1", api_key="x", max_retries=0)
    try:
        want = await direct.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=12
        )
    finally:
        await direct.close()
    got = await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=12)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage is not None and got.usage.total_tokens == want.usage.total_tokens


async def test_streamed_completion_through_envoy_is_unchanged(
    make_key: MakeKey, client_for: Callable[[str], openai.AsyncOpenAI]
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    plain = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=20
    )
    stream = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=20, stream=True
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    # The client did not ask for usage: Atlas's own usage request must not show.
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_usage_is_recorded_for_non_streaming(
    make_key: MakeKey,
    client_for: Callable[[str], openai.AsyncOpenAI],
    admin: httpx.AsyncClient,
    stack: Stack,
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    got = await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=7)
    assert got.usage is not None
    usage = await _settled_usage(admin, key["id"])
    assert usage["daily"]["used"] == got.usage.total_tokens
    assert usage["daily"]["reserved"] == 0
    async with httpx.AsyncClient() as raw:
        own = await raw.get(
            stack.proxy_url + "/v1/usage", headers={"authorization": f"Bearer {key['api_key']}"}
        )
    assert own.status_code == 200
    assert own.json()["daily_used"] == got.usage.total_tokens


async def test_healthz_reports_components(stack: Stack) -> None:
    async with httpx.AsyncClient() as raw:
        r = await raw.get(stack.admin_url + "/healthz")
        metrics = await raw.get(stack.admin_url + "/metrics")
        envoy_health = await raw.get(stack.proxy_url + "/healthz")
    assert r.status_code == 200, r.text
    assert set(r.json()["components"]) == {"redis", "authz", "extproc", "envoy"}
    assert all(c["status"] == "ok" for c in r.json()["components"].values())
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    assert envoy_health.status_code == 200

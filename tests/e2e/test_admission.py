"""Issue 3 end to end: admission rules through the real Envoy, seen by the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import MakeKey
from tests.e2e.helpers import settled as _wait_settled

#: 13 prompt tokens with cl100k: 6 of text, 3 for the message, 1 for the role, 3 priming.
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
Client = Callable[[str], openai.AsyncOpenAI]


async def test_rate_limit_is_a_rate_limit_error_with_retry_after(
    make_key: MakeKey, client_for: Client
) -> None:
    key = await make_key(rate_per_sec=0.2, burst=2)
    client = client_for(key["api_key"])
    for _ in range(2):
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    r = info.value.response
    assert info.value.code == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 5
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"


async def test_ok_responses_carry_ratelimit_headers(make_key: MakeKey, client_for: Client) -> None:
    key = await make_key(burst=10, tokens_per_minute=10_000)
    raw = await client_for(key["api_key"]).chat.completions.with_raw_response.create(
        model="demo-small", messages=MESSAGES, max_tokens=5
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "10"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    body = {"model": "demo-small", "messages": MESSAGES, "max_tokens": 5}
    reserved = estimate_prompt_tokens(body) + 5  # authz's estimate of the prompt + max_tokens
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 10_000 - reserved


async def test_daily_quota_is_insufficient_quota(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key(daily_limit=50, priority="high")
    client = client_for(key["api_key"])
    await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=30)
    await _wait_settled(admin, key["id"])  # 13 + 30 used of 50
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=30)
    assert info.value.code == "insufficient_quota"
    assert info.value.type == "insufficient_quota"
    assert int(info.value.response.headers["retry-after"]) > 0


async def test_low_priority_refused_at_its_ceiling_while_high_is_admitted(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key(daily_limit=1000, priority="low", max_priority="high")
    client = client_for(key["api_key"])
    high = {"x-request-priority": "high"}
    await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=700, extra_headers=high
    )
    await _wait_settled(admin, key["id"])  # 13 + 700 used
    with pytest.raises(openai.RateLimitError) as info:  # 713 + 113 > 80% of 1000
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=100)
    assert info.value.code == "insufficient_quota"
    ok = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=100, extra_headers=high
    )
    assert ok.usage is not None and ok.usage.completion_tokens == 100


async def test_priority_is_never_escalated_past_max_priority(
    make_key: MakeKey, client_for: Client, stack: Stack
) -> None:
    key = await make_key(priority="low", max_priority="normal")
    client = client_for(key["api_key"])
    async with httpx.AsyncClient(base_url=stack.upstream_url) as up:
        await up.delete("/demo/requests")
        await client.chat.completions.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=2,
            extra_headers={"x-request-priority": "critical", "x-atlas-key-id": "key_forged"},
        )
        seen = (await up.get("/demo/requests")).json()[-1]["headers"]
    assert seen["x-atlas-priority"] == "normal"
    assert seen["x-atlas-key-id"] == key["id"]  # the client's forged header was replaced
    assert "authorization" not in seen  # the Atlas key never reaches the upstream


async def test_model_allowlist(make_key: MakeKey, client_for: Client) -> None:
    key = await make_key(models=["demo-small"])
    client = client_for(key["api_key"])
    await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="demo-large", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "model_not_allowed"


async def test_expired_key_is_403(make_key: MakeKey, client_for: Client) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    key = await make_key(expires_at=past)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client_for(key["api_key"]).chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=2
        )
    assert info.value.code == "key_expired"


async def test_shadow_key_is_admitted_beyond_its_limits(
    make_key: MakeKey, client_for: Client, stack: Stack
) -> None:
    key = await make_key(rate_per_sec=0.01, burst=1, shadow=True)
    client = client_for(key["api_key"])
    for _ in range(3):
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    port = stack.settings.authz_metrics_port
    async with httpx.AsyncClient() as raw:
        text = (await raw.get(f"http://127.0.0.1:{port}/metrics")).text
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith(f'atlas_rate_limit_rejections_total{{key_id="{key["id"]}"')
    )
    assert float(line.rsplit(" ", 1)[1]) == 2.0  # recorded, not enforced


async def test_disabled_then_deleted_key_is_refused_within_a_second(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    r = await admin.patch(f"/v1/admin/keys/{key['id']}", json={"status": "disabled"})
    assert r.status_code == 200
    assert await _refused_within(client, 1.0) == "key_disabled"
    await admin.delete(f"/v1/admin/keys/{key['id']}")
    deadline = time.monotonic() + 1.0
    while await _refused_within(client, 1.0) != "invalid_api_key":
        assert time.monotonic() < deadline, "deleted key still known after 1 s"


async def _refused_within(client: openai.AsyncOpenAI, seconds: float) -> str | None:
    """The error code of the first refusal, polling for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await client.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=2
            )
        except openai.APIStatusError as exc:
            return exc.code
        assert time.monotonic() < deadline, "still admitted after the change"


async def test_rotate_and_revoke_reach_envoy_within_a_second(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    old = client_for(key["api_key"])
    await old.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    rotated = (await admin.post(f"/v1/admin/keys/{key['id']}/rotate")).json()
    assert await _refused_within(old, 1.0) == "invalid_api_key"
    new = client_for(rotated["api_key"])
    await new.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    assert (await admin.post(f"/v1/admin/keys/{key['id']}/revoke")).status_code == 200
    assert await _refused_within(new, 1.0) == "key_disabled"


async def test_an_expired_owner_has_every_key_refused_with_403(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    owner = f"ada-{time.monotonic_ns()}@example.com"
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    r = await admin.post("/v1/admin/owners", json={"id": owner, "valid_until": later})
    assert r.status_code == 201, r.text
    clients = [client_for((await make_key(owner=owner))["api_key"]) for _ in range(2)]
    for client in clients:
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=2)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    r = await admin.patch(f"/v1/admin/owners/{owner}", json={"valid_until": past})
    assert r.status_code == 200 and r.json()["expired"] is True and r.json()["keys"] == 2
    for client in clients:  # both keys, within the key cache's second
        assert await _refused_within(client, 1.0) == "owner_expired"
    report = (await admin.post("/v1/admin/owners/check-expired")).json()
    mine = [o for o in report["expired"] if o["id"] == owner]
    assert len(mine) == 1 and len(mine[0]["keys"]) == 2 and mine[0]["disabled"] == []


async def test_each_end_user_has_its_own_limit_within_the_key(
    make_key: MakeKey, client_for: Client
) -> None:
    key = await make_key(end_user_requests_per_minute=1)
    client = client_for(key["api_key"])

    async def ask(user: str | None = None, header: str | None = None) -> None:
        await client.chat.completions.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=2,
            **({"user": user} if user else {}),
            extra_headers={"x-atlas-end-user": header} if header else None,
        )

    await ask(user="alice")
    with pytest.raises(openai.RateLimitError) as info:
        await ask(user="alice")
    assert info.value.response.headers["x-atlas-limit"] == "end_user.requests"
    assert "end user" in info.value.message
    with pytest.raises(openai.RateLimitError):
        await ask(header="alice")  # the header names the same end user
    await ask(user="bob")
    await ask()  # a request naming no end user has no end-user limit


async def test_self_serve_usage_and_forecasts_through_envoy(
    make_key: MakeKey, client_for: Client, stack: Stack
) -> None:
    mine, other = await make_key(), await make_key()
    await client_for(mine["api_key"]).chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=3
    )
    auth = {"authorization": f"Bearer {mine['api_key']}"}
    async with httpx.AsyncClient(base_url=stack.proxy_url, headers=auth) as raw:
        usage = (await raw.get("/v1/usage")).json()
        forecast = await raw.get("/v1/forecasting/forecast?horizon=hourly")
        others = await raw.get(f"/v1/forecasting/forecast?key_id={other['id']}")
        admin_only = await raw.get("/v1/forecasting/admin/system-metrics")
        admin_api = await raw.get("/v1/admin/keys")
    assert usage["key_id"] == mine["id"] and usage["daily_limit"] == mine["daily_limit"]
    assert {"daily_used", "monthly_used", "monthly_limit", "priority"} <= set(usage)
    assert forecast.status_code == 200 and forecast.json()["key_id"] == mine["id"]
    assert others.status_code == 403
    assert admin_only.status_code == 404  # admin-token paths are not routed by the proxy
    assert admin_api.status_code == 404  # the admin API is not exposed on the proxy port

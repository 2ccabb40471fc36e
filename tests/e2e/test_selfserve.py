"""Self-serve calls through the real Envoy (routed to admin without ext_authz): admin refuses
revoked and expired keys and limits each key by its own rate and burst, OpenAI-shaped."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from atlas.local.stack import Stack
from tests.e2e.conftest import MakeKey


async def test_revoked_and_expired_keys_get_openai_errors_through_envoy(
    make_key: MakeKey,
    admin: httpx.AsyncClient,
    stack: Stack,
    client_for: Callable[[str], openai.AsyncOpenAI],
) -> None:
    revoked, expired = await make_key(), await make_key(expires_at="2020-01-01T00:00:00Z")
    assert (await admin.post(f"/v1/admin/keys/{revoked['id']}/revoke")).status_code == 200
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as proxy:
        for key, code in ((revoked, "key_disabled"), (expired, "key_expired")):
            auth = {"authorization": f"Bearer {key['api_key']}"}
            for url in ("/v1/usage", "/v1/forecasting/forecast?horizon=hourly"):
                r = await proxy.get(url, headers=auth)
                assert r.status_code == 403 and r.json()["error"]["code"] == code, (url, r.text)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client_for(revoked["api_key"]).get("/usage", cast_to=object)
    assert info.value.code == "key_disabled"


async def test_self_serve_calls_are_limited_by_the_keys_own_rate(
    make_key: MakeKey, stack: Stack
) -> None:
    key = await make_key(rate_per_sec=0.01, burst=2)
    auth = {"authorization": f"Bearer {key['api_key']}"}
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as proxy:
        codes = [(await proxy.get("/v1/usage", headers=auth)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = await proxy.get("/v1/forecasting/usage-patterns", headers=auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1

"""What Envoy itself does with what a client sends, before Atlas or the upstream see it:
admin paths answered 404, one spelling of every path, underscore headers and client-sent
x-envoy-* headers dropped, the logged path the one Envoy routed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, MakeKey
from tests.e2e.helpers import clear_upstream, settled, upstream_saw

BODY = {"model": "m", "messages": [{"role": "user", "content": "Tell me about foxes."}]}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/forecasting/admin/system-metrics",
        "/v1/forecasting/admin/forecast-all",
        "/v1/forecasting/admin",
        "/v1/forecasting//admin/forecast-all",
        "/v1/forecasting/./admin/forecast-all",
        "/v1/admin/keys",
    ],
)
async def test_admin_token_paths_are_a_404_on_the_proxy(stack: Stack, path: str) -> None:
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as c:
        r = await c.get(path, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "not_found"


async def test_underscore_and_envoy_headers_never_reach_the_upstream(
    stack: Stack, make_key: MakeKey
) -> None:
    key = await make_key()
    await clear_upstream(stack.upstream_url)
    headers = {
        "authorization": f"Bearer {key['api_key']}",
        "x_atlas_key_id": "key_someone_else",
        "x_atlas_priority": "critical",
        "x-envoy-original-path": "/v1/embeddings",
        "x-envoy-retry-on": "5xx",
        "x-envoy-upstream-rq-timeout-ms": "1",
    }
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", json=BODY, headers=headers)
    assert r.status_code == 200, r.text
    (seen,) = await upstream_saw(stack.upstream_url)
    assert not [h for h in seen["headers"] if "_" in h], seen["headers"]
    sent = {h for h in headers if h.startswith("x-envoy-")}
    assert not sent & set(seen["headers"]), seen["headers"]
    assert seen["headers"]["x-atlas-key-id"] == key["id"]


async def test_logged_path_is_the_routed_path(stack: Stack, make_key: MakeKey) -> None:
    key = await make_key()
    headers = {"authorization": f"Bearer {key['api_key']}", "x-envoy-original-path": "/forged"}
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as c:
        r = await c.post("/v1//chat/./completions", json=BODY, headers=headers)
    assert r.status_code == 200, r.text
    envoy = stack.children["envoy"]

    def logged() -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in envoy.tail if x.startswith("{")]
        return [x for x in lines if x.get("key_id") == key["id"]]

    for _ in range(250):  # the stack has Envoy flush its access log every 250 ms
        if logged():
            break
        await asyncio.sleep(0.02)
    (line,) = logged()
    assert line["path"] == "/v1/chat/completions"


async def test_one_spelling_of_every_path(
    stack: Stack, make_key: MakeKey, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    auth = {"authorization": f"Bearer {key['api_key']}"}
    await clear_upstream(stack.upstream_url)
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as c:
        for path in ("/v1//chat/completions", "/v1/x/../chat/completions"):
            r = await c.post(path, json=BODY, headers=auth)
            assert r.status_code == 200, (path, r.text)
        # An escaped slash is redirected to its unescaped path (307: method and body kept),
        # by Envoy, before authz: nothing reaches the upstream and nothing is charged.
        for path in ("/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/chat%5Ccompletions"):
            r = await c.post(path, json=BODY, headers=auth)
            assert r.status_code == 307, (path, r.status_code, r.text)
            assert r.headers["location"].endswith("/v1/chat/completions"), r.headers
    seen = await upstream_saw(stack.upstream_url)
    assert [s["path"] for s in seen] == ["/v1/chat/completions"] * 2
    u = await settled(admin, key["id"])
    assert u["daily"]["requests"] == 2

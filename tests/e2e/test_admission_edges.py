"""What a request may cost is judged from all of it, through the real Envoy: whole bodies,
prompt lists and choices, only the endpoints Atlas accounts for, and no client header that
poses as Atlas or leaks the key upstream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from atlas.local.stack import Stack
from tests.e2e.conftest import MakeKey, running_stack
from tests.e2e.helpers import settled

MESSAGES = [{"role": "user", "content": "hello"}]


async def raw_post(port: int, path: str, body: bytes, secret: str) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request with the path exactly as given (httpx would resolve `..`) and a
    chunked body (no Content-Length, as streaming clients send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: atlas\r\nauthorization: Bearer {secret}\r\n"
            "content-type: application/json\r\ntransfer-encoding: chunked\r\n"
            "connection: close\r\n\r\n".encode()
        )
        for i in range(0, len(body), 1 << 16):
            part = body[i : i + (1 << 16)]
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks, rest = [], payload
        while (size := int(rest.split(b"\r\n", 1)[0], 16)) > 0:
            rest = rest.split(b"\r\n", 1)[1]
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        payload = b"".join(chunks)
    status = int(head.split()[1])
    return status, json.loads(payload) if payload.strip() else {}


async def test_a_big_chunked_prompt_is_reserved_whole(make_key: MakeKey, stack: Stack) -> None:
    """4 MB of prompt without Content-Length used to be estimated from the first 64 KB."""
    key = await make_key(daily_limit=30_000, models=["demo-small"])
    prompt = "word " * (800_000)  # ~1M tokens
    body = json.dumps(
        {"model": "demo-small", "max_tokens": 5, "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    status, err = await raw_post(
        stack.settings.proxy_port, "/v1/chat/completions", body, key["api_key"]
    )
    assert (status, err["error"]["code"]) == (429, "insufficient_quota")
    # The same size under a roomy limit: the model allowlist sees the real model, not "".
    roomy = await make_key(daily_limit=10**7, models=["demo-small"])
    status, reply = await raw_post(
        stack.settings.proxy_port, "/v1/chat/completions", body, roomy["api_key"]
    )
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 5


async def test_completions_reserve_every_prompt_and_choice(
    make_key: MakeKey, client_for: Any, admin: httpx.AsyncClient
) -> None:
    key = await make_key(daily_limit=50_000)
    client = client_for(key["api_key"])
    with pytest.raises(openai.RateLimitError) as info:  # 128 x 5 x 100 = 64k > 50k
        await client.completions.create(
            model="demo-small", prompt=["hi there"] * 128, n=5, max_tokens=100
        )
    assert info.value.code == "insufficient_quota"
    ok = await client.completions.create(
        model="demo-small", prompt=["hi there"] * 8, n=2, max_tokens=10
    )
    assert ok.usage is not None and ok.usage.completion_tokens == 8 * 2 * 10
    u = await settled(admin, key["id"])
    assert u["daily"]["used"] == ok.usage.total_tokens


async def test_unknown_endpoints_are_404_and_never_forwarded(
    make_key: MakeKey, client_for: Any, stack: Stack, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    async with httpx.AsyncClient(base_url=stack.upstream_url) as up:
        await up.delete("/demo/requests")
        with pytest.raises(openai.NotFoundError) as info:
            await client.batches.create(
                input_file_id="f", endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert info.value.code == "unknown_endpoint"
        with pytest.raises(openai.NotFoundError):
            await client.images.generate(prompt="a cat")
        with pytest.raises(openai.NotFoundError):
            await client.files.delete("file-x")
        for path in ("/v1/chat/completions/../batches", "/v1/chat/completions/%2e%2e/batches"):
            status, err = await raw_post(stack.settings.proxy_port, path, b"{}", key["api_key"])
            assert status in (400, 404), path  # refused by authz, whatever Envoy normalises
            assert err["error"]["type"] == "invalid_request_error"
        models = await client.models.list()  # GET /v1/models: forwarded, nothing reserved
        assert models.data
        seen = [r["path"] for r in (await up.get("/demo/requests")).json()]
    assert seen == ["/v1/models"]
    u = await settled(admin, key["id"])
    assert (u["daily"]["requests"], u["daily"]["used"]) == (1, 0)  # counted, not charged


async def test_listed_extra_endpoints_are_forwarded_under_the_request_limit() -> None:
    async with running_stack(extra_endpoints=["POST /v1/images/*"]) as extra:
        async with httpx.AsyncClient(
            base_url=extra.admin_url, headers={"authorization": "Bearer e2e-admin-token"}
        ) as admin:
            r = await admin.post(
                "/v1/admin/keys", json={"name": "x", "rate_per_sec": 0.01, "burst": 2}
            )
            secret = r.json()["api_key"]
        auth = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=extra.proxy_url, headers=auth, timeout=10) as c:
            codes = [
                (await c.post("/v1/images/generations", json={"prompt": "x"})).status_code
                for _ in range(3)
            ]
            batches = await c.post("/v1/batches", json={})
    assert codes[:2] == [404, 404]  # forwarded: the demo upstream has no images endpoint
    assert codes[2] == 429  # burst 2: rate limited like any request
    assert batches.status_code == 404 and batches.json()["error"]["code"] == "unknown_endpoint"


async def test_client_headers_posing_as_atlas_or_carrying_the_key_are_removed(
    make_key: MakeKey, stack: Stack
) -> None:
    key = await make_key(priority="low", max_priority="normal")
    async with httpx.AsyncClient(timeout=10) as raw:
        await raw.delete(stack.upstream_url + "/demo/requests")
        r = await raw.post(
            stack.proxy_url + "/v1/chat/completions",
            json={"model": "demo-small", "max_tokens": 1, "messages": MESSAGES},
            headers={
                "api-key": key["api_key"],  # Azure's spelling carries the key
                "x-request-priority": "critical",
                "X-Atlas-Key-Id": "key_forged",
            },
        )
        assert r.status_code == 200, r.text
        underscored = await raw.post(
            stack.proxy_url + "/v1/chat/completions",
            json={"model": "demo-small", "max_tokens": 1, "messages": MESSAGES},
            headers={"authorization": f"Bearer {key['api_key']}", "x_atlas_key_id": "forged"},
        )
        seen = [q["headers"] for q in (await raw.get(stack.upstream_url + "/demo/requests")).json()]
    first = seen[0]
    assert "api-key" not in first and "authorization" not in first
    assert "x-request-priority" not in first
    assert (first["x-atlas-priority"], first["x-atlas-key-id"]) == ("normal", key["id"])
    # Envoy may reject underscored names outright; if it forwards the request, not the header.
    if underscored.status_code == 200:
        assert len(seen) == 2 and "x_atlas_key_id" not in seen[1]
    else:
        assert underscored.status_code == 400 and len(seen) == 1

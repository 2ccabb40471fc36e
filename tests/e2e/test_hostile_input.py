"""Bad input through the real Envoy: a clear error or a pass-through, never a crash or a leak."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from atlas.stack import Stack
from tests.e2e.conftest import MakeKey


async def _settled(admin: httpx.AsyncClient, key_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        u: dict[str, Any] = (await admin.get(f"/v1/admin/keys/{key_id}/usage")).json()
        if u["open_reservations"] == 0:
            return u
        assert time.monotonic() < deadline, u
        await asyncio.sleep(0.02)


async def test_oversized_body_is_an_openai_shaped_413(make_key: MakeKey, stack: Stack) -> None:
    key = await make_key()
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * (9 << 20) + b'"}]}'
    async with httpx.AsyncClient(timeout=30) as raw:
        r = await raw.post(
            stack.proxy_url + "/v1/chat/completions",
            content=body,
            headers={
                "authorization": f"Bearer {key['api_key']}",
                "content-type": "application/json",
            },
        )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


async def test_non_json_and_binary_bodies_pass_through_and_settle(
    make_key: MakeKey, stack: Stack, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    auth = {"authorization": f"Bearer {key['api_key']}"}
    async with httpx.AsyncClient(timeout=10) as raw:
        for body in (b"not json at all", b"\xff\xfe\x00\x01" * 100, b'{"model": '):
            r = await raw.post(stack.proxy_url + "/v1/chat/completions", content=body, headers=auth)
            assert r.status_code == 400  # the upstream's answer, passed through
            assert "error" in r.json()
    u = await _settled(admin, key["id"])
    assert u["daily"]["used"] == 0 and u["daily"]["reserved"] == 0
    assert u["daily"]["requests"] == 3

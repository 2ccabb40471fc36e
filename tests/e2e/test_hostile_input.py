"""Bad input through the real Envoy: a clear error or a pass-through, never a crash or a leak."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: atlas\r\n"
        f"authorization: Bearer {key['api_key']}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    # Envoy may answer before the body is sent and close: read while writing, as a
    # well-behaved client does, and ignore the broken pipe that may follow.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.settings.proxy_port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            for i in range(0, len(body), 1 << 16):
                writer.write(body[i : i + (1 << 16)])
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        status = await asyncio.wait_for(reader.readline(), 30)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            payload = await reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            payload = b""
            while size := int((await reader.readline()).strip(), 16):
                payload += await reader.readexactly(size)
                await reader.readline()
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    assert status.split()[1] == b"413"
    assert json.loads(payload)["error"]["code"] == "request_too_large"


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

"""Bad input through the real Envoy: a clear error or a pass-through, never a crash or a leak."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import redis.asyncio as aioredis

from atlas.local.stack import Stack
from tests.e2e.conftest import MakeKey
from tests.e2e.helpers import settled as _settled


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


async def test_oversized_headers_are_refused_and_the_proxy_keeps_serving(
    make_key: MakeKey, stack: Stack
) -> None:
    key = await make_key()
    auth = {"authorization": f"Bearer {key['api_key']}"}
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as raw:
        try:
            big = await raw.post(
                "/v1/chat/completions",
                json={"model": "m"},
                headers={**auth, "x-junk": "a" * 100_000},
            )
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # HTTP/1.1: Envoy closes the connection on a header block over its limit
        else:
            assert big.status_code == 431
        ok = await raw.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200


async def test_secrets_never_reach_redis_logs_or_metrics(
    make_key: MakeKey, stack: Stack, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    secret = key["api_key"]
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as raw:
        auth = {"authorization": f"Bearer {secret}"}
        await raw.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        )
        await raw.post(
            "/v1/chat/completions",
            json={"model": "m"},
            headers={"authorization": f"Bearer {secret}x"},
        )  # a wrong one too
        await _settled(admin, key["id"])  # from the access log, a moment after the answer
        exported = [
            (await raw.get(f"http://127.0.0.1:{port}/metrics")).text
            for port in (stack.settings.authz_metrics_port, stack.settings.extproc_metrics_port)
        ]
    exported.append((await admin.get("/metrics")).text)
    exported.append((await admin.get("/v1/admin/audit")).text)
    r = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        dump = []
        async for name in r.scan_iter(count=1000):
            dump.append(name)
            kind = await r.type(name)
            if kind == b"string":
                dump.append(await r.get(name) or b"")
            elif kind == b"hash":
                dump.extend(v for kv in (await r.hgetall(name)).items() for v in kv)
            elif kind == b"stream":
                dump.extend(str(e).encode() for e in await r.xrange(name))
    finally:
        await r.aclose()
    needle = secret.encode()
    assert not any(needle in item for item in dump)
    assert not any(secret in text for text in exported)
    assert secret not in stack.logs()
    assert any(key["id"] in text for text in exported[:2])  # labelled by key id instead

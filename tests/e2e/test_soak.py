"""Soak: every kind of hostile client at once on one stack (2 authz + 2 extproc replicas).

For a bounded ~40 s, slow streams are hung up at random points of their pauses, clients
reset their connection right after sending, bodies are oversized (by Content-Length and
chunked) or pathological (deeply nested, huge structure), endpoints are unknown, and a
victim tenant sends ordinary requests. Afterwards Envoy and every service still serve, no
reservation is left once the claim bound and the reaper have run, nothing is negative, and
every key's window equals what its settlements (and the reaper) charged.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import charged_vs_window, send_and_reset

SOAK_S = 40.0
CLAIM_TIMEOUT_S = 3
MAX_REQUEST_BYTES = 1 << 20
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]

pytestmark = pytest.mark.timeout(180)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def soak_stack() -> AsyncIterator[Stack]:
    async with running_stack(
        replicas=2,
        claim_timeout_s=CLAIM_TIMEOUT_S,
        reap_interval_s=0.5,
        max_request_bytes=MAX_REQUEST_BYTES,
    ) as stack:
        yield stack


def _request(path: str, body: bytes, api_key: str, *, chunked: bool = False) -> bytes:
    head = [f"POST {path} HTTP/1.1", "host: atlas", f"authorization: Bearer {api_key}"]
    head.append("content-type: application/json")
    if chunked:
        head.append("transfer-encoding: chunked")
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        head.append(f"content-length: {len(body)}")
        framed = body
    return ("\r\n".join(head) + "\r\n\r\n").encode() + framed


async def _send_and_read_status(port: int, data: bytes) -> int:
    """Send a request on a fresh connection and return the response status (0 if none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        parts = line.split()
        return int(parts[1]) if len(parts) > 1 else 0
    except (ConnectionError, TimeoutError):
        return 0
    finally:
        writer.transport.abort()


async def test_soak_hostile_clients_at_once(soak_stack: Stack) -> None:
    stack = soak_stack
    port = int(stack.proxy_url.rsplit(":", 1)[1])
    rng = random.Random(20261202)
    async with httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as admin:
        keys: dict[str, dict[str, Any]] = {}
        for name in ("slow", "reset", "oversized", "pathological", "unknown", "victim"):
            r = await admin.post(
                "/v1/admin/keys",
                json={
                    "name": f"soak-{name}",
                    "rate_per_sec": 200,
                    "burst": 200,
                    "daily_limit": 10_000_000,
                },
            )
            assert r.status_code == 201, r.text
            keys[name] = r.json()

        seen: dict[str, list[int]] = {name: [] for name in keys}
        client = openai.AsyncOpenAI(
            base_url=stack.proxy_url + "/v1",
            api_key=keys["slow"]["api_key"],
            max_retries=0,
            timeout=60,
        )
        victim = openai.AsyncOpenAI(
            base_url=stack.proxy_url + "/v1",
            api_key=keys["victim"]["api_key"],
            max_retries=0,
            timeout=30,
        )
        deadline = time.monotonic() + SOAK_S

        async def slow_stream() -> None:
            # A stream with long pauses, hung up at a random point of one of them.
            delay_ms = rng.randint(200, 1500)
            give_up_s = rng.uniform(0.05, 6 * delay_ms / 1000)

            async def consume() -> None:
                stream = await client.chat.completions.create(
                    model="m",
                    messages=MESSAGES,
                    max_tokens=8,
                    stream=True,
                    extra_headers={"x-demo-chunk-delay-ms": str(delay_ms)},
                )
                async with stream:
                    async for _ in stream:
                        pass

            try:
                await asyncio.wait_for(consume(), give_up_s)
                seen["slow"].append(200)
            except TimeoutError:
                seen["slow"].append(0)

        async def reset_after_send() -> None:
            body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 20}).encode()
            data = _request("/v1/chat/completions", body, keys["reset"]["api_key"])
            await send_and_reset(port, data, rng.uniform(0.001, 0.003))
            seen["reset"].append(0)

        async def oversized() -> None:
            chunked = rng.random() < 0.5
            text = "fox " * (MAX_REQUEST_BYTES // 4 + 1024)
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
            data = _request(
                "/v1/chat/completions",
                body.encode(),
                keys["oversized"]["api_key"],
                chunked=chunked,
            )
            seen["oversized"].append(await _send_and_read_status(port, data))

        async def pathological() -> None:
            nested = "[" + ",".join(["[]"] * 150_000) + "]"
            body = '{"model":"m","max_tokens":4,"messages":[{"role":"user","content":' + nested
            body += "}]}"
            data = _request("/v1/chat/completions", body.encode(), keys["pathological"]["api_key"])
            seen["pathological"].append(await _send_and_read_status(port, data))

        async def unknown_endpoint() -> None:
            path = rng.choice(["/v1/batches", "/v1/images/generations", "/v1/files/x"])
            data = _request(path, b"{}", keys["unknown"]["api_key"])
            seen["unknown"].append(await _send_and_read_status(port, data))

        async def ordinary() -> None:
            try:
                r = await victim.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
                seen["victim"].append(200 if r.usage is not None else -1)
            except openai.APIStatusError as exc:
                seen["victim"].append(exc.status_code)
            except openai.APIConnectionError:
                seen["victim"].append(0)

        async def loop(make: Callable[[], Awaitable[None]], pause_s: float) -> None:
            while time.monotonic() < deadline:
                await make()
                await asyncio.sleep(pause_s)

        workers = [
            *(loop(slow_stream, 0.05) for _ in range(6)),
            *(loop(reset_after_send, 0.05) for _ in range(2)),
            loop(oversized, 0.5),
            loop(pathological, 0.5),
            loop(unknown_endpoint, 0.2),
            *(loop(ordinary, 0.05) for _ in range(2)),
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            await client.close()
            await victim.close()

        # Everything still serves.
        assert stack.died is not None and not stack.died.done(), stack.died.result()
        async with httpx.AsyncClient(timeout=10) as raw:
            assert (await raw.get(stack.envoy_admin_url + "/ready")).status_code == 200
            assert (await raw.get(stack.proxy_url + "/healthz")).status_code == 200
        check = openai.AsyncOpenAI(
            base_url=stack.proxy_url + "/v1", api_key=keys["victim"]["api_key"], max_retries=0
        )
        async with check:
            for _ in range(4):  # reaches both authz and both extproc replicas
                r = await check.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
                assert r.usage is not None and r.usage.completion_tokens == 3

        assert seen["slow"] and seen["reset"], seen
        assert seen["victim"] and set(seen["victim"]) == {200}, seen["victim"]
        assert set(seen["unknown"]) == {404}, seen["unknown"]
        assert set(seen["oversized"]) == {413}, seen["oversized"]
        assert seen["pathological"] and set(seen["pathological"]) <= {200, 400}, seen

        # After the claim bound and the reaper: nothing reserved, conservation per key.
        wait_until = time.monotonic() + CLAIM_TIMEOUT_S + 30
        for name, key in keys.items():
            while True:
                u = (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()
                if u["open_reservations"] == 0 and u["daily"]["reserved"] == 0:
                    break
                assert time.monotonic() < wait_until, (name, u)
                await asyncio.sleep(0.2)
            charged, window = await charged_vs_window(stack.settings.redis_url, key["id"])
            assert charged == u["daily"]["used"], (name, window)
            assert int(window.get("reserved", 0)) == 0, (name, window)

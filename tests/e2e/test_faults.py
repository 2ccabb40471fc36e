"""Faults through the real Envoy: a component dies or Redis goes away, and no usage is lost."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from atlas.ledger import keys
from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import settled
from tests.servers import DelayProxy, port_of, start_valkey, stop

#: 13 prompt tokens with cl100k: 6 of text, 3 for the message, 1 for the role, 3 priming.
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
#: authz's estimate of MESSAGES, what a reservation holds for the prompt; for text this short
#: it is also exactly what the demo upstream reports (cl100k with OpenAI's chat frame).
PROMPT = estimate_prompt_tokens({"model": "m", "messages": MESSAGES})


@pytest_asyncio.fixture(loop_scope="session")
async def faulty(tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack of its own (components get killed), with quick reaping, a journal directory
    and a durable Redis (append-only file, fsync always) that survives a restart."""
    async with running_stack(
        reservation_ttl_s=2,
        reap_interval_s=0.5,
        journal_dir=str(tmp_path / "journal"),
        valkey_args=("--appendonly", "yes", "--appendfsync", "always"),
    ) as stack:
        yield stack


async def new_key(stack: Stack, **fields: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        r = await admin.post(
            "/v1/admin/keys", json={"name": "faults", "rate_per_sec": 1000, "burst": 1000, **fields}
        )
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]


async def settled_usage(stack: Stack, key_id: str, timeout_s: float = 15) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        return await settled(admin, key_id, timeout_s)


async def logged(stack: Stack, key_id: str, timeout_s: float = 10, **filters: str) -> list[Any]:
    """The key's request log records matching `filters`, once there are any."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        while True:
            r = await admin.get("/v1/admin/requests", params={"key_id": key_id, **filters})
            items: list[Any] = r.json()["items"]
            if items or time.monotonic() > deadline:
                return items
            await asyncio.sleep(0.1)


async def claimed(stack: Stack, key_id: str, timeout_s: float = 5) -> None:
    """Wait until an ext_proc stream's claim of the key's reservation reached Redis."""
    r = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while not await r.scard(keys.reservation_claims(key_id)):
            assert time.monotonic() < deadline, "the reservation was never claimed"
            await asyncio.sleep(0.01)
    finally:
        await r.aclose()


def client(stack: Stack, key: dict[str, Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0, timeout=30
    )


async def test_authz_down_is_a_fast_503_then_recovers(faulty: Stack) -> None:
    key = await new_key(faulty)
    c = client(faulty, key)
    try:
        await faulty.kill("authz")
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert info.value.status_code == 503
        assert time.monotonic() - start < 1.0  # no hang: Envoy's status_on_error
        await faulty.restart("authz")
        got = await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert got.usage is not None
    finally:
        await c.close()


async def charged_by_the_reaper(stack: Stack, key_id: str, *, max_tokens: int) -> int:
    """Assert the key's one stream (MESSAGES, `max_tokens`) was never settled: the reaper
    charged its reservation (the prompt estimate + max_tokens), and the request log's only
    record of it is the reaper's. Returns the reservation."""
    body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    reserved = estimate_prompt_tokens(body) + max_tokens
    u = await settled_usage(stack, key_id)
    assert u["daily"]["used"] == reserved
    [record] = await logged(stack, key_id, outcome="reaped")
    assert (record["prompt_tokens"], record["exact"]) == (reserved, False)
    return reserved


async def test_extproc_killed_mid_stream_is_reaped_and_restarts_clean(faulty: Stack) -> None:
    key = await new_key(faulty)
    c = client(faulty, key)
    try:
        # The client asks for usage itself: the stream runs through an ext_proc stream (a
        # `splice` stream does not: see the next test).
        stream = await c.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-demo-chunk-delay-ms": "30"},
        )
        received = 0

        async def read_until_broken() -> None:
            nonlocal received
            async for _ in stream:
                received += 1
                if received == 3:
                    # extproc claims a reservation in a batch (up to 100 ms after the stream's
                    # headers); a crash before that releases it charged 0, a window this test
                    # does not cover (tests/integration/test_leases.py does).
                    await claimed(faulty, key["id"])
                    await faulty.kill("extproc")

        with pytest.raises((openai.APIError, httpx.HTTPError)):  # the stream breaks
            await read_until_broken()
        assert received < 100
        await faulty.restart("extproc")
        reserved = await charged_by_the_reaper(faulty, key["id"], max_tokens=100)
        got = await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=7)
        assert got.usage is not None and got.usage.completion_tokens == 7
        u = await settled_usage(faulty, key["id"])
        assert u["daily"]["used"] == reserved + got.usage.total_tokens
    finally:
        await c.close()


async def test_extproc_killed_during_a_spliced_stream_never_undercharges(faulty: Stack) -> None:
    """A stream Atlas asks for usage runs without extproc (ProcMode.SPLICE, Envoy's Lua
    filter): killing extproc does not break it, the client still never sees the usage chunk,
    and its access-log entry, lost with extproc, leaves the reservation to the reaper."""
    key = await new_key(faulty)
    c = client(faulty, key)
    try:
        stream = await c.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=40,
            stream=True,
            extra_headers={"x-demo-chunk-delay-ms": "10"},
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                await claimed(faulty, key["id"])
                await faulty.kill("extproc")
        assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "length"
        assert all(ch.usage is None and ch.choices for ch in chunks)
        await faulty.restart("extproc")
        await charged_by_the_reaper(faulty, key["id"], max_tokens=40)
    finally:
        await c.close()


async def test_redis_restart_journals_settlements_and_loses_nothing(faulty: Stack) -> None:
    key = await new_key(faulty)
    c = client(faulty, key)
    try:

        async def one_stream() -> int:
            stream = await c.chat.completions.create(
                model="m",
                messages=MESSAGES,
                max_tokens=30,
                stream=True,
                extra_headers={"x-demo-chunk-delay-ms": "25"},
            )
            return len([x async for x in stream if x.choices and x.choices[0].delta.content])

        streams = [asyncio.create_task(one_stream()) for _ in range(4)]
        await asyncio.sleep(0.2)  # the streams are under way (admitted, reserved)
        await faulty.kill("valkey", signal.SIGKILL)
        # authz follows ATLAS_FAIL_MODE=deny: a fast 503 while Redis is away.
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert info.value.status_code == 503 and time.monotonic() - start < 1.0
        assert await asyncio.gather(*streams) == [30, 30, 30, 30]  # clients unaffected
        journal = Path(faulty.settings.journal_dir) / (
            f"atlas-extproc-{faulty.settings.extproc_port}.journal"
        )
        deadline = time.monotonic() + 10
        while not journal.exists():  # settlements wait on disk
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await faulty.restart("valkey")
        u = await settled_usage(faulty, key["id"])
        assert u["daily"]["used"] == 4 * (PROMPT + 30)
        assert u["daily"]["requests"] == 4
        assert not journal.exists()
    finally:
        await c.close()


async def test_slow_redis_through_envoy_fails_fast_and_recovers(tmp_path: Path) -> None:
    """Latency injected between every service and Redis: authz's Check gives up within its
    Redis budget and Envoy answers 503 at once (fail mode deny); then service resumes."""
    proc, url = start_valkey(tmp_path)
    proxy = DelayProxy(port_of(url))
    proxy_url = f"redis://127.0.0.1:{await proxy.start()}/0"
    try:
        async with running_stack(redis_url=proxy_url) as stack:
            key = await new_key(stack)
            c = client(stack, key)
            try:
                await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
                proxy.delay_s = 1.0
                start = time.monotonic()
                with pytest.raises(openai.InternalServerError) as info:
                    await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
                assert info.value.status_code == 503
                assert time.monotonic() - start < 1.0  # Redis budget 0.25 s, not 1 s
                proxy.delay_s = 0.0
                deadline = time.monotonic() + 10
                while True:  # connections broken by the timeouts are re-made
                    try:
                        await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
                        break
                    except openai.InternalServerError:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
            finally:
                await c.close()
    finally:
        await proxy.stop()
        stop(proc)

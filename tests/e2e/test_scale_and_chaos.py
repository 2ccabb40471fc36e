"""Scale-out and conservation under chaos, through the real Envoy."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest_asyncio

from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import charged_vs_window

#: 13 prompt tokens with cl100k: 6 of text, 3 for the message, 1 for the role, 3 priming.
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicated() -> AsyncIterator[Stack]:
    async with running_stack(replicas=2, reservation_ttl_s=2, reap_interval_s=0.5) as stack:
        yield stack


async def admin_client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )


async def envoy_host_requests(stack: Stack, cluster: str) -> list[int]:
    """Requests each endpoint of an Envoy cluster has served."""
    async with httpx.AsyncClient() as raw:
        text = (await raw.get(f"{stack.envoy_admin_url}/clusters")).text
    return [
        int(ln.rsplit("::", 1)[1])
        for ln in text.splitlines()
        if ln.startswith(f"{cluster}::")
        and ln.endswith(tuple("0123456789"))
        and "::rq_total::" in ln
    ]


async def test_limits_stay_exact_across_replicas(replicated: Stack) -> None:
    async with await admin_client(replicated) as admin:
        key = (
            await admin.post(
                "/v1/admin/keys", json={"name": "replicas", "rate_per_sec": 0.01, "burst": 50}
            )
        ).json()
    auth = {"authorization": f"Bearer {key['api_key']}"}
    # Streams whose client asks for usage: each one is an ext_proc stream (non-streamed
    # completions and spliced streams are settled from the access log, one long-lived stream
    # per Envoy worker), so both extproc replicas work.
    body = {
        "model": "m",
        "messages": MESSAGES,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(
        base_url=replicated.proxy_url,
        headers=auth,
        limits=httpx.Limits(max_connections=100),
        timeout=30,
    ) as raw:
        answers = await asyncio.gather(
            *(raw.post("/v1/chat/completions", json=body) for _ in range(100))
        )
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 50 and codes.count(429) == 50
    per_authz = await envoy_host_requests(replicated, "atlas_authz")
    per_extproc = await envoy_host_requests(replicated, "atlas_extproc")
    assert len(per_authz) == 2 and all(n > 0 for n in per_authz), per_authz
    assert len(per_extproc) == 2 and all(n > 0 for n in per_extproc), per_extproc


async def test_conservation_under_chaos(replicated: Stack) -> None:
    """64 concurrent streams with client disconnects, upstream errors and resets, and one
    extproc replica killed and restarted: afterwards every reservation is settled or reaped,
    and the window holds exactly what the settlements and the reaper charged."""
    async with await admin_client(replicated) as admin:
        key = (
            await admin.post(
                "/v1/admin/keys", json={"name": "chaos", "rate_per_sec": 1000, "burst": 1000}
            )
        ).json()
    client = openai.AsyncOpenAI(
        base_url=replicated.proxy_url + "/v1", api_key=key["api_key"], max_retries=0, timeout=30
    )
    rng = random.Random(11)
    outcomes: dict[str, int] = {}

    async def one(i: int) -> None:
        fate = rng.choice(["ok", "ok", "hangup", "error", "reset"])
        headers = {"x-demo-chunk-delay-ms": "10"}
        if fate == "error":
            headers["x-demo-status"] = "500"
        elif fate == "reset":
            headers["x-demo-abort-after"] = str(rng.randint(1, 20))
        try:
            stream = await client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=40, stream=True, extra_headers=headers
            )
            n = 0
            async for _ in stream:
                n += 1
                if fate == "hangup" and n == 5:
                    await stream.close()
                    break
            result = fate
        except (openai.APIError, httpx.HTTPError):
            result = fate + "_failed"
        outcomes[result] = outcomes.get(result, 0) + 1

    try:
        tasks = [asyncio.create_task(one(i)) for i in range(64)]
        await asyncio.sleep(0.2)
        await replicated.kill("extproc-1")  # streams on it break; their reservations are reaped
        await asyncio.gather(*tasks)
        await replicated.restart("extproc-1")
    finally:
        await client.close()
    assert sum(outcomes.values()) == 64
    async with await admin_client(replicated) as admin:
        deadline = time.monotonic() + 20
        while True:
            u = (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()
            if u["open_reservations"] == 0 and u["daily"]["reserved"] == 0:
                break
            assert time.monotonic() < deadline, u
            await asyncio.sleep(0.1)
    used = u["daily"]["used"]
    assert used > 0
    # What was settled or reaped, from the key's hourly history: it must equal the window.
    charged, window = await charged_vs_window(replicated.settings.redis_url, key["id"])
    assert charged == used, (outcomes, window)

"""Model routing the Envoy way: per-model upstream clusters chosen from the body's model,
with retries, outlier detection and circuit breakers, through the real Envoy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest_asyncio

from atlas.local.demo import DemoUpstream
from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, running_stack

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


@dataclass
class Routed:
    stack: Stack
    a: DemoUpstream
    b_broken: DemoUpstream
    b_good: DemoUpstream
    client: openai.AsyncOpenAI
    admin: httpx.AsyncClient


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def routed() -> AsyncIterator[Routed]:
    a, b_broken, b_good = DemoUpstream(), DemoUpstream(fail_status=503), DemoUpstream()
    for up in (a, b_broken, b_good):
        await up.start()
    routes = {"demo-a": [a.url], "demo-b*": [b_broken.url, b_good.url]}
    try:
        async with (
            running_stack(model_routes=routes) as stack,
            httpx.AsyncClient(
                base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as admin,
        ):
            key = (
                await admin.post(
                    "/v1/admin/keys", json={"name": "routing", "rate_per_sec": 1000, "burst": 1000}
                )
            ).json()
            client = openai.AsyncOpenAI(
                base_url=stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
            )
            try:
                yield Routed(stack, a, b_broken, b_good, client, admin)
            finally:
                await client.close()
    finally:
        for up in (a, b_broken, b_good):
            await up.stop()


async def envoy_stat(stack: Stack, name: str) -> int:
    async with httpx.AsyncClient() as raw:
        r = await raw.get(f"{stack.envoy_admin_url}/stats?filter=^{name}$&format=json")
    stats = r.json()["stats"]
    return int(stats[0]["value"]) if stats else 0


async def test_each_model_goes_to_its_own_upstream(routed: Routed) -> None:
    async with httpx.AsyncClient() as raw:
        default_before = len((await raw.get(routed.stack.upstream_url + "/demo/requests")).json())
    got = await routed.client.chat.completions.create(
        model="demo-a", messages=MESSAGES, max_tokens=4
    )
    assert got.usage is not None and got.usage.completion_tokens == 4
    assert [r["body"]["model"] for r in routed.a.requests] == ["demo-a"]
    assert routed.a.requests[0]["headers"]["x-atlas-model"] == "demo-a"
    await routed.client.chat.completions.create(
        model="something-else", messages=MESSAGES, max_tokens=2
    )
    async with httpx.AsyncClient() as raw:
        default = (await raw.get(routed.stack.upstream_url + "/demo/requests")).json()
    assert len(default) == default_before + 1 and default[-1]["body"]["model"] == "something-else"
    assert len(routed.a.requests) == 1


async def test_a_failing_replica_is_retried_then_ejected(routed: Routed) -> None:
    ok = 0
    deadline = time.monotonic() + 30
    while (
        await envoy_stat(routed.stack, "cluster.model_1.outlier_detection.ejections_enforced_total")
        == 0
    ):
        assert time.monotonic() < deadline, "the broken replica was never ejected"
        got = await routed.client.chat.completions.create(
            model="demo-b-large", messages=MESSAGES, max_tokens=3, stream=ok % 2 == 1
        )
        if isinstance(got, openai.AsyncStream):
            _ = [c async for c in got]
        ok += 1  # every request succeeds: a 503 from the broken replica is retried
    broken_hits = len(routed.b_broken.requests)
    assert broken_hits == 3  # outlier_detection.consecutive_5xx
    assert await envoy_stat(routed.stack, "cluster.model_1.upstream_rq_retry") >= 3
    # Ejected: the next requests all go to the good replica, without retries.
    good_before = len(routed.b_good.requests)
    for _ in range(5):
        await routed.client.chat.completions.create(model="demo-b", messages=MESSAGES, max_tokens=2)
    assert len(routed.b_broken.requests) == broken_hits
    assert len(routed.b_good.requests) == good_before + 5


async def test_retried_requests_are_charged_once(routed: Routed) -> None:
    key = (await routed.admin.post("/v1/admin/keys", json={"name": "once"})).json()
    client = openai.AsyncOpenAI(
        base_url=routed.stack.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
    )
    reported = []
    try:
        for _ in range(4):
            got = await client.chat.completions.create(
                model="demo-b", messages=MESSAGES, max_tokens=5
            )
            assert got.usage is not None and got.usage.completion_tokens == 5
            reported.append(got.usage.total_tokens)
    finally:
        await client.close()
    deadline = time.monotonic() + 5
    while (u := (await routed.admin.get(f"/v1/admin/keys/{key['id']}/usage")).json())[
        "open_reservations"
    ]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    # Charged what the answering replica reported, once per request: the 503s that were retried
    # carried no usage and must add nothing.
    assert u["daily"]["used"] == sum(reported) and u["daily"]["requests"] == 4

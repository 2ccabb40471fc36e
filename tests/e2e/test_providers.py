"""Several providers behind one Atlas, through the real Envoy with the openai SDK: credentials
that reach only their provider, a key pool whose member cools on 429 for its Retry-After,
every member cooling -> 503 with Retry-After, failover to the next provider charged once, and
the provider health endpoint. Each provider is its own demo upstream."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.demo import DemoUpstream
from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import settled

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "providers.png"
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
SECRETS = {"pool-1": "sk-pool-one", "pool-2": "sk-pool-two", "pool-3": "sk-pool-three"}
SECRETS |= {"primary-1": "sk-primary", "secondary-1": "sk-secondary"}


@dataclass
class World:
    stack: Stack
    pooled: DemoUpstream
    primary: DemoUpstream
    secondary: DemoUpstream
    admin: httpx.AsyncClient
    key: dict[str, Any]

    def client(self, retries: int = 0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.stack.proxy_url + "/v1", api_key=self.key["api_key"], max_retries=retries
        )


def _providers_file(tmp: Path, pooled: str, primary: str, secondary: str) -> Path:
    for member, secret in SECRETS.items():
        (tmp / member).write_text(secret + "\n")

    def member(mid: str) -> str:
        return f"        - {{id: {mid}, credential: {{file: {tmp / mid}}}}}\n"

    text = (
        "providers:\n"
        f"  - name: pooled\n    base_url: {pooled}/v1\n"
        "    pool:\n      strategy: round_robin\n      members:\n"
        + "".join(member(m) for m in ("pool-1", "pool-2", "pool-3"))
        + f"  - name: primary\n    base_url: {primary}/v1\n"
        "    cooldown: {server_error_s: 30}\n"
        "    pool:\n      members:\n" + member("primary-1")
        + f"  - name: secondary\n    base_url: {secondary}/v1\n"
        "    pool:\n      members:\n" + member("secondary-1")
        + "models:\n"
        "  - alias: pool-model\n    targets: [{provider: pooled}]\n"
        "  - alias: fo-model\n    targets:\n"
        "      - {provider: primary, priority: 0}\n      - {provider: secondary, priority: 1}\n"
    )  # fmt: skip
    path = tmp / "providers.yaml"
    path.write_text(text)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    ups = [DemoUpstream(), DemoUpstream(), DemoUpstream()]
    for up in ups:
        await up.start()
    path = _providers_file(tmp_path_factory.mktemp("providers"), *(u.url for u in ups))
    try:
        async with (
            running_stack(providers_file=str(path)) as stack,
            httpx.AsyncClient(
                base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as admin,
        ):
            key = (
                await admin.post(
                    "/v1/admin/keys",
                    json={"name": "providers", "rate_per_sec": 1000, "burst": 1000},
                )
            ).json()
            yield World(stack, *ups, admin, key)
    finally:
        for up in ups:
            await up.stop()


async def _mode(up: DemoUpstream, mode: dict[str, Any] | None) -> None:
    async with httpx.AsyncClient(base_url=up.url) as c:
        r = await (c.put("/demo/mode", json=mode) if mode else c.delete("/demo/mode"))
        r.raise_for_status()


def _credentials_seen(up: DemoUpstream) -> list[str]:
    return [
        r["headers"].get("authorization", "") for r in up.requests if r["path"].startswith("/v1")
    ]


async def _health(w: World) -> dict[str, Any]:
    r = await w.admin.get("/v1/admin/providers", params={"window_s": 600})
    assert r.status_code == 200, r.text
    return {p["name"]: p for p in r.json()["providers"]}


async def _until(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="session")
async def test_credentials_reach_only_their_provider(world: World) -> None:
    client = world.client()
    try:
        for _ in range(6):
            r = await client.chat.completions.create(model="pool-model", messages=MESSAGES)
            assert r.choices[0].message.content
    finally:
        await client.close()
    seen = _credentials_seen(world.pooled)
    pool = {"Bearer " + SECRETS[m] for m in ("pool-1", "pool-2", "pool-3")}
    assert set(seen) == pool  # round robin: every member, and only the pool's secrets
    assert all(world.key["api_key"] not in str(r["headers"]) for r in world.pooled.requests)
    assert all("x-atlas-provider" not in r["headers"] for r in world.pooled.requests)
    assert not [r for r in world.primary.requests + world.secondary.requests]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_member_cools_for_its_retry_after_and_returns(world: World) -> None:
    await _mode(
        world.pooled, {"credentials": {SECRETS["pool-2"]: {"status": 429, "retry_after": 3}}}
    )
    client = world.client()
    try:
        statuses = []
        for _ in range(3):  # round robin reaches pool-2 within three requests
            try:
                await client.chat.completions.create(model="pool-model", messages=MESSAGES)
                statuses.append(200)
            except openai.RateLimitError:
                statuses.append(429)
        assert statuses.count(429) == 1
        await _until(
            lambda: _is_cooling(world, "pooled", "pool-2"), timeout_s=2
        )  # the access log reached the ledger
        world.pooled.requests.clear()
        for _ in range(6):  # the other two carry the load meanwhile
            await client.chat.completions.create(model="pool-model", messages=MESSAGES)
        assert set(_credentials_seen(world.pooled)) == {
            "Bearer " + SECRETS["pool-1"],
            "Bearer " + SECRETS["pool-3"],
        }
        await _mode(world.pooled, None)
        await _until(lambda: _not_cooling(world, "pooled", "pool-2"), timeout_s=6)
        world.pooled.requests.clear()
        for _ in range(3):
            await client.chat.completions.create(model="pool-model", messages=MESSAGES)
        assert "Bearer " + SECRETS["pool-2"] in _credentials_seen(world.pooled)
    finally:
        await _mode(world.pooled, None)
        await client.close()


async def _is_cooling(w: World, provider: str, member: str) -> bool:
    members = {m["id"]: m for m in (await _health(w))[provider]["members"]}
    return bool(members[member]["state"] == "cooling")


async def _not_cooling(w: World, provider: str, member: str) -> bool:
    return not await _is_cooling(w, provider, member)


@pytest.mark.asyncio(loop_scope="session")
async def test_every_member_cooling_is_a_503_with_retry_after(world: World) -> None:
    await _mode(
        world.pooled,
        {
            "credentials": {
                s: {"status": 429, "retry_after": 2}
                for k, s in SECRETS.items()
                if k.startswith("pool")
            }
        },
    )
    try:
        async with httpx.AsyncClient(base_url=world.stack.proxy_url) as c:
            auth = {"authorization": f"Bearer {world.key['api_key']}"}
            body = {"model": "pool-model", "messages": MESSAGES}
            for _ in range(3):
                r = await c.post("/v1/chat/completions", json=body, headers=auth)
                assert r.status_code == 429
            await _until(lambda: _all_cooling(world), timeout_s=2)
            r = await c.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "providers_unavailable"
            assert 1 <= int(r.headers["retry-after"]) <= 2
            await _mode(world.pooled, None)
            await asyncio.sleep(int(r.headers["retry-after"]))  # what the client is told to do
            r = await c.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 200, r.text
    finally:
        await _mode(world.pooled, None)
    await settled(world.admin, world.key["id"])  # the 503 reserved nothing it kept


async def _all_cooling(w: World) -> bool:
    return bool((await _health(w))["pooled"]["state"] == "cooling")


@pytest.mark.asyncio(loop_scope="session")
async def test_failover_to_the_secondary_is_charged_once_and_names_it(world: World) -> None:
    await settled(world.admin, world.key["id"])
    before = (await world.admin.get(f"/v1/admin/keys/{world.key['id']}/usage")).json()
    await _mode(world.primary, {"fail_status": 503})
    client = world.client(retries=2)  # the SDK's default retry carries it to the secondary
    try:
        r = await client.chat.completions.create(model="fo-model", messages=MESSAGES)
        assert r.choices[0].message.content
        assert r.usage is not None
        attempts = len(world.primary.requests)  # Envoy may retry its one host once
        assert 1 <= attempts <= 2
        # The primary stays out while it cools: the next request goes straight to the secondary.
        world.secondary.requests.clear()
        r2 = await client.chat.completions.create(model="fo-model", messages=MESSAGES)
        assert r2.choices[0].message.content
    finally:
        await _mode(world.primary, None)
        await client.close()
    assert len(world.primary.requests) == attempts  # cooling: never again meanwhile
    assert set(_credentials_seen(world.primary)) == {"Bearer " + SECRETS["primary-1"]}
    assert _credentials_seen(world.secondary) == ["Bearer " + SECRETS["secondary-1"]]
    after = await settled(world.admin, world.key["id"])
    assert after["daily"]["used"] - before["daily"]["used"] == (
        r.usage.total_tokens + (r2.usage.total_tokens if r2.usage else 0)
    )  # the failed attempt was refunded: each completion charged once

    async def usage_reported() -> bool:  # written after the settlement, batched
        return bool((await _health(world))["secondary"]["usage"]["requests"] >= 2)

    await _until(usage_reported, timeout_s=3)
    health = await _health(world)
    assert health["primary"]["state"] == "cooling"
    assert health["primary"]["cooling_reason"] == "503"
    assert health["primary"]["errors"] >= 1
    secondary = health["secondary"]
    assert secondary["state"] == "active"
    assert secondary["usage"]["requests"] >= 2  # the settlements name the provider used
    assert secondary["members"][0]["usage"]["completion_tokens"] >= r.usage.completion_tokens
    assert secondary["latency_ms"]["p50"] is not None
    assert secondary["ttfb_ms"]["p99"] is not None


@pytest.mark.asyncio(loop_scope="session")
async def test_streams_route_to_providers_and_are_settled(world: World) -> None:
    client = world.client()
    try:
        stream = await client.chat.completions.create(
            model="pool-model", messages=MESSAGES, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert text
    assert world.pooled.requests[-1]["headers"]["authorization"].startswith("Bearer sk-pool-")
    await settled(world.admin, world.key["id"])


PANEL = """(() => {
  const rows = (sel, attr) => Object.fromEntries([...document.querySelectorAll(sel)].map(
    (tr) => [tr.dataset[attr], tr.querySelector('.state').textContent.trim()]));
  return {
    configured: document.getElementById('providers').dataset.configured,
    providers: rows('#providers tr[data-provider]', 'provider'),
    members: rows('#providers tr[data-member]', 'member'),
    text: document.getElementById('providers').innerText,
  };
})()"""


@pytest.mark.asyncio(loop_scope="session")
async def test_dashboard_panel_shows_provider_states(world: World, tmp_path: Path) -> None:
    """After the failover above the primary cools (server_error_s: 30); the panel shows it,
    in Chromium."""
    from tests.browser import CHROMIUM, chromium

    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is missing: run scripts/install-chromium.sh")
    async with chromium(CHROMIUM) as browser:
        page = await browser.new_page()
        try:
            await page.goto(f"{world.stack.admin_url}/dashboard#token={ADMIN_TOKEN}")
            await page.wait_for(
                "document.querySelector('#providers tr[data-provider=primary]') !== null"
            )
            shown = await page.evaluate(PANEL)
            png = await page.screenshot()
        finally:
            await page.close()
    (tmp_path / "providers.png").write_bytes(png)
    if os.environ.get("ATLAS_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.write_bytes(png)
    assert shown["configured"] == "true"
    assert shown["providers"]["primary"] == "cooling", shown
    assert shown["providers"]["secondary"] == "active", shown
    assert shown["providers"]["pooled"] in ("active", "cooling"), shown
    assert set(shown["members"]) == {"pool-1", "pool-2", "pool-3", "primary-1", "secondary-1"}
    assert "503" in shown["text"]  # the cooling reason
    assert not page.errors, page.errors

"""Cached, cache-write and reasoning tokens against a real valkey-server: settled into the
key's windows and hourly history, shown by /v1/usage and the history routes, and counted
toward quotas as ATLAS_QUOTA_COUNTS_CACHED says."""

from __future__ import annotations

from typing import Any

import httpx
import redis

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings

MODEL = "demo-small"


async def new_key(api: httpx.AsyncClient, ledger: RedisLedger) -> tuple[KeyRecord, str]:
    r = await api.post("/v1/admin/keys", json={"name": "k", "daily_limit": 100_000})
    assert r.status_code == 201, r.text
    rec = await ledger.get_key(r.json()["id"])
    assert rec is not None
    return rec, r.json()["api_key"]


def detailed(rec: KeyRecord, rid: str, **kw: Any) -> Settlement:
    """100 prompt tokens (60 cached, 10 written to the cache), 300 completion (200 reasoning)."""
    parts: dict[str, Any] = {"cached_tokens": 60, "cache_write_tokens": 10, "reasoning_tokens": 200}
    return Settlement(rec.id, rid, 100, 300, MODEL, True, "completed", **{**parts, **kw})


def kinds(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["cached"], row["cache_write"], row["reasoning"]


async def test_settled_kinds_show_in_usage_and_every_history(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    rec, secret = await new_key(api, ledger)
    await ledger.admit(rec, AdmitRequest("r1", 100, 400, "normal", MODEL, 1.0))
    assert (await ledger.settle(detailed(rec, "r1"))).charged == 400
    # A settlement that reports no parts adds none.
    await ledger.settle(Settlement(rec.id, "r2", 5, 5, MODEL, True, "completed"))
    own = await api.get("/v1/usage", headers={"authorization": f"Bearer {secret}"})
    assert own.status_code == 200, own.text
    admin = await api.get(f"/v1/admin/keys/{rec.id}/usage")
    for u in (own.json(), admin.json()):
        for window in (u["daily"], u["monthly"]):
            assert window["used"] == 410  # cached tokens count by default
            assert kinds(window) == (60, 10, 200)
    for url in (
        f"/v1/admin/keys/{rec.id}/history?hours=1",
        f"/v1/admin/models/{MODEL}/history?hours=1",
        "/v1/admin/history?hours=1",
    ):
        (hour,) = (await api.get(url)).json()["hours"]
        assert (hour["prompt"], hour["completion"], hour["requests"]) == (105, 305, 2), url
        assert kinds(hour) == (60, 10, 200), url


async def test_quotas_can_leave_cached_tokens_out(
    settings: Settings, redis_sync: redis.Redis, api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    rec, _ = await new_key(api, ledger)
    uncached = RedisLedger.from_settings(settings.model_copy(update={"quota_counts_cached": False}))
    try:
        a = await uncached.admit(rec, AdmitRequest("r1", 100, 400, "normal", MODEL, 1.0))
        s = await uncached.settle(detailed(rec, "r1"))
        # 100 + 300 - 60 cached; the cache writes still count.
        assert (s.status, s.charged, s.refunded) == ("settled", 340, a.reserved - 340)
        usage = await uncached.usage(rec)
        assert usage.daily.used == usage.monthly.used == 340
        assert (usage.daily.cached, usage.monthly.reasoning) == (60, 200)
        # The history still has everything the upstream processed.
        (row,) = await uncached.history(
            keys.window_prefix(rec.id), uncached.hour_start(await uncached.server_time()), 1
        )
        assert (row.get("prompt"), row.get("cached")) == (100, 60)
    finally:
        await uncached.close()


async def test_a_late_settlement_records_its_kinds(
    settings: Settings, redis_sync: redis.Redis, api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    rec, _ = await new_key(api, ledger)
    a = await ledger.admit(rec, AdmitRequest("r1", 100, 400, "normal", MODEL, 1.0))
    assert await ledger.lease({rec.id: ["r1"]}) == 1  # claimed by a stream that then died
    redis_sync.zadd(keys.reservation_expiry(rec.id), {"r1": 0})  # its deadline passed
    assert await ledger.reap(rec.id) == (1, a.reserved)
    late = await ledger.settle(detailed(rec, "r1"))
    assert (late.status, late.charged) == ("late", 400 - a.reserved)
    usage = await ledger.usage(rec)
    assert usage.daily.used == 400
    assert (usage.daily.cached, usage.daily.cache_write, usage.daily.reasoning) == (60, 10, 200)
    h = (await api.get(f"/v1/admin/keys/{rec.id}/history?hours=1")).json()["hours"][0]
    assert kinds(h) == (60, 10, 200)

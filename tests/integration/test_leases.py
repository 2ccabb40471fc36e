"""Claims and renewals against a real valkey-server: an unclaimed reservation is released
(charged 0) after the claim timeout, a claimed one lives the TTL and is renewed while its
stream lives, and the ledger invariants hold throughout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest_asyncio
import redis

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from atlas.windows import window_names
from extproc.leases import LeaseKeeper
from tests.factories import key_record


def key() -> KeyRecord:
    return key_record("l" * 20, id="key_l")


def req(rid: str) -> AdmitRequest:
    return AdmitRequest(rid, 10, 90, "normal", "m", 1.0)


@pytest_asyncio.fixture
async def quick(settings: Settings, redis_sync: redis.Redis) -> AsyncIterator[RedisLedger]:
    """A ledger with a 0.2 s claim timeout and a 1 s reservation TTL."""
    the_ledger = RedisLedger.from_settings(
        settings.model_copy(update={"claim_timeout_s": 0.2, "reservation_ttl_s": 1})
    )
    yield the_ledger
    await the_ledger.close()


async def reap_until(ledger: RedisLedger, key_id: str, timeout_s: float = 5) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while (got := await ledger.reap(key_id)) == (0, 0):
        assert time.monotonic() < deadline, "never reaped"
        await asyncio.sleep(0.02)
    return got


def books(r: redis.Redis, rec: KeyRecord, now_ms: int) -> dict[str, str]:
    names = window_names(now_ms // 1000)
    return {
        **r.hgetall(f"{keys.window_prefix(rec.id)}d:{names.day}"),  # type: ignore[dict-item]
        **{
            f"h_{k}": v
            for k, v in r.hgetall(f"{keys.window_prefix(rec.id)}h:{names.hour}").items()  # type: ignore[union-attr]
        },
    }


async def test_an_unclaimed_reservation_is_released_after_the_claim_timeout_charged_0(
    quick: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    a = await quick.admit(rec, req("r1"))
    expiry = redis_sync.zscore(keys.reservation_expiry(rec.id), "r1")
    assert expiry is not None and expiry - a.now_ms <= 200  # not the 1 s TTL
    started = time.monotonic()
    assert await reap_until(quick, rec.id) == (1, 0)
    assert time.monotonic() - started < 1.0
    b = books(redis_sync, rec, a.now_ms)
    assert (b["reserved"], b.get("used", "0"), b["h_abandoned"], b["h_reaped"]) == (
        "0",
        "0",
        "1",
        "1",
    )
    # extproc was merely slow: its settlement still charges the real usage.
    late = await quick.settle(Settlement(rec.id, "r1", 10, 20, "m", True, "completed"))
    assert (late.status, late.charged) == ("late", 30)
    assert books(redis_sync, rec, a.now_ms)["used"] == "30"


async def test_a_claimed_reservation_lives_the_ttl_and_settling_removes_the_claim(
    quick: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    a = await quick.admit(rec, req("r1"))
    assert await quick.lease({rec.id: ["r1", "never-admitted"]}) == 1
    assert redis_sync.sismember(keys.reservation_claims(rec.id), "r1")
    expiry = redis_sync.zscore(keys.reservation_expiry(rec.id), "r1")
    assert expiry is not None and expiry - a.now_ms >= 900
    await asyncio.sleep(0.3)  # past the claim timeout
    assert await quick.reap(rec.id) == (0, 0)
    s = await quick.settle(Settlement(rec.id, "r1", 10, 20, "m", True, "completed"))
    assert (s.status, s.charged) == ("settled", 30)
    assert not redis_sync.exists(keys.reservation_claims(rec.id))
    # A claim arriving after the settlement (a flush racing the stream's end) is a no-op.
    assert await quick.lease({rec.id: ["r1"]}) == 0
    assert redis_sync.zcard(keys.reservation_expiry(rec.id)) == 0
    assert not redis_sync.exists(keys.reservation_claims(rec.id))


async def test_a_live_stream_is_renewed_past_the_ttl_then_reaped_in_full_once_it_dies(
    quick: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    a = await quick.admit(rec, req("r1"))
    keeper = LeaseKeeper(quick, ttl_s=1, flush_s=0.02)
    task = asyncio.create_task(keeper.run())
    try:
        keeper.claim(rec.id, "r1")
        end = time.monotonic() + 2.5  # 2.5 TTLs
        while time.monotonic() < end:
            assert await quick.reap(rec.id) == (0, 0)
            await asyncio.sleep(0.05)
        assert redis_sync.hexists(keys.reservations(rec.id), "r1")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # extproc died: renewals stop, the claimed reservation is charged what it reserved.
    assert await reap_until(quick, rec.id) == (1, 100)
    b = books(redis_sync, rec, a.now_ms)
    assert (b["reserved"], b["used"], b.get("h_abandoned", "0")) == ("0", "100", "0")
    assert not redis_sync.exists(keys.reservation_claims(rec.id))

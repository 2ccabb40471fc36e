"""admit/settle/reap against a real valkey-server: every rule, under concurrency, and the
ledger invariants (used == Σ settled, reserved == Σ open reservations, nothing negative)."""

from __future__ import annotations

import asyncio
import random
import time

import redis

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement, SettleResult
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from atlas.windows import window_names
from tests.factories import key_record


def key(**kw: object) -> KeyRecord:
    return key_record("a" * 20, id="key_a", **kw)


def req(
    rid: str,
    prompt: int = 10,
    completion: int = 90,
    *,
    priority: str = "normal",
    ceiling: float = 1.0,
    **kw: object,
) -> AdmitRequest:
    return AdmitRequest(
        reservation_id=rid,
        prompt_tokens=prompt,
        completion_tokens=completion,
        priority=priority,
        model="m",
        ceiling=ceiling,
        **kw,
    )  # type: ignore[arg-type]


def settle(rec: KeyRecord, rid: str, prompt: int, completion: int) -> Settlement:
    return Settlement(
        rec.id, rid, prompt, completion, "m", True, "completed", rec.tokens_per_minute or 0
    )


def open_reserved(r: redis.Redis, rec: KeyRecord) -> int:
    return sum(int(v.split("|")[0]) for v in r.hvals(keys.reservations(rec.id)))


def window(r: redis.Redis, rec: KeyRecord, kind: str, name: str) -> dict[str, int]:
    raw = r.hgetall(f"{keys.window_prefix(rec.id)}{kind}:{name}")
    return {k: int(v) for k, v in raw.items()}


async def test_200_concurrent_admits_against_burst_50_admit_exactly_50(
    ledger: RedisLedger,
) -> None:
    rec = key(rate_per_sec=0.01, burst=50)
    results = await asyncio.gather(*(ledger.admit(rec, req(f"r{i}")) for i in range(200)))
    admitted = [a for a in results if a.admitted]
    assert len(admitted) == 50
    refused = [a for a in results if not a.admitted]
    assert {a.reason for a in refused} == {"rate_limit_requests"}
    assert all(a.retry_after_ms > 0 for a in refused)


async def test_request_bucket_refills_at_its_rate(ledger: RedisLedger) -> None:
    rec = key(rate_per_sec=20, burst=1)
    assert (await ledger.admit(rec, req("r1"))).admitted
    refused = await ledger.admit(rec, req("r2"))
    assert not refused.admitted and 0 < refused.retry_after_ms <= 50
    await asyncio.sleep(refused.retry_after_ms / 1000 + 0.01)
    assert (await ledger.admit(rec, req("r3"))).admitted


async def test_quota_ceiling_by_priority(ledger: RedisLedger, redis_sync: redis.Redis) -> None:
    rec = key(daily_limit=1000)
    assert (await ledger.admit(rec, req("big", 0, 700, ceiling=1.0))).admitted
    # 700 reserved: low (80% = 800) cannot fit 150, normal (95%) and high (100%) can.
    low = await ledger.admit(rec, req("low", 0, 150, priority="low", ceiling=0.8))
    assert not low.admitted and low.reason == "quota_daily"
    assert low.retry_after_ms == low.day_reset_s * 1000 - low.now_ms
    assert (await ledger.admit(rec, req("normal", 0, 150, ceiling=0.95))).admitted
    assert not (await ledger.admit(rec, req("n2", 0, 150, ceiling=0.95))).admitted
    assert (await ledger.admit(rec, req("high", 0, 150, priority="high", ceiling=1.0))).admitted
    assert open_reserved(redis_sync, rec) == 1000


async def test_monthly_quota_refuses_with_its_own_reason(ledger: RedisLedger) -> None:
    rec = key(daily_limit=10_000, monthly_limit=500)
    a = await ledger.admit(rec, req("r1", 0, 600))
    assert not a.admitted and a.reason == "quota_monthly"
    assert a.retry_after_ms == a.month_reset_s * 1000 - a.now_ms


async def test_tokens_per_minute_bucket_and_refund(ledger: RedisLedger) -> None:
    rec = key(tokens_per_minute=600)
    assert (await ledger.admit(rec, req("r1", 0, 500))).admitted
    refused = await ledger.admit(rec, req("r2", 0, 200))
    assert not refused.admitted and refused.reason == "rate_limit_tokens"
    # 100 left, 100 more needed at 10 tokens/s: about 10 s.
    assert 9_000 <= refused.retry_after_ms <= 10_000
    # Settling at 50 refunds 450 to the bucket: now 200 fits.
    await ledger.settle(settle(rec, "r1", 0, 50))
    ok = await ledger.admit(rec, req("r3", 0, 200))
    assert ok.admitted and ok.tokens_remaining is not None and ok.tokens_remaining >= 349


async def test_max_concurrent(ledger: RedisLedger) -> None:
    rec = key(max_concurrent=2)
    assert (await ledger.admit(rec, req("r1"))).admitted
    assert (await ledger.admit(rec, req("r2"))).admitted
    third = await ledger.admit(rec, req("r3"))
    assert not third.admitted and third.reason == "concurrency"
    await ledger.settle(settle(rec, "r1", 10, 10))
    assert (await ledger.admit(rec, req("r4"))).admitted


async def test_clamp_lowers_max_tokens_to_what_is_left(ledger: RedisLedger) -> None:
    rec = key(daily_limit=1000)
    await ledger.admit(rec, req("r1", 0, 900))
    clamped = await ledger.admit(rec, req("r2", 20, 500, clamp=True))
    assert clamped.admitted and clamped.granted_completion == 80 and clamped.reserved == 100
    refused = await ledger.admit(rec, req("r3", 20, 500, clamp=True))
    assert not refused.admitted and refused.reason == "quota_daily"


async def test_shadow_admits_but_reports_the_rule(ledger: RedisLedger) -> None:
    rec = key(rate_per_sec=0.01, burst=1)
    await ledger.admit(rec, req("r1"))
    a = await ledger.admit(rec, req("r2", shadow=True))
    assert a.admitted and a.reason == "rate_limit_requests"


async def test_window_rollover(
    settings: Settings, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    """A ledger whose windows run a day ahead stands in for tomorrow."""
    tomorrow = RedisLedger.from_settings(
        settings.model_copy(update={"window_utc_offset_min": 24 * 60})
    )
    try:
        rec = key(daily_limit=100)
        today = await ledger.admit(rec, req("r1", 0, 100))
        assert today.admitted
        assert not (await ledger.admit(rec, req("r2", 0, 10))).admitted
        next_day = await tomorrow.admit(rec, req("r3", 0, 10))
        assert next_day.admitted and next_day.day_reserved == 10
        # Settled tomorrow: released from today's window, charged to tomorrow's.
        await tomorrow.settle(settle(rec, "r1", 0, 60))
        d0 = window_names(today.now_ms // 1000).day
        d1 = window_names(today.now_ms // 1000 + 86400).day
        assert window(redis_sync, rec, "d", d0)["reserved"] == 0
        assert window(redis_sync, rec, "d", d1) == {"reserved": 10, "used": 60, "requests": 1}
    finally:
        await tomorrow.close()


async def test_reservation_ttl_reap_and_late_settlement(
    settings: Settings, redis_sync: redis.Redis
) -> None:
    short = RedisLedger.from_settings(settings.model_copy(update={"reservation_ttl_s": 1}))
    try:
        rec = key()
        a = await short.admit(rec, req("r1", 10, 90))
        assert await short.lease({rec.id: ["r1"]}) == 1  # an ext_proc stream claimed it
        assert await short.reap(rec.id) == (0, 0)  # not expired yet
        deadline = time.monotonic() + 5
        while (reaped := await short.reap(rec.id)) == (0, 0):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert reaped == (1, 100)
        day = window_names(a.now_ms // 1000).day
        assert window(redis_sync, rec, "d", day)["used"] == 100
        assert open_reserved(redis_sync, rec) == 0
        late = await short.settle(settle(rec, "r1", 10, 20))
        assert (late.status, late.charged) == ("late", -70)
        assert window(redis_sync, rec, "d", day)["used"] == 30
        assert (await short.settle(settle(rec, "r1", 10, 20))).status == "duplicate"
    finally:
        await short.close()


async def test_invariants_under_concurrency(
    settings: Settings, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rng = random.Random(7)
    rec = key(daily_limit=200_000, rate_per_sec=0.01, burst=150)
    admissions = await asyncio.gather(
        *(
            ledger.admit(rec, req(f"r{i}", rng.randint(1, 50), rng.randint(1, 200)))
            for i in range(200)
        )
    )
    admitted = [(f"r{i}", a) for i, a in enumerate(admissions) if a.admitted]
    assert len(admitted) == 150
    assert open_reserved(redis_sync, rec) == sum(a.reserved for _, a in admitted)
    settled, left_open = admitted[:100], admitted[100:]
    charges = {rid: (rng.randint(0, 50), rng.randint(0, 300)) for rid, _ in settled}
    results = await asyncio.gather(
        *(ledger.settle(settle(rec, rid, *charges[rid])) for rid, _ in settled),
        *(ledger.settle(settle(rec, rid, *charges[rid])) for rid, _ in settled[:20]),  # replays
    )
    assert sum(r.status == "duplicate" for r in results) == 20
    day = window_names(admissions[0].now_ms // 1000).day
    w = window(redis_sync, rec, "d", day)
    assert w["used"] == sum(p + c for p, c in charges.values())
    assert w["reserved"] == open_reserved(redis_sync, rec) == sum(a.reserved for _, a in left_open)
    # The rest are never settled: the reaper charges their reservations and reserved drops to 0.
    reaper = RedisLedger.from_settings(settings.model_copy(update={"reservation_ttl_s": 1}))
    try:
        assert await reaper.lease({rec.id: [rid for rid, _ in left_open]}) == 50  # streams seen
        redis_sync.zadd(
            keys.reservation_expiry(rec.id), {rid: 0 for rid, _ in left_open}
        )  # expire them now
        assert await reaper.reap(rec.id) == (50, sum(a.reserved for _, a in left_open))
    finally:
        await reaper.close()
    w = window(redis_sync, rec, "d", day)
    assert w["reserved"] == 0 == open_reserved(redis_sync, rec)
    assert w["used"] == sum(p + c for p, c in charges.values()) + sum(
        a.reserved for _, a in left_open
    )
    assert all(v >= 0 for v in w.values())


async def test_a_batch_of_settlements_runs_in_one_round_trip_each_on_its_own(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    """settle_many (one access-log message): every settlement as settle would do it, one
    refused input or a duplicate leaves the others alone, and scripts a restart flushed are
    loaded again."""
    a, b = key(), key_record("b" * 20, id="key_b")
    for rec, rid in ((a, "r1"), (a, "r2"), (b, "r3")):
        assert (await ledger.admit(rec, req(rid))).admitted
    redis_sync.script_flush()  # a restarted server: every EVALSHA of the batch is unknown
    hostile = Settlement(a.id, "r2", 10**15, 1, "m", True, "completed")  # beyond atlas.limits
    got = await ledger.settle_many([settle(a, "r1", 10, 5), hostile, settle(b, "r3", 7, 3)])
    assert [getattr(r, "status", type(r).__name__) for r in got] == [
        "settled",
        "LedgerInputError",
        "settled",
    ]
    (again,) = await ledger.settle_many([settle(a, "r1", 10, 5)])  # a retried batch
    assert isinstance(again, SettleResult) and again.status == "duplicate"
    day = window_names(int(time.time())).day
    assert window(redis_sync, a, "d", day)["used"] == 15
    assert window(redis_sync, b, "d", day)["used"] == 10
    assert open_reserved(redis_sync, a) == 100  # r2 is still reserved: the reaper's
    assert await ledger.settle_many([]) == []

"""Huge numbers and unreadable entries against a real valkey-server: every integer the
scripts store stays an integer, an entry no script can read is removed and reported, and one
bad key never stops the others."""

from __future__ import annotations

import pytest
import redis

from atlas import limits
from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, LedgerInputError, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.windows import window_names
from tests.factories import key_record

BIG = limits.MAX_TOKEN_LIMIT  # 10**12


def key(i: int = 0, **kw: object) -> KeyRecord:
    fields: dict[str, object] = {"daily_limit": BIG, "monthly_limit": BIG, **kw}
    return key_record(f"b{i}" * 10, id=f"key_b{i}", **fields)


def req(rid: str, prompt: int, completion: int, **kw: object) -> AdmitRequest:
    return AdmitRequest(rid, prompt, completion, "normal", "m", 1.0, **kw)  # type: ignore[arg-type]


def day_window(r: redis.Redis, rec: KeyRecord, now_ms: int) -> dict[str, str]:
    day = window_names(now_ms // 1000).day
    return r.hgetall(f"{keys.window_prefix(rec.id)}d:{day}")  # type: ignore[return-value]


async def expire_claimed(ledger: RedisLedger, r: redis.Redis, rec: KeyRecord, rid: str) -> None:
    assert await ledger.lease({rec.id: [rid]}) == 1  # an ext_proc stream claimed it...
    r.zadd(keys.reservation_expiry(rec.id), {rid: 0})  # ...and was lost


async def test_values_of_10_to_the_12_round_trip_admit_settle_reap_exactly(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    prompt, completion = 123_456_789_012, 400_000_000_001  # 5.2e11: '%.14g' would round
    a = await ledger.admit(rec, req("r1", prompt, completion))
    assert a.admitted and a.reserved == prompt + completion
    entry = redis_sync.hget(keys.reservations(rec.id), "r1")
    assert entry is not None and entry.startswith(f"{prompt + completion}|")
    s = await ledger.settle(Settlement(rec.id, "r1", prompt, 299_999_999_999, "m", True, "done"))
    assert (s.status, s.charged) == ("settled", prompt + 299_999_999_999)
    assert s.refunded == completion - 299_999_999_999
    assert redis_sync.get(f"{keys.window_prefix(rec.id)}done:r1") == (
        f"settled:{prompt + 299_999_999_999}"
    )
    w = day_window(redis_sync, rec, a.now_ms)
    assert (w["used"], w["reserved"]) == (str(prompt + 299_999_999_999), "0")

    b = await ledger.admit(rec, req("r2", 1, 476_543_210_986))
    assert b.admitted and b.reserved == 476_543_210_987
    await expire_claimed(ledger, redis_sync, rec, "r2")
    assert await ledger.reap(rec.id) == (1, 476_543_210_987)
    assert redis_sync.get(f"{keys.window_prefix(rec.id)}done:r2") == "reaped:476543210987:0"
    late = await ledger.settle(Settlement(rec.id, "r2", 1, 10**11, "m", True, "done"))
    assert (late.status, late.charged) == ("late", 10**11 + 1 - 476_543_210_987)
    w = day_window(redis_sync, rec, a.now_ms)
    assert w["used"] == str(prompt + 299_999_999_999 + 10**11 + 1) and w["reserved"] == "0"


async def test_the_scripts_alone_store_10_to_the_14_as_integers(
    ledger: RedisLedger, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original defect (`1e+14|...`, then settle and reap fail), with the Python bounds
    switched off: the Lua itself must format every stored integer as digits."""
    monkeypatch.setattr("atlas.ledger.redis.admission.check_admit", lambda req: None)
    monkeypatch.setattr("atlas.ledger.redis.settlement.check_settlement", lambda s: None)
    monkeypatch.setattr(limits, "MAX_TOKEN_LIMIT", 10**16)
    rec = key(daily_limit=10**15, monthly_limit=10**15)
    a = await ledger.admit(rec, req("r1", 10**14, 10**14))
    assert a.admitted
    assert redis_sync.hget(keys.reservations(rec.id), "r1").startswith("200000000000000|")  # type: ignore[union-attr]
    s = await ledger.settle(Settlement(rec.id, "r1", 10**14, 5, "m", True, "done"))
    assert (s.status, s.charged) == ("settled", 10**14 + 5)
    assert redis_sync.get(f"{keys.window_prefix(rec.id)}done:r1") == "settled:100000000000005"
    assert (await ledger.admit(rec, req("r2", 10**14, 10**14))).admitted
    await expire_claimed(ledger, redis_sync, rec, "r2")
    assert await ledger.reap(rec.id) == (1, 2 * 10**14)
    assert redis_sync.get(f"{keys.window_prefix(rec.id)}done:r2") == "reaped:200000000000000:0"
    w = day_window(redis_sync, rec, a.now_ms)
    assert (w["used"], w["reserved"]) == (str(3 * 10**14 + 5), "0")


async def test_numbers_beyond_the_bounds_are_refused_before_redis(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    for bad in (
        req("r1", 10**14, 10),
        req("r1", 10, -1),
        req("r1", 10, 10, choices=0),
        req("r1", 10, 10, cost_micros=10**18),
    ):
        with pytest.raises(LedgerInputError):
            await ledger.admit(rec, bad)
    with pytest.raises(LedgerInputError, match="completion_tokens"):
        await ledger.settle(Settlement(rec.id, "r1", 1, 10**14, "m", True, "done"))
    assert redis_sync.keys("atlas:*") == []  # nothing written
    # A record stored before limits were bounded still admits (its limits read as the bound).
    legacy = rec.model_copy(update={"daily_limit": 10**15, "monthly_limit": 10**16})
    a = await ledger.admit(legacy, req("r1", 10, 10**12 - 10))
    assert a.admitted and a.reserved == 10**12


async def test_an_unreadable_reservation_is_removed_and_reported_never_an_error(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    a = await ledger.admit(rec, req("r1", 10, 90))
    day, month = window_names(a.now_ms // 1000).day, window_names(a.now_ms // 1000).month
    # Written by an older admit.lua ('%.14g'): still read, released and charged exactly.
    redis_sync.hset(keys.reservations(rec.id), "r1", f"1e+2|{day}|{month}|0|normal|m")
    s = await ledger.settle(Settlement(rec.id, "r1", 10, 20, "m", True, "done"))
    assert (s.status, s.charged, s.refunded) == ("settled", 30, 70)
    assert day_window(redis_sync, rec, a.now_ms)["reserved"] == "0"
    # Garbage: settle charges the usage and removes it; reap removes another and counts it.
    for rid in ("r2", "r3"):
        assert (await ledger.admit(rec, req(rid, 10, 90))).admitted
        redis_sync.hset(keys.reservations(rec.id), rid, "garbage|x")
    s = await ledger.settle(Settlement(rec.id, "r2", 10, 5, "m", True, "done"))
    assert (s.status, s.charged) == ("malformed", 15)
    redis_sync.zadd(keys.reservation_expiry(rec.id), {"r3": 0})
    totals = await ledger.reap_keys([rec.id])
    assert (totals.reaped, totals.malformed, totals.failed_keys) == (1, 1, 0)
    assert redis_sync.hlen(keys.reservations(rec.id)) == 0
    assert redis_sync.zcard(keys.reservation_expiry(rec.id)) == 0
    hour = window_names(a.now_ms // 1000).hour
    assert redis_sync.hget(f"{keys.window_prefix(rec.id)}h:{hour}", "malformed") == "2"


async def test_a_key_whose_reap_script_fails_does_not_stop_the_others(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    recs = [key(i) for i in range(3)]
    now_ms = 0
    for rec in recs:
        a = await ledger.admit(rec, req("r1", 10, 40))
        now_ms = a.now_ms
        await expire_claimed(ledger, redis_sync, rec, "r1")
    # Key 1's day window is no hash any more: its script fails (WRONGTYPE) on every pass.
    broken = f"{keys.window_prefix(recs[1].id)}d:{window_names(now_ms // 1000).day}"
    redis_sync.delete(broken)
    redis_sync.set(broken, "x")
    totals = await ledger.reap_keys([r.id for r in recs])
    assert (totals.reaped, totals.charged, totals.failed_keys) == (2, 100, 1)
    assert redis_sync.hlen(keys.reservations(recs[0].id)) == 0
    assert redis_sync.hlen(keys.reservations(recs[2].id)) == 0
    assert redis_sync.hlen(keys.reservations(recs[1].id)) == 1  # left for a later pass


async def test_clamp_grants_max_tokens_per_choice(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key(daily_limit=1000)
    # 4 choices of 500 do not fit in 1000; each may have (1000 - 100) // 4 = 225.
    a = await ledger.admit(rec, req("r1", 100, 4 * 500, choices=4, clamp=True))
    assert a.admitted and (a.granted_completion, a.reserved) == (225, 100 + 4 * 225)
    await ledger.settle(Settlement(rec.id, "r1", 100, 0, "m", True, "done"))
    # 900 left: a prompt of 898 leaves 2 tokens, under one per choice for 4 choices: refused.
    refused = await ledger.admit(rec, req("r2", 898, 4 * 10, choices=4, clamp=True))
    assert not refused.admitted and refused.reason == "quota_daily"
    one = await ledger.admit(rec, req("r3", 898, 10, clamp=True))
    assert one.admitted and (one.granted_completion, one.reserved) == (2, 900)

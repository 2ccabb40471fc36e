"""Per-end-user limits in the key's admission, against a real valkey-server: each end user
the caller names has its own requests/minute and daily token quota within the key; the
reservation is held in the end user's day and released and charged there by settle, reap
and a late settlement exactly as in the key's (conservation); requests that name no end user,
and keys without end-user limits, are untouched."""

from __future__ import annotations

import pytest
import redis

from atlas.keymodel import KeyRecord, end_user_tag
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, LedgerInputError, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.windows import window_names
from tests.factories import key_record


def key(**limits: object) -> KeyRecord:
    return key_record("sk-atlas-end-users-0123456789", id="key_eu", **limits)


def req(rid: str, tag: str, prompt: int = 10, completion: int = 90, **kw: object) -> AdmitRequest:
    return AdmitRequest(rid, prompt, completion, "normal", "m", 1.0, end_user_tag=tag, **kw)  # type: ignore[arg-type]


def settle(rec: KeyRecord, rid: str, prompt: int, completion: int) -> Settlement:
    return Settlement(rec.id, rid, prompt, completion, "m", True, "completed")


def end_user_day(r: redis.Redis, rec: KeyRecord, tag: str, now_ms: int) -> tuple[int, int]:
    day = window_names(now_ms // 1000).day
    got = r.hmget(f"{keys.window_prefix(rec.id)}eu:d:{day}", f"{tag}:u", f"{tag}:r")
    return int(got[0] or 0), int(got[1] or 0)


def test_the_tag_is_a_hash_only_when_the_key_limits_end_users() -> None:
    limited = key(end_user_daily_limit=100)
    tag = end_user_tag(limited, "alice@example.com")
    assert len(tag) == 16 and int(tag, 16) >= 0 and "alice" not in tag
    assert end_user_tag(limited, "") == ""
    assert end_user_tag(key(), "alice@example.com") == ""  # no limit: nothing to count


async def test_each_end_user_has_its_own_requests_per_minute(ledger: RedisLedger) -> None:
    rec = key(end_user_requests_per_minute=2)
    alice, bob = end_user_tag(rec, "alice"), end_user_tag(rec, "bob")
    assert (await ledger.admit(rec, req("r1", alice))).admitted
    assert (await ledger.admit(rec, req("r2", alice))).admitted
    refused = await ledger.admit(rec, req("r3", alice))
    assert not refused.admitted and refused.reason == "end_user_rate_limit_requests"
    assert 0 < refused.retry_after_ms <= 30_000  # one request of 2/minute: 30 s
    assert (await ledger.admit(rec, req("r4", bob))).admitted
    assert (await ledger.admit(rec, req("r5", ""))).admitted  # no end user named


async def test_an_end_users_daily_quota_is_held_settled_and_reaped_exactly(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key(end_user_daily_limit=250)
    alice, bob = end_user_tag(rec, "alice"), end_user_tag(rec, "bob")
    a1 = await ledger.admit(rec, req("r1", alice))
    assert a1.admitted and (await ledger.admit(rec, req("r2", alice))).admitted
    assert end_user_day(redis_sync, rec, alice, a1.now_ms) == (0, 200)
    refused = await ledger.admit(rec, req("r3", alice))  # 300 > 250
    assert not refused.admitted and refused.reason == "end_user_quota_daily"
    assert (await ledger.admit(rec, req("r4", bob))).admitted  # bob's own day

    await ledger.settle(settle(rec, "r1", 10, 20))  # 30 used, 70 given back
    assert end_user_day(redis_sync, rec, alice, a1.now_ms) == (30, 100)
    assert (await ledger.admit(rec, req("r5", alice))).admitted  # 30 + 100 + 100 = 230

    # r2's stream was lost: the reaper charges what it reserved, a late settlement corrects.
    assert await ledger.lease({rec.id: ["r2"]}) == 1
    redis_sync.zadd(keys.reservation_expiry(rec.id), {"r2": 0})
    assert await ledger.reap(rec.id) == (1, 100)
    assert redis_sync.get(f"{keys.window_prefix(rec.id)}done:r2") == f"reaped:100:0:{alice}"
    assert end_user_day(redis_sync, rec, alice, a1.now_ms) == (130, 100)
    late = await ledger.settle(settle(rec, "r2", 10, 5))
    assert late.status == "late"
    assert end_user_day(redis_sync, rec, alice, a1.now_ms) == (45, 100)

    await ledger.settle(settle(rec, "r5", 10, 60))
    await ledger.settle(settle(rec, "r4", 10, 10))
    assert end_user_day(redis_sync, rec, alice, a1.now_ms) == (115, 0)  # nothing stranded
    assert end_user_day(redis_sync, rec, bob, a1.now_ms) == (20, 0)
    day = window_names(a1.now_ms // 1000).day
    key_day = redis_sync.hgetall(f"{keys.window_prefix(rec.id)}d:{day}")
    assert (key_day["used"], key_day["reserved"]) == ("135", "0")  # the key's total agrees


async def test_clamp_fits_the_end_users_room(ledger: RedisLedger) -> None:
    rec = key(end_user_daily_limit=60)
    alice = end_user_tag(rec, "alice")
    a = await ledger.admit(rec, req("r1", alice, prompt=10, completion=500, clamp=True))
    assert a.admitted and a.granted_completion == 50 and a.reserved == 60


async def test_a_tag_that_is_not_hex_never_reaches_redis(ledger: RedisLedger) -> None:
    rec = key(end_user_daily_limit=60)
    for bad in ("{g}", "x" * 40, "ABC", "a|b"):
        with pytest.raises(LedgerInputError):
            await ledger.admit(rec, req("r1", bad))

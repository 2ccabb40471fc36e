"""The admit command authz sends on every Check: the pre-encoded EVALSHA is byte for byte what
redis-py would send for the same KEYS and ARGV, and a changed key record is re-encoded."""

from __future__ import annotations

import random

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from atlas.ledger.protocol import AdmitRequest
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from tests.factories import key_record


def ledger() -> RedisLedger:
    # No connection is made until a command runs.
    return RedisLedger(aioredis.Redis(), Settings(window_utc_offset_min=-300))


def redis_py_packing(led: RedisLedger, ks: list[str], args: list[object]) -> bytes:
    conn = Connection()
    return b"".join(conn.pack_command("EVALSHA", led.scripts.admit.sha, len(ks), *ks, *args))


def test_admit_command_is_what_redis_py_sends() -> None:
    led = ledger()
    rng = random.Random(7)
    for i in range(200):
        rec = key_record(
            f"sk-atlas-secret-{i:04d}-0123456789",
            id=f"key_{i}",
            rate_per_sec=rng.choice([0.5, 3, 1e9, 12.25]),
            burst=rng.randrange(1, 10**9),
            tokens_per_minute=rng.choice([None, 0, 1000, 10**15]),
            max_concurrent=rng.choice([None, 0, 4]),
            monthly_budget_usd=rng.choice([None, 0, 12.5, 10**12]),
            end_user_daily_limit=rng.choice([None, 5000, 10**15]),
            end_user_requests_per_minute=rng.choice([None, 60, 10**9]),
        )
        req = AdmitRequest(
            reservation_id=f"r{rng.randrange(10**12):x}",
            prompt_tokens=rng.randrange(0, 10**6),
            completion_tokens=rng.randrange(0, 10**6),
            priority=rng.choice(["low", "normal", "high", "critical"]),
            model=rng.choice(["m", "gpt-4o-mini", "unknown", "other"]),
            ceiling=rng.choice([1.0, 0.9, 0.75, 0.5]),
            shadow=rng.random() < 0.5,
            clamp=rng.random() < 0.5,
            cost_micros=rng.randrange(0, 10**9),
            choices=rng.randrange(1, 50),
            unattended=rng.random() < 0.5,
            end_user_tag=rng.choice(["", "0123456789abcdef"]),
            idempotency_tag=rng.choice(["", "fedcba9876543210fedcba9876543210"]),
            body_hash=rng.choice(["", "00ff"]),
        )
        ks, args = led.admissions.call(rec, req)
        assert len(ks) == 6 and len(args) == 28
        assert led.admissions.command(rec, req) == redis_py_packing(led, ks, args)


def test_a_changed_record_is_encoded_anew() -> None:
    led = ledger()
    req = AdmitRequest(
        reservation_id="r1",
        prompt_tokens=1,
        completion_tokens=2,
        priority="normal",
        model="m",
        ceiling=1.0,
    )
    old = key_record(burst=10)
    new = key_record(burst=20)  # the cache's next record for the same key id
    assert led.admissions.command(old, req) == redis_py_packing(led, *led.admissions.call(old, req))
    assert led.admissions.command(new, req) == redis_py_packing(led, *led.admissions.call(new, req))
    assert led.admissions.command(new, req) != led.admissions.command(old, req)

"""The ledger against a real valkey-server: key records, admit/settle books, windows."""

from __future__ import annotations

import redis

from atlas.keymodel import KeyRecord
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.windows import window_names
from tests.factories import key_record


def key(**kw: object) -> KeyRecord:
    return key_record("s" * 20, id="key_t", daily_limit=10_000, monthly_limit=100_000, **kw)


def req(rid: str, prompt: int = 10, completion: int = 90) -> AdmitRequest:
    return AdmitRequest(
        reservation_id=rid,
        prompt_tokens=prompt,
        completion_tokens=completion,
        priority="normal",
        model="m",
        ceiling=1.0,
    )


async def test_key_records_round_trip(ledger: RedisLedger) -> None:
    rec = key()
    await ledger.create_key(rec)
    assert await ledger.find_key(rec.secret_hash) == rec
    assert await ledger.get_key(rec.id) == rec
    assert await ledger.list_key_ids() == [rec.id]
    await ledger.delete_key(rec)
    assert await ledger.find_key(rec.secret_hash) is None


async def test_admit_then_settle_keeps_the_books(ledger: RedisLedger) -> None:
    rec = key()
    await ledger.create_key(rec)
    a = await ledger.admit(rec, req("r1"))
    assert a.admitted and a.reserved == 100
    u = await ledger.usage(rec)
    assert (u.daily.used, u.daily.reserved, u.open_reservations) == (0, 100, 1)
    r = await ledger.settle(Settlement(rec.id, "r1", 10, 30, "m", True, "completed"))
    assert (r.status, r.charged, r.refunded) == ("settled", 40, 60)
    again = await ledger.settle(Settlement(rec.id, "r1", 10, 30, "m", True, "completed"))
    assert again.status == "duplicate"
    u = await ledger.usage(rec)
    assert (u.daily.used, u.daily.reserved, u.monthly.used, u.open_reservations) == (40, 0, 40, 0)


async def test_lua_and_python_agree_on_window_names(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    await ledger.create_key(rec)
    a = await ledger.admit(rec, req("r1"))
    names = window_names(a.now_ms // 1000)
    assert redis_sync.hget(f"atlas:{{k:{rec.id}}}:d:{names.day}", "reserved") == "100"
    assert redis_sync.hget(f"atlas:{{k:{rec.id}}}:m:{names.month}", "reserved") == "100"
    assert (a.day_reset_s, a.month_reset_s) == (names.day_reset_s, names.month_reset_s)


def test_window_names_across_year_end() -> None:
    n = window_names(1798761599)  # 2026-12-31T23:59:59Z
    assert (n.day, n.month, n.hour) == ("20261231", "202612", "2026123123")
    assert n.day_reset_s == n.month_reset_s == 1798761600
    shifted = window_names(1798761599, 3600)
    assert shifted.day == "20270101" and shifted.day_reset_s == 1798844400

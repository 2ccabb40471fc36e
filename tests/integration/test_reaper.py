"""The reaper against a real valkey-server: one replica at a time, every key, nothing lost."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from atlas.inflight import InflightGauge
from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest
from atlas.ledger.redis import RedisLedger
from atlas.requestlog_writer import RequestLogWriter
from atlas.windows import window_names
from extproc.reaper import Reaper
from tests.factories import key_record


def key(i: int) -> KeyRecord:
    return key_record(f"s{i}" * 10, id=f"key_{i}")


async def test_reaper_settles_expired_reservations_of_every_key_once(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    recs = [key(i) for i in range(250)]  # more than one round trip of keys
    now_ms = 0
    for rec in recs:
        await ledger.create_key(rec)
        a = await ledger.admit(rec, AdmitRequest(f"r-{rec.id}", 10, 40, "normal", "m", 1.0))
        now_ms = a.now_ms
    # Every request reached an ext_proc stream, which claimed its reservation.
    assert await ledger.lease({rec.id: [f"r-{rec.id}"] for rec in recs}) == 250
    for rec in recs[:200]:  # these streams were lost: their TTL is over
        redis_sync.zadd(keys.reservation_expiry(rec.id), {f"r-{rec.id}": 0})

    synced: list[int] = []

    async def sync(delta: int) -> int:
        synced.append(delta)
        return sum(synced)

    gauge = InflightGauge(sync, interval_s=1)
    first = Reaper(ledger, interval_s=30, charge=True, inflight=gauge, owner="a")
    second = Reaper(ledger, interval_s=30, charge=True, owner="b")
    totals = await first.run_once()
    assert totals is not None and (totals.reaped, totals.charged) == (200, 200 * 50)
    assert await second.run_once() is None  # the lease is held by the first replica
    assert gauge.tokens == 0 and (await first.run_once()) is None
    await gauge.flush()
    assert synced == [-200 * 50]
    day = window_names(now_ms // 1000).day
    lost = redis_sync.hgetall(f"{keys.window_prefix(recs[0].id)}d:{day}")
    assert (lost["used"], lost["reserved"]) == ("50", "0")
    alive = redis_sync.hgetall(f"{keys.window_prefix(recs[-1].id)}d:{day}")
    assert (alive.get("used", "0"), alive["reserved"]) == ("0", "50")


async def test_each_reaped_reservation_gets_its_request_log_record(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key_record("sk-atlas-reaped-records-0123", id="key_r.eng")
    await ledger.create_key(rec)
    lost = await ledger.admit(rec, AdmitRequest("r-lost", 10, 40, "high", "gpt-4o|x", 1.0))
    await ledger.admit(rec, AdmitRequest("r-never", 5, 15, "low", "m", 1.0))
    assert await ledger.lease({rec.id: ["r-lost"]}) == 1  # its stream claimed it, then died
    redis_sync.zadd(keys.reservation_expiry(rec.id), {"r-lost": 0, "r-never": 0})

    writer = RequestLogWriter(ledger, service="extproc")
    reaper = Reaper(ledger, interval_s=30, charge=True, owner="a", requests=writer)
    totals = await reaper.run_once()
    assert totals is not None and totals.reaped == 2
    assert await writer.flush() == 2
    day = datetime.fromtimestamp(lost.now_ms / 1000, UTC).strftime("%Y%m%d")
    got = {
        r.request_id: r for _, batch in await ledger.request_log_page(day, None, 10) for r in batch
    }
    assert set(got) == {"r-lost", "r-never"}
    reaped, never = got["r-lost"], got["r-never"]
    assert (reaped.outcome, reaped.prompt_tokens, reaped.exact) == ("reaped", 50, False)
    assert (reaped.key_id, reaped.team, reaped.priority) == (rec.id, "eng", "high")
    assert reaped.model == "gpt-4o|x"  # the entry's last field, whatever it holds
    assert (never.outcome, never.prompt_tokens, never.reason) == ("released", 0, "never_sent")

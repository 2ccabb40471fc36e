"""The request log in a real valkey-server: one stream entry per writer batch, kept within
the day's record bound (log_append.lua), and the admin API's paging over entries: every
record once, newest logged first, a cursor resuming inside an entry, time filters on the
record's own time."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import redis

from atlas.ledger import keys
from atlas.ledger.redis import RedisLedger
from atlas.ledger.redis.requestlog import RedisRequestLog
from atlas.requestlog import RequestRecord
from atlas.settings import Settings


def records(n: int, start_ms: int, key_id: str = "key_a") -> list[RequestRecord]:
    return [
        RequestRecord(at_ms=start_ms + i, request_id=f"r{start_ms + i}", key_id=key_id)
        for i in range(n)
    ]


async def test_a_batch_is_one_entry_and_pages_resume_inside_it(
    api: httpx.AsyncClient, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    now = int(time.time() * 1000) - 10_000
    batches = [records(7, now), records(1, now + 100), records(5, now + 200)]
    for b in batches:
        await ledger.log_requests(b, ["key:key_a"])
    day = batches[0][0].day
    assert redis_sync.xlen(keys.request_log_day(day)) == 3
    assert int(redis_sync.get(keys.request_log_count(day))) == 13
    assert redis_sync.smembers(keys.ALERT_DIRTY) >= {"key:key_a"}

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 3, "key_id": "key_a"} | ({"cursor": cursor} if cursor else {})
        r = await api.get("/v1/admin/requests", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [item["request_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    want = [rec.request_id for b in reversed(batches) for rec in reversed(b)]
    assert seen == want  # every record once, the newest logged first


async def test_time_filters_read_the_records_own_time(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    now = int(time.time() * 1000) - 60_000
    await ledger.log_requests(records(10, now, key_id="key_t"), [])
    since = (now + 3) / 1000
    until = (now + 6) / 1000
    r = await api.get(
        "/v1/admin/requests",
        params={"key_id": "key_t", "since": _iso(since), "until": _iso(until)},
    )
    assert r.status_code == 200, r.text
    assert [i["request_id"] for i in r.json()["items"]] == [f"r{now + i}" for i in (6, 5, 4, 3)]


async def test_a_day_keeps_its_record_bound_dropping_the_oldest_entries(
    settings: Settings, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    bounded = settings.model_copy(update={"request_log_max_per_day": 1000})
    store = RedisRequestLog(ledger.conn, bounded)
    start = int(time.time() * 1000) - 5_000
    for i in range(5):
        await store.log_requests(records(300, start + 1000 * i, key_id="key_b"), [])
    day = records(1, start)[0].day
    held = int(redis_sync.get(keys.request_log_count(day)))
    assert held <= 1000
    page = await store.request_log_page(day, None, 50)
    assert sum(len(recs) for _, recs in page) == held
    kept = {r.request_id for _, recs in page for r in recs}
    assert f"r{start + 4000 + 299}" in kept and f"r{start}" not in kept
    assert redis_sync.ttl(keys.request_log_day(day)) > 0
    assert redis_sync.ttl(keys.request_log_count(day)) > 0


async def test_an_unreadable_entry_reads_empty(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    day = "20000101"
    redis_sync.xadd(keys.request_log_day(day), {"v": "1", "rows": "{not json"})
    redis_sync.xadd(keys.request_log_day(day), {"v": "9", "rows": "[]"})
    redis_sync.xadd(keys.request_log_day(day), {"v": "1", "rows": '[[1, "r", 3], "x", 5]'})
    page = await ledger.request_log_page(day, None, 10)
    assert [len(recs) for _, recs in page] == [1, 0, 0]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()

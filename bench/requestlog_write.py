"""The request log writer's CPU per record, for the formats it could store (the numbers in
docs/request-log.md): an XADD of ~20 fields per record, an XADD of one JSON field per
record, and what Atlas does, one log_append.lua entry per batch. Against a real
valkey-server; run `python -m bench.requestlog_write`."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis

from atlas.ledger.redis import RedisLedger
from atlas.requestlog import COLUMNS, RequestRecord
from atlas.settings import Settings
from tests.servers import start_valkey, stop

BATCH = 100
ROUNDS = 50


def batch(start: int) -> list[RequestRecord]:
    return [
        RequestRecord(
            at_ms=1_764_766_800_000 + start + i,
            request_id=f"r{start + i:016x}",
            key_id="key_abcdef123456",
            team="t1",
            model="gpt-4o-mini",
            status=200,
            prompt_tokens=12,
            completion_tokens=100,
            cost_micros=123,
            latency_ms=45,
            priority="normal",
            stream=True,
        )
        for i in range(BATCH)
    ]


async def cpu_per_record(write: Callable[[list[RequestRecord]], Awaitable[object]]) -> float:
    await write(batch(0))
    recs = [batch(BATCH * (i + 1)) for i in range(ROUNDS)]
    t = time.process_time()
    for b in recs:
        await write(b)
    return (time.process_time() - t) / (ROUNDS * BATCH) * 1e6


async def main(url: str) -> None:
    r = Redis.from_url(url, decode_responses=True)
    ledger = RedisLedger.from_settings(Settings.model_validate({"redis_url": url}))

    async def xadd_fields(b: list[RequestRecord]) -> object:
        pipe = r.pipeline(transaction=False)
        for rec in b:
            pipe.xadd("bench:fields", dict(zip(COLUMNS, map(str, rec.row()), strict=True)))
        return await pipe.execute()

    async def xadd_json(b: list[RequestRecord]) -> object:
        pipe = r.pipeline(transaction=False)
        for rec in b:
            pipe.xadd("bench:json", {"r": json.dumps(rec.row())})
        return await pipe.execute()

    async def log_append(b: list[RequestRecord]) -> None:
        await ledger.log_requests(b, ["key:key_abcdef123456"])

    print(f"writer CPU per record, batches of {BATCH} (µs)")
    for name, write in (
        ("XADD per record, a field per column", xadd_fields),
        ("XADD per record, one JSON field", xadd_json),
        ("one log_append.lua entry per batch (Atlas)", log_append),
    ):
        print(f"  {name}: {await cpu_per_record(write):.1f}")
    await ledger.close()
    await r.aclose()


if __name__ == "__main__":
    proc, url = start_valkey(Path(tempfile.mkdtemp()))
    try:
        asyncio.run(main(url))
    finally:
        stop(proc)

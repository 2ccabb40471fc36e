"""The request log in Redis: one stream per UTC day (its own hash tag), trimmed to
ATLAS_REQUEST_LOG_MAX_PER_DAY and expiring ATLAS_REQUEST_LOG_DAYS after its day; written in
batches (one pipeline), read newest first."""

from __future__ import annotations

from collections.abc import Sequence

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn
from atlas.requestlog import RequestRecord
from atlas.settings import Settings

DAY_S = 86_400


class RedisRequestLog:
    def __init__(self, conn: Conn, settings: Settings) -> None:
        self._c = conn
        self._max = settings.request_log_max_per_day
        self._ttl_s = (settings.request_log_days + 1) * DAY_S

    async def log_requests(self, records: Sequence[RequestRecord], dirty: Sequence[str]) -> None:
        """Append records to their days' streams and mark `dirty` scopes (`key:<id>`,
        `team:<id>`) for the alerter; one round trip (a non-transactional pipeline, which a
        cluster client splits by slot)."""
        if not records and not dirty:
            return

        async def run() -> None:
            pipe = self._c.r.pipeline(transaction=False)
            days: set[str] = set()
            for rec in records:
                day = keys.request_log_day(rec.day)
                days.add(day)
                pipe.xadd(day, rec.fields(), maxlen=self._max, approximate=True)
            for day in days:
                pipe.expire(day, self._ttl_s)
            if dirty:
                pipe.sadd(keys.ALERT_DIRTY, *dirty)
            await pipe.execute()

        await self._c.call("log_requests", run)

    async def request_log_page(
        self, day: str, before: str | None, count: int
    ) -> list[tuple[str, RequestRecord]]:
        """Up to `count` records of one day, newest first, older than entry id `before`."""
        if before is not None and before.strip("0-") == "":
            return []
        top = f"({before}" if before else "+"
        rows = await self._c.call(
            "request_log",
            lambda: self._c.r.xrevrange(keys.request_log_day(day), top, "-", count),
        )
        return [(rid, RequestRecord.from_fields(f)) for rid, f in rows]

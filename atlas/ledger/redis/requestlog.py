"""The request log in Redis: one stream per UTC day (its own hash tag), expiring
ATLAS_REQUEST_LOG_DAYS after its day. A writer's flush is one entry per day it touches: the
batch's rows as one JSON array with their column names, appended by log_append.lua, which
keeps the day within ATLAS_REQUEST_LOG_MAX_PER_DAY records (oldest entries first). One
command per batch instead of an XADD per record: 7 µs of the writer's CPU per record
instead of 38 (docs/request-log.md). Read newest first."""

from __future__ import annotations

import json
from collections.abc import Sequence

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn
from atlas.ledger.redis.scripts import load_script
from atlas.requestlog import COLUMNS, RequestRecord
from atlas.settings import Settings

DAY_S = 86_400
#: An entry's format (its fields: v, n, cols, rows) and the columns this writer sends.
_FORMAT = "1"
_COLUMNS = ",".join(COLUMNS)


class RedisRequestLog:
    def __init__(self, conn: Conn, settings: Settings) -> None:
        self._c = conn
        self._append = conn.r.register_script(load_script("log_append"))
        self._max = settings.request_log_max_per_day
        self._ttl_s = (settings.request_log_days + 1) * DAY_S

    async def log_requests(self, records: Sequence[RequestRecord], dirty: Sequence[str]) -> None:
        """Append records to their days' streams (one entry per day) and mark `dirty` scopes
        (`key:<id>`, `team:<id>`) for the alerter."""
        if not records and not dirty:
            return
        by_day: dict[str, list[list[object]]] = {}
        for rec in records:
            by_day.setdefault(rec.day, []).append(rec.row())

        calls = [
            (
                [keys.request_log_day(day), keys.request_log_count(day)],
                [_FORMAT, _COLUMNS, json.dumps(rows), len(rows), self._max, self._ttl_s],
            )
            for day, rows in by_day.items()
        ]
        if calls:  # one round trip (per node in a cluster: each day its own slot)
            done = await self._c.run_per_key("log_requests", self._append, calls)
            self._c.ok_rows("log_requests", list(by_day), done)
        if dirty:
            await self._c.call("log_requests", lambda: self._c.r.sadd(keys.ALERT_DIRTY, *dirty))

    async def request_log_page(
        self, day: str, before: str | None, count: int
    ) -> list[tuple[str, list[RequestRecord]]]:
        """Up to `count` entries of one day, newest first, older than entry id `before`; each
        entry's records in the order they were written (an unreadable entry reads empty)."""
        if before is not None and before.strip("0-") == "":
            return []
        top = f"({before}" if before else "+"
        rows = await self._c.call(
            "request_log",
            lambda: self._c.r.xrevrange(keys.request_log_day(day), top, "-", count),
        )
        return [(rid, _records(f)) for rid, f in rows]


def _records(entry: dict[str, str]) -> list[RequestRecord]:
    if entry.get("v") != _FORMAT:
        return []
    try:
        rows = json.loads(entry.get("rows", "[]"))
    except ValueError:
        return []
    if not isinstance(rows, list):
        return []
    cols = entry.get("cols", _COLUMNS).split(",")
    return [RequestRecord.from_row(cols, r) for r in rows if isinstance(r, list)]

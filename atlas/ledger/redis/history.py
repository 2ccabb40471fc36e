"""Quota windows and hourly history as reports read them (`History`); the scripts write
them during live traffic, and the writers here serve simulations and imports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import HistoryScope, HourRow, KeyUsage, Window
from atlas.ledger.redis.client import Conn
from atlas.ledger.redis.zones import Zones
from atlas.settings import Settings
from atlas.windows import hour_name, window_names

#: A scope, or (tests and tools that pin the storage format) the raw key prefix.
ScopeOrPrefix = HistoryScope | str


def prefix_of(scope: ScopeOrPrefix) -> str:
    """The key prefix a scope's hourly history lives under."""
    if isinstance(scope, str):
        return scope
    if scope.kind == "key":
        return keys.window_prefix(scope.name)
    if scope.kind == "model":
        return keys.model_prefix(scope.name)
    return keys.GLOBAL_PREFIX


def window_of(h: dict[str, str], limit: int, reset: int) -> Window:
    return Window(
        limit=limit,
        used=int(h.get("used", 0)),
        reserved=int(h.get("reserved", 0)),
        requests=int(h.get("requests", 0)),
        resets_at_s=reset,
        spend_micros=int(h.get("spend", 0)),
        cached=int(h.get("cached", 0)),
        reasoning=int(h.get("reasoning", 0)),
        cache_write=int(h.get("cache_write", 0)),
    )


class RedisHistory:
    def __init__(self, conn: Conn, zones: Zones, settings: Settings) -> None:
        self._c = conn
        self._r = conn.r
        self._zones = zones
        self._hist_ttl_s = settings.history_days * 86400

    async def server_time(self) -> float:
        sec, usec = await self._c.call("time", self._r.time)
        return int(sec) + int(usec) / 1e6

    async def usage(self, rec: KeyRecord) -> KeyUsage:
        async def run() -> tuple[Any, ...]:
            sec, _usec = await self._r.time()
            names = window_names(
                int(sec), self._zones.zone_of(rec), hour_offset_s=self._zones.hour_offset_s
            )
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(keys.day_window(rec.id, names.day))
            pipe.hgetall(keys.month_window(rec.id, names.month))
            pipe.hlen(keys.reservations(rec.id))
            day, month, open_n = await pipe.execute()
            return names, day, month, open_n

        names, day, month, open_n = await self._c.call("usage", run)
        return KeyUsage(
            key_id=rec.id,
            daily=window_of(day, rec.daily_limit, names.day_reset_s),
            monthly=window_of(month, rec.monthly_limit, names.month_reset_s),
            open_reservations=int(open_n),
        )

    async def history(self, scope: ScopeOrPrefix, start_ts: int, hours: int) -> list[HourRow]:
        """Hourly history of `scope` (a key's, a model's or the global one), one row per hour
        from `start_ts` (an hour boundary of the windows' offset), zeros included."""
        prefix = prefix_of(scope)
        starts = [start_ts + 3600 * i for i in range(hours)]
        off = self._zones.hour_offset_s

        async def run() -> list[dict[str, str]]:
            pipe = self._r.pipeline(transaction=False)
            for ts in starts:
                pipe.hgetall(keys.history_hour(prefix, hour_name(ts, off)))
            return cast(list[dict[str, str]], await pipe.execute())

        rows = await self._c.call("history", run)
        return [
            HourRow(ts, {k: int(v) for k, v in row.items()})
            for ts, row in zip(starts, rows, strict=True)
        ]

    async def day_windows(self, key_ids: Sequence[str], day: str) -> list[dict[str, int]]:
        """The day window (`day`: YYYYMMDD) of each key, in one round trip."""

        async def run() -> list[dict[str, str]]:
            pipe = self._r.pipeline(transaction=False)
            for kid in key_ids:
                pipe.hgetall(keys.day_window(kid, day))
            return cast(list[dict[str, str]], await pipe.execute())

        rows = await self._c.call("windows", run)
        return [{k: int(v) for k, v in row.items()} for row in rows]

    async def add_history(
        self, entries: Sequence[tuple[ScopeOrPrefix, int, dict[str, int]]]
    ) -> None:
        """Add (scope, hour ts, fields) rows to history in one round trip (simulation and
        imports; live traffic is recorded by the Lua scripts)."""
        off = self._zones.hour_offset_s

        async def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for scope, ts, fields in entries:
                h = keys.history_hour(prefix_of(scope), hour_name(ts, off))
                for name, value in fields.items():
                    pipe.hincrby(h, name, value)
                pipe.expire(h, self._hist_ttl_s)
            await pipe.execute()

        await self._c.call("history", run)

    async def add_day_window(self, key_id: str, day: str, fields: dict[str, int]) -> None:
        """Add to one key's day window (YYYYMMDD; simulation and imports)."""
        await self._add_window(keys.day_window(key_id, day), fields)

    async def add_month_window(self, key_id: str, month: str, fields: dict[str, int]) -> None:
        """Add to one key's month window (YYYYMM; simulation and imports)."""
        await self._add_window(keys.month_window(key_id, month), fields)

    async def add_window_fields(self, key_id: str, window: str, fields: dict[str, int]) -> None:
        """Add to one quota window named by its storage suffix (`d:YYYYMMDD`, `m:YYYYMM`)."""
        await self._add_window(keys.window_prefix(key_id) + window, fields)

    async def _add_window(self, name: str, fields: dict[str, int]) -> None:
        async def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for field, value in fields.items():
                pipe.hincrby(name, field, value)
            await pipe.execute()

        await self._c.call("windows", run)

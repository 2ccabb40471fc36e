"""Alert state in Redis: the scopes whose usage changed (the request log writer marks them),
the once-per-window fired sets, the webhooks (no secrets) and the stream of fired alerts and
their deliveries (bounded)."""

from __future__ import annotations

import json
from typing import Any

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn

#: Alert events kept (XADD MAXLEN ~).
EVENTS_MAX = 50_000


class RedisAlerts:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._r = conn.r

    async def pop_dirty(self, count: int) -> list[str]:
        got = await self._c.call("alerts", lambda: self._r.spop(keys.ALERT_DIRTY, count))
        return sorted(got or [])

    async def first_time(self, scope: str, window: str, member: str, ttl_s: int) -> bool:
        """True once per (scope, window, member): the alert fires only then."""
        name = keys.alert_fired(scope, window)

        async def run() -> bool:
            added = await self._r.sadd(name, member)
            await self._r.expire(name, ttl_s)
            return bool(added)

        return await self._c.call("alerts", run)

    async def mark_active(self, hour_ts: int, scopes: list[str], ttl_s: int) -> None:
        name = keys.alert_active(hour_ts)

        async def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            pipe.sadd(name, *scopes)
            pipe.expire(name, ttl_s)
            await pipe.execute()

        if scopes:
            await self._c.call("alerts", run)

    async def active_scopes(self, hours: list[int]) -> list[str]:
        names = [keys.alert_active(h) for h in hours]
        return sorted(await self._c.call("alerts", lambda: self._r.sunion(names)))

    async def webhooks(self) -> dict[str, dict[str, Any]]:
        got = await self._c.call("alerts", lambda: self._r.hgetall(keys.ALERT_WEBHOOKS))
        return {k: json.loads(v) for k, v in sorted(got.items())}

    async def put_webhook(self, hook_id: str, hook: dict[str, Any]) -> None:
        body = json.dumps(hook, separators=(",", ":"))
        await self._c.call("alerts", lambda: self._r.hset(keys.ALERT_WEBHOOKS, hook_id, body))

    async def drop_webhook(self, hook_id: str) -> bool:
        return bool(
            await self._c.call("alerts", lambda: self._r.hdel(keys.ALERT_WEBHOOKS, hook_id))
        )

    async def rules(self) -> dict[str, list[int]]:
        """Each scope's own thresholds (`key:<id>`, `team:<id>` -> percentages)."""
        got = await self._c.call("alerts", lambda: self._r.hgetall(keys.ALERT_RULES))
        return {scope: json.loads(raw)["thresholds"] for scope, raw in sorted(got.items())}

    async def count_rules(self) -> int:
        return int(await self._c.call("alerts", lambda: self._r.hlen(keys.ALERT_RULES)))

    async def put_rule(self, scope: str, thresholds: list[int]) -> None:
        body = json.dumps({"thresholds": thresholds})
        await self._c.call("alerts", lambda: self._r.hset(keys.ALERT_RULES, scope, body))

    async def drop_rule(self, scope: str) -> bool:
        return bool(await self._c.call("alerts", lambda: self._r.hdel(keys.ALERT_RULES, scope)))

    async def add_event(self, event: dict[str, Any]) -> None:
        fields = {"json": json.dumps(event, separators=(",", ":"), default=str)}
        await self._c.call(
            "alerts",
            lambda: self._r.xadd(keys.ALERT_EVENTS, fields, maxlen=EVENTS_MAX, approximate=True),
        )

    async def events(self, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        """Newest first; `before` an event id to page from."""
        if before is not None and before.strip("0-") == "":
            return []
        top = f"({before}" if before else "+"
        rows = await self._c.call(
            "alerts", lambda: self._r.xrevrange(keys.ALERT_EVENTS, top, "-", limit)
        )
        return [{"event_id": rid, **json.loads(f["json"])} for rid, f in rows]

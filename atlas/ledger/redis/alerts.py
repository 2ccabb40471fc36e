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

"""The index of internal apps: app id -> the key id of the record that holds its limits,
principals and shared-secret hash (the record itself is a key record: atlas/keymodel.py)."""

from __future__ import annotations

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn


class RedisApps:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._r = conn.r

    async def claim_app(self, app_id: str, key_id: str) -> bool:
        """Reserve `app_id` for `key_id`; False when another record holds it."""
        return bool(
            await self._c.call("claim_app", lambda: self._r.hsetnx(keys.APP_INDEX, app_id, key_id))
        )

    async def app_key_id(self, app_id: str) -> str | None:
        got = await self._c.call("app_key_id", lambda: self._r.hget(keys.APP_INDEX, app_id))
        return str(got) if got else None

    async def app_ids(self) -> dict[str, str]:
        """Every app id -> its key id."""
        got = await self._c.call("app_ids", lambda: self._r.hgetall(keys.APP_INDEX))
        return dict(sorted(got.items()))

    async def drop_app(self, app_id: str) -> None:
        await self._c.call("drop_app", lambda: self._r.hdel(keys.APP_INDEX, app_id))

"""Named admin credentials in Redis: admin name -> JSON record (keys.ADMIN_INDEX) and token
sha256 -> admin name (keys.ADMIN_TOKENS), both under the global tag, so one transaction
changes both (`admin.auth_store.AdminStore`)."""

from __future__ import annotations

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn


class RedisAdmins:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._r = conn.r

    async def create_admin(self, name: str, record: str, token_hash: str) -> bool:
        async def run() -> bool:
            if not await self._r.hsetnx(keys.ADMIN_INDEX, name, record):
                return False
            await self._r.hset(keys.ADMIN_TOKENS, token_hash, name)
            return True

        return bool(await self._c.call("create_admin", run))

    async def get_admin(self, name: str) -> str | None:
        got = await self._c.call("get_admin", lambda: self._r.hget(keys.ADMIN_INDEX, name))
        return str(got) if got else None

    async def admin_records(self) -> dict[str, str]:
        got = await self._c.call("admin_records", lambda: self._r.hgetall(keys.ADMIN_INDEX))
        return dict(sorted(got.items()))

    async def admin_for_token(self, token_hash: str) -> str | None:
        got = await self._c.call(
            "admin_for_token", lambda: self._r.hget(keys.ADMIN_TOKENS, token_hash)
        )
        return str(got) if got else None

    async def put_admin(
        self, name: str, record: str, *, old_token_hash: str | None, new_token_hash: str | None
    ) -> None:
        """Replace a record; with both hashes, its token too (the old one stops at once)."""

        async def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(keys.ADMIN_INDEX, name, record)
            if old_token_hash and new_token_hash:
                pipe.hdel(keys.ADMIN_TOKENS, old_token_hash)
                pipe.hset(keys.ADMIN_TOKENS, new_token_hash, name)
            await pipe.execute()

        await self._c.call("put_admin", run)

    async def delete_admin(self, name: str, token_hash: str) -> None:
        async def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.hdel(keys.ADMIN_INDEX, name)
            pipe.hdel(keys.ADMIN_TOKENS, token_hash)
            await pipe.execute()

        await self._c.call("delete_admin", run)

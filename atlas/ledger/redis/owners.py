"""Owner records in Redis (`atlas.ledger.admin_protocol.OwnerStore`): one hash of owner id ->
record JSON, and per owner the ids of its keys (the key store adds them; a key moved to
another owner is dropped here when read)."""

from __future__ import annotations

from collections.abc import Sequence

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn
from atlas.ownermodel import OwnerRecord


class RedisOwners:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._r = conn.r

    async def create_owner(self, owner: OwnerRecord) -> bool:
        raw = owner.model_dump_json()
        return bool(
            await self._c.call("create_owner", lambda: self._r.hsetnx(keys.OWNERS, owner.id, raw))
        )

    async def put_owner(self, owner: OwnerRecord) -> None:
        raw = owner.model_dump_json()
        await self._c.call("put_owner", lambda: self._r.hset(keys.OWNERS, owner.id, raw))

    async def get_owner(self, owner_id: str) -> OwnerRecord | None:
        raw = await self._c.call("get_owner", lambda: self._r.hget(keys.OWNERS, owner_id))
        return OwnerRecord.model_validate_json(raw) if raw else None

    async def list_owners(self) -> list[OwnerRecord]:
        got = await self._c.call("list_owners", lambda: self._r.hgetall(keys.OWNERS))
        return [OwnerRecord.model_validate_json(got[k]) for k in sorted(got)]

    async def delete_owner(self, owner_id: str) -> None:
        async def run() -> None:
            pipe = self._r.pipeline(transaction=True)  # one slot ({g})
            pipe.hdel(keys.OWNERS, owner_id)
            pipe.delete(keys.owner_keys(owner_id))
            await pipe.execute()

        await self._c.call("delete_owner", run)

    async def owner_key_ids(self, owner_id: str) -> list[str]:
        got = await self._c.call("owner_keys", lambda: self._r.smembers(keys.owner_keys(owner_id)))
        return sorted(got)

    async def forget_owner_keys(self, owner_id: str, key_ids: Sequence[str]) -> None:
        """Drop ids that no longer belong to the owner (deleted, or moved to another)."""
        if key_ids:
            await self._c.call(
                "owner_keys", lambda: self._r.srem(keys.owner_keys(owner_id), *key_ids)
            )

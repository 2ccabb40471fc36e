"""Key records in Redis: the record, the secret index, the creation-ordered index of ids and
the pub/sub channel announcing changes (`atlas.ledger.protocol.KeyStore`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import cast

import redis.asyncio as aioredis

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.redis.client import Conn


class RedisKeyStore:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._r = conn.r

    async def create_key(self, rec: KeyRecord) -> None:
        async def run() -> bool:
            taken: list[str] = []
            for h in rec.lookup_hashes():
                if not await self._r.set(keys.secret_index(h), rec.id, nx=True):
                    for t in taken:  # one taken entry: none of this record's stays
                        await self._r.delete(keys.secret_index(t))
                    return False
                taken.append(h)
            await self._r.set(keys.record(rec.id), rec.model_dump_json())
            if rec.team:
                await self._r.sadd(keys.team_members(rec.team), rec.id)
            if rec.owner:
                await self._r.sadd(keys.owner_keys(rec.owner), rec.id)
            await self._r.zadd(keys.KEY_INDEX, {rec.id: int(rec.created_at.timestamp() * 1000)})
            await self._r.publish(keys.KEY_CHANGED_CHANNEL, rec.id)
            return True

        if not await self._c.call("create_key", run):
            raise ValueError("a key with this secret (or principal) already exists")

    async def put_key(
        self,
        rec: KeyRecord,
        *,
        old_secret_hash: str | None = None,
        old_lookup_hashes: list[str] | None = None,
    ) -> None:
        """Replace a record (and move its secret index when the secret was rotated, or an
        app's principals or shared secret changed: `old_lookup_hashes`).

        :raises ValueError: a new principal already finds another record."""

        async def run() -> bool:
            old = set(old_lookup_hashes or [])
            if old_secret_hash:
                old.add(old_secret_hash)
            new = set(rec.lookup_hashes())
            if old:
                claimed: list[str] = []
                for h in new - old:
                    if await self._r.set(keys.secret_index(h), rec.id, nx=True):
                        claimed.append(h)
                    elif await self._r.get(keys.secret_index(h)) != rec.id:
                        for c in claimed:  # refused: none of the new entries stays
                            await self._r.delete(keys.secret_index(c))
                        return False
                for h in old - new:
                    await self._r.delete(keys.secret_index(h))
            await self._r.set(keys.record(rec.id), rec.model_dump_json())
            if rec.owner:
                await self._r.sadd(keys.owner_keys(rec.owner), rec.id)
            await self._r.publish(keys.KEY_CHANGED_CHANNEL, rec.id)
            return True

        if not await self._c.call("put_key", run):
            raise ValueError("a principal or secret of this record already finds another one")

    async def delete_key(self, rec: KeyRecord) -> None:
        async def run() -> None:
            for h in rec.lookup_hashes():
                await self._r.delete(keys.secret_index(h))
            await self._r.delete(keys.record(rec.id))
            if rec.team:
                await self._r.srem(keys.team_members(rec.team), rec.id)
            if rec.owner:
                await self._r.srem(keys.owner_keys(rec.owner), rec.id)
            await self._r.zrem(keys.KEY_INDEX, rec.id)
            await self._r.publish(keys.KEY_CHANGED_CHANNEL, rec.id)

        await self._c.call("delete_key", run)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._c.call("get_key", lambda: self._r.get(keys.record(key_id)))
        return KeyRecord.model_validate_json(raw) if raw else None

    async def find_key(self, secret_hash: str) -> KeyRecord | None:
        key_id = await self._c.call("find_key", lambda: self._r.get(keys.secret_index(secret_hash)))
        return await self.get_key(key_id) if key_id else None

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        """Records of these ids (missing ones left out), in one round trip."""

        async def run() -> list[str | None]:
            pipe = self._r.pipeline(transaction=False)
            for kid in key_ids:
                pipe.get(keys.record(kid))
            return cast(list[str | None], await pipe.execute())

        raws = await self._c.call("get_keys", run)
        return [KeyRecord.model_validate_json(r) for r in raws if r]

    async def list_key_ids(self, offset: int = 0, limit: int = 100) -> list[str]:
        ids = await self._c.call(
            "list_keys", lambda: self._r.zrange(keys.KEY_INDEX, offset, offset + limit - 1)
        )
        return list(ids)

    async def count_keys(self) -> int:
        return int(await self._c.call("count_keys", lambda: self._r.zcard(keys.KEY_INDEX)))

    async def key_changes(self) -> AsyncIterator[str]:
        """Key ids as they change (pub/sub), after a first "*" once subscribed (anything
        cached before may be stale). Ends, or raises, when the connection drops."""
        # A dedicated plain connection without the command timeout: a subscriber idles.
        # In a cluster PUBLISH reaches every node, so any node will do.
        client = aioredis.Redis.from_url(
            self._c.url,
            decode_responses=True,
            socket_connect_timeout=self._c.timeout_s,
            socket_keepalive=True,
            health_check_interval=15,
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(keys.KEY_CHANGED_CHANNEL)
            yield "*"
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    yield str(msg["data"])
        finally:
            # Bounded: cancelled mid-read, redis-py's pubsub close can wait on the read's
            # connection forever (authz's shutdown hung in tests/integration/test_authz_http.py).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await pubsub.aclose()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await client.aclose()

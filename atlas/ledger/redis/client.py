"""The connection every part of the Redis ledger shares: the client, one place that turns
Redis failures into `LedgerUnavailable` / `LedgerInputError`, pipelined per-key script runs,
and the fast lane of pre-encoded commands (admit, and settle on a plain server:
`atlas.ledger.redis.lane`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from atlas.errors import LedgerUnavailable
from atlas.ledger.protocol import LedgerInputError
from atlas.ledger.redis.lane import ScriptLane
from atlas.settings import Settings

log = logging.getLogger("atlas.ledger.redis")


def connect(settings: Settings) -> Any:
    """A redis-py asyncio client (plain or cluster) for `settings.redis_url`."""
    opts: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections, **opts
        )
    # A bounded pool that makes callers wait (up to the command timeout) for a connection,
    # instead of failing a burst of concurrent Checks with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        health_check_interval=30,
        **opts,
    )
    return aioredis.Redis.from_pool(pool)  # aclose() closes the pool too


def script_error(exc: BaseException) -> bool:
    """A script that ran and failed on its input (Redis prefixes the place `@user_script`),
    as opposed to a server that cannot answer now (BUSY, LOADING, READONLY, ...): retrying
    the same call cannot help, so it must not be retried or journaled forever."""
    text = str(exc)
    return (
        isinstance(exc, ResponseError)
        and "user_script" in text
        and not text.startswith(("BUSY", "NOSCRIPT"))
    )


class Conn:
    """The client and how every ledger call runs on it."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.r = client
        self.url = settings.redis_url
        self.timeout_s = settings.redis_timeout_s
        self.cluster = settings.redis_cluster
        # RedisCluster has no blocking pool: past `max_connections` on a node it raises
        # MaxConnectionsError at once. Bounding the calls in flight makes a burst wait for a
        # connection (up to the command timeout) as it does on the plain pool; one call uses
        # at most one connection per node, so no node's pool can run out.
        self._slots = asyncio.Semaphore(settings.redis_max_connections) if self.cluster else None
        # The hot scripts' own connections (None in a cluster: redis-py routes by keys).
        self.lane = (
            None
            if self.cluster
            else ScriptLane(client.connection_pool, timeout_s=settings.redis_timeout_s)
        )

    async def close(self) -> None:
        if self.lane is not None:
            await self.lane.close()
        await self.r.aclose()

    async def call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """`fn()`, with Redis failures as `LedgerUnavailable` and refused input as
        `LedgerInputError`."""
        if self._slots is not None:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise LedgerUnavailable(f"{what}: no connection available") from exc
        try:
            if self.cluster:
                # Load the slot map before the first command (a no-op once loaded). A cold
                # client sends keyed commands to a random node; a burst of them meets MOVED,
                # the client then closes every connection, in-flight commands included, and
                # retries them: a script could run twice.
                await self.r.initialize()
            return await fn()
        except ResponseError as exc:
            if script_error(exc):
                raise LedgerInputError(f"{what}: {exc}") from exc
            raise LedgerUnavailable(f"{what}: {exc}") from exc
        # RedisClusterException is no RedisError: "cannot be connected", SlotNotCoveredError.
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise LedgerUnavailable(f"{what}: {exc}") from exc
        finally:
            if self._slots is not None:
                self._slots.release()

    async def run_lane(self, script: Any, command: bytes) -> Any:
        """`command` (an EVALSHA of `script`, pre-encoded) over the lane."""
        assert self.lane is not None
        try:
            return await self.lane.call(command)
        except NoScriptError:
            # The server lost its scripts (restart, failover): load it and run it once more,
            # as redis-py's Script object does.
            await self.r.script_load(script.script)
            return await self.lane.call(command)

    async def run_lane_many(self, script: Any, commands: Sequence[bytes]) -> list[Any]:
        """`commands` (EVALSHAs of `script`) pipelined over the lane; each reply, or its error."""
        assert self.lane is not None
        replies = await self.lane.call_many(commands)
        lost = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if lost:  # none of those ran: load the script and run them once more
            await self.r.script_load(script.script)
            for i, r in zip(
                lost, await self.lane.call_many([commands[i] for i in lost]), strict=True
            ):
                replies[i] = r
        return replies

    async def run_per_key(
        self, what: str, script: Any, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run `script` once per (keys, args), all in one pipelined round trip. Each call's
        keys share one slot; in a cluster the pipeline splits by node. A call that fails
        comes back as its exception, so one bad key does not stop the others."""

        async def run() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            if self.cluster:
                # redis-py refuses Script calls (evalsha) in a cluster pipeline. Send EVALSHA
                # itself, once every primary has the script, as a plain pipeline's
                # load_scripts() does.
                if not all(await self.r.script_exists(script.sha)):
                    script.sha = await self.r.script_load(script.script)
                for ks, args in calls:
                    pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *args)
            else:
                for ks, args in calls:
                    await script(keys=ks, args=args, client=pipe)
            return cast(list[Any], await pipe.execute(raise_on_error=False))

        return cast(list[Any], await self.call(what, run))

    def ok_rows(self, what: str, key_ids: Sequence[str], rows: Sequence[Any]) -> list[Any]:
        """The rows of `run_per_key` whose script ran (see `ok_keyed_rows`)."""
        return [row for _, row in self.ok_keyed_rows(what, key_ids, rows)]

    def ok_keyed_rows(
        self, what: str, key_ids: Sequence[str], rows: Sequence[Any]
    ) -> list[tuple[str, Any]]:
        """(key id, row) of each script of `run_per_key` that ran; a script that failed on its
        input is logged and left out, a server that did not run it raises
        `LedgerUnavailable` (a later pass retries)."""
        ok = []
        for key_id, row in zip(key_ids, rows, strict=True):
            if not isinstance(row, BaseException):
                ok.append((key_id, row))
            elif not script_error(row):
                raise LedgerUnavailable(f"{what} {key_id}: {row}") from row
            else:
                log.error("%s of key %s failed, other keys go on: %s", what, key_id, row)
        return ok

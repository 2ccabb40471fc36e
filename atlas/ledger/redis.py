"""The Redis/Valkey ledger: the only module that talks to Redis.

Each state change is one Lua script (`lua/*.lua`), registered once; redis-py's script object
re-loads it after a NOSCRIPT (server restart, failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from atlas import limits
from atlas.errors import LedgerUnavailable
from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import (
    Admission,
    AdmitRequest,
    HourRow,
    KeyUsage,
    LedgerInputError,
    ReapTotals,
    Settlement,
    SettleResult,
    Window,
    check_admit,
    check_settlement,
)
from atlas.pricing import MICROS_PER_USD
from atlas.settings import Settings
from atlas.windows import (
    Zone,
    default_zone,
    hour_name,
    hour_start,
    load_zone,
    window_names,
    zone_spec,
)

log = logging.getLogger(__name__)

DONE_MARKER_TTL_S = 3 * 86400
#: Reservations one reap call settles per key; the next pass takes the rest.
REAP_BATCH = 100
#: Audit entries kept (XADD MAXLEN ~).
AUDIT_MAX_ENTRIES = 100_000


def _load_script(name: str) -> str:
    pkg = resources.files("atlas.ledger") / "lua"
    prelude = (pkg / "_clock.lua").read_text()
    return prelude + "\n" + (pkg / f"{name}.lua").read_text()


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


def _reap_keys(key_id: str) -> list[str]:
    return [
        keys.reservations(key_id),
        keys.reservation_expiry(key_id),
        keys.window_prefix(key_id),
        keys.reservation_claims(key_id),
    ]


def _lease_keys(key_id: str) -> list[str]:
    return [
        keys.reservations(key_id),
        keys.reservation_expiry(key_id),
        keys.reservation_claims(key_id),
    ]


def _script_error(exc: BaseException) -> bool:
    """A script that ran and failed on its input (Redis prefixes the place `@user_script`),
    as opposed to a server that cannot answer now (BUSY, LOADING, READONLY, ...): retrying
    the same call cannot help, so it must not be retried or journaled forever."""
    text = str(exc)
    return (
        isinstance(exc, ResponseError)
        and "user_script" in text
        and not text.startswith(("BUSY", "NOSCRIPT"))
    )


def _encoded(value: object) -> bytes:
    """An argument as redis-py's encoder sends it (ints and floats by repr, text as UTF-8)."""
    return value.encode() if isinstance(value, str) else repr(value).encode()


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulk_int(value: int) -> bytes:
    """An integer argument as redis-py's encoder sends it (its decimal text)."""
    text = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(text), text)


_BULK_BOOL = (_bulk(b"0"), _bulk(b"1"))
#: Elements of admit's EVALSHA: the command, the sha, the key count, 6 keys and 22 arguments.
_ADMIT_ELEMENTS = 3 + 6 + 22
#: Per-key pieces of admit's command kept (cleared past this many keys).
MAX_CACHED_ADMIT_KEYS = 10_000
#: Zone arguments kept, one per distinct zone name of keys (cleared past this many).
MAX_CACHED_ZONES = 1024


async def _stale(conn: Any) -> bool:
    """An idle connection the server closed (restart, idle timeout) or that holds unread
    data: what redis-py's pool checks before handing one out, so it reconnects instead of
    failing the command."""
    try:
        return bool(await conn.can_read())
    except (RedisConnectionError, OSError):
        return True


class _ScriptLane:
    """Connections of their own for one hot script (admit: one EVALSHA per Check).

    redis-py's generic path (Script object, `execute_command`, the blocking pool's condition,
    connection probe and observability records, a task per write timeout) cost ~130 µs of
    CPU per admit on the 2-core machines, the command itself ~50 µs (issue 12). Here one
    pre-encoded command goes over a redis-py `Connection` (same URL, auth, TLS and protocol
    as the pool's) taken from a plain stack, bounded by one `asyncio.timeout` for the whole
    write and read: the connections have no socket timeout of their own. A connection whose
    command failed or timed out is disconnected (redis-py does it, and so do we), so a late
    reply never meets the next command; the next use reconnects.
    """

    def __init__(self, pool: Any, *, max_connections: int, timeout_s: float) -> None:
        # (`orig_socket_timeout` is what redis-py restores after a maintenance window.)
        no_timeout = {"socket_timeout": None, "orig_socket_timeout": None}
        self._kwargs = {**pool.connection_kwargs, **no_timeout}
        self._connection_class = pool.connection_class
        self._timeout_s = timeout_s
        self._free = asyncio.Semaphore(max_connections)
        self._idle: list[Any] = []
        self._all: list[Any] = []

    async def call(self, command: bytes) -> Any:
        """The reply to `command` (one packed RESP command).

        :raises TimeoutError: no connection free, or no reply, within the timeout.
        :raises ResponseError: the server's error reply (the connection stays usable).
        """
        if self._free.locked():
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._free.acquire()
            except TimeoutError:
                raise RedisConnectionError("No connection available.") from None
        else:
            await self._free.acquire()  # returns at once
        conn = self._idle.pop() if self._idle else self._connect()
        try:
            async with asyncio.timeout(self._timeout_s):
                if conn.is_connected and await _stale(conn):
                    await conn.disconnect()  # send_packed_command connects it again
                await conn.send_packed_command(command)
                return await conn.read_response()
        except ResponseError:
            raise
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            self._idle.append(conn)
            self._free.release()

    def _connect(self) -> Any:
        conn = self._connection_class(**self._kwargs)
        self._all.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self._all:
            await conn.disconnect()


class RedisLedger:
    def __init__(
        self,
        client: Any,
        settings: Settings,
        *,
        buffer_history: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """:param clock: epoch s; picks the hour whose zone spec the scripts get (Lua itself
        reads Redis TIME)."""
        self._r = client
        self._buffer_history = buffer_history
        self._history_buffer: dict[str, dict[str, int]] = {}
        self._url = settings.redis_url
        self._timeout_s = settings.redis_timeout_s
        self._cluster = settings.redis_cluster
        # RedisCluster has no blocking pool: past `max_connections` on a node it raises
        # MaxConnectionsError at once. Bounding the calls in flight makes a burst wait for a
        # connection (up to the command timeout) as it does on the plain pool; one call uses
        # at most one connection per node, so no node's pool can run out.
        self._slots = asyncio.Semaphore(settings.redis_max_connections) if self._cluster else None
        self._clock = clock
        self._hour_off = settings.window_utc_offset_min * 60
        self._default_zone = default_zone(settings.window_timezone, settings.window_utc_offset_min)
        # Zone name (None: the default) -> (hour start s, hour end s, text, RESP bulk) of its
        # zone argument.
        self._zone_args: dict[str | None, tuple[float, float, str, bytes]] = {}
        self._ttl_ms = settings.reservation_ttl_s * 1000
        self._claim_ms = round(settings.claim_timeout_s * 1000)
        self._hist_ttl_s = settings.history_days * 86400
        self._counts_cached = settings.quota_counts_cached
        self._admit = client.register_script(_load_script("admit"))
        self._settle = client.register_script(_load_script("settle"))
        self._reap = client.register_script(_load_script("reap"))
        self._lease = client.register_script(_load_script("lease"))
        self._release = client.register_script(_load_script("release"))
        # admit runs once per Check: its own connections and pre-encoded command pieces.
        self._admit_lane = (
            None
            if self._cluster
            else _ScriptLane(
                client.connection_pool,
                max_connections=settings.redis_max_connections,
                timeout_s=settings.redis_timeout_s,
            )
        )
        self._admit_pieces: dict[str, tuple[KeyRecord, bytes, bytes, bytes, bytes]] = {}
        self._admit_consts = (
            _bulk_int(self._ttl_ms),
            _bulk_int(self._hist_ttl_s),
            _bulk_int(self._claim_ms),
        )
        self._floats: dict[float, bytes] = {}
        self._texts: dict[str, bytes] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, buffer_history: bool = False) -> RedisLedger:
        return cls(connect(settings), settings, buffer_history=buffer_history)

    async def close(self) -> None:
        if self._admit_lane is not None:
            await self._admit_lane.close()
        await self._r.aclose()

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        if self._slots is not None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise LedgerUnavailable(f"{what}: no connection available") from exc
        try:
            if self._cluster:
                # Load the slot map before the first command (a no-op once loaded). A cold
                # client sends keyed commands to a random node; a burst of them meets MOVED,
                # the client then closes every connection, in-flight commands included, and
                # retries them: a script could run twice.
                await self._r.initialize()
            return await fn()
        except ResponseError as exc:
            if _script_error(exc):
                raise LedgerInputError(f"{what}: {exc}") from exc
            raise LedgerUnavailable(f"{what}: {exc}") from exc
        # RedisClusterException is no RedisError: "cannot be connected", SlotNotCoveredError.
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise LedgerUnavailable(f"{what}: {exc}") from exc
        finally:
            if self._slots is not None:
                self._slots.release()

    async def ping(self) -> None:
        await self._call("ping", self._r.ping)

    # ---- key records -----------------------------------------------------------------
    async def create_key(self, rec: KeyRecord) -> None:
        async def run() -> bool:
            claimed = await self._r.set(keys.secret_index(rec.secret_hash), rec.id, nx=True)
            if not claimed:
                return False
            await self._r.set(keys.record(rec.id), rec.model_dump_json())
            await self._r.zadd(keys.KEY_INDEX, {rec.id: int(rec.created_at.timestamp() * 1000)})
            await self._r.publish(keys.KEY_CHANGED_CHANNEL, rec.id)
            return True

        if not await self._call("create_key", run):
            raise ValueError("a key with this secret already exists")

    async def put_key(self, rec: KeyRecord, *, old_secret_hash: str | None = None) -> None:
        """Replace a record (and move its secret index when the secret was rotated)."""

        async def run() -> None:
            if old_secret_hash and old_secret_hash != rec.secret_hash:
                await self._r.set(keys.secret_index(rec.secret_hash), rec.id)
                await self._r.delete(keys.secret_index(old_secret_hash))
            await self._r.set(keys.record(rec.id), rec.model_dump_json())
            await self._r.publish(keys.KEY_CHANGED_CHANNEL, rec.id)

        await self._call("put_key", run)

    async def delete_key(self, rec: KeyRecord) -> None:
        async def run() -> None:
            await self._r.delete(keys.secret_index(rec.secret_hash))
            await self._r.delete(keys.record(rec.id))
            await self._r.zrem(keys.KEY_INDEX, rec.id)
            await self._r.publish(keys.KEY_CHANGED_CHANNEL, rec.id)

        await self._call("delete_key", run)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._call("get_key", lambda: self._r.get(keys.record(key_id)))
        return KeyRecord.model_validate_json(raw) if raw else None

    async def find_key(self, secret_hash: str) -> KeyRecord | None:
        key_id = await self._call("find_key", lambda: self._r.get(keys.secret_index(secret_hash)))
        return await self.get_key(key_id) if key_id else None

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        """Records of these ids (missing ones left out), in one round trip."""

        async def run() -> list[str | None]:
            pipe = self._r.pipeline(transaction=False)
            for kid in key_ids:
                pipe.get(keys.record(kid))
            return cast(list[str | None], await pipe.execute())

        raws = await self._call("get_keys", run)
        return [KeyRecord.model_validate_json(r) for r in raws if r]

    async def list_key_ids(self, offset: int = 0, limit: int = 100) -> list[str]:
        ids = await self._call(
            "list_keys", lambda: self._r.zrange(keys.KEY_INDEX, offset, offset + limit - 1)
        )
        return list(ids)

    async def count_keys(self) -> int:
        return int(await self._call("count_keys", lambda: self._r.zcard(keys.KEY_INDEX)))

    async def key_changes(self) -> AsyncIterator[str]:
        """Key ids as they change (pub/sub), after a first "*" once subscribed (anything
        cached before may be stale). Ends, or raises, when the connection drops."""
        # A dedicated plain connection without the command timeout: a subscriber idles.
        # In a cluster PUBLISH reaches every node, so any node will do.
        client = aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_connect_timeout=self._timeout_s,
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

    # ---- admission and settlement ------------------------------------------------------
    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission:
        """:raises LedgerInputError: a number of `req` outside `atlas.limits` (nothing written)."""
        check_admit(req)
        if self._admit_lane is None:  # cluster: redis-py routes the script by its keys
            ks, args = self._admit_call(rec, req)
            r: Sequence[Any] = await self._call("admit", lambda: self._admit(keys=ks, args=args))
        else:
            r = await self._call("admit", lambda: self._run_admit(self._admit_command(rec, req)))
        granted = int(r[3])
        return Admission(
            admitted=bool(int(r[0])),
            reason=str(r[1]),
            retry_after_ms=int(r[2]),
            granted_completion=None if granted < 0 else granted,
            reserved=int(r[4]),
            requests_remaining=int(r[5]),
            requests_reset_ms=int(r[6]),
            tokens_remaining=None if not rec.tokens_per_minute else int(r[7]),
            tokens_reset_ms=int(r[8]),
            day_used=int(r[9]),
            day_reserved=int(r[10]),
            day_reset_s=int(r[11]),
            month_used=int(r[12]),
            month_reserved=int(r[13]),
            month_reset_s=int(r[14]),
            now_ms=int(r[15]),
            month_spend_micros=int(r[16]),
        )

    def _admit_keys(self, kid: str) -> list[str]:
        return [
            keys.request_bucket(kid),
            keys.token_bucket(kid),
            keys.reservations(kid),
            keys.reservation_expiry(kid),
            keys.window_prefix(kid),
            keys.reservation_claims(kid),
        ]

    def _key_limits(self, rec: KeyRecord) -> tuple[list[Any], list[Any], list[Any]]:
        """The key's ARGV of admit.lua: (rate .. monthly), (max_concurrent), (budget)."""
        # A record stored before its limits were bounded still works: past the bounds a
        # limit means "unlimited" either way, and only bounded numbers stay exact.
        return (
            [
                repr(float(min(rec.rate_per_sec, limits.MAX_RATE_PER_SEC))),
                min(rec.burst, limits.MAX_BURST),
                min(rec.tokens_per_minute or 0, limits.MAX_TOKEN_LIMIT),
                min(rec.daily_limit, limits.MAX_TOKEN_LIMIT),
                min(rec.monthly_limit, limits.MAX_TOKEN_LIMIT),
            ],
            [min(rec.max_concurrent or 0, limits.MAX_CONCURRENT)],
            [round(min(rec.monthly_budget_usd or 0, limits.MAX_BUDGET_USD) * MICROS_PER_USD)],
        )

    def _admit_call(self, rec: KeyRecord, req: AdmitRequest) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of admit.lua (the order the script reads them in)."""
        rate_to_monthly, concurrent, budget = self._key_limits(rec)
        args = [
            req.reservation_id,
            req.prompt_tokens,
            req.completion_tokens,
            *rate_to_monthly,
            repr(float(req.ceiling)),
            *concurrent,
            self._ttl_ms,
            self._zone_text(rec.window_timezone),
            int(req.shadow),
            int(req.clamp),
            req.priority,
            req.model,
            self._hist_ttl_s,
            *budget,
            req.cost_micros,
            self._claim_ms,
            req.choices,
            int(req.unattended),
        ]
        return self._admit_keys(rec.id), args

    def _admit_command(self, rec: KeyRecord, req: AdmitRequest) -> bytes:
        """The EVALSHA of `_admit_call` as RESP bytes: the key's part encoded once per record
        (the cache hands out the same record until it changes), the request's part now."""
        pieces = self._admit_pieces.get(rec.id)
        if pieces is None or pieces[0] is not rec:
            pieces = self._encode_key_pieces(rec)
        _, head, rate_to_monthly, concurrent, budget = pieces
        ttl, hist_ttl, claim = self._admit_consts
        return b"".join(
            (
                head,
                _bulk(req.reservation_id.encode()),
                _bulk_int(req.prompt_tokens),
                _bulk_int(req.completion_tokens),
                rate_to_monthly,
                self._float_arg(req.ceiling),
                concurrent,
                ttl,
                self._zone_arg(rec.window_timezone)[3],
                _BULK_BOOL[bool(req.shadow)],
                _BULK_BOOL[bool(req.clamp)],
                self._text_arg(req.priority),
                self._text_arg(req.model),
                hist_ttl,
                budget,
                _bulk_int(req.cost_micros),
                claim,
                _bulk_int(req.choices),
                _BULK_BOOL[bool(req.unattended)],
            )
        )

    def _encode_key_pieces(self, rec: KeyRecord) -> tuple[KeyRecord, bytes, bytes, bytes, bytes]:
        if len(self._admit_pieces) >= MAX_CACHED_ADMIT_KEYS:
            self._admit_pieces.clear()
        head = [
            b"*%d\r\n" % _ADMIT_ELEMENTS,
            _bulk(b"EVALSHA"),
            _bulk(self._admit.sha.encode()),
            _bulk_int(6),
            *(_bulk(k.encode()) for k in self._admit_keys(rec.id)),
        ]
        parts = [b"".join(_bulk(_encoded(v)) for v in part) for part in self._key_limits(rec)]
        pieces = (rec, b"".join(head), *parts)
        self._admit_pieces[rec.id] = pieces  # type: ignore[assignment]
        return pieces  # type: ignore[return-value]

    def _float_arg(self, value: float) -> bytes:
        arg = self._floats.get(value)
        if arg is None:
            arg = _bulk(repr(float(value)).encode())
            if len(self._floats) < 64:  # the ceilings: one per priority
                self._floats[value] = arg
        return arg

    def _text_arg(self, value: str) -> bytes:
        """Priorities and folded model names: few distinct values (bounded all the same)."""
        arg = self._texts.get(value)
        if arg is None:
            arg = _bulk(value.encode())
            if len(self._texts) >= 1024:
                self._texts.clear()
            self._texts[value] = arg
        return arg

    async def _run_admit(self, command: bytes) -> Any:
        assert self._admit_lane is not None
        try:
            return await self._admit_lane.call(command)
        except NoScriptError:
            # The server lost its scripts (restart, failover): load it and run it once more,
            # as redis-py's Script object does.
            await self._r.script_load(self._admit.script)
            return await self._admit_lane.call(command)

    async def _run_lane(self, script: Any, command: bytes) -> Any:
        assert self._admit_lane is not None
        try:
            return await self._admit_lane.call(command)
        except NoScriptError:
            await self._r.script_load(script.script)  # lost on restart or failover
            return await self._admit_lane.call(command)

    async def settle(self, s: Settlement) -> SettleResult:
        """:raises LedgerInputError: a number of `s` outside `atlas.limits` (nothing written)."""
        check_settlement(s)
        kid = s.key_id
        ks = [
            keys.reservations(kid),
            keys.reservation_expiry(kid),
            keys.token_bucket(kid),
            keys.window_prefix(kid),
            keys.reservation_claims(kid),
        ]
        args = [
            s.reservation_id,
            s.prompt_tokens,
            s.completion_tokens,
            self._zone_text(None),
            min(max(0, s.tokens_per_minute), limits.MAX_TOKEN_LIMIT),
            int(s.exact),
            DONE_MARKER_TTL_S,
            self._hist_ttl_s,
            max(0, s.cost_micros),
            s.cached_tokens,
            s.cache_write_tokens,
            s.reasoning_tokens,
            int(self._counts_cached),
        ]
        if self._admit_lane is None:  # cluster: redis-py routes the script by its keys
            r = await self._call("settle", lambda: self._settle(keys=ks, args=args))
        else:
            # One settlement per plain completion (from the access log): the pre-encoded
            # command over admit's lane, not redis-py's generic path (~100 µs less, issue 12).
            command = b"".join(
                (
                    b"*%d\r\n" % (3 + len(ks) + len(args)),
                    _bulk(b"EVALSHA"),
                    _bulk(self._settle.sha.encode()),
                    _bulk_int(len(ks)),
                    *(_bulk(k.encode()) for k in ks),
                    *(_bulk(_encoded(v)) for v in args),
                )
            )
            r = await self._call("settle", lambda: self._run_lane(self._settle, command))
        result = SettleResult(status=str(r[0]), charged=int(r[1]), refunded=int(r[2]))
        if result.status in ("settled", "unreserved", "late", "malformed"):
            await self._record_shared_history(s, hour=str(r[4]), counted=result.status != "late")
        return result

    async def _record_shared_history(self, s: Settlement, *, hour: str, counted: bool) -> None:
        """Per-model and global hourly history: other hash tags, so not inside settle.lua.
        Buffered (summed in memory, written by `flush_history`) when the ledger was built
        with `buffer_history`: one pipeline a second instead of one round trip a request."""
        fields = {"prompt": s.prompt_tokens, "completion": s.completion_tokens}
        if counted:
            fields["requests"] = 1
        if s.cost_micros:
            fields["spend"] = s.cost_micros
        for name, n in (
            ("cached", s.cached_tokens),
            ("cache_write", s.cache_write_tokens),
            ("reasoning", s.reasoning_tokens),
        ):
            if n:
                fields[name] = n
        for prefix in (keys.GLOBAL_PREFIX, keys.model_prefix(s.model or "unknown")):
            bucket = self._history_buffer.setdefault(f"{prefix}h:{hour}", {})
            for name, value in fields.items():
                bucket[name] = bucket.get(name, 0) + value
        if not self._buffer_history:
            await self.flush_history()

    async def flush_history(self) -> None:
        """Write buffered shared history. On failure it stays buffered for the next flush."""
        if not self._history_buffer:
            return
        batch, self._history_buffer = self._history_buffer, {}

        async def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for h, fields in batch.items():
                for name, value in fields.items():
                    pipe.hincrby(h, name, value)
                pipe.expire(h, self._hist_ttl_s)
            await pipe.execute()

        try:
            await self._call("history", run)
        except LedgerUnavailable:
            # History is for reports; the keys' own books were already settled atomically.
            for h, fields in batch.items():
                bucket = self._history_buffer.setdefault(h, {})
                for name, value in fields.items():
                    bucket[name] = bucket.get(name, 0) + value
            log.warning("shared history not written yet (%d hours buffered)", len(batch))

    async def add_inflight(self, delta: int) -> int:
        """Add to the global in-flight reserved tokens; the new total."""
        return int(await self._call("inflight", lambda: self._r.incrby(keys.INFLIGHT, delta)))

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]:
        """Settle one key's expired reservations: (count, tokens charged)."""
        ks = _reap_keys(key_id)
        r = await self._call("reap", lambda: self._reap(keys=ks, args=self._reap_args(charge)))
        return int(r[0]), int(r[1])

    def _reap_args(self, charge: bool) -> list[int | str]:
        return [self._zone_text(None), int(charge), REAP_BATCH, DONE_MARKER_TTL_S, self._hist_ttl_s]

    async def _run_per_key(
        self, what: str, script: Any, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run `script` once per (keys, args), all in one pipelined round trip. Each call's
        keys share one slot; in a cluster the pipeline splits by node. A call that fails
        comes back as its exception, so one bad key does not stop the others."""

        async def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            if self._cluster:
                # redis-py refuses Script calls (evalsha) in a cluster pipeline. Send EVALSHA
                # itself, once every primary has the script, as a plain pipeline's
                # load_scripts() does.
                if not all(await self._r.script_exists(script.sha)):
                    script.sha = await self._r.script_load(script.script)
                for ks, args in calls:
                    pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *args)
            else:
                for ks, args in calls:
                    await script(keys=ks, args=args, client=pipe)
            return cast(list[Any], await pipe.execute(raise_on_error=False))

        return cast(list[Any], await self._call(what, run))

    def _failed(self, what: str, key_id: str, row: Any) -> bool:
        if not isinstance(row, BaseException):
            return False
        if not _script_error(row):
            # The server did not run it (unreachable, failover): a later pass retries.
            raise LedgerUnavailable(f"{what} {key_id}: {row}") from row
        log.error("%s of key %s failed, other keys go on: %s", what, key_id, row)
        return True

    async def reap_keys(self, key_ids: Sequence[str], *, charge: bool = True) -> ReapTotals:
        """Reap many keys in one pipelined round trip; a key whose script fails is counted in
        `failed_keys` and skipped."""
        args = self._reap_args(charge)
        rows = await self._run_per_key("reap", self._reap, [(_reap_keys(k), args) for k in key_ids])
        ok = [r for k, r in zip(key_ids, rows, strict=True) if not self._failed("reap", k, r)]
        return ReapTotals(
            reaped=sum(int(r[0]) for r in ok),
            charged=sum(int(r[1]) for r in ok),
            released=sum(int(r[2]) for r in ok),
            abandoned=sum(int(r[3]) for r in ok),
            failed_keys=len(rows) - len(ok),
            malformed=sum(int(r[4]) for r in ok),
        )

    async def lease(self, leases: Mapping[str, Collection[str]]) -> int:
        """Claim or renew open reservations (key id -> reservation ids) for live streams:
        each deadline moves to now + the reservation TTL, in one pipelined round trip. Ids
        already settled or reaped are skipped. Returns how many were claimed or renewed."""
        kids = [k for k, rids in leases.items() if rids]
        if not kids:
            return 0
        calls = [(_lease_keys(k), [self._ttl_ms, *leases[k]]) for k in kids]
        rows = await self._run_per_key("lease", self._lease, calls)
        ok = [r for k, r in zip(kids, rows, strict=True) if not self._failed("lease", k, r)]
        return sum(int(r) for r in ok)

    async def release(self, releases: Mapping[str, Collection[str]]) -> int:
        """Give up open reservations (key id -> reservation ids) whose request never reached
        the upstream: the reaper releases them, charged nothing, on its next pass."""
        kids = [k for k, rids in releases.items() if rids]
        if not kids:
            return 0
        calls = [(_lease_keys(k), list(releases[k])) for k in kids]
        rows = await self._run_per_key("release", self._release, calls)
        ok = [r for k, r in zip(kids, rows, strict=True) if not self._failed("release", k, r)]
        return sum(int(r) for r in ok)

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """A lease held by one process among replicas until `ttl_ms` passes."""
        got = await self._call(
            "lock", lambda: self._r.set(keys.lock(name), owner, nx=True, px=ttl_ms)
        )
        return bool(got)

    async def usage(self, rec: KeyRecord) -> KeyUsage:
        async def run() -> tuple[Any, ...]:
            sec, _usec = await self._r.time()
            names = window_names(int(sec), self.zone_of(rec), hour_offset_s=self._hour_off)
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(keys.window_prefix(rec.id) + "d:" + names.day)
            pipe.hgetall(keys.window_prefix(rec.id) + "m:" + names.month)
            pipe.hlen(keys.reservations(rec.id))
            day, month, open_n = await pipe.execute()
            return names, day, month, open_n

        names, day, month, open_n = await self._call("usage", run)

        def window(h: dict[str, str], limit: int, reset: int) -> Window:
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

        return KeyUsage(
            key_id=rec.id,
            daily=window(day, rec.daily_limit, names.day_reset_s),
            monthly=window(month, rec.monthly_limit, names.month_reset_s),
            open_reservations=int(open_n),
        )

    async def history(self, prefix: str, start_ts: int, hours: int) -> list[HourRow]:
        """Hourly history under `prefix` (a key's, a model's or the global one), one row per
        hour from `start_ts` (an hour boundary of the windows' offset), zeros included."""
        starts = [start_ts + 3600 * i for i in range(hours)]

        async def run() -> list[dict[str, str]]:
            pipe = self._r.pipeline(transaction=False)
            for ts in starts:
                pipe.hgetall(f"{prefix}h:{hour_name(ts, self._hour_off)}")
            return cast(list[dict[str, str]], await pipe.execute())

        rows = await self._call("history", run)
        return [
            HourRow(ts, {k: int(v) for k, v in row.items()})
            for ts, row in zip(starts, rows, strict=True)
        ]

    def hour_start(self, epoch_s: float) -> int:
        """Start (epoch s) of the history hour holding `epoch_s`."""
        return hour_start(epoch_s, self._hour_off)

    async def server_time(self) -> float:
        sec, usec = await self._call("time", self._r.time)
        return int(sec) + int(usec) / 1e6

    async def add_history(self, entries: Sequence[tuple[str, int, dict[str, int]]]) -> None:
        """Add (prefix, hour ts, fields) rows to history in one round trip (simulation and
        imports; live traffic is recorded by the Lua scripts)."""

        async def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for prefix, ts, fields in entries:
                h = f"{prefix}h:{hour_name(ts, self._hour_off)}"
                for name, value in fields.items():
                    pipe.hincrby(h, name, value)
                pipe.expire(h, self._hist_ttl_s)
            await pipe.execute()

        await self._call("history", run)

    async def add_window_fields(self, key_id: str, window: str, fields: dict[str, int]) -> None:
        """Add to one quota window (`d:YYYYMMDD` or `m:YYYYMM`; simulation and imports)."""

        async def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for name, value in fields.items():
                pipe.hincrby(keys.window_prefix(key_id) + window, name, value)
            await pipe.execute()

        await self._call("windows", run)

    async def day_windows(self, key_ids: Sequence[str], day: str) -> list[dict[str, int]]:
        """The `d:<day>` window of each key (YYYYMMDD), in one round trip."""

        async def run() -> list[dict[str, str]]:
            pipe = self._r.pipeline(transaction=False)
            for kid in key_ids:
                pipe.hgetall(f"{keys.window_prefix(kid)}d:{day}")
            return cast(list[dict[str, str]], await pipe.execute())

        rows = await self._call("windows", run)
        return [{k: int(v) for k, v in row.items()} for row in rows]

    # ---- windows' time zones ------------------------------------------------------------
    @property
    def hour_offset_s(self) -> int:
        """Offset of the history-hour grid (`h:` keys), s."""
        return self._hour_off

    def zone_of(self, rec: KeyRecord | None) -> Zone:
        """The zone of a key's day and month windows (its own, else the default; also the
        default for a name this machine's tz database does not know). None: the default."""
        name = rec.window_timezone if rec is not None else None
        if name is None:
            return self._default_zone
        try:
            return load_zone(name)
        except ValueError:
            return self._default_zone

    def _zone_text(self, name: str | None) -> str:
        return self._zone_arg(name)[2]

    def _zone_arg(self, name: str | None) -> tuple[float, float, str, bytes]:
        """(hour start, hour end, text, RESP bulk) of the scripts' zone argument for a key's
        zone name: zoneinfo runs once per zone and hour (~130 µs), an admission pays a clock
        read and a lookup (~0.2 µs)."""
        now = self._clock()
        hit = self._zone_args.get(name)
        if hit is not None and hit[0] <= now < hit[1]:
            return hit
        hour = int(now // 3600)
        zone: Zone = self._default_zone
        if name is not None:
            try:
                zone = load_zone(name)
            except ValueError:
                log.warning("key zone %r unknown here: its windows use the default zone", name)
        text = zone_spec(zone, hour * 3600, self._hour_off).text
        if len(self._zone_args) >= MAX_CACHED_ZONES:
            self._zone_args.clear()
        hit = self._zone_args[name] = (hour * 3600, hour * 3600 + 3600, text, _bulk(text.encode()))
        return hit

    # ---- audit -------------------------------------------------------------------------
    async def audit(self, entry: dict[str, Any]) -> None:
        """Append one admin change to the audit stream (bounded, newest kept)."""
        fields = {"json": json.dumps(entry, default=str, separators=(",", ":"))}
        await self._call(
            "audit",
            lambda: self._r.xadd(keys.AUDIT, fields, maxlen=AUDIT_MAX_ENTRIES, approximate=True),
        )

    async def audit_entries(self, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        """Newest first; `before` is an entry id to page from."""
        if before is not None and before.strip("0-") == "":
            return []  # nothing precedes 0-0 (and Redis rejects the exclusive range)
        top = f"({before}" if before else "+"
        rows = await self._call("audit", lambda: self._r.xrevrange(keys.AUDIT, top, "-", limit))
        return [{"id": rid, **json.loads(f["json"])} for rid, f in rows]

"""Settlements: settle.lua per finished request, then the per-model and global hourly history
(other hash tags, so outside the script, optionally buffered); reap.lua for reservations
whose stream never settled, under a lease one replica holds (`Settlements`, `Reaping`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from atlas.errors import LedgerUnavailable
from atlas.ledger import keys
from atlas.ledger.protocol import (
    LedgerInputError,
    ReapTotals,
    Settlement,
    SettleOutcome,
    SettleResult,
    check_settlement,
)
from atlas.ledger.redis.client import Conn, script_error
from atlas.ledger.redis.scripts import ReapCodec, Scripts, SettleCodec, evalsha
from atlas.ledger.redis.zones import Zones
from atlas.settings import Settings

log = logging.getLogger("atlas.ledger.redis")


class RedisSettlements:
    def __init__(
        self,
        conn: Conn,
        scripts: Scripts,
        zones: Zones,
        settings: Settings,
        *,
        buffer_history: bool = False,
    ) -> None:
        self._c = conn
        self._scripts = scripts
        self._zones = zones
        self._hist_ttl_s = settings.history_days * 86400
        self._settle = SettleCodec(
            self._hist_ttl_s, settings.quota_counts_cached, settings.idempotency_ttl_s
        )
        self._reap = ReapCodec(self._hist_ttl_s)
        self._buffer_history = buffer_history
        self._history_buffer: dict[str, dict[str, int]] = {}

    async def settle(self, s: Settlement) -> SettleResult:
        """:raises LedgerInputError: a number of `s` outside `atlas.limits` (nothing written)."""
        check_settlement(s)
        ks = self._settle.keys(s.key_id)
        args = self._settle.args(s, self._zones.text(None))
        script = self._scripts.settle
        if self._c.lane is None:  # cluster: redis-py routes the script by its keys
            r = await self._c.call("settle", lambda: script(keys=ks, args=args))
        else:
            # One settlement per plain completion (from the access log): the pre-encoded
            # command over admit's lane, not redis-py's generic path (~100 µs less, issue 12).
            command = evalsha(script.sha, ks, args)
            r = await self._c.call("settle", lambda: self._c.run_lane(script, command))
        result, hour = self._settle.decode(r)
        if result.status in ("settled", "unreserved", "late", "malformed"):
            await self._record_shared_history(s, hour=hour, counted=result.status != "late")
        return result

    async def settle_many(self, ss: Sequence[Settlement]) -> list[SettleOutcome]:
        """One access-log message's settlements: pipelined over the lane on a plain server
        (one write, one read for all), concurrently in a cluster (redis-py routes each)."""
        out: list[SettleOutcome | None] = [None] * len(ss)
        todo: list[int] = []
        for i, s in enumerate(ss):
            try:
                check_settlement(s)
                todo.append(i)
            except LedgerInputError as exc:
                out[i] = exc
        if self._c.lane is None:
            got = await asyncio.gather(*(self.settle(ss[i]) for i in todo), return_exceptions=True)
            for i, r in zip(todo, got, strict=True):
                if not isinstance(r, SettleResult | LedgerInputError | LedgerUnavailable):
                    raise r
                out[i] = r
            return [r for r in out if r is not None]
        script, zone = self._scripts.settle, self._zones.text(None)
        commands = [
            evalsha(script.sha, self._settle.keys(ss[i].key_id), self._settle.args(ss[i], zone))
            for i in todo
        ]
        replies = await self._c.call("settle", lambda: self._c.run_lane_many(script, commands))
        for i, reply in zip(todo, replies, strict=True):
            if isinstance(reply, ResponseError):  # that script alone
                bad = LedgerInputError if script_error(reply) else LedgerUnavailable
                out[i] = bad(f"settle {ss[i].reservation_id}: {reply}")
                continue
            result, hour = self._settle.decode(reply)
            if result.status in ("settled", "unreserved", "late", "malformed"):
                await self._record_shared_history(ss[i], hour=hour, counted=result.status != "late")
            out[i] = result
        return [r for r in out if r is not None]

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
            bucket = self._history_buffer.setdefault(keys.history_hour(prefix, hour), {})
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
            pipe = self._c.r.pipeline(transaction=False)
            for h, fields in batch.items():
                for name, value in fields.items():
                    pipe.hincrby(h, name, value)
                pipe.expire(h, self._hist_ttl_s)
            await pipe.execute()

        try:
            await self._c.call("history", run)
        except LedgerUnavailable:
            # History is for reports; the keys' own books were already settled atomically.
            for h, fields in batch.items():
                bucket = self._history_buffer.setdefault(h, {})
                for name, value in fields.items():
                    bucket[name] = bucket.get(name, 0) + value
            log.warning("shared history not written yet (%d hours buffered)", len(batch))

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]:
        """Settle one key's expired reservations: (count, tokens charged)."""
        ks = self._reap.keys(key_id)
        args = self._reap.args(self._zones.text(None), charge=charge)
        r = await self._c.call("reap", lambda: self._scripts.reap(keys=ks, args=args))
        return int(r[0]), int(r[1])

    async def reap_keys(self, key_ids: Sequence[str], *, charge: bool = True) -> ReapTotals:
        """Reap many keys in one pipelined round trip; a key whose script fails is counted in
        `failed_keys` and skipped."""
        args: list[Any] = self._reap.args(self._zones.text(None), charge=charge)
        calls = [(self._reap.keys(k), args) for k in key_ids]
        rows = await self._c.run_per_key("reap", self._scripts.reap, calls)
        ok = self._c.ok_keyed_rows("reap", key_ids, rows)
        return ReapCodec.totals(
            [row for _, row in ok], failed_keys=len(rows) - len(ok), key_ids=[k for k, _ in ok]
        )

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """A lease held by one process among replicas until `ttl_ms` passes."""
        got = await self._c.call(
            "lock", lambda: self._c.r.set(keys.lock(name), owner, nx=True, px=ttl_ms)
        )
        return bool(got)

"""Provider key pools in Redis (`Pools`): pool_pick.lua and pool_report.lua, one hash tag per
provider (`{p:<provider>}`), so each call is one atomic script on one slot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atlas.ledger import keys
from atlas.ledger.protocol import PoolObservation, PoolPick, PoolState
from atlas.ledger.redis.client import Conn
from atlas.ledger.redis.scripts import load_script

#: Per-minute stats are kept this long (the health view's longest window, and a margin), s.
STATS_TTL_S = 2 * 3600


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisPools:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._pick = conn.r.register_script(load_script("pool_pick"))
        self._report = conn.r.register_script(load_script("pool_report"))

    async def pick(
        self, provider: str, strategy: str, estimate: int, members: Sequence[tuple[str, int, int]]
    ) -> PoolPick:
        cool, use, rr, _ = keys.pool_keys(provider)
        args: list[Any] = [strategy, max(0, int(estimate)), len(members)]
        for member, rpm, tpm in members:
            args += [member, rpm, tpm]
        row = await self._c.call("pool pick", lambda: self._pick(keys=[cool, use, rr], args=args))
        return PoolPick(_text(row[0]), int(row[1]), _text(row[2]))

    async def report(self, provider: str, observations: Sequence[PoolObservation]) -> None:
        if not observations:
            return
        cool, use, _, stats = keys.pool_keys(provider)
        args: list[Any] = [STATS_TTL_S, len(observations)]
        for o in observations:
            args += [o.member, max(0, int(o.cool_ms)), o.cool_scope, o.reason or "-"]
            args += [int(o.token_correction), len(o.stats)]
            for f, amount in o.stats.items():
                args += [f, int(amount)]
        await self._c.call("pool report", lambda: self._report(keys=[cool, use, stats], args=args))

    async def pool_state(self, provider: str, minutes: int) -> PoolState:
        cool, use, _, stats = keys.pool_keys(provider)
        now_s = await self._server_time()
        minute = int(now_s // 60)
        pipe = self._c.r.pipeline(transaction=False)
        pipe.hgetall(cool)
        pipe.hgetall(f"{use}{minute}")
        for m in range(minute - minutes + 1, minute + 1):
            pipe.hgetall(f"{stats}{m}")
        rows = await self._c.call("pool state", pipe.execute)
        cooling: dict[str, tuple[float, str]] = {}
        for k, v in rows[0].items():
            until_ms, _, reason = _text(v).partition("|")
            if until_ms.isdigit() and int(until_ms) / 1000 > now_s:
                cooling[_text(k)] = (int(until_ms) / 1000, reason)
        current = {_text(k): int(v) for k, v in rows[1].items()}
        per_minute = [{_text(k): int(v) for k, v in h.items()} for h in rows[2:]]
        return PoolState(cooling, current, per_minute)

    async def _server_time(self) -> float:
        sec, usec = await self._c.call("time", self._c.r.time)
        return float(sec) + float(usec) / 1e6

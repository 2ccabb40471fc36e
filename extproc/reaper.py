"""Settles reservations whose stream never settled (extproc crashed, a gRPC stream was lost).

One extproc replica at a time reaps (a lease in Redis); each pass walks every key in
pipelined batches and runs `reap.lua`, which only touches reservations past their TTL.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.inflight import InflightGauge
from atlas.ledger.protocol import ReapTotals
from atlas.ledger.redis import RedisLedger

log = logging.getLogger(__name__)

KEYS_PER_ROUND_TRIP = 200


class Reaper:
    def __init__(
        self,
        ledger: RedisLedger,
        *,
        interval_s: float,
        charge: bool,
        inflight: InflightGauge | None = None,
        owner: str | None = None,
    ) -> None:
        self._ledger = ledger
        self._interval_s = interval_s
        self._charge = charge
        self._inflight = inflight
        self._owner = owner or secrets.token_hex(8)

    async def run_once(self) -> ReapTotals | None:
        """One pass, or None when another replica holds the lease."""
        if not await self._ledger.try_lock("reaper", self._owner, int(self._interval_s * 1000)):
            return None
        reaped = charged = released = 0
        offset = 0
        while True:
            ids = await self._ledger.list_key_ids(offset, KEYS_PER_ROUND_TRIP)
            if not ids:
                break
            t = await self._ledger.reap_keys(ids, charge=self._charge)
            reaped, charged, released = (
                reaped + t.reaped,
                charged + t.charged,
                released + t.released,
            )
            offset += len(ids)
        if reaped:
            log.warning("reaped %d unsettled reservations (%d tokens charged)", reaped, charged)
            metrics.REAPED.inc(reaped)
            if self._inflight is not None:
                self._inflight.add(-released)
        return ReapTotals(reaped, charged, released)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except LedgerUnavailable as exc:
                metrics.LEDGER_ERRORS.labels(service="extproc", op="reap").inc()
                log.warning("reaper pass skipped: %s", exc)

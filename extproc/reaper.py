"""Settles reservations whose stream never settled (extproc crashed, a gRPC stream was lost).

One extproc replica at a time reaps (a lease in Redis); each pass walks every key in
pipelined batches and runs `reap.lua`, which only touches reservations past their deadline:
unclaimed ones (no ext_proc stream ever saw the request) are released and charged 0, claimed
ones charged what they reserved. A key whose script fails is reported and skipped; the
other keys are still reaped.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import astuple

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.inflight import InflightGauge
from atlas.ledger.protocol import Reaping, ReapTotals

log = logging.getLogger(__name__)

KEYS_PER_ROUND_TRIP = 200


class Reaper:
    def __init__(
        self,
        ledger: Reaping,
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
        total = ReapTotals(0, 0, 0)
        offset = 0
        while True:
            ids = await self._ledger.list_key_ids(offset, KEYS_PER_ROUND_TRIP)
            if not ids:
                break
            t = await self._ledger.reap_keys(ids, charge=self._charge)
            total = ReapTotals(*(a + b for a, b in zip(astuple(total), astuple(t), strict=True)))
            offset += len(ids)
        if total.reaped:
            log.warning(
                "reaped %d unsettled reservations (%d abandoned; %d tokens charged)",
                total.reaped,
                total.abandoned,
                total.charged,
            )
            metrics.REAPED.inc(total.reaped)
            metrics.ABANDONED.inc(total.abandoned)
            if self._inflight is not None:
                self._inflight.add(-total.released)
        if total.failed_keys or total.malformed:
            metrics.LEDGER_ERRORS.labels(service="extproc", op="reap_key").inc(total.failed_keys)
            log.error(
                "reaper: %d keys failed, %d malformed reservations removed",
                total.failed_keys,
                total.malformed,
            )
        return total

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except LedgerUnavailable as exc:
                metrics.LEDGER_ERRORS.labels(service="extproc", op="reap").inc()
                log.warning("reaper pass skipped: %s", exc)

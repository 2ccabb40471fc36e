"""Settles reservations whose stream never settled (extproc crashed, a gRPC stream was lost).

One extproc replica at a time reaps (a lease in Redis); each pass walks every key in
pipelined batches and runs `reap.lua`, which only touches reservations past their deadline:
unclaimed ones (no ext_proc stream ever saw the request) are released and charged 0, claimed
ones charged what they reserved. A key whose script fails is reported and skipped; the
other keys are still reaped. Each reservation reaped gets its request log record (outcome
`reaped`, or `released` for an unclaimed one), the only record of a request whose stream
was lost.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import astuple

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.inflight import InflightGauge
from atlas.keymodel import team_of
from atlas.ledger.protocol import Reaping, ReapTotals
from atlas.requestlog import RequestRecord
from atlas.requestlog_writer import RequestLogWriter

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
        requests: RequestLogWriter | None = None,
    ) -> None:
        self._ledger = ledger
        self._interval_s = interval_s
        self._charge = charge
        self._inflight = inflight
        self._owner = owner or secrets.token_hex(8)
        self._requests = requests

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
            self._log(t)
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

    def _log(self, t: ReapTotals) -> None:
        """One record per reservation reaped: what it was charged (the reservation, or 0),
        as estimated tokens; the split between prompt and completion is not known."""
        if self._requests is None:
            return
        now_ms = int(time.time() * 1000)
        for key_id, rid, charged, claimed, priority, model in t.lost:
            self._requests.add(
                RequestRecord(
                    at_ms=now_ms,
                    request_id=rid,
                    key_id=key_id,
                    team=team_of(key_id),
                    model=model,
                    outcome="reaped" if claimed else "released",
                    reason="stream_lost" if claimed else "never_sent",
                    prompt_tokens=charged,
                    exact=False,
                    priority=priority,
                )
            )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except LedgerUnavailable as exc:
                metrics.LEDGER_ERRORS.labels(service="extproc", op="reap").inc()
                log.warning("reaper pass skipped: %s", exc)

"""Running settlements: in tasks that outlive the gRPC handler that finished the exchange,
one task and one Redis round trip for a batch (the exchanges of one access-log message). A
settlement Redis does not take after quick retries goes to the on-disk journal, replayed
when Redis is back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.grant import Grant
from atlas.inflight import InflightGauge
from atlas.ledger.protocol import LedgerInputError, Settlement, Settlements, SettleResult
from atlas.requestlog_writer import RequestLogWriter
from extproc.journal import SettlementJournal
from extproc.providers import ProviderReporter
from extproc.settlement import request_record

log = logging.getLogger("atlas.extproc")

#: Quick retries (50 ms, 200 ms) ride out a blip; a longer outage goes to the journal.
SETTLE_RETRIES = 3
#: Settlements per round trip: an access-log message holds ~16 KiB of entries (a few dozen),
#: so this only bounds one Redis pipeline (and its time budget) whatever Envoy sends.
MAX_BATCH = 256


@dataclass(slots=True)
class Finished:
    """One finished exchange to settle, with what the request log records of it."""

    settlement: Settlement
    grant: Grant | None
    #: For a streamed response, how long it streamed (None: not one; < 0: unknown).
    stream_s: float | None = None
    #: The HTTP status the client got; how long the exchange took; when it started (epoch s).
    status: int = 0
    latency_ms: float = 0.0
    started_s: float | None = None


class Settler:
    """Runs settlements as tasks that outlive the gRPC handler."""

    def __init__(
        self,
        ledger: Settlements,
        *,
        journal: SettlementJournal | None = None,
        inflight: InflightGauge | None = None,
        providers: ProviderReporter | None = None,
        requests: RequestLogWriter | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._ledger = ledger
        self._requests = requests
        self._journal = journal
        self._inflight = inflight
        self._providers = providers
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(
        self,
        s: Settlement,
        grant: Grant | None,
        *,
        stream_s: float | None = None,
        status: int = 0,
        latency_ms: float = 0.0,
        started_s: float | None = None,
    ) -> None:
        """One exchange (an ext_proc stream's): see `Finished` for the parameters."""
        self.submit_many([Finished(s, grant, stream_s, status, latency_ms, started_s)])

    def submit_many(self, batch: Sequence[Finished]) -> None:
        """Exchanges settled together: one task, one round trip (each still on its own)."""
        if not batch:
            return
        if self._requests is not None:
            now = time.time()
            for f in batch:
                self._requests.add(
                    request_record(
                        f.settlement,
                        f.grant,
                        status=f.status,
                        latency_ms=f.latency_ms,
                        now_s=now,
                        started_s=f.started_s,
                    )
                )
        for i in range(0, len(batch), MAX_BATCH):
            task = asyncio.create_task(self._settle(list(batch[i : i + MAX_BATCH])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle(self, pending: list[Finished]) -> None:
        delay = 0.05
        error: Exception | None = None
        for attempt in range(SETTLE_RETRIES):
            try:
                results = await self._ledger.settle_many([f.settlement for f in pending])
            except LedgerUnavailable as exc:
                error = exc
            else:
                failed = []
                for f, r in zip(pending, results, strict=True):
                    if isinstance(r, LedgerUnavailable):  # that script alone (BUSY, ...)
                        failed.append(f)
                        error = r
                    elif isinstance(r, LedgerInputError):
                        self._rejected(f.settlement, r)
                    else:
                        self._settled(f, r)
                pending = failed
            if not pending:
                return
            metrics.LEDGER_ERRORS.labels(service="extproc", op="settle").inc()
            if attempt < SETTLE_RETRIES - 1:
                await self._sleep(delay)
                delay *= 4
        for f in pending:
            rid = f.settlement.reservation_id
            if self._journal is not None and self._journal.append(f.settlement):
                log.warning("settle %s journaled: %s", rid, error)
            else:  # the reservation's TTL makes the reaper charge it
                log.error("settle %s left to the reaper: %s", rid, error)

    @staticmethod
    def _rejected(s: Settlement, exc: LedgerInputError) -> None:
        # Numbers no ledger takes (beyond atlas.limits): retrying or journaling cannot help.
        # The claimed reservation is no longer renewed: the reaper charges it.
        metrics.SETTLEMENTS.labels(
            outcome=s.outcome, source="exact" if s.exact else "estimated", status="rejected"
        ).inc()
        log.error("settle %s rejected, left to the reaper: %s", s.reservation_id, exc)

    def _settled(self, f: Finished, result: SettleResult) -> None:
        s, grant, stream_s = f.settlement, f.grant, f.stream_s
        if (
            self._inflight is not None
            and result.status in ("settled", "malformed")
            and grant is not None
            and not grant.degraded
        ):
            self._inflight.add(-grant.reserved)
        source = "exact" if s.exact else "estimated"
        metrics.SETTLEMENTS.labels(outcome=s.outcome, source=source, status=result.status).inc()
        if result.status == "duplicate":
            return
        if self._providers is not None and grant is not None and grant.provider:
            self._providers.settled(s, grant)
        metrics.REQUESTS.labels(key_id=s.key_id, model=s.model, outcome=s.outcome).inc()
        tokens = metrics.TOKENS_USED.labels
        tokens(key_id=s.key_id, model=s.model, kind="prompt").inc(s.prompt_tokens)
        tokens(key_id=s.key_id, model=s.model, kind="completion").inc(s.completion_tokens)
        # The parts: a series only for keys and models that report them.
        if s.cached_tokens:
            tokens(key_id=s.key_id, model=s.model, kind="cached").inc(s.cached_tokens)
        if s.cache_write_tokens:
            tokens(key_id=s.key_id, model=s.model, kind="cache_write").inc(s.cache_write_tokens)
        if s.reasoning_tokens:
            tokens(key_id=s.key_id, model=s.model, kind="reasoning").inc(s.reasoning_tokens)
        if result.refunded:
            metrics.TOKEN_REFUNDS.labels(key_id=s.key_id, reason=s.outcome).inc(result.refunded)
        if stream_s is not None:
            metrics.STREAMING_REQUESTS.labels(key_id=s.key_id, model=s.model).inc()
            if stream_s >= 0:
                metrics.STREAMING_DURATION.observe(stream_s)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

"""Writes request log records in batches, off the request path: `add` appends to a bounded
in-memory buffer (no I/O); a background task flushes it every `interval_s` (or at
`max_batch` records) in one pipeline, marking the scopes the alerter re-evaluates. While
Redis is unreachable the buffer keeps the newest `max_buffer` records; older ones are
dropped and counted (the log is a record, never the accounting: settlements are
journaled, log records are not)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.ledger.admin_protocol import RequestLog
from atlas.requestlog import RequestRecord

log = logging.getLogger("atlas.requestlog")

#: Records one flush writes at most (one pipeline).
MAX_BATCH = 500
#: Records kept in memory while Redis is away.
MAX_BUFFER = 20_000


class RequestLogWriter:
    def __init__(
        self,
        store: RequestLog,
        *,
        service: str,
        interval_s: float = 0.5,
        max_batch: int = MAX_BATCH,
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._buffer: deque[RequestRecord] = deque(maxlen=max_buffer)
        self._wake = asyncio.Event()
        self._written = metrics.REQUEST_LOG.labels(service=service, event="written")
        self._dropped = metrics.REQUEST_LOG.labels(service=service, event="dropped")

    def add(self, rec: RequestRecord) -> None:
        """Queue one record (no I/O); the oldest is dropped when the buffer is full."""
        if len(self._buffer) == self._buffer.maxlen:
            self._dropped.inc()
        self._buffer.append(rec)
        if len(self._buffer) >= self._max_batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> int:
        """Write what is queued, a batch at a time; the records written (0 on an outage: they
        stay queued for the next flush)."""
        written = 0
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self._max_batch, len(self._buffer)))]
            dirty = sorted(_scopes(batch))
            try:
                await self._store.log_requests(batch, dirty)
            except LedgerUnavailable:
                # Back in front, in order; what no longer fits is the oldest, dropped.
                over = len(self._buffer) + len(batch) - (self._buffer.maxlen or 0)
                if over > 0:
                    self._dropped.inc(over)
                    batch = batch[over:]
                self._buffer.extendleft(reversed(batch))
                return written
            written += len(batch)
            self._written.inc(len(batch))
        return written

    async def run(self) -> None:
        """Flush forever (until cancelled; then once more)."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
                self._wake.clear()
                try:
                    await self.flush()
                except Exception:  # a record the store refuses must not stop the log
                    log.exception("request log flush failed")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), 2.0)


def _scopes(batch: list[RequestRecord]) -> set[str]:
    """The alerter's scopes whose usage these records changed."""
    out: set[str] = set()
    for rec in batch:
        if rec.key_id:
            out.add("key:" + rec.key_id)
        if rec.team:
            out.add("team:" + rec.team)
    return out

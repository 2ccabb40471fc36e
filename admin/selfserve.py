"""What a self-serve call (`/v1/usage`, `/v1/forecasting/*` with a client's own key) may do.

Envoy routes these paths to admin without ext_authz, so admin itself refuses disabled and
expired keys (as authz does) and limits each key to its own requests/s and burst, per admin
replica (authz's `LocalLimiter`). Forecasts, patterns and replays are CPU work (numpy and
loops over thousands of hours): they run in worker threads, at most `concurrency` at once
for every caller, admin included, so the event loop stays free for key revocation and the
rest of the API. Callers beyond `max_waiting` are told to retry instead of piling up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from atlas.errors import Denied
from atlas.keymodel import KeyRecord
from atlas.local_limiter import LocalLimiter

#: Heavy calls at once per admin process. Their history reads run on the event loop (in
#: redis-py), so more slots only queue more loop work ahead of a revocation: measured with 60
#: parallel forecasts, revocation p50/max was 16/70 ms with one slot, 30/100 ms with two.
HEAVY_CONCURRENCY = 1
#: Callers that may wait for a slot; beyond, 503 with Retry-After.
MAX_WAITING = 64

P = ParamSpec("P")
T = TypeVar("T")


class SelfServe:
    def __init__(
        self,
        *,
        concurrency: int = HEAVY_CONCURRENCY,
        max_waiting: int = MAX_WAITING,
        limiter: LocalLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.concurrency = concurrency
        self._max_waiting = max_waiting
        self._limiter = limiter if limiter is not None else LocalLimiter()
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting = 0
        self._running = 0
        #: Observability (and tests): most computations seen at once, and how many ran.
        self.peak_running = 0
        self.offloaded = 0

    def admit(self, key: KeyRecord) -> None:
        """Refuse a disabled or expired key, or one over its own request rate."""
        key.check_usable(datetime.fromtimestamp(self._clock(), UTC))
        wait_s = self._limiter.admit(key, 0)  # requests only: these calls use no tokens
        if wait_s:
            retry_s = max(1, math.ceil(wait_s))
            raise Denied(
                429,
                f"Rate limit reached for requests per second ({key.rate_per_sec:g}, burst "
                f"{key.burst}). Retry after {retry_s}s.",
                type="requests",
                code="rate_limit_exceeded",
                retry_after_s=wait_s,
            )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `concurrency` slots for a heavy call: its history reads and its
        computation (waiting for a slot, or refused when too many wait)."""
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise Denied(
                503,
                "The admin API is busy computing forecasts; retry shortly.",
                type="server_error",
                code="overloaded",
                retry_after_s=1,
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        self.peak_running = max(self.peak_running, self._running)
        try:
            yield
        finally:
            self._running -= 1
            self._slots.release()

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args)` in a worker thread (call it holding a slot)."""
        self.offloaded += 1
        return await asyncio.to_thread(fn, *args, **kwargs)

"""Global in-flight reserved tokens, for shedding by priority.

Every admitted request adds its reservation and every settlement (or reap) removes it. A
per-key Lua script cannot touch a global counter in Redis Cluster, and one extra command per
request would double authz's Redis load, so each process accumulates its changes and syncs
them with one INCRBY every `interval_s`; the answer is the cluster-wide total. Between syncs a
process sees the last total plus its own changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from atlas.errors import LedgerUnavailable

log = logging.getLogger(__name__)


class InflightGauge:
    def __init__(self, sync: Callable[[int], Awaitable[int]], *, interval_s: float) -> None:
        """:param sync: adds a delta to the shared counter and returns the new total (tokens)."""
        self._sync = sync
        self._interval_s = interval_s
        self._pending = 0
        self._total = 0

    @property
    def tokens(self) -> int:
        return max(0, self._total + self._pending)

    def add(self, tokens: int) -> None:
        self._pending += tokens

    async def flush(self) -> None:
        delta, self._pending = self._pending, 0
        try:
            self._total = await self._sync(delta)
        except LedgerUnavailable:
            self._pending += delta  # kept for the next sync; nothing is lost

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

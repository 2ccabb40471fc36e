"""Claims and renewals of the reservations of live ext_proc streams, batched off the request path.

authz's admission gives a reservation a short deadline (`claim_timeout_s`): a request Envoy
never sent on (the client reset right after sending, a body over the 413 limit) opens no
ext_proc stream, is never claimed, and the reaper releases it, charged 0. A stream that sees
its grant *claims* the reservation: its deadline moves to now + `reservation_ttl_s`, and the
reaper charges it in full if it is never settled (extproc crashed). While the stream lives,
its deadline is renewed, so a stream longer than the TTL is never reaped while running.

No Redis round trip is added to a request: `claim` and `release` only touch in-memory sets.
One task flushes new claims as one pipelined batch (at once when idle, then at most every
`flush_s`, so a burst shares one round trip), and renews every live claim in one batch every
min(ttl / 3, 60) s. An exchange released before its claim is flushed is never claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

from atlas import metrics
from atlas.errors import LedgerUnavailable

log = logging.getLogger(__name__)

#: How long new claims wait to share one round trip, seconds.
FLUSH_S = 0.1
#: Renewals run at least this often, seconds (and at least 3 times per TTL).
MAX_RENEW_S = 60.0


class LeaseLedger(Protocol):
    async def lease(self, leases: Mapping[str, Collection[str]]) -> int: ...

    async def release(self, releases: Mapping[str, Collection[str]]) -> int: ...


Lease = tuple[str, str]  # (key id, reservation id)


def _by_key(leases: Collection[Lease]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key_id, rid in leases:
        out.setdefault(key_id, []).append(rid)
    return out


class LeaseKeeper:
    def __init__(
        self,
        ledger: LeaseLedger,
        *,
        ttl_s: float,
        flush_s: float = FLUSH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._flush_s = flush_s
        self.renew_s = min(ttl_s / 3, MAX_RENEW_S)
        self._clock = clock
        self._pending: set[Lease] = set()  # claimed by a stream, not yet in Redis
        self._live: set[Lease] = set()  # claimed in Redis, renewed until released
        self._flushing: set[Lease] = set()  # being written now
        self._abandoned: set[Lease] = set()  # never reached the upstream: to give up
        self._wake = asyncio.Event()

    def claim(self, key_id: str, reservation_id: str) -> None:
        """A live stream holds this reservation (no I/O: the next flush writes it)."""
        lease = (key_id, reservation_id)
        if lease not in self._live:
            self._pending.add(lease)
            self._wake.set()

    def release(self, key_id: str, reservation_id: str) -> None:
        """The stream ended and its settlement was submitted: stop claiming and renewing."""
        lease = (key_id, reservation_id)
        self._pending.discard(lease)
        self._live.discard(lease)
        self._flushing.discard(lease)

    def abandon(self, key_id: str, reservation_id: str) -> None:
        """Envoy's access log says this request never reached the upstream: give up its
        reservation (released, charged nothing), with the next flush."""
        self._abandoned.add((key_id, reservation_id))
        self._wake.set()

    @property
    def held(self) -> int:
        return len(self._pending) + len(self._live)

    async def flush(self) -> int:
        """Write pending claims (and abandons) now; on failure they stay for the next flush."""
        if self._abandoned:
            gone, self._abandoned = self._abandoned, set()
            try:
                await self._ledger.release(_by_key(gone))
            except LedgerUnavailable:
                self._abandoned |= gone
                raise
            metrics.LEASES.labels(op="abandon").inc(len(gone))
        if not self._pending:
            return 0
        batch = self._flushing = self._pending
        self._pending = set()
        try:
            n = await self._ledger.lease(_by_key(batch))
        except LedgerUnavailable:
            self._pending |= self._flushing  # those not released meanwhile
            raise
        finally:
            self._flushing = set()
        # `batch` minus those released while it was in flight (`release` empties them from
        # `_flushing`, the same set): their claims landed, the settlement removes them.
        self._live |= batch
        metrics.LEASES.labels(op="claim").inc(len(batch))
        return n

    async def renew(self) -> int:
        """Move every live claim's deadline to now + TTL, one batch."""
        if not self._live:
            return 0
        n = await self._ledger.lease(_by_key(list(self._live)))
        metrics.LEASES.labels(op="renew").inc(len(self._live))
        return n

    async def run(self) -> None:
        next_renew = self._clock() + self.renew_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_renew - self._clock())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                if self._clock() >= next_renew:
                    await self.renew()
                    next_renew = self._clock() + self.renew_s
            except LedgerUnavailable as exc:
                metrics.LEDGER_ERRORS.labels(service="extproc", op="lease").inc()
                log.warning("leases not written yet (%d held): %s", self.held, exc)
                self._wake.set()  # retry after the pause below
            # A pause, so the claims of a burst gather into one round trip.
            await asyncio.sleep(self._flush_s)

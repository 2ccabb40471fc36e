"""LeaseKeeper: claims batched off the request path, renewals of every live stream, nothing
claimed for an exchange that ended before the flush."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

import pytest

from atlas.errors import LedgerUnavailable
from extproc.leases import LeaseKeeper, LeaseLedger


class FakeLeases:
    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []
        self.down = False

    async def lease(self, leases: Mapping[str, Collection[str]]) -> int:
        if self.down:
            raise LedgerUnavailable("fake: down")
        self.calls.append({k: sorted(v) for k, v in leases.items()})
        return sum(len(v) for v in leases.values())


_: LeaseLedger = FakeLeases()


async def test_claims_are_one_batch_and_released_ones_are_never_written() -> None:
    fake = FakeLeases()
    keeper = LeaseKeeper(fake, ttl_s=600)
    keeper.claim("k1", "r1")
    keeper.claim("k1", "r2")
    keeper.claim("k2", "r3")
    keeper.release("k1", "r2")  # ended (and settled) before the flush: no claim needed
    assert fake.calls == []  # claim() does no I/O
    assert await keeper.flush() == 2
    assert fake.calls == [{"k1": ["r1"], "k2": ["r3"]}]
    keeper.claim("k1", "r1")  # already claimed: nothing new
    assert await keeper.flush() == 0 and len(fake.calls) == 1
    assert await keeper.renew() == 2
    assert fake.calls[-1] == {"k1": ["r1"], "k2": ["r3"]}
    keeper.release("k1", "r1")
    keeper.release("k2", "r3")
    assert await keeper.renew() == 0 and keeper.held == 0


async def test_claims_survive_an_outage_and_a_release_during_the_flush_is_kept() -> None:
    fake = FakeLeases()
    keeper = LeaseKeeper(fake, ttl_s=600)
    keeper.claim("k", "r1")
    fake.down = True
    with pytest.raises(LedgerUnavailable):
        await keeper.flush()
    assert keeper.held == 1
    fake.down = False

    gate = asyncio.Event()
    real = fake.lease

    async def slow(leases: Mapping[str, Collection[str]]) -> int:
        await gate.wait()
        return await real(leases)

    fake.lease = slow  # type: ignore[method-assign]
    flushing = asyncio.create_task(keeper.flush())
    await asyncio.sleep(0)
    keeper.release("k", "r1")  # the stream ends while its claim is in flight
    gate.set()
    assert await flushing == 1
    assert keeper.held == 0  # not renewed after its release


async def test_the_loop_flushes_at_once_when_idle_and_renews_every_third_of_the_ttl() -> None:
    fake = FakeLeases()
    keeper = LeaseKeeper(fake, ttl_s=0.3, flush_s=0.01)
    assert keeper.renew_s == pytest.approx(0.1)
    task = asyncio.create_task(keeper.run())
    try:
        keeper.claim("k", "r1")
        async with asyncio.timeout(2):
            while not fake.calls:
                await asyncio.sleep(0.001)
            while len(fake.calls) < 4:  # the claim, then renewals of the live stream
                await asyncio.sleep(0.01)
        assert all(c == {"k": ["r1"]} for c in fake.calls)
        keeper.release("k", "r1")
        n = len(fake.calls)
        await asyncio.sleep(0.25)
        assert len(fake.calls) == n  # nothing live: no more writes
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

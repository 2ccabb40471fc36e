"""Self-serve admission (admin/selfserve.py) and the priority cap of stored keys."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from admin.selfserve import SelfServe
from atlas.errors import Denied
from atlas.local_limiter import LocalLimiter
from tests.factories import key_record
from tests.unit.fakes import FakeLedger
from tests.unit.test_policy import authorizer, inp, make_key

NOW = datetime(2026, 11, 23, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def guard(clock: Clock | None = None, **kw: int) -> SelfServe:
    return SelfServe(limiter=LocalLimiter(clock=clock or Clock()), clock=lambda: NOW, **kw)


def refusal(g: SelfServe, **fields: object) -> Denied:
    with pytest.raises(Denied) as info:
        g.admit(key_record(**fields))
    return info.value


def test_disabled_and_expired_keys_are_refused_like_authz_refuses_them() -> None:
    g = guard()
    d = refusal(g, status="disabled")
    assert (d.status, d.code, d.type) == (403, "key_disabled", "permission_denied")
    d = refusal(g, expires_at=datetime.fromtimestamp(NOW - 1, UTC))
    assert (d.status, d.code) == (403, "key_expired")
    g.admit(key_record(expires_at=datetime.fromtimestamp(NOW + 60, UTC)))


def test_each_key_gets_its_own_rate_and_burst() -> None:
    clock = Clock()
    g = guard(clock)
    slow = key_record(rate_per_sec=0.5, burst=2)
    g.admit(slow)
    g.admit(slow)
    with pytest.raises(Denied) as info:
        g.admit(slow)
    assert (info.value.status, info.value.code) == (429, "rate_limit_exceeded")
    assert info.value.retry_after_s == pytest.approx(2.0)
    g.admit(key_record(id="key_2", rate_per_sec=0.5, burst=2))  # another key: its own bucket
    clock.t = 2.0
    g.admit(slow)


async def test_heavy_calls_are_bounded_and_the_queue_is_too() -> None:
    g = guard(concurrency=1, max_waiting=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with g.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    with pytest.raises(Denied) as info:
        async with g.slot():
            pass
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (503, "overloaded", 1)
    release.set()
    await asyncio.gather(holder, waiter)
    assert g.peak_running == 1
    async with g.slot():
        assert await g.offload(sum, [1, 2, 3]) == 6
    assert g.offloaded == 1


async def test_a_stored_default_priority_above_max_priority_is_capped() -> None:
    """Records written before admin refused them still never run above their cap."""
    a = authorizer(FakeLedger(), make_key(priority="critical", max_priority="normal"))
    assert (await a.check(inp())).priority == "normal"

"""Global shadow mode, the local (degraded) limiter and the in-flight gauge."""

from __future__ import annotations

import pytest

from atlas.errors import Denied, LedgerUnavailable
from atlas.inflight import InflightGauge
from atlas.keymodel import KeyRecord
from atlas.local_limiter import LocalLimiter
from atlas.settings import Settings
from authz.shedding import Shedder
from tests.unit.fakes import FakeLedger, admission
from tests.unit.test_policy import authorizer, inp, make_key


async def test_global_shadow_admits_unknown_keys_without_reserving() -> None:
    fake = FakeLedger()
    v = await authorizer(fake, shadow_mode=True).check(inp())
    assert v.key is None and v.shadow_reason == "invalid_api_key"
    assert fake.admits == []


async def test_global_shadow_passes_shadow_to_the_ledger() -> None:
    fake = FakeLedger()
    fake.next_admission = admission(True, "quota_daily")
    v = await authorizer(fake, make_key(), shadow_mode=True).check(inp())
    assert fake.admits[0].shadow and v.shadow_reason == "quota_daily"


async def test_shadow_never_hides_an_outage() -> None:
    fake = FakeLedger()
    a = authorizer(fake, make_key(), shadow_mode=True)
    fake.down = True
    with pytest.raises(Denied) as info:
        await a.check(inp())
    assert info.value.status == 503


async def test_local_fail_mode_uses_the_stale_key_and_marks_degraded() -> None:
    fake = FakeLedger()
    a = authorizer(fake, make_key(burst=2, rate_per_sec=0.001), fail_mode="local")
    await a.check(inp())  # caches the key
    fake.down = True
    v = await a.check(inp())
    assert v.degraded and v.key is not None and v.admission is not None
    with pytest.raises(Denied) as info:  # burst 2 used up, per replica
        await a.check(inp())
    assert info.value.status == 429


def test_local_limiter_bounds_tokens_by_a_share_of_the_daily_quota() -> None:
    now = [0.0]
    lim = LocalLimiter(clock=lambda: now[0])
    k = make_key(daily_limit=2400, rate_per_sec=100, burst=100)  # 100 tokens an hour
    assert lim.admit(k, 60) == 0
    wait = lim.admit(k, 60)
    assert wait == pytest.approx(20 / (100 / 3600))
    now[0] += wait
    assert lim.admit(k, 60) == 0


def test_local_limiter_requests_bucket() -> None:
    now = [0.0]
    lim = LocalLimiter(clock=lambda: now[0])
    k: KeyRecord = make_key(rate_per_sec=2, burst=1, tokens_per_minute=10_000)
    assert lim.admit(k, 1) == 0
    assert lim.admit(k, 1) == pytest.approx(0.5)
    now[0] += 0.5
    assert lim.admit(k, 1) == 0


async def test_inflight_gauge_keeps_unsynced_changes() -> None:
    total = 0
    fail = False

    async def sync(delta: int) -> int:
        nonlocal total
        if fail:
            raise LedgerUnavailable("down")
        total += delta
        return total

    g = InflightGauge(sync, interval_s=1)
    g.add(500)
    assert g.tokens == 500
    fail = True
    await g.flush()
    assert g.tokens == 500 and total == 0
    fail = False
    await g.flush()
    g.add(-200)
    assert (total, g.tokens) == (500, 300)
    s = Shedder(g, Settings(capacity_tokens=1000))
    assert not s.sheds("low", 400) and s.sheds("low", 401)
    assert not s.sheds("critical", 10**9)
    assert not Shedder(g, Settings()).sheds("low", 10**9)  # no capacity: no shedding

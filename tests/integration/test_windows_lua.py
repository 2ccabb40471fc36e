"""Windows in a key's own time zone against a real valkey-server: `_clock.lua` against the
Python mirror (atlas/windows.py) at instants around DST transitions, and admit, settle and
reap at chosen local times.

Lua reads Redis TIME, which no test can set. So (1) a small script runs the prelude's
`clock_at` at a given instant, and (2) the ledger's own scripts are loaded behind a test-only
prefix that shadows `redis` with one whose TIME reads a key the test sets (`PIN_TIME`), while
the ledger's Python clock is pinned to the same instant (or a skewed one).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis

from admin.app import create_app
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger, connect
from atlas.ledger.redis import scripts as redis_scripts
from atlas.settings import Settings
from atlas.windows import SPEC_BEFORE_S, load_zone, window_names, zone_spec
from tests.factories import key_record

PRELUDE = (resources.files("atlas.ledger") / "lua" / "_clock.lua").read_text()
CLOCK_AT = (
    PRELUDE
    + """
local c = clock_at(tonumber(ARGV[2]), 0, zone(ARGV[1]))
return {c.day, c.month, c.hour, c.day_reset_s, c.month_reset_s}
"""
)
TIME_KEY = "atlas-test:time"
# Test only: every `redis.call('TIME')` of the script below it reads TIME_KEY instead.
PIN_TIME = f"""
local real_redis = redis
local redis = setmetatable({{
  call = function(cmd, ...)
    if cmd == 'TIME' then
      local sec, usec = string.match(real_redis.call('GET', '{TIME_KEY}'), '^(%d+) (%d+)$')
      return {{sec, usec}}
    end
    return real_redis.call(cmd, ...)
  end,
}}, {{__index = real_redis}})
"""
ZONES = [
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Havana",
    "America/Santiago",
]


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


def instants(zone_name: str) -> list[int]:
    """Every second near each 2026-2027 transition, local 23:30 and 00:30 of those days,
    the turn of every month, and random instants."""
    zone = load_zone(zone_name)
    found: set[int] = set()
    t = utc(2026, 1, 1)
    while t < utc(2028, 1, 1):
        found.update(zone_spec(zone, t).transitions)
        t += 20 * 86400
    out: list[int] = []
    for tr in sorted(found):
        out += [tr + d for d in (-3600, -60, -2, -1, 0, 1, 2, 60, 1800, 3600)]
        start = window_names(tr, zone).day_reset_s - 86400  # near that local day's start
        out += [start - 1800, start + 1800, start + 86400 - 1800, start + 86400 + 1800]
    for year in (2026, 2027):
        for month in range(1, 13):
            first = window_names(utc(year, month, 15), zone).month_reset_s
            out += [first - 1, first, first + 1]
    rng = random.Random(zone_name)
    out += [rng.randrange(utc(2026, 1, 1), utc(2030, 1, 1)) for _ in range(200)]
    return out


@pytest.mark.parametrize("zone_name", ZONES)
def test_lua_clock_matches_the_python_mirror(redis_sync: redis.Redis, zone_name: str) -> None:
    """Lua at instant t with a spec Python made at t + skew (Redis and Python clocks apart)
    names the windows Python names for t."""
    zone = load_zone(zone_name)
    clock_at = redis_sync.register_script(CLOCK_AT)
    cases = [(t, skew) for t in instants(zone_name) for skew in (-SPEC_BEFORE_S, -5, 0, 5, 3599)]
    pipe = redis_sync.pipeline(transaction=False)
    for t, skew in cases:
        clock_at(args=[zone_spec(zone, t + skew).text, t], client=pipe)
    for (t, skew), got in zip(cases, pipe.execute(), strict=True):
        n = window_names(t, zone)
        assert got == [n.day, n.month, n.hour, n.day_reset_s, n.month_reset_s], (t, skew)


def test_a_single_number_is_still_a_fixed_offset(redis_sync: redis.Redis) -> None:
    clock_at = redis_sync.register_script(CLOCK_AT)
    for offset in (-18000, 0, 3600, 19800, 86400):
        for t in (utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1), utc(2028, 2, 29, 12)):
            n = window_names(t, offset)
            got = clock_at(args=[str(offset), t])
            assert got == [n.day, n.month, n.hour, n.day_reset_s, n.month_reset_s]


class Pinned:
    """A ledger whose scripts and Python clock read the instant the test sets."""

    def __init__(self, settings: Settings, redis_sync: redis.Redis) -> None:
        self.redis_time = 0.0
        self.python_time = 0.0
        self._redis = redis_sync
        self.ledger = RedisLedger(connect(settings), settings, clock=lambda: self.python_time)

    def at(self, t: float, *, python_t: float | None = None) -> None:
        self.redis_time = t
        self.python_time = t if python_t is None else python_t
        self._redis.set(TIME_KEY, f"{int(t)} {round(t % 1 * 1e6)}")


@pytest_asyncio.fixture
async def pinned(
    settings: Settings, redis_sync: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Pinned]:
    load = redis_scripts.load_script
    monkeypatch.setattr(redis_scripts, "load_script", lambda name: PIN_TIME + load(name))
    p = Pinned(settings, redis_sync)
    yield p
    await p.ledger.close()


def req(rid: str, completion: int) -> AdmitRequest:
    return AdmitRequest(
        reservation_id=rid,
        prompt_tokens=0,
        completion_tokens=completion,
        priority="normal",
        model="m",
        ceiling=1.0,
    )


def settle(key_id: str, rid: str, completion: int) -> Settlement:
    return Settlement(
        key_id=key_id,
        reservation_id=rid,
        prompt_tokens=0,
        completion_tokens=completion,
        model="m",
        exact=True,
        outcome="completed",
    )


def window(r: redis.Redis, key_id: str, name: str) -> dict[str, int]:
    raw: dict[str, Any] = r.hgetall(keys.window_prefix(key_id) + name)  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items()}


async def test_2330_and_0030_local_are_two_days_and_the_quota_resets_at_local_midnight(
    pinned: Pinned, redis_sync: redis.Redis
) -> None:
    # New York, the evening of the 23-hour day 8 March 2026 (EDT, UTC-4): in UTC both
    # instants below are 9 March, in the key's zone they are two days.
    rec = key_record(id="key_ny", daily_limit=100, window_timezone="America/New_York")
    pinned.at(utc(2026, 3, 9, 3, 30))  # 23:30 EDT
    first = await pinned.ledger.admit(rec, req("r1", 100))
    assert first.admitted and first.day_reset_s == utc(2026, 3, 9, 4)
    pinned.at(utc(2026, 3, 9, 3, 45))  # 23:45: the day's quota is used up
    refused = await pinned.ledger.admit(rec, req("r2", 10))
    assert (refused.admitted, refused.reason) == (False, "quota_daily")
    assert refused.retry_after_ms == 15 * 60 * 1000  # until local midnight
    pinned.at(utc(2026, 3, 9, 4, 30))  # 00:30 EDT, 9 March
    after = await pinned.ledger.admit(rec, req("r3", 10))
    assert after.admitted and after.day_reserved == 10
    assert after.day_reset_s == utc(2026, 3, 10, 4)
    assert window(redis_sync, rec.id, "d:20260308") == {"reserved": 100, "requests": 1}
    assert window(redis_sync, rec.id, "d:20260309") == {"reserved": 10, "requests": 1}
    # Settled after midnight: released from the day it was taken in, charged to today.
    assert (await pinned.ledger.settle(settle(rec.id, "r1", 60))).status == "settled"
    assert window(redis_sync, rec.id, "d:20260308")["reserved"] == 0
    assert window(redis_sync, rec.id, "d:20260309")["used"] == 60


async def test_a_25_hour_day_is_one_daily_window(pinned: Pinned) -> None:
    rec = key_record(id="key_ny", daily_limit=100, window_timezone="America/New_York")
    pinned.at(utc(2026, 11, 1, 4, 30))  # 00:30 EDT, 1 November (falls back at 02:00)
    assert (await pinned.ledger.admit(rec, req("r1", 60))).admitted
    pinned.at(utc(2026, 11, 2, 4, 30))  # 24 hours later: 23:30 EST, still 1 November
    late = await pinned.ledger.admit(rec, req("r2", 60))
    assert (late.admitted, late.reason, late.day_used + late.day_reserved) == (
        False,
        "quota_daily",
        60,
    )
    assert late.retry_after_ms == 30 * 60 * 1000 and late.day_reset_s == utc(2026, 11, 2, 5)
    pinned.at(utc(2026, 11, 2, 5, 30))  # 00:30 EST, 2 November
    assert (await pinned.ledger.admit(rec, req("r3", 60))).admitted


@pytest.mark.parametrize(
    ("zone_name", "local_midnight"),
    [
        ("Australia/Lord_Howe", utc(2026, 10, 3, 13, 30)),  # 4 Oct (23.5 h) starts at +10:30
        ("Australia/Lord_Howe", utc(2026, 10, 4, 13)),  # and ends at +11
        ("Asia/Kolkata", utc(2026, 5, 31, 18, 30)),  # 1 June, and a new month
        ("Europe/Berlin", utc(2026, 10, 24, 22)),  # 25 October (25 h) starts at CEST
    ],
)
async def test_admissions_either_side_of_local_midnight(
    pinned: Pinned, redis_sync: redis.Redis, zone_name: str, local_midnight: int
) -> None:
    zone = load_zone(zone_name)
    rec = key_record(id="key_z", daily_limit=50, window_timezone=zone_name)
    before, after = window_names(local_midnight - 60, zone), window_names(local_midnight, zone)
    assert before.day != after.day and before.day_reset_s == local_midnight
    pinned.at(local_midnight - 90)
    assert (await pinned.ledger.admit(rec, req("r1", 50))).admitted
    pinned.at(local_midnight - 60)
    refused = await pinned.ledger.admit(rec, req("r2", 1))
    assert refused.reason == "quota_daily" and refused.retry_after_ms == 60_000
    pinned.at(local_midnight)
    fresh = await pinned.ledger.admit(rec, req("r3", 50))
    assert fresh.admitted and fresh.day_reserved == 50
    assert window(redis_sync, rec.id, f"d:{before.day}")["reserved"] == 50
    assert window(redis_sync, rec.id, f"d:{after.day}")["reserved"] == 50
    if before.month != after.month:
        assert fresh.month_reserved == 50 and fresh.month_reset_s == after.month_reset_s


async def test_redis_and_python_clocks_apart_across_a_transition(
    pinned: Pinned, redis_sync: redis.Redis
) -> None:
    """Santiago falls back at Sunday 00:00 -03 to Saturday 23:00 -04. Python (2 s before)
    still sees -03; Redis (2 s after) is at Saturday 23:00:02 -04: still Saturday."""
    rec = key_record(id="key_cl", window_timezone="America/Santiago")
    back = utc(2026, 4, 5, 3)
    pinned.at(back + 2, python_t=back - 2)
    a = await pinned.ledger.admit(rec, req("r1", 10))
    assert a.day_reset_s == utc(2026, 4, 5, 4)  # Sunday 00:00 -04
    assert window(redis_sync, rec.id, "d:20260404")["reserved"] == 10


async def test_settle_and_reap_charge_the_keys_own_day(
    pinned: Pinned, redis_sync: redis.Redis
) -> None:
    """settle and reap run without the key's record: they use the zone admit stored."""
    ny = key_record(id="key_ny", window_timezone="America/New_York")
    plain = key_record(id="key_utc")
    pinned.at(utc(2026, 3, 9, 3, 30))  # 23:30 EDT on 8 March; 9 March in UTC
    for rec in (ny, plain):
        assert (await pinned.ledger.admit(rec, req("r1", 10))).admitted
        assert (await pinned.ledger.admit(rec, req("r2", 10))).admitted
    assert (
        redis_sync.get(keys.window_zone(ny.id))
        == zone_spec(load_zone("America/New_York"), pinned.python_time).text
    )
    pinned.at(utc(2026, 3, 9, 3, 40))
    await pinned.ledger.settle(settle(ny.id, "r1", 7))
    await pinned.ledger.settle(settle(plain.id, "r1", 7))
    assert window(redis_sync, ny.id, "d:20260308")["used"] == 7
    assert window(redis_sync, plain.id, "d:20260309")["used"] == 7
    # r2 was claimed by a stream that died: the reaper charges it where now is for the key.
    await pinned.ledger.lease({ny.id: ["r2"]})
    redis_sync.zadd(keys.reservation_expiry(ny.id), {"r2": 0})
    assert await pinned.ledger.reap(ny.id) == (1, 10)
    assert window(redis_sync, ny.id, "d:20260308")["used"] == 17
    # A key with no stored zone (none admitted for ZONE_TTL_S): the default zone.
    redis_sync.delete(keys.window_zone(ny.id))
    await pinned.ledger.settle(settle(ny.id, "r9", 5))  # unreserved
    assert window(redis_sync, ny.id, "d:20260309")["used"] == 5


async def test_usage_reads_the_window_admit_wrote(ledger: RedisLedger) -> None:
    """At the real Redis time: the usage view (Python) and admit (Lua) pick the same day,
    here zones 26 hours apart, so their local dates differ from each other and often from
    UTC's."""
    for kid, zone_name in (("key_east", "Pacific/Kiritimati"), ("key_west", "Etc/GMT+12")):
        rec = key_record(id=kid, window_timezone=zone_name)
        a = await ledger.admit(rec, req("r1", 42))
        u = await ledger.usage(rec)
        names = window_names(a.now_ms // 1000, load_zone(zone_name))
        assert (u.daily.reserved, u.monthly.reserved) == (42, 42), zone_name
        assert u.daily.resets_at_s == a.day_reset_s == names.day_reset_s
        assert u.monthly.resets_at_s == a.month_reset_s == names.month_reset_s


@pytest_asyncio.fixture
async def api(settings: Settings, ledger: RedisLedger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, ledger)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin",
        headers={"authorization": "Bearer test-admin-token"},
    ) as client:
        yield client


async def test_admin_sets_validates_and_clears_a_keys_zone(api: httpx.AsyncClient) -> None:
    bad = await api.post("/v1/admin/keys", json={"window_timezone": "Mars/Olympus"})
    assert bad.status_code == 422
    (err,) = bad.json()["detail"]
    assert err["loc"] == ["body", "window_timezone"] and "Mars/Olympus" in err["msg"]
    created = await api.post("/v1/admin/keys", json={"window_timezone": "Asia/Kolkata"})
    assert created.status_code == 201 and created.json()["window_timezone"] == "Asia/Kolkata"
    url = f"/v1/admin/keys/{created.json()['id']}"
    usage = (await api.get(url + "/usage")).json()
    reset = datetime.fromisoformat(usage["daily"]["resets_at"])
    assert (reset.hour, reset.minute) == (18, 30)  # midnight IST
    bad_patch = await api.patch(url, json={"window_timezone": "Europe/Atlantis"})
    assert bad_patch.status_code == 422
    assert bad_patch.json()["detail"][0]["loc"] == ["body", "window_timezone"]
    cleared = await api.patch(url, json={"window_timezone": None})
    assert cleared.status_code == 200 and cleared.json()["window_timezone"] is None
    assert (await api.get(url)).json()["window_timezone"] is None

"""Calendar windows in IANA zones (atlas/windows.py, the Python mirror of _clock.lua): DST
days of 23 and 25 hours (23.5 and 24.5 on Lord Howe), a zone without DST, month ends, and
agreement with zoneinfo's own local dates at any instant."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from admin.planning import daily_totals
from atlas.errors import ConfigError
from atlas.ledger.protocol import AdmitRequest, HourRow
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings, load_settings
from atlas.windows import (
    SPEC_AFTER_S,
    SPEC_BEFORE_S,
    ZoneSpec,
    day_bounds,
    load_zone,
    local_day_month,
    names_at,
    window_names,
    zone_spec,
)
from tests.factories import key_record

NY = load_zone("America/New_York")
BERLIN = load_zone("Europe/Berlin")
LORD_HOWE = load_zone("Australia/Lord_Howe")
KOLKATA = load_zone("Asia/Kolkata")
HAVANA = load_zone("America/Havana")
SANTIAGO = load_zone("America/Santiago")
ZONES = (NY, BERLIN, LORD_HOWE, KOLKATA, HAVANA, SANTIAGO)


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


def hours(d: date, zone: ZoneInfo) -> float:
    start, end = day_bounds(d, zone)
    return (end - start) / 3600


def transitions(zone: ZoneInfo, year: int) -> list[int]:
    """Every offset change of `zone` in `year`, from the specs themselves."""
    found: set[int] = set()
    t = utc(year, 1, 1)
    while t < utc(year + 1, 1, 1):
        found.update(zone_spec(zone, t).transitions)
        t += SPEC_AFTER_S // 2
    return sorted(x for x in found if utc(year, 1, 1) <= x < utc(year + 1, 1, 1))


def test_new_york_spring_forward_is_one_23_hour_day() -> None:
    assert hours(date(2026, 3, 8), NY) == 23
    assert (hours(date(2026, 3, 7), NY), hours(date(2026, 3, 9), NY)) == (24, 24)
    midnight_est, jump = utc(2026, 3, 8, 5), utc(2026, 3, 8, 7)  # 02:00 EST -> 03:00 EDT
    for t in (midnight_est, jump - 1, jump, utc(2026, 3, 9, 3, 59, 59)):
        n = window_names(t, NY)
        assert (n.day, n.month) == ("20260308", "202603")
        assert n.day_reset_s == utc(2026, 3, 9, 4)  # midnight EDT
    assert window_names(utc(2026, 3, 9, 4), NY).day == "20260309"
    assert window_names(utc(2026, 3, 8, 4, 59, 59), NY).day == "20260307"


def test_new_york_fall_back_is_one_25_hour_day() -> None:
    assert hours(date(2026, 11, 1), NY) == 25
    first, second = utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30)  # 01:30 EDT, 01:30 EST
    for t in (utc(2026, 11, 1, 4), first, second, utc(2026, 11, 2, 4, 59, 59)):
        n = window_names(t, NY)
        assert n.day == "20261101" and n.day_reset_s == utc(2026, 11, 2, 5)  # midnight EST
    assert window_names(utc(2026, 11, 2, 5), NY).day == "20261102"


def test_berlin_days_around_its_transitions() -> None:
    assert hours(date(2026, 3, 29), BERLIN) == 23
    assert hours(date(2026, 10, 25), BERLIN) == 25
    assert window_names(utc(2026, 3, 29, 1), BERLIN).day_reset_s == utc(2026, 3, 29, 22)
    assert window_names(utc(2026, 10, 25, 1), BERLIN).day_reset_s == utc(2026, 10, 25, 23)
    # New Year in Berlin is 23:00 UTC: the month and the year change there.
    n = window_names(utc(2026, 12, 31, 22, 59, 59), BERLIN)
    assert (n.day, n.month, n.month_reset_s) == ("20261231", "202612", utc(2026, 12, 31, 23))
    assert window_names(utc(2026, 12, 31, 23), BERLIN).month == "202701"


def test_lord_howe_half_hour_dst() -> None:
    # +11 -> +10:30 at 02:00 local on 5 April; +10:30 -> +11 at 02:00 local on 4 October.
    assert hours(date(2026, 4, 5), LORD_HOWE) == 24.5
    assert hours(date(2026, 10, 4), LORD_HOWE) == 23.5
    spec = zone_spec(LORD_HOWE, utc(2026, 4, 4, 12))
    assert spec.offsets == (39600, 37800) and spec.transitions == (utc(2026, 4, 4, 15),)
    n = window_names(utc(2026, 4, 4, 14), LORD_HOWE)  # 01:00 +11 on 5 April
    assert n.day == "20260405" and n.day_reset_s == utc(2026, 4, 5, 13, 30)  # midnight +10:30


def test_kolkata_has_no_dst_and_a_half_hour_offset() -> None:
    spec = zone_spec(KOLKATA, utc(2026, 6, 1))
    assert spec.transitions == () and spec.text == "0 19800"
    d = date(2026, 1, 1)
    while d < date(2027, 1, 1):
        assert day_bounds(d, KOLKATA) == (
            utc(d.year, d.month, d.day) - 19800,
            utc(d.year, d.month, d.day) + 86400 - 19800,
        )
        d += timedelta(days=1)
    n = window_names(utc(2026, 1, 31, 18, 29, 59), KOLKATA)  # 23:59:59 IST
    assert (n.day, n.month, n.month_reset_s) == ("20260131", "202601", utc(2026, 1, 31, 18, 30))
    # History hours stay on the UTC grid: this hour bucket straddles local midnight.
    assert n.hour == "2026013118"
    leap = window_names(utc(2028, 2, 28, 19), KOLKATA)
    assert (leap.day, leap.day_reset_s) == ("20280229", utc(2028, 2, 29, 18, 30))


def test_month_resets_in_the_offset_of_the_month_start() -> None:
    # 1 March is EST, 1 April EDT: the month resets at 04:00 UTC, not 05:00.
    assert window_names(utc(2026, 3, 1, 5), NY).month_reset_s == utc(2026, 4, 1, 4)
    # The last evening of October is EDT; the fall-back comes 2 hours into November.
    n = window_names(utc(2026, 11, 1, 3, 30), NY)  # 23:30 EDT on 31 October
    assert (n.month, n.month_reset_s) == ("202610", utc(2026, 11, 1, 4))
    assert window_names(utc(2026, 11, 1, 4), NY).month == "202611"
    assert window_names(utc(2026, 12, 15), NY).month_reset_s == utc(2027, 1, 1, 5)


def test_midnight_skipped_by_dst_starts_the_day_at_the_transition() -> None:
    # Havana springs from 00:00 CST to 01:00 CDT: 8 March has no midnight.
    jump = utc(2026, 3, 8, 5)
    assert window_names(jump - 1, HAVANA).day_reset_s == jump
    assert window_names(jump, HAVANA).day == "20260308"
    assert day_bounds(date(2026, 3, 8), HAVANA) == (jump, utc(2026, 3, 9, 4))


def test_a_fall_back_at_midnight_repeats_the_last_hour_of_the_day() -> None:
    # Santiago falls back from Sunday 00:00 -03 to Saturday 23:00 -04: Saturday 4 April has
    # 25 hours and Sunday never starts twice.
    back = utc(2026, 4, 5, 3)
    assert hours(date(2026, 4, 4), SANTIAGO) == 25
    for t in (back - 1, back, back + 3599):
        n = window_names(t, SANTIAGO)
        assert n.day == "20260404" and n.day_reset_s == utc(2026, 4, 5, 4), t
    assert window_names(utc(2026, 4, 5, 4), SANTIAGO).day == "20260405"


@pytest.mark.parametrize("zone", ZONES, ids=str)
def test_names_and_resets_agree_with_zoneinfo(zone: ZoneInfo) -> None:
    """At random instants and at every second near each transition: the day and month are
    zoneinfo's local date, and each reset is where zoneinfo's local day or month changes."""
    rng = random.Random(str(zone))
    instants = [rng.randrange(utc(2025, 1, 1), utc(2031, 1, 1)) for _ in range(1500)]
    for year in (2026, 2027):
        for t in transitions(zone, year):
            instants += [t + d for d in (-3601, -3600, -2, -1, 0, 1, 2, 1800, 3600)]
    for t in instants:
        n = window_names(t, zone)
        assert (n.day, n.month) == local_day_month(t, zone), t
        assert local_day_month(n.day_reset_s - 1, zone)[0] == n.day, t
        next_day = datetime.strptime(n.day, "%Y%m%d") + timedelta(days=1)
        assert local_day_month(n.day_reset_s, zone)[0] == next_day.strftime("%Y%m%d"), t
        assert local_day_month(n.month_reset_s - 1, zone)[1] == n.month, t
        assert local_day_month(n.month_reset_s, zone)[1] != n.month, t


@pytest.mark.parametrize("zone", ZONES, ids=str)
def test_a_spec_from_a_clock_off_by_up_to_an_hour_names_the_same_windows(
    zone: ZoneInfo,
) -> None:
    """Python picks the spec by its own clock, Lua the offset by Redis TIME: a spec made an
    hour before or after the instant still gives its windows, across each transition."""
    for t in transitions(zone, 2026):
        for at in (t - 86400 + 1800, t - 1, t, t + 1, t + 86400 - 1800):
            want = window_names(at, zone)
            for skew in (-SPEC_BEFORE_S, -5, 5, SPEC_BEFORE_S - 1):
                assert names_at(at, zone_spec(zone, at + skew)) == want, (at, skew)


def test_spec_text_is_the_scripts_zone_argument() -> None:
    spec = zone_spec(NY, utc(2026, 3, 1))
    assert spec.text == f"0 -18000 {utc(2026, 3, 8, 7)} -14400"
    assert zone_spec(NY, utc(2026, 3, 1), 3600).text.startswith("3600 -18000 ")
    # The old ARGV (one fixed offset) means the same windows as before zones.
    assert ZoneSpec.fixed(-18000).text == "-18000 -18000"
    legacy = window_names(utc(2026, 12, 31, 23, 59, 59), 3600)
    assert (legacy.day, legacy.hour, legacy.day_reset_s) == (
        "20270101",
        "2027010100",
        utc(2027, 1, 1, 23),
    )


@pytest.mark.parametrize("name", ["Mars/Olympus", "../../etc/passwd", "", "utc+1", "localtime"])
def test_unknown_zones_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        load_zone(name)


def test_settings_name_a_bad_zone_and_refuse_two_defaults() -> None:
    with pytest.raises(ConfigError, match=r"ATLAS_WINDOW_TIMEZONE \(window_timezone\)"):
        load_settings({"window_timezone": "Europe/Atlantis"})
    with pytest.raises(ConfigError, match="window_utc_offset_min, not both"):
        load_settings({"window_timezone": "Europe/Berlin", "window_utc_offset_min": 60})
    assert load_settings({"window_utc_offset_min": 60}).window_timezone == "UTC"


def test_daily_totals_keep_a_25_hour_day_whole() -> None:
    start = utc(2026, 11, 1, 4)  # midnight EDT
    rows = [HourRow(start + 3600 * i, {"prompt": 1}) for i in range(26)]
    assert daily_totals(rows, NY) == {"20261101": 25, "20261102": 1}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_ledger_computes_a_zone_once_per_hour() -> None:
    clock = Clock(utc(2026, 3, 8, 6, 10))
    led = RedisLedger(aioredis.Redis(), Settings(), clock=clock)
    ny = led.zones.arg("America/New_York")
    assert ny[2] == zone_spec(NY, clock.now).text
    clock.now += 1000
    assert led.zones.arg("America/New_York") is ny  # same hour: the cached argument
    clock.now = utc(2026, 3, 8, 7, 0)
    later = led.zones.arg("America/New_York")
    assert later is not ny and later[0] == ny[0] + 3600
    clock.now = utc(2026, 3, 8, 9)  # two hours on, the transition has left the spec
    assert led.zones.arg("America/New_York")[2] == "0 -14400"
    assert led.zones.arg(None)[2] == "0 0"  # the default, UTC
    # A stored name this machine cannot read: the default zone, not a failed admission.
    assert led.zones.arg("Gone/Zone")[2] == "0 0"


def test_the_admit_command_carries_the_keys_zone() -> None:
    clock = Clock(utc(2026, 10, 20))
    led = RedisLedger(aioredis.Redis(), Settings(window_timezone="Europe/Berlin"), clock=clock)
    req = AdmitRequest(
        reservation_id="r1",
        prompt_tokens=1,
        completion_tokens=1,
        priority="normal",
        model="m",
        ceiling=1.0,
    )
    own = key_record(id="key_ny", window_timezone="America/New_York")
    _, args = led.admissions.call(own, req)
    assert args[11] == zone_spec(NY, clock.now).text  # ARGV[12]
    assert zone_spec(NY, clock.now).text.encode() in led.admissions.command(own, req)
    _, args = led.admissions.call(key_record(id="key_default"), req)
    assert args[11] == f"0 7200 {utc(2026, 10, 25, 1)} 3600"


def test_local_date_in_a_zone_and_at_a_legacy_offset() -> None:
    from datetime import date
    from zoneinfo import ZoneInfo

    from atlas.windows import local_date

    t = 1_700_000_000  # 2023-11-14 22:13:20 UTC
    assert local_date(t, 0) == date(2023, 11, 14)
    assert local_date(t, 2 * 3600) == date(2023, 11, 15)  # a fixed offset, seconds
    assert local_date(t, ZoneInfo("Asia/Tokyo")) == date(2023, 11, 15)
    assert local_date(t, ZoneInfo("America/New_York")) == date(2023, 11, 14)

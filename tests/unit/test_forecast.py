"""Usage forecasts and patterns: held-out accuracy on synthetic usage, intervals, degradation
with short history, hostile values and the pattern summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas.forecast import (
    MAX_HORIZON_H,
    Forecast,
    forecast_hourly,
    hour_floor,
    synthetic_series,
    usage_patterns,
)


def mape(actual: Sequence[float], predicted: Sequence[float]) -> float:
    """Mean absolute percentage error over points where actual > 0 (0.0 if there are none)."""
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if a.shape != p.shape:
        raise ValueError(f"length mismatch: {a.shape} vs {p.shape}")
    ok = np.isfinite(a) & np.isfinite(p) & (a > 0)
    if not ok.any():
        return 0.0
    return float(np.mean(np.abs(a[ok] - p[ok]) / a[ok]) * 100.0)


MONDAY = 1_704_067_200  # 2024-01-01 00:00 UTC, a Monday
DAY = 24
TRAIN_DAYS = 28
SEEDS = range(5)

# No example database: it would write a .hypothesis directory into the source tree.
PROPERTY = settings(database=None, deadline=None, max_examples=150)

SHAPES: dict[str, dict[str, float]] = {
    "flat": {"base": 1000, "daily_amplitude": 0.8, "weekly_amplitude": 0.4, "trend_per_day": 0},
    "growing": {"base": 500, "daily_amplitude": 0.6, "weekly_amplitude": 0.5, "trend_per_day": 8},
    "shrinking": {
        "base": 2000,
        "daily_amplitude": 0.9,
        "weekly_amplitude": 0.3,
        "trend_per_day": -15,
    },
}


def series(days: int, shape: str, *, noise: float, seed: int, first_ts: int) -> list[float]:
    return synthetic_series(days, noise=noise, seed=seed, first_ts=first_ts, **SHAPES[shape])


def held_out_day(shape: str, noise: float, seed: int) -> tuple[Forecast, list[float]]:
    """Train on 28 days, forecast the 29th; starts shift by seed so the held-out weekday varies."""
    first_ts = MONDAY + seed * 29 * 3600
    data = series(TRAIN_DAYS + 1, shape, noise=noise, seed=seed, first_ts=first_ts)
    return forecast_hourly(data[: TRAIN_DAYS * DAY], first_ts, DAY), data[TRAIN_DAYS * DAY :]


def assert_well_formed(fc: Forecast, horizon: int) -> None:
    assert len(fc.values) == len(fc.lower) == len(fc.upper) == horizon
    for lo, value, hi in zip(fc.lower, fc.values, fc.upper, strict=True):
        assert all(math.isfinite(x) for x in (lo, value, hi))
        assert 0.0 <= lo <= value <= hi


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_next_day_within_10pct_mape_at_5pct_noise(shape: str, seed: int) -> None:
    fc, actual = held_out_day(shape, 0.05, seed)
    assert fc.method == "seasonal_daily_weekly_trend"
    assert fc.note is None
    error = mape(actual, fc.values)
    assert error <= 10.0, f"{shape} seed {seed}: MAPE {error:.2f}%"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_next_day_within_15pct_mape_at_10pct_noise(shape: str, seed: int) -> None:
    fc, actual = held_out_day(shape, 0.10, seed)
    error = mape(actual, fc.values)
    assert error <= 15.0, f"{shape} seed {seed}: MAPE {error:.2f}%"


@pytest.mark.parametrize("noise", [0.05, 0.10])
def test_90pct_interval_covers_most_of_a_held_out_week(noise: float) -> None:
    covered = total = 0
    for seed in range(20):
        first_ts = MONDAY + seed * 7 * 3600
        data = series(35, "growing", noise=noise, seed=seed, first_ts=first_ts)
        fc = forecast_hourly(data[: TRAIN_DAYS * DAY], first_ts, 7 * DAY, interval=0.9)
        actual = data[TRAIN_DAYS * DAY :]
        covered += sum(lo <= a <= hi for lo, a, hi in zip(fc.lower, actual, fc.upper, strict=True))
        total += len(actual)
    assert 0.75 <= covered / total <= 0.99


def test_interval_level_orders_band_widths() -> None:
    data = series(TRAIN_DAYS, "flat", noise=0.05, seed=1, first_ts=MONDAY)
    narrow = forecast_hourly(data, MONDAY, DAY, interval=0.5)
    wide = forecast_hourly(data, MONDAY, DAY, interval=0.95)
    assert narrow.values == wide.values
    assert all(w <= n for w, n in zip(wide.lower, narrow.lower, strict=True))
    assert all(w >= n for w, n in zip(wide.upper, narrow.upper, strict=True))
    assert sum(wide.upper) - sum(wide.lower) > 1.5 * (sum(narrow.upper) - sum(narrow.lower))


def test_bands_widen_with_horizon() -> None:
    data = series(TRAIN_DAYS, "flat", noise=0.05, seed=2, first_ts=MONDAY)
    fc = forecast_hourly(data, MONDAY, MAX_HORIZON_H)
    width = np.array(fc.upper) - np.array(fc.lower)
    # The same hour of the week, 1 week and 12 weeks out.
    assert width[12 * 168 + 13] > width[168 + 13] > 0


@pytest.mark.parametrize(
    ("hours", "method", "used", "note"),
    [
        (0, "none", 0, "no history"),
        (5, "mean", 5, "too little history: 5 h"),
        (30, "mean", 30, "too little history: 30 h"),
        (3 * DAY, "seasonal_daily_trend", 3 * DAY, "no weekly seasonality"),
        (10 * DAY + 7, "seasonal_daily_trend", 10 * DAY, "no weekly seasonality"),
        (20 * DAY, "seasonal_daily_weekly_trend", 14 * DAY, None),
        (90 * DAY, "seasonal_daily_weekly_trend", 12 * 168, None),
    ],
)
@pytest.mark.parametrize("horizon", [1, 24, 168, MAX_HORIZON_H])
def test_degrades_with_short_history(
    hours: int, method: str, used: int, note: str | None, horizon: int
) -> None:
    first_ts = MONDAY + 5 * 3600
    data = series(91, "growing", noise=0.05, seed=7, first_ts=first_ts)[:hours]
    fc = forecast_hourly(data, first_ts, horizon)
    assert fc.method == method
    assert fc.history_hours == used
    assert fc.start_ts == first_ts + 3600 * hours
    assert fc.interval == 0.9
    if note is None:
        assert fc.note is None
    else:
        assert fc.note is not None
        assert note in fc.note
    assert_well_formed(fc, horizon)
    if hours == 0:
        assert fc.values == [0.0] * horizon


def test_mean_forecast_is_flat_and_wide() -> None:
    data = [100.0, 120.0, 80.0, 110.0, 90.0]
    fc = forecast_hourly(data, MONDAY, 3)
    assert fc.values == pytest.approx([100.0] * 3)
    assert fc.lower[0] <= 50.0
    assert fc.upper[0] >= 150.0


def test_unaligned_first_ts_is_floored_to_the_hour() -> None:
    fc = forecast_hourly([1.0] * 10, MONDAY + 1799, 2)
    assert fc.start_ts == MONDAY + 10 * 3600


def test_long_horizon_trend_is_damped_and_never_negative() -> None:
    first_ts = MONDAY
    falling = synthetic_series(
        28,
        base=500,
        daily_amplitude=0.8,
        weekly_amplitude=0.3,
        trend_per_day=-15,
        noise=0.05,
        seed=3,
        first_ts=first_ts,
    )
    fc = forecast_hourly(falling, first_ts, MAX_HORIZON_H)
    assert_well_formed(fc, MAX_HORIZON_H)
    assert fc.values[-1] == 0.0
    rising = series(28, "growing", noise=0.05, seed=3, first_ts=first_ts)
    fc = forecast_hourly(rising, first_ts, MAX_HORIZON_H)
    # 90 days more of +8/h per day undamped would add 720/h; damping keeps it well below.
    last_week = np.mean(rising[-168:])
    assert np.mean(fc.values[-168:]) - last_week < 600


def test_isolated_spikes_and_lost_hours_do_not_distort_the_forecast() -> None:
    first_ts = MONDAY + 11 * 3600
    data = series(TRAIN_DAYS + 1, "growing", noise=0.05, seed=4, first_ts=first_ts)
    history = data[: TRAIN_DAYS * DAY]
    history[600] *= 100
    history[500] *= 50
    history[640] = 0.0
    fc = forecast_hourly(history, first_ts, DAY)
    assert fc.note is not None
    assert "3 outlier hours" in fc.note
    assert mape(data[TRAIN_DAYS * DAY :], fc.values) <= 10.0


def test_spike_with_two_weeks_of_history_is_caught() -> None:
    data = series(15, "flat", noise=0.05, seed=5, first_ts=MONDAY)
    history = data[: 14 * DAY]
    history[-30] *= 100
    fc = forecast_hourly(history, MONDAY, DAY)
    assert mape(data[14 * DAY :], fc.values) <= 10.0


def test_multi_hour_outage_is_winsorised() -> None:
    data = series(TRAIN_DAYS + 1, "flat", noise=0.05, seed=6, first_ts=MONDAY)
    history = data[: TRAIN_DAYS * DAY]
    # Hours 09-20 on the last Monday of history (the held-out day is a Monday too).
    history[21 * DAY + 9 : 21 * DAY + 21] = [0.0] * 12
    fc = forecast_hourly(history, MONDAY, DAY)
    assert mape(data[TRAIN_DAYS * DAY :], fc.values) <= 10.0


def test_recurring_batch_spike_is_forecast() -> None:
    data = series(TRAIN_DAYS + 1, "flat", noise=0.05, seed=8, first_ts=MONDAY)
    for i in range(2, len(data), DAY):
        data[i] += 5000.0  # a nightly 02:00 UTC batch job
    fc = forecast_hourly(data[: TRAIN_DAYS * DAY], MONDAY, DAY)
    assert fc.note is None
    assert fc.values[2] > 4000.0 + max(fc.values[1], fc.values[3])


@pytest.mark.parametrize("busy_share", [0.01, 0.03, 0.08])
def test_sparse_usage_keeps_its_volume(busy_share: float) -> None:
    rng = np.random.default_rng(1)
    busy = rng.random(TRAIN_DAYS * DAY) < busy_share
    history = np.where(busy, rng.uniform(500, 1500, busy.size), 0.0)
    fc = forecast_hourly(history.tolist(), MONDAY, 7 * DAY)
    assert_well_formed(fc, 7 * DAY)
    assert fc.note is None
    assert 0.5 < np.mean(fc.values) / history.mean() < 2.0


def test_constant_history_forecasts_the_constant() -> None:
    fc = forecast_hourly([250.0] * (15 * DAY), MONDAY, 48)
    assert fc.values == pytest.approx([250.0] * 48)
    assert_well_formed(fc, 48)


def test_bad_values_are_repaired_with_notes() -> None:
    first_ts = MONDAY
    data = series(TRAIN_DAYS + 1, "flat", noise=0.05, seed=9, first_ts=first_ts)
    history: list[Any] = list(data[: TRAIN_DAYS * DAY])
    history[100:130] = [math.nan] * 30
    history[200] = math.inf
    history[201] = -math.inf
    history[300] = None
    history[400] = -5000.0
    fc = forecast_hourly(history, first_ts, DAY)
    assert fc.note is not None
    assert "33 missing or non-finite values interpolated" in fc.note
    assert "1 negative values clipped to 0" in fc.note
    assert_well_formed(fc, DAY)
    assert mape(data[TRAIN_DAYS * DAY :], fc.values) <= 10.0


@pytest.mark.parametrize("hours", [1, 5, 50, 400])
def test_history_without_a_finite_value_forecasts_zeros(hours: int) -> None:
    fc = forecast_hourly([math.nan, math.inf, -math.inf] * hours, MONDAY, 24)
    assert fc.values == [0.0] * 24
    assert fc.note is not None
    assert "no finite values" in fc.note
    assert_well_formed(fc, 24)


@pytest.mark.parametrize("horizon", [0, -1, MAX_HORIZON_H + 1, True])
def test_invalid_horizon_raises(horizon: int) -> None:
    with pytest.raises(ValueError, match="horizon_hours"):
        forecast_hourly([1.0] * 100, MONDAY, horizon)


@pytest.mark.parametrize("interval", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_invalid_interval_raises(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        forecast_hourly([1.0] * 100, MONDAY, 24, interval=interval)


@PROPERTY
@given(
    history=st.lists(
        st.one_of(
            st.floats(min_value=-1e6, max_value=1e9),
            st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
        ),
        max_size=24 * 15,
    ),
    offset=st.integers(min_value=0, max_value=7 * 24 * 3600),
    horizon=st.integers(min_value=1, max_value=300),
    interval=st.floats(min_value=0.01, max_value=0.99),
)
def test_any_history_gives_a_well_formed_forecast(
    history: list[float], offset: int, horizon: int, interval: float
) -> None:
    fc = forecast_hourly(history, MONDAY + offset, horizon, interval=interval)
    assert_well_formed(fc, horizon)
    assert fc.start_ts == hour_floor(MONDAY + offset) + 3600 * len(history)


def test_patterns_find_working_hours_weekend_dip_and_growth() -> None:
    shape = {"base": 1000, "daily_amplitude": 0.8, "weekly_amplitude": 0.4, "trend_per_day": 10}
    noisy = synthetic_series(28, noise=0.05, seed=1, first_ts=MONDAY, **shape)
    clean = synthetic_series(28, noise=0.0, seed=1, first_ts=MONDAY, **shape)
    p = usage_patterns(noisy, MONDAY)
    assert p.days == 28.0
    assert p.note is None
    assert p.peak_hours[0] == 13
    assert set(p.peak_hours) <= {11, 12, 13, 14, 15}
    assert len(p.hourly_profile) == 24
    assert p.hourly_profile[13] > 2 * p.hourly_profile[2]
    weekdays, weekend = p.weekday_profile[:5], p.weekday_profile[5:]
    assert max(weekend) < 0.75 * min(weekdays)
    assert p.trend_per_day == pytest.approx(10.0, abs=1.5)
    truth = (sum(clean[-168:]) / sum(clean[-336:-168]) - 1) * 100
    assert p.growth_pct_per_week is not None
    assert p.growth_pct_per_week == pytest.approx(truth, abs=2.0)


def test_patterns_follow_the_calendar_not_the_series_start() -> None:
    first_ts = MONDAY + 3 * 86400 + 5 * 3600  # Thursday 05:00 UTC
    data = series(21, "flat", noise=0.05, seed=2, first_ts=first_ts)
    p = usage_patterns(data, first_ts)
    assert p.peak_hours[0] == 13
    assert sorted(range(7), key=lambda d: p.weekday_profile[d])[:2] in ([5, 6], [6, 5])
    assert abs(p.trend_per_day) < 5.0
    assert p.growth_pct_per_week is not None
    assert abs(p.growth_pct_per_week) < 3.0


@pytest.mark.parametrize("hours", [0, 5, 30, 6 * DAY, 13 * DAY])
def test_patterns_with_short_history(hours: int) -> None:
    data = series(14, "growing", noise=0.05, seed=3, first_ts=MONDAY)[:hours]
    p = usage_patterns(data, MONDAY)
    assert p.days == hours / 24
    assert (p.weekday_profile == []) == (hours < 7 * DAY)
    assert p.growth_pct_per_week is None
    assert p.note is not None
    assert len(p.hourly_profile) == 24
    assert len(p.peak_hours) == min(hours, 3)
    assert all(math.isfinite(v) for v in [*p.hourly_profile, p.trend_per_day])
    if hours < 48:
        assert p.trend_per_day == 0.0


def test_patterns_growth_is_none_when_the_earlier_week_is_idle() -> None:
    p = usage_patterns([0.0] * 168 + [5.0] * 168, MONDAY)
    assert p.growth_pct_per_week is None
    assert len(p.weekday_profile) == 7


def test_patterns_tolerate_bad_values() -> None:
    data: list[Any] = series(15, "flat", noise=0.05, seed=4, first_ts=MONDAY)
    data[10], data[20], data[30], data[40] = math.nan, math.inf, -7.0, None
    p = usage_patterns(data, MONDAY)
    assert p.note is not None
    assert "interpolated" in p.note
    assert all(math.isfinite(v) and v >= 0 for v in [*p.hourly_profile, *p.weekday_profile])


def test_mape_ignores_zero_actuals() -> None:
    assert mape([100, 0, 200], [110, 50, 150]) == pytest.approx(17.5)
    assert mape([0, 0], [1, 2]) == 0.0
    assert mape([], []) == 0.0
    with pytest.raises(ValueError, match="length"):
        mape([1, 2], [1])


def test_synthetic_series_is_deterministic_and_calendar_aligned() -> None:
    kwargs: dict[str, Any] = {
        "base": 1000,
        "daily_amplitude": 0.8,
        "weekly_amplitude": 0.4,
        "trend_per_day": 0,
    }
    a = synthetic_series(14, noise=0.1, seed=1, first_ts=MONDAY, **kwargs)
    assert a == synthetic_series(14, noise=0.1, seed=1, first_ts=MONDAY, **kwargs)
    assert a != synthetic_series(14, noise=0.1, seed=2, first_ts=MONDAY, **kwargs)
    assert len(a) == 14 * 24
    clean = np.array(synthetic_series(7, noise=0.0, seed=0, first_ts=MONDAY, **kwargs))
    days = clean.reshape(7, 24)
    assert days[0].mean() == pytest.approx(1000.0)
    assert days[0].max() == pytest.approx(1800.0)
    assert int(days[0].argmax()) == 13
    assert days[5].mean() == pytest.approx(600.0)
    # Starting at Saturday 00:00 UTC: the first two days are the weekend.
    saturday = MONDAY + 5 * 86400
    shifted = np.array(synthetic_series(7, noise=0.0, seed=0, first_ts=saturday, **kwargs))
    assert shifted[:48].mean() == pytest.approx(600.0)


def test_synthetic_series_is_never_negative() -> None:
    data = synthetic_series(
        30,
        base=100,
        daily_amplitude=1.5,
        weekly_amplitude=0.9,
        trend_per_day=-20,
        noise=1.0,
        seed=0,
    )
    assert min(data) == 0.0
    assert all(v >= 0 for v in data)


def test_hour_floor() -> None:
    assert hour_floor(MONDAY + 3599.9) == MONDAY
    assert hour_floor(MONDAY + 3600) == MONDAY + 3600
    assert hour_floor(-1) == -3600

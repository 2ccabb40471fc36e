"""Hourly token-usage forecasts and usage patterns, in plain numpy.

The model is an additive decomposition, y(t) = a + b·t + S(slot(t)) + e(t):

* Slots are the 168 hours of the week (Monday 00:00 UTC = 0) with at least 14 days of history,
  the 24 hours of the day with at least 2 days. Less history gives a flat mean; none, zeros.
* The fit uses the last K whole periods (at most 12 weeks), so every slot has K samples.
* Cleaning: NaN, ±inf and None are missing and linearly interpolated; negatives become 0. An
  hour far from both its ±2-hour neighbourhood median and its slot's median is an isolated
  outlier (a spike, a lost hour) and takes the neighbourhood median.
* Trend: ordinary least squares on the centred one-period moving average, which holds no
  seasonality. Forecasts extrapolate it damped (φ = 0.9995 per hour), so long horizons level off.
* Seasonality: per slot, the mean of the detrended values weighted by age (halving every 28
  days), after winsorising them to the slot median ± 2.5 robust scales (per-hour-of-day MAD),
  which tames multi-hour outages and surges. It is not re-centred, so recent weeks also pull
  the level.
* Intervals: in-sample residuals relative to the fitted level (usage noise grows with load),
  standardised by a per-hour-of-day RMS; their empirical quantiles give the band, which is
  inflated because in-sample residuals of a K-sample mean understate new errors, and widened
  by √(1 + h/N) at horizon h for N hours of fitted history.
* Values and bounds are clipped at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

HOUR_S = 3600
DAY_H = 24
WEEK_H = 168
MAX_HORIZON_H = 24 * 90

_WEEKLY_MIN_H = 14 * DAY_H
_DAILY_MIN_H = 2 * DAY_H
_MAX_WEEKS = 12
_HALF_LIFE_H = 28 * DAY_H
_DAMPING = 0.9995
# Relative errors are measured against max(level, 10% of the mean) so idle hours stay finite.
_LEVEL_FLOOR = 0.1
_NEIGHBOURS = 2
_OUTLIER_SCALES = 5.0
_WINSOR_SCALES = 2.5
_MAD_TO_SIGMA = 1.4826
# Pseudo-samples of the all-hours RMS mixed into each hour-of-day RMS.
_SCALE_PRIOR_N = 6.0
# Epoch hour 0 is a Thursday; shifting by 3 days makes hour-of-week 0 Monday 00:00 UTC.
_MONDAY_SHIFT_H = 3 * DAY_H


@dataclass(slots=True, frozen=True)
class Forecast:
    start_ts: int
    values: list[float]
    lower: list[float]
    upper: list[float]
    interval: float
    method: str
    history_hours: int
    note: str | None


@dataclass(slots=True, frozen=True)
class Patterns:
    days: float
    hourly_profile: list[float]
    weekday_profile: list[float]
    peak_hours: list[int]
    trend_per_day: float
    growth_pct_per_week: float | None
    note: str | None


def hour_floor(ts: float) -> int:
    """Epoch seconds floored to the start of the hour."""
    return math.floor(ts / HOUR_S) * HOUR_S


def forecast_hourly(
    history: Sequence[float | None],
    first_ts: int,
    horizon_hours: int,
    *,
    interval: float = 0.9,
) -> Forecast:
    """Forecast the `horizon_hours` hours after `history` (hourly counts, oldest first)."""
    if isinstance(horizon_hours, bool) or not 1 <= horizon_hours <= MAX_HORIZON_H:
        raise ValueError(f"horizon_hours must be 1..{MAX_HORIZON_H}, got {horizon_hours!r}")
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must be strictly between 0 and 1, got {interval!r}")
    y, notes = _clean(history)
    n = len(y)
    first_hour = hour_floor(first_ts) // HOUR_S
    start_ts = (first_hour + n) * HOUR_S
    if n == 0:
        zeros = [0.0] * horizon_hours
        return Forecast(
            start_ts, zeros, zeros, zeros, interval, "none", 0, "no history; forecasting zeros"
        )
    if n < _DAILY_MIN_H:
        notes.insert(0, f"too little history: {n} h; a flat mean forecast with wide intervals")
        values, lower, upper = _mean_forecast(y, horizon_hours, interval)
        return Forecast(start_ts, values, lower, upper, interval, "mean", n, "; ".join(notes))
    if n >= _WEEKLY_MIN_H:
        period, method = WEEK_H, "seasonal_daily_weekly_trend"
        cycles = min(n // WEEK_H, _MAX_WEEKS)
    else:
        period, method = DAY_H, "seasonal_daily_trend"
        cycles = n // DAY_H
        notes.insert(0, f"{n / DAY_H:.1f} days of history: no weekly seasonality (needs 14)")
    used = cycles * period
    window, outliers = _despike(y[n - used :], period)
    if outliers:
        notes.append(f"{outliers} outlier hours replaced by their neighbours' median")
    values, lower, upper = _seasonal_forecast(
        window, first_hour + n - used, period, horizon_hours, interval
    )
    return Forecast(
        start_ts, values, lower, upper, interval, method, used, "; ".join(notes) or None
    )


def usage_patterns(history: Sequence[float | None], first_ts: int) -> Patterns:
    """Hour-of-day and weekday profiles, peak hours, trend and week-over-week growth."""
    y, notes = _clean(history)
    n = len(y)
    hours = hour_floor(first_ts) // HOUR_S + np.arange(n)
    hourly, seen = _group_means(y, hours % DAY_H, DAY_H)
    ranked = sorted(
        (h for h in range(DAY_H) if seen[h] and hourly[h] > 0), key=lambda h: -hourly[h]
    )
    weekday: list[float] = []
    if n >= WEEK_H:
        # Mean hour × 24 rather than summing calendar days, so partial first/last days count.
        means, _ = _group_means(y, _weekday(hours), 7)
        weekday = (means * DAY_H).tolist()
    else:
        notes.append("weekday profile needs 7 days of history")
    growth: float | None = None
    if n >= 2 * WEEK_H:
        earlier = float(y[-2 * WEEK_H : -WEEK_H].sum())
        if earlier > 0:
            growth = (float(y[-WEEK_H:].sum()) / earlier - 1.0) * 100.0
    else:
        notes.append("growth needs 14 days of history")
    if n == 0:
        notes.insert(0, "no history")
    elif n < DAY_H:
        notes.insert(0, f"only {n} h of history: hourly profile incomplete")
    slope = 0.0
    if n >= _DAILY_MIN_H:
        _, slope = _trend_line(y, WEEK_H if n >= _WEEKLY_MIN_H else DAY_H)
    elif n:
        # Within a day or so the daily cycle would pass for a trend.
        notes.append("trend needs 2 days of history")
    return Patterns(
        days=n / DAY_H,
        hourly_profile=hourly.tolist(),
        weekday_profile=weekday,
        peak_hours=ranked[:3],
        trend_per_day=slope * DAY_H,
        growth_pct_per_week=growth,
        note="; ".join(notes) or None,
    )


def synthetic_series(
    days: int,
    *,
    base: float,
    daily_amplitude: float,
    weekly_amplitude: float,
    trend_per_day: float,
    noise: float,
    seed: int,
    first_ts: int = 0,
) -> list[float]:
    """Hourly demo usage: a working-hours bump, a weekend dip, a linear trend and noise.

    A weekday averages `base` per hour and peaks at 13:30 UTC at `base·(1 + daily_amplitude)`
    (amplitudes up to 1.5 stay positive); Saturday and Sunday are lower by the fraction
    `weekly_amplitude`; the trend adds `trend_per_day` tokens per hour each day; each hour is
    multiplied by 1 + N(0, noise). Never negative, and the same for the same seed.
    """
    hours = hour_floor(first_ts) // HOUR_S + np.arange(max(days, 0) * DAY_H)
    shape = _bump(np.arange(DAY_H))
    # Scaled so that a day averages 1 and its peak is 1 + amplitude.
    daily = 1.0 + daily_amplitude * (shape[hours % DAY_H] - shape.mean()) / (
        shape.max() - shape.mean()
    )
    weekly = np.where(_weekday(hours) >= 5, 1.0 - weekly_amplitude, 1.0)
    level = base * daily * weekly + trend_per_day * np.arange(len(hours)) / DAY_H
    rng = np.random.default_rng(seed)
    noisy = np.maximum(level, 0.0) * (1.0 + noise * rng.standard_normal(len(hours)))
    values: list[float] = np.maximum(noisy, 0.0).tolist()
    return values


def _bump(hour_of_day: IntArray) -> Array:
    """A Gaussian bump over the day centred on 13:30 UTC (σ = 4 h), wrapping at midnight."""
    distance = np.abs(hour_of_day + 0.5 - 13.5)
    distance = np.minimum(distance, DAY_H - distance)
    bump: Array = np.exp(-0.5 * (distance / 4.0) ** 2)
    return bump


def _weekday(epoch_hours: IntArray) -> IntArray:
    """Day of week of epoch hours, Monday = 0."""
    return ((epoch_hours + _MONDAY_SHIFT_H) // DAY_H) % 7


def _clean(history: Sequence[float | None]) -> tuple[Array, list[str]]:
    """History as floats: missing values interpolated, negatives 0; notes say what was fixed."""
    y = np.array([math.nan if v is None else v for v in history], dtype=np.float64)
    notes: list[str] = []
    finite = np.isfinite(y)
    missing = len(y) - int(finite.sum())
    if missing and missing == len(y):
        notes.append("no finite values in history; treated as zeros")
        y = np.zeros(len(y))
    elif missing:
        notes.append(f"{missing} missing or non-finite values interpolated")
        idx = np.arange(len(y))
        y = np.interp(idx, idx[finite], y[finite])
    negative = int((y < 0).sum())
    if negative:
        notes.append(f"{negative} negative values clipped to 0")
        y = np.maximum(y, 0.0)
    return y, notes


def _despike(y: Array, period: int) -> tuple[Array, int]:
    """`y` (whole periods) with isolated outliers replaced by their neighbourhood median.

    An hour is an isolated outlier only if it stands out from both its neighbours and its slot
    in the other periods, so a recurring spike (a nightly batch job) and a steep ramp survive.
    Returns the cleaned copy and the number of outliers.
    """
    cycles = len(y) // period
    padded = np.pad(y, _NEIGHBOURS, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * _NEIGHBOURS + 1)
    local = np.median(windows, axis=1)
    # Detrended first, or a steady trend would hide outliers among the periods' differences;
    # the trend of the neighbourhood medians, which the spikes themselves cannot tilt.
    a, b = _trend_line(local, period)
    line = a + b * np.arange(len(y), dtype=np.float64)
    seasonal = line + np.tile(np.median((y - line).reshape(cycles, period), axis=0), cycles)
    level = np.maximum(local, max(_LEVEL_FLOOR * float(y.mean()), 1e-9))
    outlier = np.ones(len(y), dtype=bool)
    for reference in (local, seasonal):
        dev = np.abs(y - reference) / level
        # A 95% quantile, not the MAD: in sparse usage most hours are idle, and the busy ones
        # are not anomalies.
        scale = float(np.quantile(dev, 0.95)) / 1.96
        outlier &= dev > _OUTLIER_SCALES * scale
    count = int(outlier.sum())
    if count > min(0.01 * len(y), 0.25 * np.count_nonzero(y)):
        # That many "outliers" are the usage itself: a key busy only a few hours a week.
        return y, 0
    return np.where(outlier, local, y), count


def _winsorise(detrended: Array, idle: npt.NDArray[np.bool_]) -> Array:
    """Clip each (period, slot) value to its slot median ± 2.5 robust scales (per-hour MAD)."""
    median = np.median(detrended, axis=0)
    dev = (detrended - median).reshape(-1, DAY_H)
    robust = _MAD_TO_SIGMA * np.median(np.abs(dev), axis=0)
    bound = np.tile(_WINSOR_SCALES * robust, detrended.shape[1] // DAY_H)
    # In a slot idle in most periods every busy hour looks like an outlier; keep them all.
    bound[idle] = np.inf
    return np.clip(detrended, median - bound, median + bound)


def _group_means(y: Array, groups: IntArray, size: int) -> tuple[Array, npt.NDArray[np.bool_]]:
    """Mean of `y` per group 0..size-1 (0 for empty groups) and whether each group had data."""
    counts = np.bincount(groups, minlength=size).astype(np.float64)
    sums = np.bincount(groups, weights=y, minlength=size)
    seen = counts > 0
    return np.divide(sums, counts, out=np.zeros(size), where=seen), seen


def _trend_line(y: Array, period: int) -> tuple[float, float]:
    """(a, b) of the least-squares line a + b·t through the centred `period`-hour moving average."""
    if len(y) < period + 1:
        return (float(y.mean()) if len(y) else 0.0), 0.0
    csum = np.concatenate(([0.0], np.cumsum(y)))
    smooth = (csum[period:] - csum[:-period]) / period
    t = np.arange(len(smooth)) + (period - 1) / 2.0
    tc = t - t.mean()
    slope = float(tc @ (smooth - smooth.mean()) / (tc @ tc))
    return float(smooth.mean() - slope * t.mean()), slope


def _mean_forecast(y: Array, horizon: int, interval: float) -> tuple[list[float], ...]:
    """Flat mean with a normal band at least ±50% of the mean wide, since the day's shape is
    unknown."""
    mean = float(y.mean())
    spread = max(float(y.std()) * math.sqrt(1.0 + 1.0 / len(y)), 0.5 * mean)
    z = NormalDist().inv_cdf(0.5 + interval / 2.0)
    half = z * spread * np.sqrt(1.0 + np.arange(1, horizon + 1) / DAY_H)
    values = np.full(horizon, mean)
    return values.tolist(), np.maximum(values - half, 0.0).tolist(), (values + half).tolist()


def _seasonal_forecast(
    y: Array, first_hour: int, period: int, horizon: int, interval: float
) -> tuple[list[float], ...]:
    """Trend + seasonal forecast after `y`: whole periods, starting at epoch hour `first_hour`."""
    cycles = len(y) // period
    offset = _MONDAY_SHIFT_H if period == WEEK_H else 0
    t = np.arange(len(y), dtype=np.float64)
    idle = np.median(y.reshape(cycles, period), axis=0) == 0
    a, b = _trend_line(y, period)
    tamed = _winsorise((y - (a + b * t)).reshape(cycles, period), idle).reshape(-1)
    # Refit on the winsorised series: an outage near either end would otherwise tilt the slope.
    a, b = _trend_line(a + b * t + tamed, period)
    line = a + b * t
    detrended = (y - line).reshape(cycles, period)
    weights = 0.5 ** ((cycles - 1 - np.arange(cycles)) * period / _HALF_LIFE_H)
    profile = weights @ _winsorise(detrended, idle) / weights.sum()

    floor = max(_LEVEL_FLOOR * float(y.mean()), 1e-9)
    fitted = line.reshape(cycles, period) + profile
    rel = ((detrended - profile) / np.maximum(fitted, floor)).reshape(-1, DAY_H)
    per_hour = np.mean(rel**2, axis=0)
    samples = len(rel)
    scale = np.sqrt(
        (samples * per_hour + _SCALE_PRIOR_N * per_hour.mean()) / (samples + _SCALE_PRIOR_N)
    )
    z = np.divide(rel, scale, out=np.zeros_like(rel), where=scale > 0)
    q_lo, q_hi = np.quantile(z, [0.5 - interval / 2.0, 0.5 + interval / 2.0])
    # For a weighted mean of K iid errors: in-sample residuals have variance σ²(1 − 2/K + 1/Keff),
    # a new observation's error σ²(1 + 1/Keff).
    k_eff = weights.sum() ** 2 / (weights @ weights)
    inflate = math.sqrt((1.0 + 1.0 / k_eff) / (1.0 - 2.0 / cycles + 1.0 / k_eff))

    # Row-major reshapes put consecutive hours from `first_hour` in the columns; map to slots.
    by_slot = np.empty(period)
    by_slot[(first_hour + offset + np.arange(period)) % period] = profile
    scale_by_hour = np.empty(DAY_H)
    scale_by_hour[(first_hour + np.arange(DAY_H)) % DAY_H] = scale

    steps = np.arange(1, horizon + 1)
    future = first_hour + len(y) - 1 + steps
    damped = np.cumsum(_DAMPING**steps)
    point = a + b * (len(y) - 1 + damped) + by_slot[(future + offset) % period]
    band = (
        np.maximum(point, floor)
        * scale_by_hour[future % DAY_H]
        * inflate
        * np.sqrt(1.0 + steps / len(y))
    )
    values = np.maximum(point, 0.0)
    lower = np.minimum(np.maximum(point + q_lo * band, 0.0), values)
    upper = np.maximum(point + q_hi * band, values)
    return values.tolist(), lower.tolist(), upper.tolist()

"""The anomaly alert: when an hour closes, the hour's tokens of each scope active in it or the
hour before (the keys whose usage the alerter saw change, and everyone's total as `global`)
are compared with the forecast (atlas/forecast.py) made from the four weeks before that
hour. A count above the 90 % interval's upper bound, or below its lower bound, by more than
ATLAS_ALERT_ANOMALY_MARGIN times the interval's width (and by at least MIN_DEVIATION
tokens) fires one `anomaly` alert for that scope and hour. A scope needs a day of history
(from its first used hour) before it is judged; teams have no hourly history of their own
and are not judged (their keys are)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from atlas.forecast import HOUR_S, forecast_hourly
from atlas.ledger.protocol import GLOBAL_HISTORY, History, HistoryScope

#: Hours of history a judgement learns from.
HISTORY_HOURS = 24 * 28
#: Hours a scope needs (from its first used hour) before it is judged.
MIN_HISTORY_HOURS = 24
#: Deviations below this many tokens are noise, whatever the interval.
MIN_DEVIATION = 1000
#: Scopes judged per closed hour at most (each costs a history read and a forecast).
MAX_SCOPES_PER_HOUR = 200
#: Hours read per round trip.
_READ_CHUNK = 168

Direction = Literal["above", "below"]


@dataclass(frozen=True, slots=True)
class Anomaly:
    scope: str  # global or key:<id>
    hour_ts: int  # start of the judged hour
    used: float
    expected: float
    lower: float
    upper: float
    direction: Direction


def judge(
    used: float, expected: float, lower: float, upper: float, margin: float
) -> Direction | None:
    """Whether `used` lies outside [lower, upper] widened by `margin` of its width (pure)."""
    slack = margin * max(upper - lower, 0.0)
    if used > upper + slack and used - upper >= MIN_DEVIATION:
        return "above"
    if used < lower - slack and lower - used >= MIN_DEVIATION:
        return "below"
    return None


def history_scope(scope: str) -> HistoryScope | None:
    kind, _, ident = scope.partition(":")
    if scope == "global":
        return GLOBAL_HISTORY
    return HistoryScope.key(ident) if kind == "key" and ident else None


async def _hours(ledger: History, scope: HistoryScope, first: int, n: int) -> list[float]:
    totals: list[float] = []
    for done in range(0, n, _READ_CHUNK):
        rows = await ledger.history(scope, first + HOUR_S * done, min(_READ_CHUNK, n - done))
        totals += [float(r.total) for r in rows]
    return totals


async def check_hour(
    ledger: History, scopes: Sequence[str], hour_ts: int, margin: float
) -> list[Anomaly]:
    """Judge the hour starting at `hour_ts` for each scope (global first, then the others in
    order, at most MAX_SCOPES_PER_HOUR)."""
    found: list[Anomaly] = []
    ordered = ["global", *sorted(s for s in set(scopes) if s != "global")]
    for scope in ordered[:MAX_SCOPES_PER_HOUR]:
        whose = history_scope(scope)
        if whose is None:
            continue
        first = hour_ts - HOUR_S * HISTORY_HOURS
        series = await _hours(ledger, whose, first, HISTORY_HOURS + 1)
        *history, used = series
        start = next((i for i, v in enumerate(history) if v), len(history))
        if len(history) - start < MIN_HISTORY_HOURS:
            continue
        fc = await asyncio.to_thread(forecast_hourly, history[start:], first + HOUR_S * start, 1)
        direction = judge(used, fc.values[0], fc.lower[0], fc.upper[0], margin)
        if direction is not None:
            found.append(
                Anomaly(scope, hour_ts, used, fc.values[0], fc.lower[0], fc.upper[0], direction)
            )
    return found

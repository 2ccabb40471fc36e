"""Forecasts, quota-exhaustion warnings, capacity advice and what-if replays, computed from
the ledger's hourly history. Pure functions over `HourRow`s; the routes fetch and format."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from atlas.forecast import Forecast, forecast_hourly
from atlas.ledger.protocol import HourRow
from atlas.windows import Zone, local_day_month

#: Suggested limits leave this much room above the forecast need.
SUGGESTION_HEADROOM = 1.2


def totals(rows: Sequence[HourRow]) -> list[float]:
    return [float(r.total) for r in rows]


def forecast_rows(rows: Sequence[HourRow], horizon_hours: int) -> Forecast:
    first_ts = rows[0].ts if rows else 0
    return forecast_hourly(totals(rows), first_ts, horizon_hours)


@dataclass(slots=True)
class Exhaustion:
    window: str  # daily | monthly
    limit: int
    used: int
    forecast_total: float  # used now plus the forecast until the window resets
    exhausts_at: datetime | None
    suggested_limit: int


def exhaustion(
    window: str,
    limit: int,
    used: int,
    now_ts: float,
    reset_ts: int,
    fc: Forecast,
    typical_total: float,
) -> Exhaustion:
    """When the forecast makes `used` reach `limit` before the window resets, if it does.

    :param typical_total: what a whole window of this kind usually takes (for the suggestion).
    """
    cumulative = float(used)
    exhausts_at = None
    for i, value in enumerate(fc.values):
        start = fc.start_ts + 3600 * i
        if start >= reset_ts:
            break
        # Only the part of the current hour still to come counts.
        share = min(1.0, max(0.0, (min(start + 3600, reset_ts) - max(start, now_ts)) / 3600))
        before = cumulative
        cumulative += value * share
        if exhausts_at is None and limit > 0 and cumulative >= limit > before:
            frac = (limit - before) / max(cumulative - before, 1e-9)
            at = max(start, now_ts) + frac * 3600 * share
            exhausts_at = datetime.fromtimestamp(at, UTC)
    if limit > 0 and used >= limit:
        exhausts_at = datetime.fromtimestamp(now_ts, UTC)
    need = max(cumulative, typical_total)
    return Exhaustion(
        window,
        limit,
        used,
        round(cumulative, 1),
        exhausts_at,
        max(1, math.ceil(need * SUGGESTION_HEADROOM)),
    )


def daily_totals(rows: Sequence[HourRow], zone: Zone) -> dict[str, int]:
    """Totals per local day of `zone` (the key's windows), each hour by its start."""
    days: dict[str, int] = defaultdict(int)
    for r in rows:
        days[local_day_month(r.ts, zone)[0]] += r.total
    return dict(days)


def typical(values: Sequence[int]) -> float:
    """The 90th percentile of whole-window totals, a need that limits should cover."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)])


@dataclass(slots=True)
class Limits:
    """The limits a replay applies (None: not limited)."""

    daily_limit: int | None = None
    monthly_limit: int | None = None
    rate_per_sec: float | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def of(cls, source: object) -> Limits:
        """The same-named limits of a key record or a proposal (`admin.schemas.PlanLimits`)."""
        return cls(*(getattr(source, f.name) for f in fields(cls)))


@dataclass(slots=True)
class Replay:
    hours: int = 0
    requests: int = 0
    tokens: int = 0
    refused_requests: int = 0
    refused_tokens: int = 0
    by_day: dict[str, dict[str, int]] = field(default_factory=dict)


def what_if(rows: Sequence[HourRow], limits: Limits, zone: Zone) -> Replay:
    """Replay hourly history against `limits`: what would have been refused.

    Resolution is one hour: a request refused for a quota is refused with every later one of
    its window; rate limits are compared with hourly averages, so bursts inside an hour are
    not seen (the result is a lower bound for them).
    """
    out = Replay()
    day_used: dict[str, int] = defaultdict(int)
    month_used: dict[str, int] = defaultdict(int)
    for r in rows:
        day, month = local_day_month(r.ts, zone)
        reqs, toks = r.get("requests"), r.total
        out.hours += 1
        out.requests += reqs
        out.tokens += toks
        allowed = toks
        if limits.daily_limit is not None:
            allowed = min(allowed, max(0, limits.daily_limit - day_used[day]))
        if limits.monthly_limit is not None:
            allowed = min(allowed, max(0, limits.monthly_limit - month_used[month]))
        if limits.tokens_per_minute is not None:
            allowed = min(allowed, limits.tokens_per_minute * 60)
        refused_tokens = toks - allowed
        per_request = toks / reqs if reqs else 0.0
        refused_reqs = math.ceil(refused_tokens / per_request) if per_request else 0
        if limits.rate_per_sec is not None:
            refused_reqs = max(refused_reqs, reqs - math.floor(limits.rate_per_sec * 3600))
            refused_tokens = max(refused_tokens, round(refused_reqs * per_request))
        refused_reqs = min(reqs, refused_reqs)
        refused_tokens = min(toks, refused_tokens)
        day_used[day] += toks - refused_tokens
        month_used[month] += toks - refused_tokens
        out.refused_requests += refused_reqs
        out.refused_tokens += refused_tokens
        by_day = out.by_day.setdefault(
            day, {"requests": 0, "tokens": 0, "refused_requests": 0, "refused_tokens": 0}
        )
        by_day["requests"] += reqs
        by_day["tokens"] += toks
        by_day["refused_requests"] += refused_reqs
        by_day["refused_tokens"] += refused_tokens
    return out

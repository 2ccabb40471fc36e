"""Forecasting, Atlas-compatible paths: self-serve with the caller's own key (routed through
Envoy like /v1/usage), or any key, model or everything with the admin token.

Every history read and computation here holds one of `SelfServe`'s few slots and computes in
a worker thread, so a crowd of forecast calls cannot stall the rest of admin."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import Field

from admin.deps import AdminDep, CallerDep, LedgerDep, SelfServeDep, SettingsDep
from admin.planning import (
    Limits,
    daily_totals,
    exhaustion,
    forecast_rows,
    typical,
    what_if,
)
from admin.routes.history import hour_out, recent_hours
from admin.schemas import PlanLimits
from admin.selfserve import SelfServe
from atlas.forecast import Forecast, usage_patterns
from atlas.keymodel import KeyRecord
from atlas.ledger.admin_protocol import AdminLedger
from atlas.ledger.protocol import GLOBAL_HISTORY, HistoryScope, HourRow, KeyUsage
from atlas.limits import MAX_QUERY_HOURS
from atlas.pricing import usd
from atlas.windows import Zone, day_bounds, local_date

router = APIRouter(prefix="/v1/forecasting", tags=["forecasting"])

#: Atlas's named horizons, in hours.
HORIZONS = {"hourly": 24, "daily": 24 * 7, "weekly": 24 * 28, "monthly": 24 * 30}
#: History a forecast learns from (four weeks: two weekly cycles and more).
HISTORY_HOURS = 24 * 28
#: Keys per capacity-recommendations answer (each costs a forecast).
MAX_KEYS_PER_PLAN = 200
MAX_DAYS_BACK = MAX_QUERY_HOURS // 24

KeyIdQuery = Annotated[str | None, Query(max_length=100, description="admin only: any key")]
ModelQuery = Annotated[str | None, Query(max_length=200, description="admin only: one model")]


async def _scope(
    caller: Any, ledger: AdminLedger, key_id: str | None, model: str | None
) -> tuple[HistoryScope, str, KeyRecord | None]:
    """(history scope, scope name, key) the caller may see."""
    if not caller.is_admin:
        if model is not None or (key_id is not None and key_id != caller.key.id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "an API key sees only its own usage")
        return HistoryScope.key(caller.key.id), "key", caller.key
    if key_id is not None:
        rec = await ledger.get_key(key_id)
        if rec is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id!r} not found")
        return HistoryScope.key(key_id), "key", rec
    if model is not None:
        return HistoryScope.model(model), "model", None
    return GLOBAL_HISTORY, "global", None


async def complete_hours(ledger: AdminLedger, scope: HistoryScope, hours: int) -> list[Any]:
    """The last `hours` whole hours before the current one: a forecast must not learn from
    the hour in progress (its partial count looks like a drop)."""
    return _trim_leading_zeros((await recent_hours(ledger, scope, hours + 1))[:-1])


def _points(fc: Forecast) -> list[dict[str, float]]:
    return [
        {
            "ts": fc.start_ts + 3600 * i,
            "value": round(v, 2),
            "lower": round(lo, 2),
            "upper": round(hi, 2),
        }
        for i, (v, lo, hi) in enumerate(zip(fc.values, fc.lower, fc.upper, strict=True))
    ]


@router.get("/forecast")
async def forecast(
    caller: CallerDep,
    ledger: LedgerDep,
    guard: SelfServeDep,
    horizon: Literal["hourly", "daily", "weekly", "monthly"] = "daily",
    horizon_hours: Annotated[int | None, Query(ge=1, le=MAX_QUERY_HOURS)] = None,
    key_id: KeyIdQuery = None,
    model: ModelQuery = None,
) -> dict[str, Any]:
    """Hourly token forecast with 90% prediction intervals, for a key, a model or all."""
    whose, scope, rec = await _scope(caller, ledger, key_id, model)
    hours = horizon_hours or HORIZONS[horizon]
    async with guard.slot():
        rows = await complete_hours(ledger, whose, HISTORY_HOURS)
        fc = await guard.offload(forecast_rows, rows, hours)
    return {
        "scope": scope,
        "key_id": rec.id if rec else None,
        "model": model,
        "horizon": horizon,
        "horizon_hours": hours,
        "method": fc.method,
        "note": fc.note,
        "interval": fc.interval,
        "history_hours": fc.history_hours,
        "total": _total(fc),
        "points": _points(fc),
    }


def _total(fc: Forecast) -> dict[str, float]:
    """The horizon's sum with its interval (summed bounds: a conservative interval)."""
    return {
        "value": round(sum(fc.values), 1),
        "lower": round(sum(fc.lower), 1),
        "upper": round(sum(fc.upper), 1),
    }


def _trim_leading_zeros(rows: list[Any]) -> list[Any]:
    """History starts when usage starts: hours before a key's first request are not zeros
    to learn from (a new key would look like a dying one)."""
    for i, r in enumerate(rows):
        if r.total or r.get("requests"):
            return rows[i:]
    return []


@router.get("/usage-patterns")
async def patterns(
    caller: CallerDep,
    ledger: LedgerDep,
    guard: SelfServeDep,
    days_back: Annotated[int, Query(ge=1, le=MAX_DAYS_BACK)] = 28,
    key_id: KeyIdQuery = None,
    model: ModelQuery = None,
) -> dict[str, Any]:
    """Peak hours, weekday profile, trend and growth of token usage."""
    whose, scope, rec = await _scope(caller, ledger, key_id, model)
    async with guard.slot():
        rows = await complete_hours(ledger, whose, 24 * days_back)
        totals = [float(r.total) for r in rows]
        p = await guard.offload(usage_patterns, totals, rows[0].ts if rows else 0)
    return {
        "scope": scope,
        "key_id": rec.id if rec else None,
        "model": model,
        "days_back": days_back,
        "days_of_history": round(p.days, 2),
        "peak_hours_utc": p.peak_hours,
        "hourly_profile": [round(v, 2) for v in p.hourly_profile],
        "weekday_profile": [round(v, 2) for v in p.weekday_profile],
        "trend_tokens_per_hour_per_day": round(p.trend_per_day, 3),
        "growth_pct_per_week": None
        if p.growth_pct_per_week is None
        else round(p.growth_pct_per_week, 2),
        "note": p.note,
    }


async def _plan_key(
    ledger: AdminLedger, guard: SelfServe, rec: KeyRecord, now: float
) -> dict[str, Any]:
    async with guard.slot():
        usage = await ledger.usage(rec)
        rows = await complete_hours(ledger, HistoryScope.key(rec.id), HISTORY_HOURS)
        return await guard.offload(_plan, rec, usage, rows, now, ledger.zone_of(rec))


def _plan(
    rec: KeyRecord, usage: KeyUsage, rows: list[HourRow], now: float, zone: Zone
) -> dict[str, Any]:
    to_month_end = max(1, int((usage.monthly.resets_at_s - now) // 3600) + 1)
    fc = forecast_rows(rows, min(to_month_end, MAX_QUERY_HOURS))
    days = list(daily_totals(rows, zone).values())
    windows = []
    for name, w, whole in (
        ("daily", usage.daily, typical(days[:-1] or days)),
        ("monthly", usage.monthly, typical(days) * 30),
    ):
        e = exhaustion(name, w.limit, w.used + w.reserved, now, w.resets_at_s, fc, whole)
        windows.append(
            {
                "window": e.window,
                "limit": e.limit,
                "used": e.used,
                "forecast_total": e.forecast_total,
                "resets_at": datetime.fromtimestamp(w.resets_at_s, UTC),
                "exhausts_at": e.exhausts_at,
                "will_exhaust": e.exhausts_at is not None,
                "suggested_limit": e.suggested_limit,
            }
        )
    return {
        "key_id": rec.id,
        "name": rec.name,
        "method": fc.method,
        "note": fc.note,
        "windows": windows,
    }


@router.get("/capacity-recommendations")
async def capacity_recommendations(
    caller: CallerDep,
    ledger: LedgerDep,
    settings: SettingsDep,
    guard: SelfServeDep,
    key_id: KeyIdQuery = None,
) -> dict[str, Any]:
    """Keys forecast to exhaust a quota before it resets (with when), suggested limits, and
    the forecast peak against the upstream's configured capacity."""
    now = await ledger.server_time()
    if not caller.is_admin or key_id is not None:
        _, _, rec = await _scope(caller, ledger, key_id, None)
        assert rec is not None
        recs = [rec]
    else:
        ids = await ledger.list_key_ids(0, MAX_KEYS_PER_PLAN)
        recs = [r for r in await ledger.get_keys(ids) if r.status == "active"]
    plans = [await _plan_key(ledger, guard, r, now) for r in recs]
    flat = [{"key_id": p["key_id"], "name": p["name"], **w} for p in plans for w in p["windows"]]
    answer: dict[str, Any] = {
        "generated_at": datetime.fromtimestamp(now, UTC),
        "keys": flat,
        "at_risk": [f for f in flat if f["will_exhaust"]],
    }
    if caller.is_admin:
        capacity_tps = settings.upstream_capacity_tokens_per_s
        async with guard.slot():
            rows = await complete_hours(ledger, GLOBAL_HISTORY, HISTORY_HOURS)
            answer["capacity"] = await guard.offload(_capacity, rows, capacity_tps)
    return answer


def _capacity(rows: list[HourRow], configured_tps: float) -> dict[str, Any]:
    fc = forecast_rows(rows, 24 * 7)
    peak_i = max(range(len(fc.upper)), key=fc.upper.__getitem__) if fc.upper else 0
    peak_tps = (fc.upper[peak_i] / 3600) if fc.upper else 0.0
    out: dict[str, Any] = {
        "configured_tokens_per_s": configured_tps or None,
        "forecast_peak_tokens_per_s": round(peak_tps, 3),
        "forecast_peak_at": datetime.fromtimestamp(fc.start_ts + 3600 * peak_i, UTC)
        if fc.upper
        else None,
        "basis": "upper bound of the 90% interval, hourly average, next 7 days",
        "method": fc.method,
        "note": fc.note,
    }
    if configured_tps:
        headroom = 1 - peak_tps / configured_tps
        out["headroom_pct"] = round(100 * headroom, 1)
        out["advice"] = (
            "capacity is sufficient"
            if headroom >= 0.2
            else "add upstream capacity or lower limits: less than 20% headroom at the peak"
        )
    else:
        out["advice"] = "set ATLAS_UPSTREAM_CAPACITY_TOKENS_PER_S to compare with the forecast"
    return out


class WhatIfIn(PlanLimits):
    """Proposed limits (unset: none) to replay a key's recorded usage against."""

    key_id: str | None = Field(None, max_length=100, description="admin: any key; else own")
    days_back: int = Field(28, ge=1, le=MAX_DAYS_BACK)


@router.post("/what-if")
async def what_if_replay(
    body: WhatIfIn, caller: CallerDep, ledger: LedgerDep, guard: SelfServeDep
) -> dict[str, Any]:
    """Replay recorded hourly usage against proposed limits: what would have been refused."""
    if caller.is_admin and body.key_id is None:
        raise HTTPException(422, "key_id is required")
    _, _, rec = await _scope(caller, ledger, body.key_id, None)
    assert rec is not None
    proposed, current = Limits.of(body), Limits.of(rec)
    async with guard.slot():
        rows = await recent_hours(ledger, HistoryScope.key(rec.id), 24 * body.days_back)
        zone = ledger.zone_of(rec)
        result = await guard.offload(what_if, rows, proposed, zone)
        baseline = await guard.offload(what_if, rows, current, zone)
    return {
        "key_id": rec.id,
        "days_back": body.days_back,
        "proposed": body.model_dump(exclude={"key_id", "days_back"}, exclude_none=True),
        "result": _replay_out(result),
        "with_current_limits": _replay_out(baseline),
        "note": None if result.requests else "no recorded usage in this period",
        "resolution": "hourly: quotas exact to the hour; rate limits against hourly averages",
    }


def _replay_out(r: Any) -> dict[str, Any]:
    return {
        "requests": r.requests,
        "tokens": r.tokens,
        "refused_requests": r.refused_requests,
        "refused_tokens": r.refused_tokens,
        "refused_pct": round(100 * r.refused_tokens / r.tokens, 2) if r.tokens else 0.0,
        "by_day": r.by_day,
    }


@router.get("/admin/system-metrics")
async def system_metrics(
    _: AdminDep, ledger: LedgerDep, day: Annotated[date | None, Query(alias="date")] = None
) -> dict[str, Any]:
    """One day of everything: hourly totals, top keys, key count (today by default)."""
    # The day is a calendar day of the default zone (ATLAS_WINDOW_TIMEZONE): 23 to 25 hours
    # of global history; each key's own window of that date (in its own zone) for the ranks.
    now = await ledger.server_time()
    zone = ledger.zone_of(None)
    the_day = day or local_date(now, zone)
    day_start, day_end = day_bounds(the_day, zone)
    start = ledger.hour_start(day_start)
    rows = await ledger.history(GLOBAL_HISTORY, start, -(-(day_end - start) // 3600))
    ids: list[str] = []
    while batch := await ledger.list_key_ids(len(ids), 1000):
        ids += batch
    day_name = the_day.strftime("%Y%m%d")
    windows = await ledger.day_windows(ids, day_name)
    ranked = sorted(zip(ids, windows, strict=True), key=lambda kv: -kv[1].get("used", 0))
    top = [r for r in await ledger.get_keys([kid for kid, _ in ranked[:10]])]
    by_id = dict(ranked)
    hours = [hour_out(r) for r in rows]
    return {
        "date": the_day.isoformat(),
        "keys": len(ids),
        "active_keys": sum(1 for w in windows if w.get("requests")),
        "totals": {
            "requests": sum(h.requests for h in hours),
            "prompt": sum(h.prompt for h in hours),
            "completion": sum(h.completion for h in hours),
            "total": sum(h.total for h in hours),
            "denied": sum(h.denied for h in hours),
            "spend_usd": usd(sum(r.get("spend") for r in rows)),
        },
        "top_keys": [
            {
                "key_id": r.id,
                "name": r.name,
                "used": by_id[r.id].get("used", 0),
                "requests": by_id[r.id].get("requests", 0),
            }
            for r in top
        ],
        "hours": hours,
    }


@router.get("/admin/forecast-all")
async def forecast_all(
    _: AdminDep,
    ledger: LedgerDep,
    guard: SelfServeDep,
    horizon_hours: Annotated[int, Query(ge=1, le=24 * 30)] = 24,
) -> dict[str, Any]:
    """Every key's forecast total for the next hours, with its interval."""
    ids = await ledger.list_key_ids(0, MAX_KEYS_PER_PLAN)
    out = []
    for rec in await ledger.get_keys(ids):
        async with guard.slot():
            rows = await complete_hours(ledger, HistoryScope.key(rec.id), HISTORY_HOURS)
            fc = await guard.offload(forecast_rows, rows, horizon_hours)
        out.append(
            {
                "key_id": rec.id,
                "name": rec.name,
                "method": fc.method,
                "note": fc.note,
                "total": _total(fc),
            }
        )
    return {"horizon_hours": horizon_hours, "keys": out}

"""Hourly usage history: per key, per model and for everything."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from admin.deps import AdminDep, LedgerDep
from atlas.ledger.protocol import GLOBAL_HISTORY, History, HistoryScope, HourRow
from atlas.limits import MAX_QUERY_HOURS
from atlas.pricing import usd

router = APIRouter(prefix="/v1/admin", tags=["history"])

HoursQuery = Annotated[
    int, Query(ge=1, le=MAX_QUERY_HOURS, description="hours back, this one included")
]


class HourOut(BaseModel):
    ts: int
    requests: int
    prompt: int
    completion: int
    total: int
    refunded: int
    denied: int
    estimated: int
    spend_usd: float
    cached: int = Field(description="prompt tokens read from the upstream's cache (in prompt)")
    cache_write: int = Field(description="prompt tokens written to a prompt cache (in prompt)")
    reasoning: int = Field(description="reasoning tokens (in completion)")


class HistoryOut(BaseModel):
    key_id: str | None
    model: str | None
    hours: list[HourOut]


def hour_out(row: HourRow) -> HourOut:
    return HourOut(
        ts=row.ts,
        requests=row.get("requests"),
        prompt=row.get("prompt"),
        completion=row.get("completion"),
        total=row.total,
        refunded=row.get("refunded"),
        denied=row.get("denied"),
        estimated=row.get("estimated"),
        spend_usd=usd(row.get("spend")),
        cached=row.get("cached"),
        cache_write=row.get("cache_write"),
        reasoning=row.get("reasoning"),
    )


#: Hours read per round trip: a whole read of 90 days would hold the event loop ~50 ms (in
#: redis-py's packing and parsing); a week at a time lets other requests in between.
READ_CHUNK_HOURS = 168


async def recent_hours(ledger: History, scope: HistoryScope, hours: int) -> list[HourRow]:
    """The last `hours` hours of `scope`, the current one included, oldest first."""
    first = ledger.hour_start(await ledger.server_time()) - 3600 * (hours - 1)
    rows: list[HourRow] = []
    for done in range(0, hours, READ_CHUNK_HOURS):
        n = min(READ_CHUNK_HOURS, hours - done)
        rows += await ledger.history(scope, first + 3600 * done, n)
    return rows


@router.get("/keys/{key_id}/history", response_model=HistoryOut)
async def key_history(
    key_id: str, _: AdminDep, ledger: LedgerDep, hours: HoursQuery = 168
) -> HistoryOut:
    """Hourly requests, tokens and spend of one key."""
    if await ledger.get_key(key_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id!r} not found")
    rows = await recent_hours(ledger, HistoryScope.key(key_id), hours)
    return HistoryOut(key_id=key_id, model=None, hours=[hour_out(r) for r in rows])


@router.get("/models/{model}/history", response_model=HistoryOut)
async def model_history(
    model: str, _: AdminDep, ledger: LedgerDep, hours: HoursQuery = 168
) -> HistoryOut:
    """Hourly requests, tokens and spend of one model, all keys together."""
    rows = await recent_hours(ledger, HistoryScope.model(model), hours)
    return HistoryOut(key_id=None, model=model, hours=[hour_out(r) for r in rows])


@router.get("/history", response_model=HistoryOut)
async def global_history(_: AdminDep, ledger: LedgerDep, hours: HoursQuery = 168) -> HistoryOut:
    """Hourly requests, tokens and spend of all keys together."""
    rows = await recent_hours(ledger, GLOBAL_HISTORY, hours)
    return HistoryOut(key_id=None, model=None, hours=[hour_out(r) for r in rows])

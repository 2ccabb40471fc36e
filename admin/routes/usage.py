"""Usage windows: self-serve with the caller's own key, or any key with the admin token."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, status

from admin.deps import AdminDep, ClientKeyDep, LedgerDep
from admin.schemas import UsageOut, WindowOut
from atlas.keymodel import KeyRecord
from atlas.ledger.protocol import History, Window
from atlas.pricing import usd

router = APIRouter(tags=["usage"])


def window_out(w: Window) -> WindowOut:
    return WindowOut(
        limit=w.limit,
        used=w.used,
        reserved=w.reserved,
        remaining=w.remaining,
        requests=w.requests,
        resets_at=datetime.fromtimestamp(w.resets_at_s, UTC),
        spend_usd=usd(w.spend_micros),
        cached=w.cached,
        cache_write=w.cache_write,
        reasoning=w.reasoning,
    )


async def _usage(ledger: History, rec: KeyRecord) -> UsageOut:
    u = await ledger.usage(rec)
    return UsageOut(
        key_id=rec.id,
        priority=rec.priority,
        daily=window_out(u.daily),
        monthly=window_out(u.monthly),
        open_reservations=u.open_reservations,
        monthly_budget_usd=rec.monthly_budget_usd,
        daily_used=u.daily.used,
        daily_limit=u.daily.limit,
        monthly_used=u.monthly.used,
        monthly_limit=u.monthly.limit,
    )


@router.get("/v1/usage", response_model=UsageOut)
async def own_usage(rec: ClientKeyDep, ledger: LedgerDep) -> UsageOut:
    """The calling key's own daily and monthly windows."""
    return await _usage(ledger, rec)


@router.get("/v1/admin/keys/{key_id}/usage", response_model=UsageOut)
async def key_usage(key_id: str, _: AdminDep, ledger: LedgerDep) -> UsageOut:
    """Any key's daily and monthly windows."""
    rec = await ledger.get_key(key_id)
    if rec is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id!r} not found")
    return await _usage(ledger, rec)

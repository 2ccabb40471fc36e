"""The audit log of admin changes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from admin.deps import AdminDep, LedgerDep

router = APIRouter(prefix="/v1/admin", tags=["audit"])

#: A Redis stream entry id (milliseconds-sequence), bounded so Redis accepts it.
ENTRY_ID = r"^\d{1,15}-\d{1,9}$"


@router.get("/audit")
async def audit_log(
    _: AdminDep,
    ledger: LedgerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None, Query(pattern=r"^\d{1,15}-\d{1,9}$", description="entry id")
    ] = None,
    key_id: Annotated[str | None, Query(max_length=100)] = None,
) -> dict[str, Any]:
    """Admin changes, newest first: who, what, before/after, when."""
    entries = await ledger.audit_entries(limit, before)
    if key_id is not None:
        entries = [e for e in entries if e.get("key_id") == key_id]
    return {"entries": entries, "next_before": entries[-1]["id"] if entries else None}

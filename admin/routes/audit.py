"""The audit log of admin changes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from admin.deps import AdminDep, LedgerDep

router = APIRouter(prefix="/v1/admin", tags=["audit"])

#: A Redis stream entry id (milliseconds-sequence), bounded so Redis accepts it.
ENTRY_ID = r"^\d{1,15}-\d{1,9}$"
#: Entries one request filtered by key reads at most: a key with few changes in a long log
#: costs a bounded scan per page, and a page that stops short still says where to go on.
MAX_SCANNED_ENTRIES = 10_000
#: Entries read per stream range while filtering.
_SCAN_BATCH = 500


@router.get("/audit")
async def audit_log(
    _: AdminDep,
    ledger: LedgerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[str | None, Query(pattern=ENTRY_ID, description="entry id")] = None,
    key_id: Annotated[str | None, Query(max_length=100)] = None,
) -> dict[str, Any]:
    """Admin changes, newest first: who, what, before/after, when."""
    if key_id is None:
        entries = await ledger.audit_entries(limit, before)
        return {"entries": entries, "next_before": entries[-1]["id"] if entries else None}
    # Filter before limiting: older entries are read until `limit` match or the log ends.
    matches: list[dict[str, Any]] = []
    scanned, cursor = 0, before
    while True:
        want = min(max(limit, _SCAN_BATCH), MAX_SCANNED_ENTRIES - scanned)
        rows = await ledger.audit_entries(want, cursor)
        scanned += len(rows)
        for entry in rows:
            cursor = entry["id"]
            if entry.get("key_id") == key_id:
                matches.append(entry)
                if len(matches) == limit:
                    return {"entries": matches, "next_before": cursor}
        if len(rows) < want:  # the log's oldest entry was read
            return {"entries": matches, "next_before": None}
        if scanned >= MAX_SCANNED_ENTRIES:
            return {"entries": matches, "next_before": cursor}

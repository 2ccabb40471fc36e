"""Key owners: the people (or service accounts) API keys belong to. Create, list, get, update,
delete (refused while keys belong to the owner), and the bulk expiry check. Each key copies its
owner's `valid_until` (authz refuses an expired owner's keys with 403 `owner_expired` without a
lookup), so a change here is written to each of the owner's keys at once, and the check
repairs any copy that is out of date."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status

from admin.audit import record_change, record_event, snapshot
from admin.auth import Admin
from admin.deps import AdminDep, LedgerDep, OperatorDep
from admin.owner_schemas import (
    ExpiredOwnerOut,
    OwnerCheckOut,
    OwnerCreate,
    OwnerList,
    OwnerPublic,
    OwnerUpdate,
)
from atlas.keymodel import KeyRecord
from atlas.ledger.admin_protocol import AdminLedger
from atlas.ownermodel import OwnerRecord

router = APIRouter(prefix="/v1/admin/owners", tags=["owners"])


async def get_owner_or_404(ledger: AdminLedger, owner_id: str) -> OwnerRecord:
    owner = await ledger.get_owner(owner_id)
    if owner is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"owner {owner_id!r} not found")
    return owner


async def owner_keys(ledger: AdminLedger, owner_id: str) -> list[KeyRecord]:
    """The owner's keys as stored now; ids of keys deleted or moved to another owner are
    dropped from the owner's list."""
    ids = await ledger.owner_key_ids(owner_id)
    recs = [r for r in await ledger.get_keys(ids) if r.owner == owner_id]
    stale = sorted(set(ids) - {r.id for r in recs})
    await ledger.forget_owner_keys(owner_id, stale)
    return recs


async def sync_keys(
    ledger: AdminLedger, request: Request, who: Admin, owner: OwnerRecord
) -> tuple[list[KeyRecord], list[str]]:
    """Write the owner's `valid_until` to each key whose copy differs; the keys and the ids
    of those written."""
    recs, synced = [], []
    for rec in await owner_keys(ledger, owner.id):
        if rec.owner_valid_until != owner.valid_until:
            new = rec.model_copy(
                update={"owner_valid_until": owner.valid_until, "updated_at": datetime.now(UTC)}
            )
            await ledger.put_key(new)
            await record_change(ledger, request, who, "key.owner_sync", before=rec, after=new)
            rec = new
            synced.append(rec.id)
        recs.append(rec)
    return recs, synced


@router.post("", status_code=status.HTTP_201_CREATED, response_model=OwnerPublic)
async def create_owner(
    body: OwnerCreate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> OwnerPublic:
    """Register an owner; keys name it with `owner` when created or updated."""
    owner = OwnerRecord.model_validate(body.model_dump(exclude_none=True))
    if not await ledger.create_owner(owner):
        raise HTTPException(status.HTTP_409_CONFLICT, f"owner {owner.id!r} exists")
    await record_event(
        ledger, request, who, "owner.create", subject=owner.id, before=None, after=snapshot(owner)
    )
    return OwnerPublic.of(owner, datetime.now(UTC), 0)


@router.get("", response_model=OwnerList)
async def list_owners(
    _: AdminDep,
    ledger: LedgerDep,
    expired: Annotated[bool | None, Query(description="expired ones, or valid ones")] = None,
) -> OwnerList:
    """Owners by id, with how many keys each has."""
    now = datetime.now(UTC)
    owners = [o for o in await ledger.list_owners() if expired in (None, o.expired(now))]
    items = [OwnerPublic.of(o, now, len(await ledger.owner_key_ids(o.id))) for o in owners]
    return OwnerList(items=items, total=len(items))


@router.get("/{owner_id}", response_model=OwnerPublic)
async def get_owner(owner_id: str, _: AdminDep, ledger: LedgerDep) -> OwnerPublic:
    """One owner."""
    owner = await get_owner_or_404(ledger, owner_id)
    return OwnerPublic.of(owner, datetime.now(UTC), len(await owner_keys(ledger, owner_id)))


@router.patch("/{owner_id}", response_model=OwnerPublic)
async def update_owner(
    owner_id: str, body: OwnerUpdate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> OwnerPublic:
    """Change name, e-mail, metadata or `valid_until` (copied to each key at once: a past
    date refuses them on the next request, within the key cache's TTL)."""
    old = await get_owner_or_404(ledger, owner_id)
    changes = body.model_dump(exclude_unset=True)
    for field in ("name", "email", "metadata"):
        if changes.get(field, "") is None:
            del changes[field]  # null keeps them; only valid_until may be removed
    owner = OwnerRecord.model_validate(
        {**old.model_dump(), **changes, "updated_at": datetime.now(UTC)}
    )
    await ledger.put_owner(owner)
    await record_event(
        ledger,
        request,
        who,
        "owner.update",
        subject=owner.id,
        before=snapshot(old),
        after=snapshot(owner),
    )
    recs, _ = await sync_keys(ledger, request, who, owner)
    return OwnerPublic.of(owner, datetime.now(UTC), len(recs))


@router.delete("/{owner_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_owner(
    owner_id: str, who: OperatorDep, ledger: LedgerDep, request: Request
) -> None:
    """Delete an owner without keys (409 while keys belong to it: move or delete them)."""
    owner = await get_owner_or_404(ledger, owner_id)
    if recs := await owner_keys(ledger, owner_id):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"owner {owner_id!r} has {len(recs)} keys: move or delete them first",
        )
    await ledger.delete_owner(owner_id)
    await record_event(
        ledger, request, who, "owner.delete", subject=owner.id, before=snapshot(owner), after=None
    )


@router.post("/check-expired", response_model=OwnerCheckOut)
async def check_expired(
    who: OperatorDep,
    ledger: LedgerDep,
    request: Request,
    disable: Annotated[
        bool, Query(description="also disable the active keys of expired owners")
    ] = False,
) -> OwnerCheckOut:
    """The bulk check: every owner's keys get its current `valid_until` (repairing any copy
    a failed update left behind), and the expired owners are listed with their keys;
    `disable=true` also sets their active keys to `disabled`, so they stay refused even if
    the owner's date is later moved."""
    now = datetime.now(UTC)
    owners = await ledger.list_owners()
    synced: list[str] = []
    expired: list[ExpiredOwnerOut] = []
    for owner in owners:
        recs, written = await sync_keys(ledger, request, who, owner)
        synced += written
        if owner.valid_until is None or not owner.expired(now):
            continue
        disabled = []
        for rec in recs:
            if disable and rec.status == "active":
                new = rec.model_copy(update={"status": "disabled", "updated_at": now})
                await ledger.put_key(new)
                await record_change(ledger, request, who, "key.revoke", before=rec, after=new)
                disabled.append(rec.id)
        expired.append(
            ExpiredOwnerOut(
                id=owner.id,
                valid_until=owner.valid_until,
                keys=[r.id for r in recs],
                disabled=disabled,
            )
        )
    result = OwnerCheckOut(checked_at=now, owners=len(owners), synced=synced, expired=expired)
    await record_event(
        ledger,
        request,
        who,
        "owner.check_expired",
        subject="*",
        before=None,
        after=result.model_dump(mode="json"),
    )
    return result

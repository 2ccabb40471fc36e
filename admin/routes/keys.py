"""API keys: create (secret shown once), list, get, update, rotate, delete."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Query, status

from admin.deps import AdminDep, LedgerDep, SettingsDep
from admin.schemas import KeyCreate, KeyCreated, KeyList, KeyPublic, KeyUpdate
from atlas.keymodel import KeyRecord, hash_secret, new_key_id, new_secret

router = APIRouter(prefix="/v1/admin/keys", tags=["keys"])

SECRET_HINT_CHARS = 12


async def _get(ledger: LedgerDep, key_id: str) -> KeyRecord:
    rec = await ledger.get_key(key_id)
    if rec is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id!r} not found")
    return rec


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(
    body: KeyCreate, _: AdminDep, ledger: LedgerDep, settings: SettingsDep
) -> KeyCreated:
    """Create an API key; the response carries its secret, once."""
    secret = body.api_key or new_secret()
    fields = body.model_dump(exclude_none=True, exclude={"api_key"})
    rec = KeyRecord(
        id=new_key_id(),
        secret_hash=hash_secret(secret),
        secret_hint=secret[:SECRET_HINT_CHARS] + "…",
        **{
            "daily_limit": settings.default_daily_limit,
            "monthly_limit": settings.default_monthly_limit,
            "rate_per_sec": settings.default_rate_per_sec,
            "burst": settings.default_burst,
            **fields,
        },
    )
    try:
        await ledger.create_key(rec)
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return KeyCreated(**KeyPublic.of(rec).model_dump(), api_key=secret)


@router.get("", response_model=KeyList)
async def list_keys(
    _: AdminDep,
    ledger: LedgerDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> KeyList:
    """List API keys, oldest first."""
    ids = await ledger.list_key_ids(offset, limit)
    items = [KeyPublic.of(r) for r in [await ledger.get_key(i) for i in ids] if r is not None]
    return KeyList(items=items, total=await ledger.count_keys(), offset=offset, limit=limit)


@router.get("/{key_id}", response_model=KeyPublic)
async def get_key(key_id: str, _: AdminDep, ledger: LedgerDep) -> KeyPublic:
    """One API key (never its secret)."""
    return KeyPublic.of(await _get(ledger, key_id))


@router.patch("/{key_id}", response_model=KeyPublic)
async def update_key(key_id: str, body: KeyUpdate, _: AdminDep, ledger: LedgerDep) -> KeyPublic:
    """Change limits, status, priority or expiry; every authz replica sees it within 1 s."""
    rec = await _get(ledger, key_id)
    changes = body.model_dump(exclude_unset=True)
    updated = rec.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
    updated = KeyRecord.model_validate(updated.model_dump())
    await ledger.put_key(updated)
    return KeyPublic.of(updated)


@router.post("/{key_id}/rotate", response_model=KeyCreated)
async def rotate_key(key_id: str, _: AdminDep, ledger: LedgerDep) -> KeyCreated:
    """Replace the secret; the old one stops working at once."""
    rec = await _get(ledger, key_id)
    secret = new_secret()
    updated = rec.model_copy(
        update={
            "secret_hash": hash_secret(secret),
            "secret_hint": secret[:SECRET_HINT_CHARS] + "…",
            "updated_at": datetime.now(UTC),
        }
    )
    await ledger.put_key(updated, old_secret_hash=rec.secret_hash)
    return KeyCreated(**KeyPublic.of(updated).model_dump(), api_key=secret)


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_key(key_id: str, _: AdminDep, ledger: LedgerDep) -> None:
    """Revoke and delete a key; its usage history stays until it expires."""
    await ledger.delete_key(await _get(ledger, key_id))

"""Internal apps: create (an optional shared secret shown once), list, get, update (limits,
status, principals), rotate the shared secret, delete. An app's record is a key record
(`app` set) whose bearer secret nobody was shown: authz finds it by the mTLS principal Envoy
verified or by x-atlas-app-id + x-atlas-app-secret (atlas/identity.py), limits and accounts
it like any key, and its usage is the key's (/v1/admin/keys/{key_id}/usage)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status

from admin.app_schemas import AppCreate, AppCreated, AppList, AppPublic, AppUpdate
from admin.audit import record_event
from admin.deps import AdminDep, LedgerDep, OperatorDep, SettingsDep
from admin.routes.keys import check_priorities, keep_team_zone, team_zone
from atlas.identity import app_secret_hash
from atlas.keymodel import KeyRecord, hash_secret, new_key_id, new_secret
from atlas.ledger.admin_protocol import AdminLedger
from atlas.limits import MAX_LIST_OFFSET

router = APIRouter(prefix="/v1/admin/apps", tags=["apps"])


async def get_app_or_404(ledger: AdminLedger, app_id: str) -> KeyRecord:
    key_id = await ledger.app_key_id(app_id)
    rec = await ledger.get_key(key_id) if key_id else None
    if rec is None or rec.app != app_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"app {app_id!r} not found")
    return rec


def _audited(rec: KeyRecord | None) -> dict[str, Any] | None:
    return None if rec is None else AppPublic.of(rec).model_dump(mode="json")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AppCreated)
async def create_app(
    body: AppCreate, who: OperatorDep, ledger: LedgerDep, settings: SettingsDep, request: Request
) -> AppCreated:
    """Register an app by its principals and/or a shared secret (at least one)."""
    if not body.principals and not body.shared_secret:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "an app needs principals, shared_secret: true, or both",
        )
    fields = body.model_dump(exclude_none=True, exclude={"id", "shared_secret"})
    if body.team is not None:
        fields["window_timezone"] = await team_zone(ledger, body.team, body.window_timezone)
    secret = new_secret() if body.shared_secret else None
    rec = KeyRecord(
        id=new_key_id(body.team),
        secret_hash=hash_secret(new_secret()),  # a bearer secret nobody holds
        secret_hint="app",
        app=body.id,
        app_secret_hash=app_secret_hash(body.id, secret) if secret else None,
        **{
            "daily_limit": settings.default_daily_limit,
            "monthly_limit": settings.default_monthly_limit,
            "rate_per_sec": settings.default_rate_per_sec,
            "burst": settings.default_burst,
            **fields,
        },
    )
    check_priorities(rec, set(fields))
    if not await ledger.claim_app(body.id, rec.id):
        raise HTTPException(status.HTTP_409_CONFLICT, f"app {body.id!r} already exists")
    try:
        await ledger.create_key(rec)
    except ValueError as exc:
        await ledger.drop_app(body.id)
        raise HTTPException(
            status.HTTP_409_CONFLICT, "a principal of this app already identifies another app"
        ) from exc
    await record_event(
        ledger, request, who, "app.create", subject=body.id, before=None, after=_audited(rec)
    )
    return AppCreated(**AppPublic.of(rec).model_dump(), app_secret=secret)


@router.get("", response_model=AppList)
async def list_apps(
    _: AdminDep,
    ledger: LedgerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> AppList:
    """Apps by id."""
    index = await ledger.app_ids()
    page = list(index.items())[offset : offset + limit]
    recs = await ledger.get_keys([key_id for _, key_id in page])
    return AppList(
        items=[AppPublic.of(r) for r in recs if r.app is not None],
        total=len(index),
        offset=offset,
        limit=limit,
    )


@router.get("/{app_id}", response_model=AppPublic)
async def get_app(app_id: str, _: AdminDep, ledger: LedgerDep) -> AppPublic:
    return AppPublic.of(await get_app_or_404(ledger, app_id))


@router.patch("/{app_id}", response_model=AppPublic)
async def update_app(
    app_id: str, body: AppUpdate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> AppPublic:
    """Change an app's limits, status or principals; every authz replica sees it at once."""
    rec = await get_app_or_404(ledger, app_id)
    changes = body.model_dump(exclude_unset=True)
    keep_team_zone(rec, changes)
    for field in ("name", "status", "principals"):  # null means "leave it"
        if field in changes and changes[field] is None:
            del changes[field]
    updated = KeyRecord.model_validate(
        {**rec.model_dump(), **changes, "updated_at": datetime.now(UTC)}
    )
    if not updated.principals and updated.app_secret_hash is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "an app without a shared secret needs principals"
        )
    check_priorities(updated, set(changes))
    try:
        await ledger.put_key(updated, old_lookup_hashes=rec.lookup_hashes())
    except ValueError as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "a principal of this app already identifies another app"
        ) from exc
    before, after = _audited(rec), _audited(updated)
    await record_event(
        ledger, request, who, "app.update", subject=app_id, before=before, after=after
    )
    return AppPublic.of(updated)


@router.post("/{app_id}/rotate-secret", response_model=AppCreated)
async def rotate_app_secret(
    app_id: str, who: OperatorDep, ledger: LedgerDep, request: Request
) -> AppCreated:
    """Issue a new shared secret (the old one stops working at once); also gives an app
    known only by principals a secret."""
    rec = await get_app_or_404(ledger, app_id)
    secret = new_secret()
    updated = rec.model_copy(
        update={"app_secret_hash": app_secret_hash(app_id, secret), "updated_at": datetime.now(UTC)}
    )
    await ledger.put_key(updated, old_lookup_hashes=rec.lookup_hashes())
    before, after = _audited(rec), _audited(updated)
    await record_event(
        ledger, request, who, "app.rotate_secret", subject=app_id, before=before, after=after
    )
    return AppCreated(**AppPublic.of(updated).model_dump(), app_secret=secret)


@router.delete("/{app_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_app(app_id: str, who: OperatorDep, ledger: LedgerDep, request: Request) -> None:
    """Delete an app: its principals and secret stop identifying anything at once; its usage
    history stays until it expires."""
    rec = await get_app_or_404(ledger, app_id)
    await ledger.delete_key(rec)
    await ledger.drop_app(app_id)
    await record_event(
        ledger, request, who, "app.delete", subject=app_id, before=_audited(rec), after=None
    )

"""Named admin credentials, managed by owners: create (the token shown once), list, get,
change role or disable, rotate (the old token stops at once on this replica, within the
5 s lookup cache on others), delete. Stored as token hashes only (atlas/ledger/redis/
admins.py); every change audited with who made it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from admin.audit import record_event
from admin.auth import BOOTSTRAP_NAME, Authenticator, new_admin_token, token_hash
from admin.auth_store import AdminRecord, AdminStore, Role
from admin.deps import AuthDep, LedgerDep, OwnerDep
from atlas.keymodel import TEAM_ID_PATTERN

router = APIRouter(prefix="/v1/admin/admins", tags=["admins"])


class AdminCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=TEAM_ID_PATTERN, description="A slug naming the person or tool")
    role: Role = "viewer"


class AdminUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role | None = None
    disabled: bool | None = None


class AdminPublic(BaseModel):
    name: str
    role: Role
    disabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, rec: AdminRecord) -> AdminPublic:
        return cls.model_validate(rec.model_dump(exclude={"token_hash"}))


class AdminCreated(AdminPublic):
    token: str = Field(description="The admin token. Shown once; only its hash is stored.")


class AdminList(BaseModel):
    items: list[AdminPublic]


def _store(auth: Authenticator) -> AdminStore:
    if auth.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no admin store configured")
    return auth.store


async def _get(store: AdminStore, name: str) -> AdminRecord:
    raw = await store.get_admin(name)
    if raw is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"admin {name!r} not found")
    return AdminRecord.model_validate_json(raw)


def _audited(rec: AdminRecord | None) -> dict[str, Any] | None:
    return None if rec is None else AdminPublic.of(rec).model_dump(mode="json")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AdminCreated)
async def create_admin(
    body: AdminCreate, who: OwnerDep, auth: AuthDep, ledger: LedgerDep, request: Request
) -> AdminCreated:
    if body.name == BOOTSTRAP_NAME:
        raise HTTPException(status.HTTP_409_CONFLICT, "'bootstrap' is ATLAS_ADMIN_TOKEN's name")
    token = new_admin_token()
    rec = AdminRecord(name=body.name, role=body.role, token_hash=token_hash(token))
    if not await _store(auth).create_admin(rec.name, rec.model_dump_json(), rec.token_hash):
        raise HTTPException(status.HTTP_409_CONFLICT, f"admin {body.name!r} already exists")
    auth.forget()
    await record_event(
        ledger, request, who, "admin.create", subject=rec.name, before=None, after=_audited(rec)
    )
    return AdminCreated(**AdminPublic.of(rec).model_dump(), token=token)


@router.get("", response_model=AdminList)
async def list_admins(_: OwnerDep, auth: AuthDep) -> AdminList:
    records = await _store(auth).admin_records()
    return AdminList(
        items=[AdminPublic.of(AdminRecord.model_validate_json(r)) for r in records.values()]
    )


@router.get("/{name}", response_model=AdminPublic)
async def get_admin(name: str, _: OwnerDep, auth: AuthDep) -> AdminPublic:
    return AdminPublic.of(await _get(_store(auth), name))


async def _replace(
    auth: Authenticator, old: AdminRecord, new: AdminRecord, *, rotated: bool
) -> None:
    await _store(auth).put_admin(
        new.name,
        new.model_dump_json(),
        old_token_hash=old.token_hash if rotated else None,
        new_token_hash=new.token_hash if rotated else None,
    )
    auth.forget()


@router.patch("/{name}", response_model=AdminPublic)
async def update_admin(
    name: str, body: AdminUpdate, who: OwnerDep, auth: AuthDep, ledger: LedgerDep, request: Request
) -> AdminPublic:
    rec = await _get(_store(auth), name)
    changes = {k: v for k, v in body.model_dump().items() if v is not None}
    new = rec.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
    await _replace(auth, rec, new, rotated=False)
    before, after = _audited(rec), _audited(new)
    await record_event(
        ledger, request, who, "admin.update", subject=name, before=before, after=after
    )
    return AdminPublic.of(new)


@router.post("/{name}/rotate", response_model=AdminCreated)
async def rotate_admin(
    name: str, who: OwnerDep, auth: AuthDep, ledger: LedgerDep, request: Request
) -> AdminCreated:
    rec = await _get(_store(auth), name)
    token = new_admin_token()
    new = rec.model_copy(update={"token_hash": token_hash(token), "updated_at": datetime.now(UTC)})
    await _replace(auth, rec, new, rotated=True)
    await record_event(ledger, request, who, "admin.rotate", subject=name, before=None, after=None)
    return AdminCreated(**AdminPublic.of(new).model_dump(), token=token)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_admin(
    name: str, who: OwnerDep, auth: AuthDep, ledger: LedgerDep, request: Request
) -> None:
    store = _store(auth)
    rec = await _get(store, name)
    await store.delete_admin(name, rec.token_hash)
    auth.forget()
    await record_event(
        ledger, request, who, "admin.delete", subject=name, before=_audited(rec), after=None
    )

"""API keys: create (secret shown once), list, get, update, rotate, delete."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError

from admin.audit import record_change
from admin.deps import AdminDep, LedgerDep, OperatorDep, SettingsDep
from admin.schemas import KeyCreate, KeyCreated, KeyList, KeyPublic, KeyUpdate
from atlas.keymodel import (
    KeyRecord,
    KeyStatus,
    hash_secret,
    new_key_id,
    new_secret,
    priority_rank,
    secret_hint,
)
from atlas.limits import MAX_LIST_OFFSET
from atlas.settings import Priority

router = APIRouter(prefix="/v1/admin/keys", tags=["keys"])

#: Filtered listings read records this many at a time.
LIST_SCAN_PAGE = 500


async def _get(ledger: LedgerDep, key_id: str) -> KeyRecord:
    rec = await ledger.get_key(key_id)
    if rec is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id!r} not found")
    return rec


def _not_an_app(rec: KeyRecord) -> None:
    """An app's identities are kept with its record: it is rotated and deleted as an app."""
    if rec.app is not None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"{rec.id!r} is app {rec.app!r}: use /v1/admin/apps"
        )


def check_priorities(rec: KeyRecord, sent: set[str]) -> None:
    """A key's default priority may not exceed its max_priority (requests would run above
    the cap). Checked on the record as it would be stored, so a create that names only one of
    them (the other is the default) and an update that changes only one are both covered."""
    if priority_rank(rec.priority) <= priority_rank(rec.max_priority):
        return
    field = "priority" if "priority" in sent or "max_priority" not in sent else "max_priority"
    raise RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("body", field),
                "msg": f"priority {rec.priority!r} is above max_priority {rec.max_priority!r}",
                "input": getattr(rec, field),
            }
        ]
    )


def _invalid(field: str, msg: str, value: object) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": msg, "input": value}]
    )


async def team_zone(ledger: LedgerDep, team_id: str, asked: str | None) -> str | None:
    """A key of a team counts in the team's windows, so it uses the team's zone."""
    team = await ledger.get_team(team_id)
    if team is None:
        raise _invalid("team", f"team {team_id!r} does not exist", team_id)
    if asked is not None and asked != team.window_timezone:
        raise _invalid(
            "window_timezone",
            f"a key of team {team_id!r} uses the team's zone ({team.window_timezone})",
            asked,
        )
    return team.window_timezone


async def owner_end(ledger: LedgerDep, owner_id: str | None) -> datetime | None:
    """The `valid_until` a key of this owner copies (422 naming body.owner if unknown)."""
    if owner_id is None:
        return None
    owner = await ledger.get_owner(owner_id)
    if owner is None:
        raise _invalid("owner", f"owner {owner_id!r} does not exist", owner_id)
    return owner.valid_until


def keep_team_zone(rec: KeyRecord, changes: dict[str, Any]) -> None:
    """A key (or app) of a team keeps the team's zone: its windows are the team's too."""
    if rec.team and changes.get("window_timezone", rec.window_timezone) != rec.window_timezone:
        raise _invalid(
            "window_timezone", "a key of a team uses the team's zone", changes["window_timezone"]
        )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(
    body: KeyCreate, who: OperatorDep, ledger: LedgerDep, settings: SettingsDep, request: Request
) -> KeyCreated:
    """Create an API key; the response carries its secret, once."""
    secret = body.api_key or new_secret()
    fields = body.model_dump(exclude_none=True, exclude={"api_key"})
    if body.team is not None:
        fields["window_timezone"] = await team_zone(ledger, body.team, body.window_timezone)
    fields["owner_valid_until"] = await owner_end(ledger, body.owner)
    rec = KeyRecord(
        id=new_key_id(body.team),
        secret_hash=hash_secret(secret),
        secret_hint=secret_hint(secret),
        **{
            "daily_limit": settings.default_daily_limit,
            "monthly_limit": settings.default_monthly_limit,
            "rate_per_sec": settings.default_rate_per_sec,
            "burst": settings.default_burst,
            **fields,
        },
    )
    check_priorities(rec, set(fields))
    try:
        await ledger.create_key(rec)
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    await record_change(ledger, request, who, "key.create", before=None, after=rec)
    return KeyCreated(**KeyPublic.of(rec).model_dump(), api_key=secret)


@router.get("", response_model=KeyList)
async def list_keys(
    _: AdminDep,
    ledger: LedgerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    status_: Annotated[KeyStatus | None, Query(alias="status")] = None,
    priority: Priority | None = None,
    name: Annotated[str | None, Query(max_length=200, description="substring, any case")] = None,
    team: Annotated[
        str | None, Query(max_length=200, description="the key's team (or metadata.team)")
    ] = None,
    tag: Annotated[str | None, Query(max_length=200, description="one of metadata.tags")] = None,
) -> KeyList:
    """List API keys, oldest first, optionally filtered."""
    if not any((status_, priority, name, team, tag)):
        recs = await ledger.get_keys(await ledger.list_key_ids(offset, limit))
        return KeyList(
            items=[KeyPublic.of(r) for r in recs],
            total=await ledger.count_keys(),
            offset=offset,
            limit=limit,
        )

    def wanted(r: KeyRecord) -> bool:
        tags = r.metadata.get("tags")
        return (
            (status_ is None or r.status == status_)
            and (priority is None or r.priority == priority)
            and (name is None or name.lower() in r.name.lower())
            and (team is None or team in (r.team, r.metadata.get("team")))
            and (tag is None or (isinstance(tags, list) and tag in tags))
        )

    matches: list[KeyRecord] = []
    start = 0
    while ids := await ledger.list_key_ids(start, LIST_SCAN_PAGE):
        matches += [r for r in await ledger.get_keys(ids) if wanted(r)]
        start += len(ids)
    page = matches[offset : offset + limit]
    return KeyList(
        items=[KeyPublic.of(r) for r in page], total=len(matches), offset=offset, limit=limit
    )


@router.get("/{key_id}", response_model=KeyPublic)
async def get_key(key_id: str, _: AdminDep, ledger: LedgerDep) -> KeyPublic:
    """One API key (never its secret)."""
    return KeyPublic.of(await _get(ledger, key_id))


@router.patch("/{key_id}", response_model=KeyPublic)
async def update_key(
    key_id: str, body: KeyUpdate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> KeyPublic:
    """Change limits, status, priority or expiry; every authz replica sees it within 1 s."""
    rec = await _get(ledger, key_id)
    changes = body.model_dump(exclude_unset=True)
    keep_team_zone(rec, changes)
    if "owner" in changes:
        changes["owner_valid_until"] = await owner_end(ledger, changes["owner"])
    updated = rec.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
    updated = KeyRecord.model_validate(updated.model_dump())
    check_priorities(updated, set(changes))
    await ledger.put_key(updated)
    await record_change(ledger, request, who, "key.update", before=rec, after=updated)
    return KeyPublic.of(updated)


@router.post("/{key_id}/revoke", response_model=KeyPublic)
async def revoke_key(
    key_id: str, who: OperatorDep, ledger: LedgerDep, request: Request
) -> KeyPublic:
    """Disable a key (kept, with its history); refused everywhere within 1 s."""
    rec = await _get(ledger, key_id)
    updated = rec.model_copy(update={"status": "disabled", "updated_at": datetime.now(UTC)})
    await ledger.put_key(updated)
    await record_change(ledger, request, who, "key.revoke", before=rec, after=updated)
    return KeyPublic.of(updated)


@router.post("/{key_id}/rotate", response_model=KeyCreated)
async def rotate_key(
    key_id: str, who: OperatorDep, ledger: LedgerDep, request: Request
) -> KeyCreated:
    """Replace the secret; the old one stops working at once."""
    rec = await _get(ledger, key_id)
    _not_an_app(rec)
    secret = new_secret()
    updated = rec.model_copy(
        update={
            "secret_hash": hash_secret(secret),
            "secret_hint": secret_hint(secret),
            "updated_at": datetime.now(UTC),
        }
    )
    await ledger.put_key(updated, old_secret_hash=rec.secret_hash)
    await record_change(ledger, request, who, "key.rotate", before=rec, after=updated)
    return KeyCreated(**KeyPublic.of(updated).model_dump(), api_key=secret)


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_key(key_id: str, who: OperatorDep, ledger: LedgerDep, request: Request) -> None:
    """Delete a key; its usage history stays until it expires."""
    rec = await _get(ledger, key_id)
    _not_an_app(rec)
    await ledger.delete_key(rec)
    await record_change(ledger, request, who, "key.delete", before=rec, after=None)

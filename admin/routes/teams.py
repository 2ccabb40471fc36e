"""Teams: create, list, get, update (limits take effect on the next admission), delete (a
team with keys is refused), and the team's usage over all its keys."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status

from admin.audit import record_event, snapshot
from admin.deps import AdminDep, LedgerDep, OperatorDep
from admin.routes.usage import window_out
from admin.team_schemas import TeamCreate, TeamList, TeamPublic, TeamUpdate, TeamUsageOut
from atlas.ledger.admin_protocol import AdminLedger
from atlas.limits import MAX_LIST_OFFSET
from atlas.teammodel import TeamRecord

router = APIRouter(prefix="/v1/admin/teams", tags=["teams"])


async def get_team_or_404(ledger: AdminLedger, team_id: str) -> TeamRecord:
    team = await ledger.get_team(team_id)
    if team is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"team {team_id!r} not found")
    return team


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TeamPublic)
async def create_team(
    body: TeamCreate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> TeamPublic:
    """Create a team; its limits apply to every key created in it."""
    team = TeamRecord.model_validate(body.model_dump(exclude_none=True))
    try:
        await ledger.create_team(team)
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    await record_event(
        ledger, request, who, "team.create", subject=team.id, before=None, after=snapshot(team)
    )
    return TeamPublic.of(team)


@router.get("", response_model=TeamList)
async def list_teams(
    _: AdminDep,
    ledger: LedgerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> TeamList:
    """Teams, oldest first, with how many keys each has."""
    teams = await ledger.list_teams(offset, limit)
    items = [TeamPublic.of(t, len(await ledger.team_key_ids(t.id))) for t in teams]
    return TeamList(items=items, total=await ledger.count_teams(), offset=offset, limit=limit)


@router.get("/{team_id}", response_model=TeamPublic)
async def get_team(team_id: str, _: AdminDep, ledger: LedgerDep) -> TeamPublic:
    team = await get_team_or_404(ledger, team_id)
    return TeamPublic.of(team, len(await ledger.team_key_ids(team.id)))


@router.patch("/{team_id}", response_model=TeamPublic)
async def update_team(
    team_id: str, body: TeamUpdate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> TeamPublic:
    """Change a team's limits: every replica's next admission enforces them (they are read
    by the admission script itself, not cached)."""
    team = await get_team_or_404(ledger, team_id)
    changes = body.model_dump(exclude_unset=True)
    if "window_timezone" in changes and await ledger.team_key_ids(team_id):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "a team's window_timezone is fixed once it has keys (its windows and theirs align)",
        )
    for field in ("name", "metadata"):  # not limits: null means "leave it"
        if changes.get(field, "") is None:
            del changes[field]
    updated = TeamRecord.model_validate(
        {**team.model_dump(), **changes, "updated_at": datetime.now(UTC)}
    )
    await ledger.put_team(updated)
    before, after = snapshot(team), snapshot(updated)
    await record_event(
        ledger, request, who, "team.update", subject=team.id, before=before, after=after
    )
    return TeamPublic.of(updated, len(await ledger.team_key_ids(team.id)))


@router.delete("/{team_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_team(team_id: str, who: OperatorDep, ledger: LedgerDep, request: Request) -> None:
    """Delete a team without keys (409 while it has any)."""
    team = await get_team_or_404(ledger, team_id)
    try:
        await ledger.delete_team(team_id)
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    await record_event(
        ledger, request, who, "team.delete", subject=team.id, before=snapshot(team), after=None
    )


@router.get("/{team_id}/usage", response_model=TeamUsageOut)
async def team_usage(team_id: str, _: AdminDep, ledger: LedgerDep) -> TeamUsageOut:
    """The team's day and month windows (over all its keys) and its keys."""
    team = await get_team_or_404(ledger, team_id)
    day, month = await ledger.team_usage(team)
    return TeamUsageOut(
        team=team.id,
        daily=window_out(day),
        monthly=window_out(month),
        monthly_budget_usd=team.monthly_budget_usd,
        key_ids=await ledger.team_key_ids(team.id),
    )

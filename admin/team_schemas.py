"""Admin API shapes of teams: limits over all of a team's keys, bounded like a key's."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from admin.schemas import BoundedMetadata, KnownZone, WindowOut
from atlas.keymodel import TEAM_ID_PATTERN
from atlas.limits import (
    MAX_BUDGET_USD,
    MAX_BURST,
    MAX_RATE_PER_SEC,
    MAX_TOKEN_LIMIT,
    MIN_BUDGET_USD,
    MIN_RATE_PER_SEC,
)
from atlas.teammodel import TeamRecord


class _TeamLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, max_length=200)
    rate_per_sec: float | None = Field(
        None, ge=MIN_RATE_PER_SEC, le=MAX_RATE_PER_SEC, description="Requests/s over all keys"
    )
    burst: int | None = Field(None, ge=1, le=MAX_BURST, description="Requests allowed at once")
    tokens_per_minute: int | None = Field(None, ge=1, le=MAX_TOKEN_LIMIT)
    daily_limit: int | None = Field(None, ge=0, le=MAX_TOKEN_LIMIT, description="Tokens per day")
    monthly_limit: int | None = Field(None, ge=0, le=MAX_TOKEN_LIMIT)
    monthly_budget_usd: float | None = Field(None, ge=MIN_BUDGET_USD, le=MAX_BUDGET_USD)
    window_timezone: KnownZone = Field(
        None, max_length=64, description="IANA zone of the team's (and its keys') windows"
    )
    metadata: BoundedMetadata = None


class TeamCreate(_TeamLimits):
    id: str = Field(
        pattern=TEAM_ID_PATTERN,
        description="A slug (lowercase letters, digits, '-', up to 32): in key ids and refusals",
        examples=["research"],
    )


class TeamUpdate(_TeamLimits):
    """Unset fields stay; a limit sent as null is removed (a null name or metadata stays)."""


class TeamPublic(BaseModel):
    id: str
    name: str
    rate_per_sec: float | None
    burst: int | None
    tokens_per_minute: int | None
    daily_limit: int | None
    monthly_limit: int | None
    monthly_budget_usd: float | None
    window_timezone: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    keys: int = Field(0, description="How many API keys belong to the team")

    @classmethod
    def of(cls, team: TeamRecord, keys: int = 0) -> TeamPublic:
        return cls.model_validate({**team.model_dump(), "keys": keys})


class TeamList(BaseModel):
    items: list[TeamPublic]
    total: int
    offset: int
    limit: int


class TeamUsageOut(BaseModel):
    team: str
    daily: WindowOut
    monthly: WindowOut
    monthly_budget_usd: float | None
    key_ids: list[str]

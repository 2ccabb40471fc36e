"""Admin API shapes. `KeyCreated` is the only schema that carries a secret."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from atlas.keymodel import TEAM_ID_PATTERN, KeyRecord, KeyStatus
from atlas.limits import (
    MAX_BUDGET_USD,
    MAX_BURST,
    MAX_CONCURRENT,
    MAX_END_USER_RPM,
    MAX_KEY_MODELS,
    MAX_METADATA_BYTES,
    MAX_MODEL_NAME_CHARS,
    MAX_RATE_PER_SEC,
    MAX_TOKEN_LIMIT,
    MIN_BUDGET_USD,
    MIN_RATE_PER_SEC,
)
from atlas.ownermodel import OWNER_ID_PATTERN
from atlas.settings import Priority
from atlas.windows import load_zone


def _bounded_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is limited to {MAX_METADATA_BYTES} bytes of JSON")
    return value


def _known_zone(value: str | None) -> str | None:
    if value is not None:
        load_zone(value)  # ValueError -> 422 naming the field (body.window_timezone)
    return value


#: Admin-set metadata of a key, team or owner: at most MAX_METADATA_BYTES of JSON.
BoundedMetadata = Annotated[dict[str, Any] | None, AfterValidator(_bounded_metadata)]
#: An IANA time zone this machine's tz database knows.
KnownZone = Annotated[str | None, AfterValidator(_known_zone)]


class PlanLimits(BaseModel):
    """The limits a what-if replay and a key's edit share, bounded alike: every number is
    bounded (atlas/limits.py), since Lua stores doubles and a value refused here never
    reaches Redis. NaN and infinities are refused too."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    daily_limit: int | None = Field(None, ge=0, le=MAX_TOKEN_LIMIT, description="Tokens per day")
    monthly_limit: int | None = Field(
        None, ge=0, le=MAX_TOKEN_LIMIT, description="Tokens per month"
    )
    rate_per_sec: float | None = Field(
        None, ge=MIN_RATE_PER_SEC, le=MAX_RATE_PER_SEC, description="Requests per second"
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, le=MAX_TOKEN_LIMIT, description="Token rate; unset = none"
    )


class KeyLimits(PlanLimits):
    burst: int | None = Field(None, ge=1, le=MAX_BURST, description="Requests allowed at once")
    max_concurrent: int | None = Field(
        None, ge=1, le=MAX_CONCURRENT, description="Open requests; unset = none"
    )
    end_user_daily_limit: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKEN_LIMIT,
        description="Tokens a day of each end user the caller names (x-atlas-end-user or the"
        " body's user); unset = none",
    )
    end_user_requests_per_minute: int | None = Field(
        None, ge=1, le=MAX_END_USER_RPM, description="Requests a minute of each end user"
    )
    monthly_budget_usd: float | None = Field(
        None,
        ge=MIN_BUDGET_USD,
        le=MAX_BUDGET_USD,
        description="Monthly spend limit in USD (model prices); unset = none",
    )
    priority: Priority | None = Field(
        None, description="Default priority of requests (at most max_priority)"
    )
    max_priority: Priority | None = Field(None, description="Highest priority a request may ask")
    models: list[Annotated[str, Field(max_length=MAX_MODEL_NAME_CHARS)]] | None = Field(
        None, max_length=MAX_KEY_MODELS, description="Allowed models; unset = any"
    )
    expires_at: datetime | None = None
    shadow: bool | None = Field(None, description="Record verdicts but admit everything")
    window_timezone: KnownZone = Field(
        None,
        max_length=64,
        description="IANA time zone of the daily and monthly windows (e.g. America/New_York,"
        " DST included); unset = ATLAS_WINDOW_TIMEZONE",
        examples=["Europe/Berlin"],
    )
    metadata: BoundedMetadata = Field(None, description="owner, team, tags, ...")


class KeyCreate(KeyLimits):
    name: str = Field("", max_length=200)
    team: str | None = Field(
        None,
        pattern=TEAM_ID_PATTERN,
        description="The team whose limits also apply (fixed for the key's life)",
    )
    owner: str | None = Field(
        None,
        pattern=OWNER_ID_PATTERN,
        description="The owner (/v1/admin/owners) whose valid_until also ends the key",
    )
    api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Register this secret (Atlas-style) instead of generating one",
    )


class KeyUpdate(KeyLimits):
    name: str | None = Field(None, max_length=200)
    status: KeyStatus | None = None
    owner: str | None = Field(
        None, pattern=OWNER_ID_PATTERN, description="Move the key to this owner; null: none"
    )


class KeyPublic(BaseModel):
    id: str
    name: str
    secret_hint: str
    daily_limit: int
    monthly_limit: int
    rate_per_sec: float
    burst: int
    tokens_per_minute: int | None
    max_concurrent: int | None
    monthly_budget_usd: float | None
    end_user_daily_limit: int | None = None
    end_user_requests_per_minute: int | None = None
    priority: Priority
    max_priority: Priority
    models: list[str] | None
    expires_at: datetime | None
    status: KeyStatus
    shadow: bool
    window_timezone: str | None = None
    team: str | None = None
    owner: str | None = None
    owner_valid_until: datetime | None = None
    app: str | None = Field(None, description="The internal app this record is (/v1/admin/apps)")
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, rec: KeyRecord) -> KeyPublic:
        return cls.model_validate(
            rec.model_dump(exclude={"secret_hash", "app_secret_hash", "principals"})
        )


class KeyCreated(KeyPublic):
    api_key: str = Field(description="The secret. Shown once; only its hash is stored.")


class KeyList(BaseModel):
    items: list[KeyPublic]
    total: int
    offset: int
    limit: int


class WindowOut(BaseModel):
    limit: int
    used: int
    reserved: int
    remaining: int
    requests: int
    resets_at: datetime
    spend_usd: float
    cached: int = Field(
        description="Settled prompt tokens read from the upstream's cache (counted in `used`"
        " unless ATLAS_QUOTA_COUNTS_CACHED=false)"
    )
    cache_write: int = Field(description="Settled prompt tokens written to a prompt cache")
    reasoning: int = Field(description="Settled completion tokens spent reasoning")


class UsageOut(BaseModel):
    key_id: str
    priority: Priority
    daily: WindowOut
    monthly: WindowOut
    open_reservations: int
    monthly_budget_usd: float | None
    # Atlas's flat fields, kept for its clients.
    daily_used: int
    daily_limit: int
    monthly_used: int
    monthly_limit: int

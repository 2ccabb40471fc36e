"""Admin API shapes. `KeyCreated` is the only schema that carries a secret."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from atlas.keymodel import KeyRecord, KeyStatus
from atlas.settings import Priority


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    daily_limit: int | None = Field(None, ge=0, description="Tokens per day")
    monthly_limit: int | None = Field(None, ge=0, description="Tokens per month")
    rate_per_sec: float | None = Field(None, gt=0, le=1e6, description="Requests per second")
    burst: int | None = Field(None, ge=1, le=1_000_000, description="Requests allowed at once")
    tokens_per_minute: int | None = Field(None, ge=1, description="Token rate; unset = none")
    max_concurrent: int | None = Field(None, ge=1, description="Open requests; unset = none")
    monthly_budget_usd: float | None = Field(
        None, gt=0, description="Monthly spend limit in USD (model prices); unset = none"
    )
    priority: Priority | None = Field(None, description="Default priority of requests")
    max_priority: Priority | None = Field(None, description="Highest priority a request may ask")
    models: list[str] | None = Field(None, description="Allowed models; unset = any")
    expires_at: datetime | None = None
    shadow: bool | None = Field(None, description="Record verdicts but admit everything")
    metadata: dict[str, Any] | None = Field(None, description="owner, team, tags, ...")


class KeyCreate(_Limits):
    name: str = Field("", max_length=200)
    api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Register this secret (Atlas-style) instead of generating one",
    )


class KeyUpdate(_Limits):
    name: str | None = Field(None, max_length=200)
    status: KeyStatus | None = None


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
    priority: Priority
    max_priority: Priority
    models: list[str] | None
    expires_at: datetime | None
    status: KeyStatus
    shadow: bool
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, rec: KeyRecord) -> KeyPublic:
        return cls.model_validate(rec.model_dump(exclude={"secret_hash"}))


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

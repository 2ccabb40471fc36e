"""Admin API shapes of key owners: the people keys belong to and the date their keys stop."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from admin.schemas import BoundedMetadata
from atlas.ownermodel import OWNER_ID_PATTERN, OwnerRecord


class _OwnerFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    email: str | None = Field(None, max_length=254)
    valid_until: datetime | None = Field(
        None, description="When the owner's keys stop working (403 owner_expired); null = never"
    )
    metadata: BoundedMetadata = None

    @field_validator("valid_until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("valid_until needs a time zone (e.g. 2027-01-31T00:00:00Z)")
        return value


class OwnerCreate(_OwnerFields):
    id: str = Field(
        pattern=OWNER_ID_PATTERN,
        description="A user name, e-mail address or employee number",
        examples=["ada@example.com"],
    )


class OwnerUpdate(_OwnerFields):
    """Unset fields stay; `valid_until: null` removes the end date. A changed `valid_until`
    is copied to each of the owner's keys at once."""


class OwnerPublic(BaseModel):
    id: str
    name: str
    email: str
    valid_until: datetime | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expired: bool = Field(description="valid_until has passed: the owner's keys are refused")
    keys: int = Field(description="How many keys belong to the owner")

    @classmethod
    def of(cls, owner: OwnerRecord, now: datetime, keys: int) -> OwnerPublic:
        return cls(**owner.model_dump(), expired=owner.expired(now), keys=keys)


class OwnerList(BaseModel):
    items: list[OwnerPublic]
    total: int


class ExpiredOwnerOut(BaseModel):
    id: str
    valid_until: datetime
    keys: list[str] = Field(description="The owner's keys (each refused with owner_expired)")
    disabled: list[str] = Field(description="Active keys this check disabled (disable=true)")


class OwnerCheckOut(BaseModel):
    checked_at: datetime
    owners: int = Field(description="Owners checked")
    synced: list[str] = Field(
        description="Keys whose copy of their owner's valid_until was out of date and is now set"
    )
    expired: list[ExpiredOwnerOut]

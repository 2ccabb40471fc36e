"""Admin API shapes of internal apps: identified by mTLS principal or a shared secret with the
app id (atlas/identity.py), limited like a key (the app's record is a key record)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from admin.schemas import KeyLimits, KeyPublic
from atlas.identity import MAX_PRINCIPAL_CHARS
from atlas.keymodel import TEAM_ID_PATTERN, KeyRecord, KeyStatus

#: An app is known by at most this many principals (its SPIFFE ids, SANs).
MAX_APP_PRINCIPALS = 8

Principal = Annotated[str, Field(min_length=1, max_length=MAX_PRINCIPAL_CHARS)]


def _clean_principals(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    out = [p.strip() for p in value]
    if any(not p or any(c in p for c in ',;"\r\n') for p in out):
        raise ValueError('a principal is a URI or DNS name without , ; " or line breaks')
    if len(set(out)) != len(out):
        raise ValueError("principals repeat")
    return out


class AppCreate(KeyLimits):
    id: str = Field(
        pattern=TEAM_ID_PATTERN,
        description="The app id (a slug): what x-atlas-app-id names with a shared secret",
    )
    name: str = Field("", max_length=200)
    principals: list[Principal] = Field(
        default_factory=list,
        max_length=MAX_APP_PRINCIPALS,
        description="mTLS principals (SPIFFE id or URI/DNS SAN) the app is known by",
        examples=[["spiffe://cluster.local/ns/shop/sa/checkout"]],
    )
    shared_secret: bool = Field(
        False, description="Issue a shared secret for x-atlas-app-secret (shown once)"
    )
    team: str | None = Field(
        None, pattern=TEAM_ID_PATTERN, description="The team whose limits also apply"
    )

    _principals = field_validator("principals")(_clean_principals)


class AppUpdate(KeyLimits):
    name: str | None = Field(None, max_length=200)
    status: KeyStatus | None = None
    principals: list[Principal] | None = Field(None, max_length=MAX_APP_PRINCIPALS)

    _principals = field_validator("principals")(_clean_principals)


class AppPublic(KeyPublic):
    app: str
    principals: list[str]
    has_shared_secret: bool

    @classmethod
    def of(cls, rec: KeyRecord) -> AppPublic:
        return cls.model_validate(
            {
                **rec.model_dump(exclude={"secret_hash", "app_secret_hash"}),
                "has_shared_secret": rec.app_secret_hash is not None,
            }
        )


class AppCreated(AppPublic):
    app_secret: str | None = Field(
        description="The shared secret (with shared_secret): shown once; only its hash is kept"
    )


class AppList(BaseModel):
    items: list[AppPublic]
    total: int
    offset: int
    limit: int

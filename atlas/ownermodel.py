"""The owner record: the person (or service account) API keys belong to, with the date their
right to use them ends. Each key copies its owner's `valid_until` (admin does), so authz
refuses an expired owner's keys (403 `owner_expired`, atlas/keymodel.py) without a lookup."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Owner ids: user names, e-mail addresses, employee numbers.
OWNER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"


class OwnerRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=OWNER_ID_PATTERN)
    name: str = ""
    email: str = ""
    #: When the owner's keys stop working (None: no end).
    valid_until: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def expired(self, now: datetime) -> bool:
        return self.valid_until is not None and self.valid_until <= now

"""The API key record: what an admin configures and authz enforces.

Secrets are never stored: a key is found by the sha256 of its secret. The record is stored
as JSON by the ledger and cached by authz.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atlas.settings import PRIORITIES, Priority

SECRET_PREFIX = "sk-atlas-"
KeyStatus = Literal["active", "disabled"]


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def priority_rank(p: Priority) -> int:
    return PRIORITIES.index(p)


def cap_priority(asked: Priority, ceiling: Priority) -> Priority:
    """A request may lower its priority but never rise above the key's `max_priority`."""
    return asked if priority_rank(asked) <= priority_rank(ceiling) else ceiling


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    secret_hash: str
    secret_hint: str = Field(description="first characters of the secret, for people")
    daily_limit: int
    monthly_limit: int
    rate_per_sec: float
    burst: int
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    monthly_budget_usd: float | None = None
    priority: Priority = "normal"
    max_priority: Priority = "critical"
    models: list[str] | None = None
    expires_at: datetime | None = None
    status: KeyStatus = "active"
    shadow: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

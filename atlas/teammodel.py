"""The team record: limits over all of a team's API keys, enforced beside each key's own in
the same admission (atlas/ledger/lua/admit.lua)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from atlas import limits
from atlas.keymodel import TEAM_ID_PATTERN
from atlas.pricing import MICROS_PER_USD


class TeamRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=TEAM_ID_PATTERN)
    name: str = ""
    #: Each limit is over all the team's keys; None = none.
    rate_per_sec: float | None = None
    burst: int | None = None
    tokens_per_minute: int | None = None
    daily_limit: int | None = None
    monthly_limit: int | None = None
    monthly_budget_usd: float | None = None
    #: The zone of the team's windows; its keys' windows use it too (admin enforces it).
    window_timezone: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def enforced(self) -> dict[str, str]:
        """What admit.lua reads (the team's limits hash): bounded integers and a float rate as
        text, 0 for none. A rate without a burst gets a burst of one second's requests."""
        rate = min(self.rate_per_sec or 0.0, limits.MAX_RATE_PER_SEC)
        burst = self.burst or (max(1, round(rate)) if rate else 0)
        budget = min(self.monthly_budget_usd or 0.0, limits.MAX_BUDGET_USD)
        return {
            "rate": repr(float(rate)),
            "burst": str(min(burst, limits.MAX_BURST)),
            "tpm": str(min(self.tokens_per_minute or 0, limits.MAX_TOKEN_LIMIT)),
            "daily": str(min(self.daily_limit or 0, limits.MAX_TOKEN_LIMIT)),
            "monthly": str(min(self.monthly_limit or 0, limits.MAX_TOKEN_LIMIT)),
            "budget": str(round(budget * MICROS_PER_USD)),
        }

"""Which thresholds a scope's usage has reached (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Measure:
    """One limit of one scope in its current window."""

    limit: str  # key.daily, key.monthly, key.budget, team.daily, ...
    used: float  # settled tokens, or spend in USD
    limit_value: float  # 0 or less: unlimited, never alerts
    window: str  # the window's identity: its reset time, epoch s


def reached(m: Measure, thresholds: Sequence[int]) -> list[int]:
    """The thresholds (percent) `m.used` has reached, lowest first."""
    if m.limit_value <= 0:
        return []
    return [t for t in sorted(thresholds) if m.used * 100 >= t * m.limit_value]

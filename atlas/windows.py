"""Calendar window names in Python, matching `lua/_clock.lua` (pinned by a unit test)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(slots=True, frozen=True)
class WindowNames:
    day: str  # YYYYMMDD
    month: str  # YYYYMM
    hour: str  # YYYYMMDDHH
    day_reset_s: int
    month_reset_s: int


def window_names(epoch_s: int, tz_offset_s: int = 0) -> WindowNames:
    local = datetime.fromtimestamp(epoch_s + tz_offset_s, UTC)
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day_start + timedelta(days=1)
    if local.month == 12:
        next_month = day_start.replace(year=local.year + 1, month=1, day=1)
    else:
        next_month = day_start.replace(month=local.month + 1, day=1)
    return WindowNames(
        day=local.strftime("%Y%m%d"),
        month=local.strftime("%Y%m"),
        hour=local.strftime("%Y%m%d%H"),
        day_reset_s=int(next_day.timestamp()) - tz_offset_s,
        month_reset_s=int(next_month.timestamp()) - tz_offset_s,
    )

"""Shedding by priority when the upstream's in-flight capacity is nearly used."""

from __future__ import annotations

from atlas.inflight import InflightGauge
from atlas.settings import Priority, Settings


class Shedder:
    """Refuses lower priorities first as in-flight tokens approach the upstream's capacity."""

    def __init__(self, gauge: InflightGauge, settings: Settings) -> None:
        self.gauge = gauge
        self._capacity = settings.capacity_tokens
        self._limits: dict[str, float] = {
            "low": settings.shed_low * self._capacity,
            "normal": settings.shed_normal * self._capacity,
            "high": settings.shed_high * self._capacity,
        }

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    def sheds(self, priority: Priority, tokens: int) -> bool:
        """Whether a request of `tokens` at `priority` must wait; critical never does."""
        limit = self._limits.get(priority)
        return self.enabled and limit is not None and self.gauge.tokens + tokens > limit

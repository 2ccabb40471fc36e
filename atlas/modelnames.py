"""Bounded model names for metric labels and Redis history.

A model name is client input: every distinct string would add metric series and a 90-day
history hash. `ModelNames.fold` keeps configured models (prices, routes, `tracked_models`)
and the first `max_tracked_models` other names a process sees; everything else becomes
`OTHER`. Per process, so a fleet of N replicas holds at most N x max_tracked_models names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from atlas.limits import MAX_MODEL_NAME_CHARS

OTHER = "other"
#: Named when a request carries no model (or one we could not read).
UNKNOWN = "unknown"


def _clean(model: str) -> str:
    """Printable ASCII without braces (a brace would change a Redis hash tag), bounded."""
    return "".join(c for c in model[:MAX_MODEL_NAME_CHARS] if " " < c <= "~" and c not in "{}")


class ModelNames:
    def __init__(self, patterns: Iterable[str] = (), *, max_tracked: int = 100) -> None:
        """:param patterns: model names or `fnmatch` globs always kept by name (a lone `*`
        is ignored: it would keep everything)."""
        self._exact: set[str] = set()
        self._globs: list[str] = []
        for p in patterns:
            if p == "*" or not p:
                continue
            if any(ch in p for ch in "*?["):
                self._globs.append(p)
            else:
                self._exact.add(p)
        self._max = max_tracked
        self._seen: set[str] = set()

    @classmethod
    def from_settings(cls, settings: object) -> ModelNames:
        patterns = [
            *getattr(settings, "model_prices", {}),
            *getattr(settings, "model_routes", {}),
            *getattr(settings, "tracked_models", []),
        ]
        return cls(patterns, max_tracked=getattr(settings, "max_tracked_models", 100))

    def fold(self, model: str) -> str:
        name = _clean(model)
        if not name:
            return UNKNOWN
        if name in self._exact or name in self._seen:
            return name
        if any(fnmatch.fnmatchcase(name, g) for g in self._globs):
            return name
        if len(self._seen) < self._max:
            self._seen.add(name)
            return name
        return OTHER

"""Admission while Redis is unreachable (ATLAS_FAIL_MODE=local).

Each replica limits each key on its own, from the cached key record: the key's requests/s and
burst, and its tokens/minute or, without one, an hour's share of its daily quota. Never
unlimited; the decisions are marked degraded, and settlements still reach the ledger once it
is back (the usage is charged then).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from atlas.keymodel import KeyRecord


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float

    def take(self, n: float, rate_per_s: float, cap: float, now: float) -> float:
        """Take n if available; return 0 on success, else seconds until it would be."""
        self.tokens = min(cap, self.tokens + (now - self.at) * rate_per_s)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / rate_per_s


class LocalLimiter:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def admit(self, key: KeyRecord, tokens: int) -> float:
        """0.0 when admitted, else the seconds to wait."""
        now = self._clock()
        req = self._requests.setdefault(key.id, _Bucket(float(key.burst), now))
        if key.tokens_per_minute:
            cap, rate = float(key.tokens_per_minute), key.tokens_per_minute / 60
        else:
            cap = max(1.0, key.daily_limit / 24)
            rate = cap / 3600
        tok = self._tokens.setdefault(key.id, _Bucket(cap, now))
        need = min(float(tokens), cap)
        probe = _Bucket(tok.tokens, tok.at)
        wait_tokens = probe.take(need, rate, cap, now)
        wait_req = req.take(1, key.rate_per_sec, key.burst, now) if wait_tokens == 0 else 0.0
        if wait_tokens or wait_req:
            return max(wait_tokens, wait_req)
        tok.take(need, rate, cap, now)
        return 0.0

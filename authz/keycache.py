"""In-process cache of key records, invalidated by the ledger's pub/sub change feed.

A steady-state Check then costs no Redis round trip for the key lookup. Entries live at most
`ttl_s`; when the change feed reconnects every entry is marked stale (changes may have been
missed). Stale records stay available to `stale()` for the local fail mode, which must limit
known keys while Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from atlas.keymodel import KeyRecord

log = logging.getLogger(__name__)

#: Unknown secrets are remembered too (an attacker's random keys must not each cost a lookup),
#: but briefly and in bounded number.
NEGATIVE_TTL_S = 1.0
MAX_ENTRIES = 100_000


class KeyCache:
    def __init__(
        self,
        lookup: Callable[[str], Awaitable[KeyRecord | None]],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[KeyRecord | None, float]] = {}
        #: key id -> the secret hashes it is cached under (an app's principals and secret)
        self._ids: dict[str, set[str]] = {}

    def fresh(self, secret_hash: str) -> tuple[KeyRecord | None] | None:
        """`(record,)` while a fresh entry is cached (a None record: an unknown secret), else
        None. What `get` returns without a lookup, for callers that skip a coroutine on a hit
        (every Check of a known key)."""
        hit = self._entries.get(secret_hash)
        if hit is not None and hit[1] > self._clock():
            return (hit[0],)
        return None

    async def get(self, secret_hash: str) -> KeyRecord | None:
        hit = self._entries.get(secret_hash)
        now = self._clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        rec = await self._lookup(secret_hash)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
            self._ids.clear()
        ttl = self._ttl_s if rec is not None else min(self._ttl_s, NEGATIVE_TTL_S)
        self._entries[secret_hash] = (rec, now + ttl)
        if rec is not None:
            self._ids.setdefault(rec.id, set()).add(secret_hash)
        return rec

    def stale(self, secret_hash: str) -> KeyRecord | None:
        """The last record seen for this secret, however old (None if unknown)."""
        hit = self._entries.get(secret_hash)
        return hit[0] if hit is not None else None

    def expire_all(self) -> None:
        self._entries = {h: (rec, 0.0) for h, (rec, _) in self._entries.items() if rec}

    def invalidate(self, key_id: str) -> None:
        for secret_hash in self._ids.pop(key_id, ()):
            self._entries.pop(secret_hash, None)
        # A new key may reuse a secret we cached as unknown.
        self._entries = {h: e for h, e in self._entries.items() if e[0] is not None}

    def clear(self) -> None:
        self._entries.clear()
        self._ids.clear()

    async def follow(self, changes: Callable[[], AsyncIterator[str]]) -> None:
        """Apply the change feed forever, reconnecting with backoff."""
        delay = 0.1
        while True:
            try:
                async for key_id in changes():
                    delay = 0.1
                    if key_id == "*":  # (re)subscribed: anything cached may be stale
                        self.expire_all()
                    else:
                        self.invalidate(key_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the feed is best effort; the TTL bounds staleness
                log.warning("key change feed lost (%s); retrying in %.1fs", exc, delay)
            self.expire_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

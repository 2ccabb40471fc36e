"""The audit stream of admin changes (`Audit`): bounded, newest first."""

from __future__ import annotations

import json
from typing import Any

from atlas.ledger import keys
from atlas.ledger.redis.client import Conn

#: Audit entries kept (XADD MAXLEN ~).
AUDIT_MAX_ENTRIES = 100_000


class RedisAudit:
    def __init__(self, conn: Conn) -> None:
        self._c = conn

    async def audit(self, entry: dict[str, Any]) -> None:
        """Append one admin change to the audit stream (bounded, newest kept)."""
        fields = {"json": json.dumps(entry, default=str, separators=(",", ":"))}
        await self._c.call(
            "audit",
            lambda: self._c.r.xadd(keys.AUDIT, fields, maxlen=AUDIT_MAX_ENTRIES, approximate=True),
        )

    async def audit_entries(self, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        """Newest first; `before` is an entry id to page from."""
        if before is not None and before.strip("0-") == "":
            return []  # nothing precedes 0-0 (and Redis rejects the exclusive range)
        top = f"({before}" if before else "+"
        rows = await self._c.call("audit", lambda: self._c.r.xrevrange(keys.AUDIT, top, "-", limit))
        return [{"id": rid, **json.loads(f["json"])} for rid, f in rows]

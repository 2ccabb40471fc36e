"""Polling helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx


async def settled(admin: httpx.AsyncClient, key_id: str, timeout_s: float = 10) -> dict[str, Any]:
    """The key's usage once nothing is reserved: settlement runs after the response."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await admin.get(f"/v1/admin/keys/{key_id}/usage")
        if r.status_code == 200:
            u: dict[str, Any] = r.json()
            if u["open_reservations"] == 0 and u["daily"]["reserved"] == 0:
                return u
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.02)

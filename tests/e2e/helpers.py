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


async def charged_vs_window(redis_url: str, key_id: str) -> tuple[int, dict[str, str]]:
    """What the key's hourly history says was settled or reaped today, and today's window.

    Conservation: the first must equal the window's `used`; nothing in either is negative
    (`reaped_tokens` may dip below zero in an hour where a late settlement corrected it)."""
    import redis.asyncio as aioredis

    from atlas.ledger import keys
    from atlas.windows import window_names

    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        day = window_names(int((await r.time())[0])).day
        charged = 0
        for hour in range(24):
            h: dict[str, Any] = await r.hgetall(f"{keys.window_prefix(key_id)}h:{day}{hour:02d}")
            charged += sum(int(h.get(f, 0)) for f in ("prompt", "completion", "reaped_tokens"))
            assert all(int(v) >= 0 for f, v in h.items() if f != "reaped_tokens"), h
        window: dict[str, str] = await r.hgetall(f"{keys.window_prefix(key_id)}d:{day}")
    finally:
        await r.aclose()
    assert all(int(v) >= 0 for v in window.values()), window
    return charged, window


async def send_and_reset(port: int, data: bytes, after_s: float = 0.0) -> None:
    """Send `data` on a fresh connection to 127.0.0.1:`port`, then reset it (RST, not FIN)
    after `after_s`: a client that gives up right after sending."""
    import socket
    import struct

    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if after_s:
        await asyncio.sleep(after_s)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def upstream_saw(upstream_url: str) -> list[dict[str, Any]]:
    """The requests the demo upstream recorded (method, path, headers, body)."""
    async with httpx.AsyncClient(timeout=5) as c:
        r = await c.get(upstream_url + "/demo/requests")
    seen: list[dict[str, Any]] = r.json()
    return seen


async def clear_upstream(upstream_url: str) -> None:
    """Forget what the demo upstream recorded."""
    async with httpx.AsyncClient(timeout=5) as c:
        await c.delete(upstream_url + "/demo/requests")


async def extproc_messages(stack: Any) -> float:
    """How many ext_proc messages the stack's extproc has answered (its metrics)."""
    url = f"http://127.0.0.1:{stack.settings.extproc_metrics_port}/metrics"
    async with httpx.AsyncClient() as raw:
        text = (await raw.get(url)).text
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("atlas_extproc_messages_total{")
    )

"""Delivering one alert to one webhook: JSON body, HMAC-SHA256 signature, retries with
exponential backoff (a 2xx ends it; a 4xx other than 408/429 is final), no redirects."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

SIGNATURE_HEADER = "X-Atlas-Signature"
ALERT_ID_HEADER = "X-Atlas-Alert-Id"
#: Waits before each retry, seconds.
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Delivery:
    ok: bool
    attempts: int
    status: int  # the last answer's status (0: no answer)
    error: str = ""


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    alert_id: str,
    secret: str | None,
    *,
    backoff_s: tuple[float, ...] = BACKOFF_S,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Delivery:
    headers = {"content-type": "application/json", ALERT_ID_HEADER: alert_id}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    status, error = 0, ""
    for attempt in range(len(backoff_s) + 1):
        if attempt:
            await sleep(backoff_s[attempt - 1])
        try:
            r = await client.post(url, content=body, headers=headers, follow_redirects=False)
            status, error = r.status_code, ""
        except httpx.HTTPError as exc:
            status, error = 0, type(exc).__name__
            continue
        if 200 <= status < 300:
            return Delivery(True, attempt + 1, status)
        if 400 <= status < 500 and status not in (408, 429):
            return Delivery(False, attempt + 1, status)
    return Delivery(False, len(backoff_s) + 1, status, error)

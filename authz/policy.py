"""The admission decision, free of gRPC: identify the key, pick the priority, estimate the
tokens, run the ledger's admit script, and say yes (a `Verdict`) or no (`Denied`)."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from atlas.errors import Denied, LedgerUnavailable
from atlas.keymodel import KeyRecord, cap_priority, hash_secret
from atlas.ledger.protocol import Admission, AdmitRequest, Ledger
from atlas.requestbody import LLMRequest, parse_llm_request
from atlas.settings import PRIORITIES, Priority, Settings
from authz.keycache import KeyCache

#: Without max_tokens a request reserves this share of the daily limit (Atlas's defaults),
#: capped by `max_reservation`.
DEFAULT_RESERVATION_SHARE: dict[str, float] = {
    "low": 0.05,
    "normal": 0.10,
    "high": 0.20,
    "critical": 0.30,
}


@dataclass(slots=True, frozen=True)
class CheckInput:
    headers: dict[str, str]  # lower-case names
    path: str
    body: bytes
    body_complete: bool
    body_size: int = 0  # the whole body's length when Envoy sent only its start


@dataclass(slots=True, frozen=True)
class Verdict:
    key: KeyRecord
    reservation_id: str
    priority: Priority
    request: LLMRequest
    admission: Admission
    shadow_reason: str  # the rule that would have refused, in shadow mode


def bearer_token(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


def _denied_401(message: str) -> Denied:
    return Denied(401, message, type="invalid_request_error", code="invalid_api_key")


class Authorizer:
    def __init__(
        self,
        ledger: Ledger,
        cache: KeyCache,
        settings: Settings,
        *,
        new_id: Callable[[], str] = lambda: secrets.token_hex(12),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._cache = cache
        self._s = settings
        self._new_id = new_id
        self._clock = clock
        self._ceilings: dict[str, float] = {
            "low": settings.ceiling_low,
            "normal": settings.ceiling_normal,
            "high": settings.ceiling_high,
            "critical": settings.ceiling_critical,
        }

    async def check(self, inp: CheckInput) -> Verdict:
        secret = bearer_token(inp.headers)
        if secret is None:
            raise _denied_401("Missing API key. Send it as 'Authorization: Bearer <key>'.")
        try:
            key = await self._cache.get(hash_secret(secret))
        except LedgerUnavailable as exc:
            raise self._unavailable() from exc
        if key is None:
            raise _denied_401("Incorrect API key provided.")
        if key.status != "active":
            raise Denied(
                403, "This API key is disabled.", type="permission_denied", code="key_disabled"
            )
        if key.expired(datetime.fromtimestamp(self._clock(), UTC)):
            raise Denied(
                403, "This API key has expired.", type="permission_denied", code="key_expired"
            )

        req = parse_llm_request(inp.body, complete=inp.body_complete, size=inp.body_size)
        if key.models is not None and req.model not in key.models:
            raise Denied(
                403,
                f"This API key may not use model '{req.model}'.",
                type="permission_denied",
                code="model_not_allowed",
            )
        priority = self._priority(inp.headers, key)
        completion = self._completion_estimate(req, key, priority)
        rid = self._new_id()
        try:
            admission = await self._ledger.admit(
                key,
                AdmitRequest(
                    reservation_id=rid,
                    prompt_tokens=req.prompt_tokens,
                    completion_tokens=completion,
                    priority=priority,
                    model=req.model,
                    ceiling=self._ceilings[priority],
                    shadow=key.shadow,
                ),
            )
        except LedgerUnavailable as exc:
            raise self._unavailable() from exc
        if not admission.admitted:
            raise refusal(admission, key)
        return Verdict(key, rid, priority, req, admission, admission.reason)

    def _priority(self, headers: dict[str, str], key: KeyRecord) -> Priority:
        asked = headers.get("x-request-priority")
        if asked is None:
            return key.priority
        asked = asked.strip().lower()
        for p in PRIORITIES:
            if p == asked:
                return cap_priority(p, key.max_priority)
        raise Denied(
            400,
            "x-request-priority must be one of: " + ", ".join(PRIORITIES),
            type="invalid_request_error",
            code="invalid_priority",
        )

    def _completion_estimate(self, req: LLMRequest, key: KeyRecord, priority: str) -> int:
        if req.max_tokens is not None:
            return req.max_tokens * req.n
        share = math.ceil(key.daily_limit * DEFAULT_RESERVATION_SHARE[priority])
        return max(1, min(share or self._s.default_stream_reservation, self._s.max_reservation))

    def _unavailable(self) -> Denied:
        return Denied(
            503,
            "Rate limiting is temporarily unavailable; retry shortly.",
            type="server_error",
            code="service_unavailable",
            retry_after_s=1,
        )


def _duration(ms: int) -> str:
    return f"{max(0, ms) / 1000:.3f}s"


def ratelimit_headers(a: Admission, key: KeyRecord) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers. Tokens describe the tokens/minute bucket when the key
    has one, else the daily quota."""
    h = {
        "x-ratelimit-limit-requests": str(key.burst),
        "x-ratelimit-remaining-requests": str(max(0, a.requests_remaining)),
        "x-ratelimit-reset-requests": _duration(a.requests_reset_ms),
    }
    if key.tokens_per_minute and a.tokens_remaining is not None:
        h["x-ratelimit-limit-tokens"] = str(key.tokens_per_minute)
        h["x-ratelimit-remaining-tokens"] = str(max(0, a.tokens_remaining))
        h["x-ratelimit-reset-tokens"] = _duration(a.tokens_reset_ms)
    else:
        h["x-ratelimit-limit-tokens"] = str(key.daily_limit)
        h["x-ratelimit-remaining-tokens"] = str(
            max(0, key.daily_limit - a.day_used - a.day_reserved)
        )
        h["x-ratelimit-reset-tokens"] = _duration(a.day_reset_s * 1000 - a.now_ms)
    return h


def refusal(a: Admission, key: KeyRecord) -> Denied:
    """Translate a refused admission into the OpenAI-shaped 429."""
    retry_s = max(1, math.ceil(a.retry_after_ms / 1000))
    headers = ratelimit_headers(a, key)
    if a.reason.startswith("quota_"):
        window = "daily" if a.reason == "quota_daily" else "monthly"
        return Denied(
            429,
            f"You exceeded the {window} token quota of this API key.",
            type="insufficient_quota",
            code="insufficient_quota",
            retry_after_s=retry_s,
            headers=headers,
        )
    what = {
        "rate_limit_requests": f"requests per second ({key.rate_per_sec:g}, burst {key.burst})",
        "rate_limit_tokens": f"tokens per minute ({key.tokens_per_minute})",
        "concurrency": f"concurrent requests ({key.max_concurrent})",
    }.get(a.reason, a.reason)
    return Denied(
        429,
        f"Rate limit reached for {what}. Retry after {retry_s}s.",
        type="requests" if a.reason != "rate_limit_tokens" else "tokens",
        code="rate_limit_exceeded",
        retry_after_s=a.retry_after_ms / 1000,
        headers=headers,
    )

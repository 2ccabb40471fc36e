"""How a refused admission reaches the client: the OpenAI-shaped 429 (with `x-atlas-limit`
naming the limit hit, key or team), OpenAI's `x-ratelimit-*` headers, and the counters."""

from __future__ import annotations

import math
from collections.abc import Mapping

from atlas import idempotency, metrics
from atlas.errors import Denied
from atlas.grant import END_USER_HEADER, LIMIT_HEADER
from atlas.keymodel import KeyRecord
from atlas.ledger.protocol import Admission
from atlas.requestlog import RequestRecord

#: The scope a reason names beyond the key's own: its team's limits, or its end user's.
_SCOPES = ("team_", "end_user_")


def _scoped(reason: str) -> tuple[str, str]:
    """(scope prefix or '', the reason without it)."""
    for prefix in _SCOPES:
        if reason.startswith(prefix):
            return prefix, reason.removeprefix(prefix)
    return "", reason


def count_refusal(reason: str, key_id: str) -> None:
    if reason.startswith("idempotency_"):
        return  # a duplicate, not a limit
    if _scoped(reason)[1].startswith(("quota_", "budget_")):
        metrics.QUOTA_REJECTIONS.labels(key_id=key_id, window=reason).inc()
    else:
        metrics.RATE_LIMIT_REJECTIONS.labels(key_id=key_id, limit=reason).inc()


def _duration(ms: int) -> str:
    return f"{max(0, ms) / 1000:.3f}s"


def ratelimit_header_list(a: Admission, key: KeyRecord) -> list[tuple[str, str]]:
    """OpenAI's `x-ratelimit-*` headers. Tokens describe the tokens/minute bucket when the key
    has one, else the daily quota."""
    if key.tokens_per_minute and a.tokens_remaining is not None:
        tokens = (
            str(key.tokens_per_minute),
            str(max(0, a.tokens_remaining)),
            _duration(a.tokens_reset_ms),
        )
    else:
        tokens = (
            str(key.daily_limit),
            str(max(0, key.daily_limit - a.day_used - a.day_reserved)),
            _duration(a.day_reset_s * 1000 - a.now_ms),
        )
    return [
        ("x-ratelimit-limit-requests", str(key.burst)),
        ("x-ratelimit-remaining-requests", str(max(0, a.requests_remaining))),
        ("x-ratelimit-reset-requests", _duration(a.requests_reset_ms)),
        ("x-ratelimit-limit-tokens", tokens[0]),
        ("x-ratelimit-remaining-tokens", tokens[1]),
        ("x-ratelimit-reset-tokens", tokens[2]),
    ]


def ratelimit_headers(a: Admission, key: KeyRecord) -> dict[str, str]:
    """`ratelimit_header_list` as a dict."""
    return dict(ratelimit_header_list(a, key))


#: admit.lua's reason -> the `x-atlas-limit` value a client and a dashboard read.
LIMIT_NAMES = {
    "rate_limit_requests": "key.requests",
    "rate_limit_tokens": "key.tokens",
    "quota_daily": "key.daily",
    "quota_monthly": "key.monthly",
    "budget_monthly": "key.budget",
    "concurrency": "key.concurrency",
    "team_rate_limit_requests": "team.requests",
    "team_rate_limit_tokens": "team.tokens",
    "team_quota_daily": "team.daily",
    "team_quota_monthly": "team.monthly",
    "team_budget_monthly": "team.budget",
    "end_user_quota_daily": "end_user.daily",
    "end_user_rate_limit_requests": "end_user.requests",
}

_QUOTA_WORDS = {
    "quota_daily": "daily token quota",
    "quota_monthly": "monthly token quota",
    "budget_monthly": "monthly budget",
}


def refusal(a: Admission, key: KeyRecord) -> Denied:
    """Translate a refused admission into the OpenAI-shaped 429 (a duplicate of an
    idempotent request into its replay or 409/422)."""
    if a.reason.startswith("idempotency_"):
        return idempotency.refusal(a)
    retry_s = max(1, math.ceil(a.retry_after_ms / 1000))
    headers = ratelimit_headers(a, key)
    headers[LIMIT_HEADER] = LIMIT_NAMES.get(a.reason, a.reason)
    scope, reason = _scoped(a.reason)
    scoped = scope != ""
    whose = {"team_": f"team {key.team!r}", "end_user_": "this end user of this API key"}.get(
        scope, "this API key"
    )
    if reason.startswith(("quota_", "budget_")):
        what = _QUOTA_WORDS.get(reason, reason)
        return Denied(
            429,
            f"You exceeded the {what} of {whose}.",
            type="insufficient_quota",
            code="insufficient_quota",
            retry_after_s=retry_s,
            headers=headers,
        )
    if scoped:
        what = {
            "rate_limit_requests": "requests per minute"
            if scope == "end_user_"
            else "requests per second",
            "rate_limit_tokens": "tokens per minute",
        }.get(reason, reason)
        what = f"{what} of {whose}"
    else:
        what = {
            "rate_limit_requests": f"requests per second ({key.rate_per_sec:g}, burst {key.burst})",
            "rate_limit_tokens": f"tokens per minute ({key.tokens_per_minute})",
            "concurrency": f"concurrent requests ({key.max_concurrent})",
        }.get(reason, reason)
    return Denied(
        429,
        f"Rate limit reached for {what}. Retry after {retry_s}s.",
        type="requests" if reason != "rate_limit_tokens" else "tokens",
        code="rate_limit_exceeded",
        retry_after_s=a.retry_after_ms / 1000,
        headers=headers,
    )


def refusal_record(headers: Mapping[str, str], d: Denied, now_s: float) -> RequestRecord:
    """The request log's record of a refusal: whom (once identified), why, never the body."""
    key = d.subject
    return RequestRecord(
        at_ms=int(now_s * 1000),
        request_id="",
        key_id=key.id if key is not None else "",
        team=(key.team or "") if key is not None else "",
        app=(key.app or "") if key is not None else "",
        end_user=headers.get(END_USER_HEADER, ""),
        status=d.status,
        outcome="replayed" if d.status == 200 else "refused",
        # The limit hit as the client's x-atlas-limit names it (key.daily, team.rpm, ...),
        # else the error's code (invalid_api_key, model_not_allowed, ...).
        reason=d.headers.get(LIMIT_HEADER) or d.code or str(d.status),
        priority=key.priority if key is not None else "",
    )

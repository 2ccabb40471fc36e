"""What a provider's answers mean for its pool, and the per-minute numbers of its health view.

extproc turns each access-log entry of a provider-routed request into a `PoolObservation`
(`observe`); admin reads the per-minute hashes back into the health view (`summarize`). Both
sides use the field names and latency buckets defined here.

Stats fields are `<member>|<name>` (`-` for a provider without a pool): `req`, `err`,
`s429`, `s5xx`, `s401`, `lat<i>` and `ttfb<i>` (counts per latency bucket), `prompt`,
`completion`, `spend` (micro-USD), `settled`.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from atlas.ledger.protocol import PoolObservation
from atlas.providers.config import Cooldown

#: Upper bounds of the latency buckets, ms (the last is unbounded).
BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, math.inf)
NO_MEMBER = "-"


def bucket(ms: float) -> int:
    for i, bound in enumerate(BUCKETS_MS):
        if ms <= bound:
            return i
    return len(BUCKETS_MS) - 1


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def cooling(
    status: int, upstream_failed: bool, retry_after: str | None, cd: Cooldown
) -> tuple[float, str, str]:
    """(seconds, scope, reason) a response puts the member or provider out for; 0 s: none.

    - 429: the member (its key's limit), Retry-After honoured;
    - 401/403: the member (its key is refused), for `unauthorized_s`;
    - 5xx or no answer (connection failure, reset, timeout): the whole provider."""
    ra = retry_after_s(retry_after)
    if status == 429:
        s, scope, reason = (cd.rate_limited_s if ra is None else ra), "member", "429"
    elif status in (401, 403):
        s, scope, reason = cd.unauthorized_s, "member", str(status)
    elif status >= 500 or upstream_failed:
        s = cd.server_error_s if ra is None else ra
        scope, reason = "provider", str(status) if status else "unreachable"
    else:
        return 0.0, "member", ""
    return min(s, cd.max_s), scope, reason


def observe(
    member: str,
    status: int,
    upstream_failed: bool,
    retry_after: str | None,
    latency_ms: float | None,
    ttfb_ms: float | None,
    cd: Cooldown,
) -> PoolObservation:
    m = member or NO_MEMBER
    seconds, scope, reason = cooling(status, upstream_failed, retry_after, cd)
    stats = {f"{m}|req": 1}
    failed = status >= 500 or status in (401, 403, 429) or upstream_failed
    if failed:
        stats[f"{m}|err"] = 1
    if status == 429:
        stats[f"{m}|s429"] = 1
    elif status in (401, 403):
        stats[f"{m}|s401"] = 1
    elif status >= 500 or upstream_failed:
        stats[f"{m}|s5xx"] = 1
    if latency_ms is not None:
        stats[f"{m}|lat{bucket(latency_ms)}"] = 1
    if ttfb_ms is not None:
        stats[f"{m}|ttfb{bucket(ttfb_ms)}"] = 1
    return PoolObservation(
        member=member,
        cool_ms=int(seconds * 1000),
        cool_scope=scope,
        reason=reason,
        stats=stats,
    )


def usage_observation(
    member: str, prompt: int, completion: int, spend_micros: int, correction: int
) -> PoolObservation:
    m = member or NO_MEMBER
    return PoolObservation(
        member=member,
        token_correction=correction,
        stats={
            f"{m}|settled": 1,
            f"{m}|prompt": prompt,
            f"{m}|completion": completion,
            f"{m}|spend": spend_micros,
        },
    )


def percentile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a bucketed distribution, interpolated inside its bucket; the
    unbounded bucket reports its lower bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            low = 0.0 if i == 0 else float(BUCKETS_MS[i - 1])
            high = BUCKETS_MS[i]
            if math.isinf(high):
                return low
            return round(low + (high - low) * (rank - seen) / c, 1)
        seen += c
    return float(BUCKETS_MS[-2])


def _quantiles(counts: list[int]) -> dict[str, float | None]:
    return {"p50": percentile(counts, 0.5), "p95": percentile(counts, 0.95),
            "p99": percentile(counts, 0.99)}  # fmt: skip


def summarize(minutes: Iterable[Mapping[str, int]], member: str) -> dict[str, Any]:
    """One member's (or `*`: the whole provider's) numbers over the given minutes."""
    tot: dict[str, int] = {}
    for h in minutes:
        for f, v in h.items():
            who, _, name = f.partition("|")
            if member == "*" or who == member:
                tot[name] = tot.get(name, 0) + v
    n = len(BUCKETS_MS)
    requests = tot.get("req", 0)
    errors = tot.get("err", 0)
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": round(errors / requests, 4) if requests else 0.0,
        "rate_limited": tot.get("s429", 0),
        "latency_ms": _quantiles([tot.get(f"lat{i}", 0) for i in range(n)]),
        "ttfb_ms": _quantiles([tot.get(f"ttfb{i}", 0) for i in range(n)]),
        "usage": {
            "requests": tot.get("settled", 0),
            "prompt_tokens": tot.get("prompt", 0),
            "completion_tokens": tot.get("completion", 0),
            "spend_usd": round(tot.get("spend", 0) / 1e6, 6),
        },
    }

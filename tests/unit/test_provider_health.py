"""What provider answers mean (atlas/providers/health.py): cooling by status and Retry-After,
the per-minute stats fields of one answer, and the health view's percentiles and summary."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from atlas.providers import health
from atlas.providers.config import Cooldown

CD = Cooldown(rate_limited_s=30, unauthorized_s=300, server_error_s=15, max_s=600)
N = len(health.BUCKETS_MS)


def _http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


# ---- cooling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "failed", "retry_after", "expected"),
    [
        (429, False, None, (30.0, "member", "429")),
        (429, False, "7", (7.0, "member", "429")),
        (429, False, " 12 ", (12.0, "member", "429")),
        (429, False, "soon", (30.0, "member", "429")),  # unparseable: the default
        (429, False, "99999", (600.0, "member", "429")),  # capped at max_s
        (401, False, None, (300.0, "member", "401")),
        (403, False, "5", (300.0, "member", "403")),  # Retry-After is not a 401/403's
        (500, False, None, (15.0, "provider", "500")),
        (503, False, "40", (40.0, "provider", "503")),
        (502, True, None, (15.0, "provider", "502")),
        (0, True, None, (15.0, "provider", "unreachable")),
        (200, False, "5", (0.0, "member", "")),
        (404, False, None, (0.0, "member", "")),
        (400, False, "9", (0.0, "member", "")),
    ],
)
def test_cooling_by_status(
    status: int, failed: bool, retry_after: str | None, expected: tuple[float, str, str]
) -> None:
    assert health.cooling(status, failed, retry_after, CD) == expected


def test_cooling_honours_an_http_date_up_to_max_s() -> None:
    seconds, scope, reason = health.cooling(429, False, _http_date(45), CD)
    assert 43 <= seconds <= 45 and (scope, reason) == ("member", "429")
    assert health.cooling(503, False, _http_date(90), CD)[0] == pytest.approx(90, abs=2)
    assert health.cooling(429, False, _http_date(7200), CD)[0] == 600.0


def test_unauthorized_is_capped_at_max_s_too() -> None:
    tight = Cooldown(unauthorized_s=86400, max_s=60)
    assert health.cooling(401, False, None, tight) == (60.0, "member", "401")


def test_retry_after_parsing() -> None:
    now = time.time()
    assert health.retry_after_s(None) is None and health.retry_after_s("") is None
    assert health.retry_after_s("120") == 120.0
    assert health.retry_after_s("1.5") is None  # not a delta-seconds
    assert health.retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0  # past: now
    future = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert health.retry_after_s(future, now) == pytest.approx(30, abs=1)


# ---- observe -----------------------------------------------------------------------------


def test_a_good_answer_counts_a_request_and_its_latency_buckets() -> None:
    o = health.observe("k1", 200, False, None, 80.0, 20.0, CD)
    assert (o.member, o.cool_ms, o.reason, o.token_correction) == ("k1", 0, "", 0)
    assert o.stats == {"k1|req": 1, "k1|lat2": 1, "k1|ttfb0": 1}


def test_a_429_cools_the_member_and_counts_an_error() -> None:
    o = health.observe("k1", 429, False, "7", 30.0, None, CD)
    assert (o.cool_ms, o.cool_scope, o.reason) == (7000, "member", "429")
    assert o.stats == {"k1|req": 1, "k1|err": 1, "k1|s429": 1, "k1|lat1": 1}


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_counts_as_s401(status: int) -> None:
    o = health.observe("k2", status, False, None, None, None, CD)
    assert (o.cool_ms, o.cool_scope, o.reason) == (300_000, "member", str(status))
    assert o.stats == {"k2|req": 1, "k2|err": 1, "k2|s401": 1}


def test_server_errors_and_failures_cool_the_provider() -> None:
    o = health.observe("k1", 503, False, None, 999_999.0, 999_999.0, CD)
    assert (o.cool_ms, o.cool_scope, o.reason) == (15_000, "provider", "503")
    assert o.stats == {
        "k1|req": 1,
        "k1|err": 1,
        "k1|s5xx": 1,
        f"k1|lat{N - 1}": 1,
        f"k1|ttfb{N - 1}": 1,
    }
    o = health.observe("", 0, True, None, None, None, CD)
    assert (o.member, o.cool_scope, o.reason) == ("", "provider", "unreachable")
    assert o.stats == {"-|req": 1, "-|err": 1, "-|s5xx": 1}  # no member: "-"


def test_a_client_error_is_no_provider_error() -> None:
    o = health.observe("k1", 400, False, None, None, None, CD)
    assert o.cool_ms == 0 and o.stats == {"k1|req": 1}


def test_usage_observation_carries_the_correction_and_the_usage() -> None:
    o = health.usage_observation("", 12, 34, 5600, -20)
    assert (o.member, o.cool_ms, o.token_correction) == ("", 0, -20)
    assert o.stats == {"-|settled": 1, "-|prompt": 12, "-|completion": 34, "-|spend": 5600}


@pytest.mark.parametrize(
    ("ms", "index"),
    [(0, 0), (25, 0), (25.1, 1), (100, 2), (60_000, N - 2), (60_001, N - 1), (math.inf, N - 1)],
)
def test_buckets_are_upper_bounds(ms: float, index: int) -> None:
    assert health.bucket(ms) == index


# ---- percentile and summarize ------------------------------------------------------------


def _counts(**by_index: int) -> list[int]:
    counts = [0] * N
    for i, c in by_index.items():
        counts[int(i[1:])] = c
    return counts


def test_percentile_interpolates_inside_its_bucket() -> None:
    one_bucket = _counts(b0=10)
    assert health.percentile(one_bucket, 0.5) == 12.5
    assert health.percentile(one_bucket, 1.0) == 25.0
    two = _counts(b0=5, b1=5)  # 5 under 25 ms, 5 in 25..50 ms
    assert health.percentile(two, 0.5) == 25.0
    assert health.percentile(two, 0.95) == 47.5
    assert health.percentile(_counts(b3=4), 0.25) == 137.5  # 100 + 150 * 1/4


def test_percentile_of_the_unbounded_bucket_is_its_lower_bound() -> None:
    assert health.percentile(_counts(b11=3), 0.99) == 60_000.0
    assert health.percentile(_counts(b0=99, b11=1), 0.999) == 60_000.0


def test_percentile_of_nothing_is_none() -> None:
    assert health.percentile([0] * N, 0.5) is None


MINUTES = [
    {"k1|req": 8, "k1|err": 2, "k1|s429": 2, "k1|lat0": 8, "k1|ttfb0": 8, "-|req": 1},
    {"k1|req": 2, "k1|lat4": 2, "k2|req": 10, "k2|err": 1, "k2|lat11": 10},
    {"k1|settled": 3, "k1|prompt": 30, "k1|completion": 70, "k1|spend": 1_234_567},
]


def test_summarize_one_member() -> None:
    s = health.summarize(MINUTES, "k1")
    assert (s["requests"], s["errors"], s["error_rate"], s["rate_limited"]) == (10, 2, 0.2, 2)
    assert s["latency_ms"]["p50"] == pytest.approx(15.6)  # rank 5 of 8 under 25 ms
    assert 250 <= s["latency_ms"]["p99"] <= 500
    assert s["ttfb_ms"] == {"p50": 12.5, "p95": 23.8, "p99": 24.8}
    assert s["usage"] == {
        "requests": 3,
        "prompt_tokens": 30,
        "completion_tokens": 70,
        "spend_usd": 1.234567,
    }


def test_summarize_the_whole_provider() -> None:
    s = health.summarize(MINUTES, "*")
    assert (s["requests"], s["errors"], s["rate_limited"]) == (21, 3, 2)
    assert s["error_rate"] == round(3 / 21, 4)
    assert s["latency_ms"]["p99"] == 60_000.0  # k2's answers in the unbounded bucket


def test_summarize_nothing() -> None:
    s = health.summarize([], "k1")
    assert (s["requests"], s["errors"], s["error_rate"]) == (0, 0, 0.0)
    assert s["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert health.summarize(MINUTES, "k9")["requests"] == 0

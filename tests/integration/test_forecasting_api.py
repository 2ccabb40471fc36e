"""Forecasting endpoints on `atlas simulate` data, against a real valkey-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from admin.app import create_app
from atlas.keymodel import KeyRecord
from atlas.ledger.redis import RedisLedger
from atlas.local.simulate import backfill
from atlas.settings import Settings

ADMIN = {"authorization": "Bearer test-admin-token"}


@pytest_asyncio.fixture
async def api(settings: Settings, ledger: RedisLedger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"upstream_capacity_tokens_per_s": 10.0}), ledger)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin"
    ) as client:
        yield client


@pytest_asyncio.fixture
async def simulated(ledger: RedisLedger) -> list[tuple[KeyRecord, str]]:
    return await backfill(ledger, days=28, keys=4, seed=3)


async def get(api: httpx.AsyncClient, url: str, headers: dict[str, str] = ADMIN) -> Any:
    r = await api.get(url, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_forecast_for_a_key_has_sane_values_and_intervals(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    rec, _ = simulated[0]
    f = await get(api, f"/v1/forecasting/forecast?key_id={rec.id}&horizon=daily")
    assert f["scope"] == "key" and f["horizon_hours"] == 168 and len(f["points"]) == 168
    assert f["method"] == "seasonal_daily_weekly_trend" and f["note"] is None
    history = await get(api, f"/v1/admin/keys/{rec.id}/history?hours=168")
    past_mean = sum(h["total"] for h in history["hours"][:-1]) / 167
    future_mean = f["total"]["value"] / 168
    assert 0.7 * past_mean < future_mean < 1.4 * past_mean
    assert all(p["lower"] <= p["value"] <= p["upper"] for p in f["points"])
    assert f["points"][0]["ts"] == history["hours"][-1]["ts"]  # from the hour in progress


async def test_global_and_model_scopes(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    g = await get(api, "/v1/forecasting/forecast?horizon=hourly")
    m = await get(api, "/v1/forecasting/forecast?horizon=hourly&model=demo-small")
    assert g["scope"] == "global" and m["scope"] == "model"
    assert 0 < m["total"]["value"] < g["total"]["value"]


async def test_usage_patterns_see_working_hours_and_weekends(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    p = await get(api, "/v1/forecasting/usage-patterns?days_back=28")
    assert all(9 <= h <= 18 for h in p["peak_hours_utc"])
    weekdays, weekend = p["weekday_profile"][:5], p["weekday_profile"][5:]
    assert max(weekend) < min(weekdays)
    assert p["growth_pct_per_week"] is not None and p["growth_pct_per_week"] > 0


async def test_capacity_recommendations_flag_the_growing_key(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    c = await get(api, "/v1/forecasting/capacity-recommendations")
    at_risk = {(k["name"], k["window"]) for k in c["at_risk"]}
    # Whether today's quota runs out before midnight depends on the hour the test runs (late
    # in the UTC day too little of it is left); this month's does then (but in its last hours).
    assert at_risk & {("sim-growth", "daily"), ("sim-growth", "monthly")}, at_risk
    growth = next(k for k in c["keys"] if k["name"] == "sim-growth" and k["window"] == "daily")
    assert growth["suggested_limit"] > growth["limit"]  # from typical days: any hour
    assert c["capacity"]["configured_tokens_per_s"] == 10.0
    assert c["capacity"]["forecast_peak_tokens_per_s"] > 0
    assert "headroom_pct" in c["capacity"]


async def test_what_if_replays_history_against_proposed_limits(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    rec, _ = simulated[0]
    r = await api.post(
        "/v1/forecasting/what-if",
        headers=ADMIN,
        json={"key_id": rec.id, "days_back": 14, "daily_limit": 50_000},
    )
    assert r.status_code == 200, r.text
    w = r.json()
    assert w["result"]["tokens"] == w["with_current_limits"]["tokens"] > 0
    assert 0 < w["result"]["refused_tokens"] < w["result"]["tokens"]
    assert all(d["tokens"] - d["refused_tokens"] <= 50_000 for d in w["result"]["by_day"].values())
    loose = await api.post(
        "/v1/forecasting/what-if", headers=ADMIN, json={"key_id": rec.id, "daily_limit": 10**9}
    )
    assert loose.json()["result"]["refused_tokens"] == 0


async def test_too_little_history_is_a_200_that_says_so(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    f = await get(api, "/v1/forecasting/forecast")
    assert f["method"] == "none" and f["note"]
    p = await get(api, "/v1/forecasting/usage-patterns")
    assert p["note"]


async def test_self_serve_sees_only_its_own_key(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    (mine, secret), (other, _) = simulated[0], simulated[1]
    own = {"authorization": f"Bearer {secret}"}
    f = await get(api, "/v1/forecasting/forecast", headers=own)
    assert f["key_id"] == mine.id
    c = await get(api, "/v1/forecasting/capacity-recommendations", headers=own)
    assert {k["key_id"] for k in c["keys"]} == {mine.id} and "capacity" not in c
    for url in (
        f"/v1/forecasting/forecast?key_id={other.id}",
        "/v1/forecasting/forecast?model=demo-small",
    ):
        assert (await api.get(url, headers=own)).status_code == 403
    assert (await api.get("/v1/forecasting/admin/system-metrics", headers=own)).status_code == 401
    assert (await api.get("/v1/forecasting/forecast")).status_code == 401


async def test_system_metrics_and_forecast_all(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    m = await get(api, "/v1/forecasting/admin/system-metrics")
    assert m["keys"] == 4 and len(m["hours"]) == 24
    assert m["top_keys"][0]["used"] >= m["top_keys"][-1]["used"]
    old = await get(api, "/v1/forecasting/admin/system-metrics?date=2020-01-01")
    assert old["totals"]["total"] == 0
    bad = await api.get("/v1/forecasting/admin/system-metrics?date=yesterday", headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "date"
    a = await get(api, "/v1/forecasting/admin/forecast-all?horizon_hours=24")
    assert len(a["keys"]) == 4 and all(k["total"]["value"] > 0 for k in a["keys"])


def own(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


SELF_SERVE = (
    ("GET", "/v1/usage", None),
    ("GET", "/v1/forecasting/forecast", None),
    ("GET", "/v1/forecasting/usage-patterns", None),
    ("GET", "/v1/forecasting/capacity-recommendations", None),
    ("POST", "/v1/forecasting/what-if", {"daily_limit": 1000}),
)


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and set(error) >= {"type", "param"}


async def test_self_serve_refuses_revoked_expired_and_unknown_keys(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    (revoked, revoked_secret), (expired, expired_secret) = simulated[0], simulated[1]
    assert (await api.post(f"/v1/admin/keys/{revoked.id}/revoke", headers=ADMIN)).status_code == 200
    past = {"expires_at": "2020-01-01T00:00:00Z"}
    r = await api.patch(f"/v1/admin/keys/{expired.id}", headers=ADMIN, json=past)
    assert r.status_code == 200
    for method, url, body in SELF_SERVE:
        r = await api.request(method, url, headers=own(revoked_secret), json=body)
        assert_openai_error(r, 403, "key_disabled")
        r = await api.request(method, url, headers=own(expired_secret), json=body)
        assert_openai_error(r, 403, "key_expired")
        r = await api.request(method, url, headers=own("sk-atlas-nobody-0123456789"), json=body)
        assert_openai_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    # The admin still reads those keys.
    r = await api.get(f"/v1/forecasting/forecast?key_id={revoked.id}", headers=ADMIN)
    assert r.status_code == 200


async def test_self_serve_is_limited_per_key_by_its_own_rate_and_burst(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    (slow, slow_secret), (_, other_secret) = simulated[0], simulated[1]
    limits = {"rate_per_sec": 0.01, "burst": 3}
    assert (await api.patch(f"/v1/admin/keys/{slow.id}", headers=ADMIN, json=limits)).is_success
    for method, url, body in SELF_SERVE[:3]:
        r = await api.request(method, url, headers=own(slow_secret), json=body)
        assert r.status_code == 200, r.text
    for method, url, body in SELF_SERVE:
        r = await api.request(method, url, headers=own(slow_secret), json=body)
        assert_openai_error(r, 429, "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 100  # 1 request per 100 s
    # Another key and the admin token are not held back by it.
    assert (await api.get("/v1/usage", headers=own(other_secret))).status_code == 200
    for _ in range(5):
        r = await api.get(f"/v1/forecasting/forecast?key_id={slow.id}", headers=ADMIN)
        assert r.status_code == 200


async def test_forecasts_run_off_the_event_loop_with_bounded_concurrency(
    api: httpx.AsyncClient, simulated: list[tuple[KeyRecord, str]]
) -> None:
    guard = api._transport.app.state.selfserve  # type: ignore[attr-defined]
    rec, secret = simulated[0]
    r = await api.patch(f"/v1/admin/keys/{rec.id}", headers=ADMIN, json={"burst": 100})
    assert r.status_code == 200
    urls = [
        "/v1/forecasting/forecast?horizon=monthly",
        "/v1/forecasting/usage-patterns",
        "/v1/forecasting/capacity-recommendations",
    ]
    answers = await asyncio.gather(
        *(api.get(urls[i % 3], headers=own(secret)) for i in range(30)),
        api.post("/v1/forecasting/what-if", headers=own(secret), json={"daily_limit": 1}),
    )
    assert [a.status_code for a in answers] == [200] * 31
    assert 1 <= guard.peak_running <= guard.concurrency
    assert guard.offloaded >= 31  # every forecast, pattern and replay ran in a worker thread

"""The admin REST API against a real valkey-server: keys, audit, usage, history, spend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from admin.app import create_app
from atlas.keymodel import hash_secret
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings

ADMIN = {"authorization": "Bearer test-admin-token"}


@pytest_asyncio.fixture
async def api(settings: Settings, ledger: RedisLedger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, ledger)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin", headers=ADMIN
    ) as client:
        yield client


async def create(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await api.post("/v1/admin/keys", json={"name": "k", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_atlas_style_registration_with_x_admin_key(
    api: httpx.AsyncClient, ledger: RedisLedger, settings: Settings
) -> None:
    body = {
        "api_key": "team-a-chosen-secret-123",
        "daily_limit": 1000,
        "monthly_limit": 9000,
        "rate_per_sec": 2,
        "burst": 4,
        "priority": "high",
    }
    r = await api.post(
        "/v1/admin/keys",
        json=body,
        headers={"authorization": "", "x-admin-key": "test-admin-token"},
    )
    assert r.status_code == 201
    key = r.json()
    assert key["api_key"] == body["api_key"]
    assert {k: key[k] for k in body if k != "api_key"} == {
        k: v for k, v in body.items() if k != "api_key"
    }
    rec = await ledger.find_key(hash_secret("team-a-chosen-secret-123"))
    assert rec is not None and rec.id == key["id"]
    again = await api.post("/v1/admin/keys", json=body)
    assert again.status_code == 409
    defaults = await create(api)
    assert defaults["daily_limit"] == settings.default_daily_limit


async def test_list_paginates_and_filters(api: httpx.AsyncClient) -> None:
    for i in range(5):
        await create(
            api,
            name=f"svc-{i}",
            priority="low" if i % 2 else "high",
            metadata={"team": "blue" if i < 2 else "red", "tags": [f"t{i}"]},
        )
    page = (await api.get("/v1/admin/keys?offset=1&limit=2")).json()
    assert page["total"] == 5 and [k["name"] for k in page["items"]] == ["svc-1", "svc-2"]
    assert (await api.get("/v1/admin/keys?team=blue")).json()["total"] == 2
    assert (await api.get("/v1/admin/keys?priority=low")).json()["total"] == 2
    assert (await api.get("/v1/admin/keys?tag=t3&name=SVC")).json()["items"][0]["name"] == "svc-3"
    k = (await api.get("/v1/admin/keys?name=svc-4")).json()["items"][0]
    await api.post(f"/v1/admin/keys/{k['id']}/revoke")
    assert (await api.get("/v1/admin/keys?status=disabled")).json()["total"] == 1


async def test_update_rotate_delete_and_the_audit_log(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    key = await create(api, daily_limit=100)
    kid, old_secret = key["id"], key["api_key"]
    r = await api.patch(f"/v1/admin/keys/{kid}", json={"daily_limit": 200, "status": "disabled"})
    assert r.json()["daily_limit"] == 200 and r.json()["status"] == "disabled"
    rotated = (await api.post(f"/v1/admin/keys/{kid}/rotate")).json()
    assert rotated["api_key"] != old_secret
    assert await ledger.find_key(hash_secret(old_secret)) is None
    assert (await ledger.find_key(hash_secret(rotated["api_key"]))) is not None
    assert (await api.delete(f"/v1/admin/keys/{kid}")).status_code == 204
    assert (await api.get(f"/v1/admin/keys/{kid}")).status_code == 404
    audit = (await api.get(f"/v1/admin/audit?key_id={kid}")).json()["entries"]
    assert [e["action"] for e in audit] == ["key.delete", "key.rotate", "key.update", "key.create"]
    update = audit[2]
    assert update["before"]["daily_limit"] == 100 and update["after"]["daily_limit"] == 200
    assert update["actor"] == "admin" and update["at"]
    text = str(audit)
    assert old_secret not in text and rotated["api_key"] not in text
    assert "secret_hash" not in text


async def test_bad_input_is_422_naming_the_field_and_unknown_ids_404(
    api: httpx.AsyncClient,
) -> None:
    for body, field in (
        ({"daily_limit": -1}, "daily_limit"),
        ({"priority": "urgent"}, "priority"),
        ({"burst": "many"}, "burst"),
        ({"nope": 1}, "nope"),
        ({"api_key": "short"}, "api_key"),
    ):
        r = await api.post("/v1/admin/keys", json=body)
        assert r.status_code == 422, body
        assert r.json()["detail"][0]["loc"][-1] == field
    r = await api.post(
        "/v1/admin/keys", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    for method, url in (
        ("GET", "/v1/admin/keys/key_nope"),
        ("PATCH", "/v1/admin/keys/key_nope"),
        ("DELETE", "/v1/admin/keys/key_nope"),
        ("GET", "/v1/admin/keys/key_nope/usage"),
        ("GET", "/v1/admin/keys/key_nope/history"),
    ):
        r = await api.request(method, url, json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, url)


async def test_usage_history_and_spend(api: httpx.AsyncClient, ledger: RedisLedger) -> None:
    key = await create(api, daily_limit=10_000, monthly_budget_usd=1.0)
    rec = await ledger.get_key(key["id"])
    assert rec is not None
    await ledger.admit(
        rec, AdmitRequest("r1", 100, 400, "normal", "demo-small", 1.0, cost_micros=500_000)
    )
    await ledger.settle(
        Settlement(rec.id, "r1", 100, 300, "demo-small", True, "completed", cost_micros=400_000)
    )
    u = (await api.get(f"/v1/admin/keys/{rec.id}/usage")).json()
    assert (u["daily"]["used"], u["monthly"]["spend_usd"], u["monthly_budget_usd"]) == (
        400,
        0.4,
        1.0,
    )
    # The budget is a quota on cost: 0.4 spent, 0.7 more does not fit.
    refused = await ledger.admit(
        rec, AdmitRequest("r2", 10, 10, "normal", "demo-small", 1.0, cost_micros=700_000)
    )
    assert not refused.admitted and refused.reason == "budget_monthly"
    h = (await api.get(f"/v1/admin/keys/{rec.id}/history?hours=3")).json()["hours"]
    assert len(h) == 3 and h[-1]["total"] == 400 and h[-1]["spend_usd"] == 0.4
    g = (await api.get("/v1/admin/history?hours=1")).json()["hours"]
    m = (await api.get("/v1/admin/models/demo-small/history?hours=1")).json()["hours"]
    assert g[0]["total"] == m[0]["total"] == 400

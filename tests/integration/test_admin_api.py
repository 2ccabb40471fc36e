"""The admin REST API against a real valkey-server: keys, audit, usage, history, spend."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import redis

from atlas import limits
from atlas.keymodel import hash_secret
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings

JSON = {"content-type": "application/json"}


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
    assert update["actor"] == "bootstrap" and update["via"] == "bootstrap" and update["at"]
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


async def test_default_priority_may_not_exceed_max_priority(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    for body, field in (
        ({"priority": "critical", "max_priority": "high"}, "priority"),
        ({"max_priority": "low"}, "max_priority"),  # the default priority, normal, is above it
    ):
        r = await api.post("/v1/admin/keys", json=body)
        assert r.status_code == 422, body
        assert r.json()["detail"][0]["loc"] == ["body", field]
    assert await ledger.count_keys() == 0
    key = await create(api, priority="normal", max_priority="high")
    for change in ({"priority": "critical"}, {"max_priority": "low"}):
        r = await api.patch(f"/v1/admin/keys/{key['id']}", json=change)
        assert r.status_code == 422, change
        assert r.json()["detail"][0]["loc"] == ["body", *change]
    stored = await ledger.get_key(key["id"])
    assert stored is not None and (stored.priority, stored.max_priority) == ("normal", "high")
    both = {"priority": "low", "max_priority": "low"}
    assert (await api.patch(f"/v1/admin/keys/{key['id']}", json=both)).status_code == 200


#: A value over each bound of the admin API, and the largest accepted (limits in atlas/limits.py).
OVER_THE_EDGE: tuple[tuple[str, Any, Any], ...] = (
    ("daily_limit", limits.MAX_TOKEN_LIMIT + 1, limits.MAX_TOKEN_LIMIT),
    ("monthly_limit", 10**14, limits.MAX_TOKEN_LIMIT),
    ("tokens_per_minute", limits.MAX_TOKEN_LIMIT + 1, limits.MAX_TOKEN_LIMIT),
    ("rate_per_sec", limits.MAX_RATE_PER_SEC * 2, limits.MAX_RATE_PER_SEC),
    ("rate_per_sec", 1e-300, limits.MIN_RATE_PER_SEC),
    ("burst", limits.MAX_BURST + 1, limits.MAX_BURST),
    ("max_concurrent", limits.MAX_CONCURRENT + 1, limits.MAX_CONCURRENT),
    ("monthly_budget_usd", limits.MAX_BUDGET_USD * 10, limits.MAX_BUDGET_USD),
    # Below a micro-USD the stored budget would round to 0, which means "no budget".
    ("monthly_budget_usd", 1e-9, limits.MIN_BUDGET_USD),
)


async def test_every_number_is_bounded_at_the_edge_and_never_stored(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    key = await create(api)
    for field, over, edge in OVER_THE_EDGE:
        r = await api.post("/v1/admin/keys", json={field: over})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, (field, r.text)
        r = await api.patch(f"/v1/admin/keys/{key['id']}", json={field: over})
        assert r.status_code == 422, (field, over)
        r = await api.patch(f"/v1/admin/keys/{key['id']}", json={field: edge})
        assert r.status_code == 200 and r.json()[field] == edge, (field, r.text)
    for raw in (b'{"rate_per_sec": NaN}', b'{"monthly_budget_usd": Infinity}'):
        r = await api.post(
            "/v1/admin/keys", content=raw, headers={"content-type": "application/json"}
        )
        assert r.status_code == 422, raw
    assert await ledger.count_keys() == 1
    for url in (
        "/v1/forecasting/usage-patterns?days_back=91",
        "/v1/forecasting/forecast?horizon_hours=100000",
        "/v1/admin/history?hours=100000",
        "/v1/admin/keys?offset=10000000000",
    ):
        assert (await api.get(url)).status_code == 422, url
    what_if = {"key_id": key["id"], "daily_limit": 10**14}
    assert (await api.post("/v1/forecasting/what-if", json=what_if)).status_code == 422


async def test_every_number_in_the_openapi_schema_has_bounds(api: httpx.AsyncClient) -> None:
    """The class, not the instances: a new numeric field or query parameter without a bound
    fails here."""
    spec = (await api.get("/openapi.json")).json()
    unbounded: list[str] = []

    def walk(where: str, schema: dict[str, Any]) -> None:
        for option in schema.get("anyOf", []):
            walk(where, option)
        if schema.get("type") in ("integer", "number"):
            if "maximum" not in schema and "exclusiveMaximum" not in schema:
                unbounded.append(where + " (no maximum)")
            if "minimum" not in schema and "exclusiveMinimum" not in schema:
                unbounded.append(where + " (no minimum)")

    for name, model in spec["components"]["schemas"].items():
        if name.endswith(("Public", "Created", "Out", "List")) or "Error" in name:
            continue  # responses
        for field, schema in model.get("properties", {}).items():
            walk(f"{name}.{field}", schema)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                walk(f"{method.upper()} {path} ?{p['name']}", p["schema"])
    assert unbounded == []


async def test_secret_hint_shows_at_most_its_last_four_characters(
    api: httpx.AsyncClient, ledger: RedisLedger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    imported = "team-a-chosen-secret-wxyz"
    key = await create(api, api_key=imported)
    assert key["secret_hint"] == "…wxyz"
    generated = await create(api)
    assert generated["secret_hint"] == "sk-atlas-…" + generated["api_key"][-4:]
    openai_style = await create(api, api_key="sk-proj-0123456789abcd")
    assert openai_style["secret_hint"] == "sk-…abcd"
    rotated = (await api.post(f"/v1/admin/keys/{key['id']}/rotate")).json()
    assert rotated["secret_hint"] == "sk-atlas-…" + rotated["api_key"][-4:]
    # The secret appears in the one creation (or rotation) response and nowhere else: not in
    # reads, listings, the audit log, a 422 (which echoes bad input) or a log line.
    secrets_ = [imported, generated["api_key"], rotated["api_key"], "sk-proj-0123456789abcd"]
    bad = await api.post(
        "/v1/admin/keys", json={"api_key": "short-secret", "priority": "x", "nope": imported}
    )
    conflict = await api.post("/v1/admin/keys", json={"api_key": "sk-proj-0123456789abcd"})
    mixed = await api.post(
        "/v1/admin/keys",
        json={"api_key": "another-chosen-secret-1", "priority": "critical", "max_priority": "low"},
    )
    assert (bad.status_code, conflict.status_code, mixed.status_code) == (422, 409, 422)
    secrets_ += ["short-secret", "another-chosen-secret-1"]
    seen = " ".join(
        [
            bad.text,
            conflict.text,
            mixed.text,
            (await api.get("/v1/admin/keys")).text,
            (await api.get(f"/v1/admin/keys/{key['id']}")).text,
            (await api.get("/v1/admin/audit")).text,
            caplog.text,
        ]
    )
    assert [s for s in secrets_ if s in seen] == []
    assert [s[-8:] for s in secrets_ if s[-8:] in seen] == []  # nor more than the hint


async def test_hints_stored_by_older_versions_are_cut_to_four_characters(
    api: httpx.AsyncClient, redis_sync: redis.Redis
) -> None:
    key = await create(api, api_key="team-b-chosen-secret-9876")
    stored = json.loads(redis_sync.get(keys.record(key["id"])))  # type: ignore[arg-type]
    stored["secret_hint"] = "team-b-chose…"  # 12 characters, as 0.1 stored them
    redis_sync.set(keys.record(key["id"]), json.dumps(stored))
    shown = (await api.get(f"/v1/admin/keys/{key['id']}")).json()["secret_hint"]
    assert shown == "team…"

"""Alert rules through the admin API on a real valkey-server, and the alerter using them:
a key's own thresholds replace the default, an empty rule silences the key's threshold
alerts, the input is bounded and scopes must exist."""

from __future__ import annotations

from typing import Any

import httpx

from atlas.alerts.alerter import Alerter
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.ledger.redis.alerts import RedisAlerts
from atlas.settings import Settings


async def new_key(api: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await api.post("/v1/admin/keys", json={"name": "k", "daily_limit": 1000, **fields})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def use(ledger: RedisLedger, key_id: str, tokens: int) -> None:
    rec = await ledger.get_key(key_id)
    assert rec is not None
    rid = f"r-{tokens}"
    assert (await ledger.admit(rec, AdmitRequest(rid, tokens, 0, "normal", "m", 1.0))).admitted
    await ledger.settle(Settlement(rec.id, rid, tokens, 0, "m", True, "completed"))
    await ledger.conn.r.sadd(keys.ALERT_DIRTY, f"key:{rec.id}")


async def test_a_scopes_rule_replaces_the_default_thresholds(
    api: httpx.AsyncClient, ledger: RedisLedger, settings: Settings
) -> None:
    own, silent, plain = await new_key(api), await new_key(api), await new_key(api)
    r = await api.put(f"/v1/admin/alerts/rules/key:{own['id']}", json={"thresholds": [95, 30]})
    assert r.status_code == 200 and r.json()["thresholds"] == [30, 95]
    r = await api.put(f"/v1/admin/alerts/rules/key:{silent['id']}", json={"thresholds": []})
    assert r.status_code == 200
    listed = (await api.get("/v1/admin/alerts/rules")).json()
    assert {i["scope"] for i in listed["items"]} == {f"key:{own['id']}", f"key:{silent['id']}"}
    assert listed["default"] == [50, 80, 100]

    store = RedisAlerts(ledger.conn)
    alerter = Alerter(ledger, store, settings)
    for k in (own, silent, plain):
        await use(ledger, k["id"], 600)  # 60 % of each daily quota
    assert await alerter.round() == 2  # own: 30; silent: none; plain: 50
    fired = {(e["scope"], e["threshold"]) for e in await store.events(20) if e["event"] == "fired"}
    assert fired == {(f"key:{own['id']}", 30), (f"key:{plain['id']}", 50)}

    assert (await api.delete(f"/v1/admin/alerts/rules/key:{silent['id']}")).status_code == 204
    await ledger.conn.r.sadd(keys.ALERT_DIRTY, f"key:{silent['id']}")
    assert await alerter.round() == 1  # back on the default: 50
    audit = (await api.get("/v1/admin/audit", params={"limit": 20})).json()["entries"]
    assert {"alert_rule.put", "alert_rule.delete"} <= {e["action"] for e in audit}


async def test_rule_input_is_bounded(api: httpx.AsyncClient) -> None:
    k = await new_key(api)
    scope = f"key:{k['id']}"
    for body in (
        {"thresholds": [0]},
        {"thresholds": [1001]},
        {"thresholds": list(range(1, 12))},
        {"thresholds": ["x"]},
        {"thresholds": [50], "extra": 1},
        {},
    ):
        r = await api.put(f"/v1/admin/alerts/rules/{scope}", json=body)
        assert r.status_code == 422, body
    for bad in ("model:x", "key:" + "a" * 200, "key:{g}"):
        r = await api.put(f"/v1/admin/alerts/rules/{bad}", json={"thresholds": [50]})
        assert r.status_code == 422, bad
    r = await api.put("/v1/admin/alerts/rules/team:nobody", json={"thresholds": [50]})
    assert r.status_code == 404
    assert (await api.delete(f"/v1/admin/alerts/rules/{scope}")).status_code == 404

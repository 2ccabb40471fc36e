"""Key owners through the admin API on a real valkey-server: a key copies its owner's
`valid_until` when created or moved, a change to the owner reaches every key at once (so
authz refuses them with owner_expired without a lookup), the bulk check repairs stale
copies, lists expired owners with their keys and can disable them, and every change names
its admin in the audit stream."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from atlas.errors import Denied
from atlas.ledger.redis import RedisLedger


def when(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


async def owner(api: httpx.AsyncClient, oid: str, **fields: Any) -> dict[str, Any]:
    r = await api.post("/v1/admin/owners", json={"id": oid, **fields})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def key(api: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    r = await api.post("/v1/admin/keys", json={"name": "k", **fields})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_keys_copy_their_owners_end_and_follow_its_changes(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    later = when(days=30)
    await owner(api, "ada@example.com", name="Ada", valid_until=later)
    a, b = await key(api, owner="ada@example.com"), await key(api, owner="ada@example.com")
    assert a["owner"] == "ada@example.com"
    assert datetime.fromisoformat(a["owner_valid_until"]) == datetime.fromisoformat(later)
    got = (await api.get("/v1/admin/owners/ada@example.com")).json()
    assert got["keys"] == 2 and got["expired"] is False and got["name"] == "Ada"

    r = await api.patch("/v1/admin/owners/ada@example.com", json={"valid_until": when(minutes=-1)})
    assert r.status_code == 200 and r.json()["expired"] is True
    now = datetime.now(UTC)
    for k in (a, b):
        rec = await ledger.get_key(k["id"])
        assert rec is not None
        with pytest.raises(Denied) as info:
            rec.check_usable(now)
        assert info.value.code == "owner_expired" and info.value.status == 403
    # Moving a key to an owner without an end, and back to none, updates its copy.
    await owner(api, "bob")
    moved = (await api.patch(f"/v1/admin/keys/{a['id']}", json={"owner": "bob"})).json()
    assert moved["owner"] == "bob" and moved["owner_valid_until"] is None
    assert (await api.get("/v1/admin/owners/ada@example.com")).json()["keys"] == 1
    listed = (await api.get("/v1/admin/owners", params={"expired": "true"})).json()
    assert [o["id"] for o in listed["items"]] == ["ada@example.com"]
    r = await api.patch("/v1/admin/owners/ada@example.com", json={"valid_until": None})
    assert r.json()["expired"] is False
    rec = await ledger.get_key(b["id"])
    assert rec is not None and rec.owner_valid_until is None
    rec.check_usable(datetime.now(UTC))


async def test_owner_input_is_checked(api: httpx.AsyncClient) -> None:
    await owner(api, "carol")
    assert (await api.post("/v1/admin/owners", json={"id": "carol"})).status_code == 409
    for body in (
        {"id": "has space"},
        {"id": "x" * 200},
        {"id": "{g}"},
        {"id": "dan", "valid_until": "2027-01-01T00:00:00"},  # no zone
        {"id": "dan", "role": "owner"},  # unknown field
        {"id": "dan", "metadata": {"x": "y" * 70_000}},
    ):
        r = await api.post("/v1/admin/owners", json=body)
        assert r.status_code == 422, body
    r = await api.post("/v1/admin/keys", json={"owner": "nobody"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "owner"]
    r = await api.post("/v1/admin/keys", json={"owner_valid_until": when(days=1)})
    assert r.status_code == 422  # only the owner sets it
    assert (await api.get("/v1/admin/owners/nobody")).status_code == 404


async def test_an_owner_with_keys_is_not_deleted(api: httpx.AsyncClient) -> None:
    await owner(api, "erin")
    k = await key(api, owner="erin")
    assert (await api.delete("/v1/admin/owners/erin")).status_code == 409
    assert (await api.delete(f"/v1/admin/keys/{k['id']}")).status_code == 204
    assert (await api.delete("/v1/admin/owners/erin")).status_code == 204
    assert (await api.get("/v1/admin/owners/erin")).status_code == 404


async def test_the_bulk_check_repairs_copies_reports_and_disables(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    await owner(api, "frank", valid_until=when(days=1))
    await owner(api, "grace")
    f1, f2 = await key(api, owner="frank"), await key(api, owner="frank")
    g1 = await key(api, owner="grace")
    # An update that failed half way: the owner's date moved, one key's copy did not.
    rec = await ledger.get_owner("frank")
    assert rec is not None
    await ledger.put_owner(rec.model_copy(update={"valid_until": datetime.now(UTC)}))
    await api.post(f"/v1/admin/keys/{f2['id']}/revoke")

    report = (await api.post("/v1/admin/owners/check-expired")).json()
    assert report["owners"] == 2 and sorted(report["synced"]) == sorted([f1["id"], f2["id"]])
    [expired] = report["expired"]
    assert expired["id"] == "frank" and sorted(expired["keys"]) == sorted([f1["id"], f2["id"]])
    assert expired["disabled"] == []
    assert (await api.get(f"/v1/admin/keys/{f1['id']}")).json()["status"] == "active"

    report = (await api.post("/v1/admin/owners/check-expired?disable=true")).json()
    assert report["synced"] == [] and report["expired"][0]["disabled"] == [f1["id"]]
    assert (await api.get(f"/v1/admin/keys/{f1['id']}")).json()["status"] == "disabled"
    assert (await api.get(f"/v1/admin/keys/{g1['id']}")).json()["status"] == "active"
    audit = (await api.get("/v1/admin/audit", params={"limit": 50})).json()["entries"]
    actions = [(e["action"], e.get("actor")) for e in audit]
    assert ("owner.check_expired", "bootstrap") in actions
    assert ("key.owner_sync", "bootstrap") in actions and ("key.revoke", "bootstrap") in actions


async def test_viewers_read_owners_and_operators_change_them(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    from tests.integration.test_admin_roles import named

    viewer = {"Authorization": f"Bearer {await named(ledger, 'vic', 'viewer')}"}
    assert (await api.get("/v1/admin/owners", headers=viewer)).status_code == 200
    r = await api.post("/v1/admin/owners", json={"id": "hal"}, headers=viewer)
    assert r.status_code == 403
    r = await api.post("/v1/admin/owners/check-expired", headers=viewer)
    assert r.status_code == 403

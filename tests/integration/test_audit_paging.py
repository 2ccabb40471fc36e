"""Paging the admin audit log filtered by key, against a real valkey-server."""

from __future__ import annotations

from typing import Any

import httpx

from admin.routes import audit
from atlas.ledger.redis import RedisLedger


async def pages(api: httpx.AsyncClient, query: str) -> list[dict[str, Any]]:
    """Every page of `GET /v1/admin/audit?<query>`, following `next_before` to the end."""
    out: list[dict[str, Any]] = []
    before = ""
    for _ in range(1000):
        page = (await api.get(f"/v1/admin/audit?{query}{before}")).json()
        out.append(page)
        if page["next_before"] is None:
            return out
        before = f"&before={page['next_before']}"
    raise AssertionError("paging did not end")


async def test_paging_by_key_reaches_every_match_behind_other_keys(
    api: httpx.AsyncClient, ledger: RedisLedger
) -> None:
    # Oldest first: 12 changes of key A, then 30 of key B on top of them.
    for i in range(12):
        await ledger.audit({"action": "key.update", "key_id": "A", "n": i})
    for i in range(30):
        await ledger.audit({"action": "key.update", "key_id": "B", "n": i})
    got = await pages(api, "key_id=A&limit=5")
    found = [e["n"] for p in got for e in p["entries"]]
    assert found == list(range(11, -1, -1))  # all of A, newest first, each once
    assert all(e["key_id"] == "A" for p in got for e in p["entries"])
    assert all(len(p["entries"]) <= 5 for p in got)
    assert [len(p["entries"]) for p in got[:3]] == [5, 5, 2]  # full pages while A lasts
    unfiltered = await pages(api, "limit=7")
    assert sum(len(p["entries"]) for p in unfiltered) == 42
    assert [len(p["entries"]) for p in unfiltered] == [7] * 6 + [0]  # unchanged: one range each


async def test_a_scan_bounded_short_of_a_match_still_pages_on(
    api: httpx.AsyncClient, ledger: RedisLedger, monkeypatch: Any
) -> None:
    monkeypatch.setattr(audit, "MAX_SCANNED_ENTRIES", 10)
    await ledger.audit({"action": "key.create", "key_id": "A"})
    for i in range(25):
        await ledger.audit({"action": "key.update", "key_id": "B", "n": i})
    got = await pages(api, "key_id=A&limit=3")
    # 25 entries of B, 10 scanned per request: two empty pages that still point on, then A.
    assert [len(p["entries"]) for p in got] == [0, 0, 1]
    assert got[-1]["entries"][0]["action"] == "key.create"
    assert (await api.get("/v1/admin/audit?key_id=nobody")).json() == {
        "entries": [],
        "next_before": (await ledger.audit_entries(10))[-1]["id"],
    }

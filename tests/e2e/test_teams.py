"""Teams end to end through the real Envoy with the openai SDK: a team's quota is shared by
its keys and the request that crosses it is refused naming the team's limit; the team's
usage is what its keys settled; teams are managed over the admin API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import MakeKey
from tests.e2e.helpers import settled

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
PROMPT = estimate_prompt_tokens({"model": "demo-small", "messages": MESSAGES})
Client = Callable[[str], openai.AsyncOpenAI]


async def new_team(admin: httpx.AsyncClient, team_id: str, **limits: Any) -> dict[str, Any]:
    await admin.delete(f"/v1/admin/teams/{team_id}")  # a leftover of an earlier run
    r = await admin.post("/v1/admin/teams", json={"id": team_id, "name": team_id, **limits})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_a_team_quota_shared_by_two_keys_refuses_the_crossing_request(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    # Room for two requests of (prompt + 20) over the whole team, not three.
    per_request = PROMPT + 20
    await new_team(admin, "e2e-quota", daily_limit=2 * per_request + per_request // 2)
    a = await make_key(team="e2e-quota", daily_limit=10**6)
    b = await make_key(team="e2e-quota", daily_limit=10**6)
    assert a["id"].endswith(".e2e-quota") and a["team"] == "e2e-quota"
    ca, cb = client_for(a["api_key"]), client_for(b["api_key"])
    got = await ca.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=20)
    await settled(admin, a["id"])
    got2 = await cb.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=20)
    await settled(admin, b["id"])
    with pytest.raises(openai.RateLimitError) as info:
        await cb.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=20)
    assert info.value.code == "insufficient_quota"
    assert "team 'e2e-quota'" in info.value.message
    assert info.value.response.headers["x-atlas-limit"] == "team.daily"
    assert int(info.value.response.headers["retry-after"]) >= 1
    # Each key's own quota is far from used: it is the team's that refused.
    r = await admin.get(f"/v1/admin/keys/{b['id']}/usage")
    assert r.json()["daily"]["remaining"] > 10**5
    assert got.usage is not None and got2.usage is not None
    r = await admin.get("/v1/admin/teams/e2e-quota/usage")
    assert r.status_code == 200
    usage = r.json()
    assert usage["daily"]["used"] == got.usage.total_tokens + got2.usage.total_tokens
    assert usage["daily"]["reserved"] == 0
    assert sorted(usage["key_ids"]) == sorted([a["id"], b["id"]])


async def test_the_keys_own_limit_is_named_when_it_is_hit_first(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    await new_team(admin, "e2e-roomy", daily_limit=10**6)
    a = await make_key(team="e2e-roomy", daily_limit=PROMPT + 25)
    c = client_for(a["api_key"])
    await c.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=20)
    await settled(admin, a["id"])
    with pytest.raises(openai.RateLimitError) as info:
        await c.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=20)
    assert info.value.response.headers["x-atlas-limit"] == "key.daily"
    assert "this API key" in info.value.message


async def test_team_admin_api_validates_and_protects(
    make_key: MakeKey, admin: httpx.AsyncClient
) -> None:
    await new_team(admin, "e2e-admin", rate_per_sec=5)
    r = await admin.post("/v1/admin/teams", json={"id": "e2e-admin"})
    assert r.status_code == 409
    for bad in ({"id": "Has Spaces"}, {"id": "x" * 33}, {"id": "ok", "daily_limit": -1}):
        r = await admin.post("/v1/admin/teams", json=bad)
        assert r.status_code == 422, bad
    r = await admin.post("/v1/admin/keys", json={"team": "no-such-team"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "team"]
    key = await make_key(team="e2e-admin")
    r = await admin.delete("/v1/admin/teams/e2e-admin")
    assert r.status_code == 409  # it has a key
    r = await admin.patch("/v1/admin/teams/e2e-admin", json={"daily_limit": 500})
    assert r.status_code == 200 and r.json()["daily_limit"] == 500 and r.json()["keys"] == 1
    listed = await admin.get("/v1/admin/keys", params={"team": "e2e-admin"})
    assert [k["id"] for k in listed.json()["items"]] == [key["id"]]
    entries = (await admin.get("/v1/admin/audit", params={"limit": 20})).json()
    actions = [e["action"] for e in entries["entries"]]
    assert "team.update" in actions and "team.create" in actions
    assert (await admin.delete(f"/v1/admin/keys/{key['id']}")).status_code == 204
    assert (await admin.delete("/v1/admin/teams/e2e-admin")).status_code == 204
    assert (await admin.get("/v1/admin/teams/e2e-admin")).status_code == 404

"""Team limits in the same admission as each key's, against a real valkey-server: quotas,
rates and budgets over all of a team's keys, precedence, clamping, and the team's windows
kept exactly as its keys' through settle and reap (conservation)."""

from __future__ import annotations

import asyncio

import pytest
import redis

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.teammodel import TeamRecord
from atlas.windows import window_names
from tests.factories import key_record


def member(n: int, team: str = "research", **kw: object) -> KeyRecord:
    return key_record(f"sk-atlas-team-member-{n}-0123456789", id=f"key_{n}.{team}", team=team, **kw)


def req(rid: str, prompt: int = 10, completion: int = 90, **kw: object) -> AdmitRequest:
    return AdmitRequest(rid, prompt, completion, "normal", "m", 1.0, **kw)  # type: ignore[arg-type]


def settle(rec: KeyRecord, rid: str, prompt: int, completion: int, cost: int = 0) -> Settlement:
    return Settlement(rec.id, rid, prompt, completion, "m", True, "completed", cost_micros=cost)


def team_window(r: redis.Redis, team: str, kind: str) -> dict[str, int]:
    sec = int(r.time()[0])
    names = window_names(sec)
    name = names.day if kind == "d" else names.month
    raw = r.hgetall(f"{keys.team_window_prefix(team)}{kind}:{name}")
    return {k: int(v) for k, v in raw.items()}


async def make_team(ledger: RedisLedger, **limits: object) -> TeamRecord:
    team = TeamRecord(id="research", name="Research", **limits)  # type: ignore[arg-type]
    await ledger.create_team(team)
    return team


async def test_a_team_quota_is_shared_by_its_keys(ledger: RedisLedger) -> None:
    await make_team(ledger, daily_limit=250)
    a, b = member(1), member(2)
    assert (await ledger.admit(a, req("r1"))).admitted  # 100 reserved of 250
    assert (await ledger.admit(b, req("r2"))).admitted  # 200
    refused = await ledger.admit(b, req("r3"))  # 300 > 250: the team's, not the key's
    assert not refused.admitted and refused.reason == "team_quota_daily"
    assert refused.retry_after_ms > 0
    # Settling below the reservation frees the team's room for either key.
    await ledger.settle(settle(a, "r1", 10, 20))
    assert (await ledger.admit(b, req("r4"))).admitted  # 30 + 100 + 100 = 230


async def test_the_keys_own_limit_is_reported_when_it_is_the_smaller_room(
    ledger: RedisLedger,
) -> None:
    await make_team(ledger, daily_limit=1000)
    a = member(1, daily_limit=150)
    assert (await ledger.admit(a, req("r1"))).admitted
    refused = await ledger.admit(a, req("r2"))
    assert refused.reason == "quota_daily"


async def test_clamp_fits_the_smaller_of_key_and_team_room(ledger: RedisLedger) -> None:
    await make_team(ledger, daily_limit=60)
    a = member(1)
    got = await ledger.admit(a, req("r1", clamp=True))
    assert got.admitted and got.granted_completion == 50 and got.reserved == 60


async def test_team_requests_per_second_over_all_keys(ledger: RedisLedger) -> None:
    await make_team(ledger, rate_per_sec=0.01, burst=5)
    keys_ = [member(i) for i in range(4)]
    results = await asyncio.gather(
        *(ledger.admit(keys_[i % 4], req(f"r{i}", 1, 1)) for i in range(20))
    )
    assert sum(a.admitted for a in results) == 5
    assert {a.reason for a in results if not a.admitted} == {"team_rate_limit_requests"}


async def test_team_tokens_per_minute_and_refund_on_settle(ledger: RedisLedger) -> None:
    await make_team(ledger, tokens_per_minute=150)
    a, b = member(1), member(2)
    assert (await ledger.admit(a, req("r1"))).admitted  # 100 of the bucket's 150
    refused = await ledger.admit(b, req("r2"))
    assert refused.reason == "team_rate_limit_tokens"
    await ledger.settle(settle(a, "r1", 10, 10))  # 80 back to the team's bucket
    assert (await ledger.admit(b, req("r3"))).admitted


async def test_team_monthly_budget(ledger: RedisLedger) -> None:
    await make_team(ledger, monthly_budget_usd=0.001)  # 1000 micro-USD
    a, b = member(1), member(2)
    assert (await ledger.admit(a, req("r1", cost_micros=600))).admitted
    refused = await ledger.admit(b, req("r2", cost_micros=600))
    assert refused.reason == "team_budget_monthly"
    await ledger.settle(settle(a, "r1", 10, 10, cost=100))
    assert (await ledger.admit(b, req("r3", cost_micros=600))).admitted


async def test_a_key_refusal_leaves_the_team_untouched(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await make_team(ledger, daily_limit=10_000)
    a = member(1, rate_per_sec=0.01, burst=1)
    assert (await ledger.admit(a, req("r1"))).admitted
    refused = await ledger.admit(a, req("r2"))
    assert refused.reason == "rate_limit_requests"
    assert team_window(redis_sync, "research", "d") == {"reserved": 100, "requests": 1}


async def test_team_windows_equal_the_sum_of_their_keys(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    """Conservation: after admissions, settlements, a late settlement and a reap, the team's
    day and month used/reserved equal the sums over its keys."""
    await make_team(ledger, daily_limit=10**6, monthly_limit=10**7)
    members = [member(i) for i in range(3)]
    for i in range(30):
        assert (await ledger.admit(members[i % 3], req(f"r{i}", 5 + i, 50))).admitted
    for i in range(0, 30, 2):
        await ledger.settle(settle(members[i % 3], f"r{i}", 5 + i, i))
    # Reap the rest: due now (unclaimed: charged 0), then one claimed and reaped (charged).
    for i in range(1, 30, 2):
        rec = members[i % 3]
        redis_sync.zadd(keys.reservation_expiry(rec.id), {f"r{i}": 0})
        if i == 1:
            redis_sync.sadd(keys.reservation_claims(rec.id), f"r{i}")
    for rec in members:
        await ledger.reap(rec.id)
    await ledger.settle(settle(members[1], "r1", 6, 7))  # late: corrects the reaped charge
    sec = int(redis_sync.time()[0])
    names = window_names(sec)
    for kind, name in (("d", names.day), ("m", names.month)):
        sums: dict[str, int] = {}
        for rec in members:
            raw = redis_sync.hgetall(f"{keys.window_prefix(rec.id)}{kind}:{name}")
            for f in ("used", "reserved", "requests", "spend", "spend_reserved"):
                sums[f] = sums.get(f, 0) + int(raw.get(f, 0))
        team = team_window(redis_sync, "research", kind)
        assert {f: team.get(f, 0) for f in sums} == sums
        assert sums["reserved"] == 0 and sums["used"] > 0


async def test_team_store_round_trip_and_delete_rules(ledger: RedisLedger) -> None:
    team = await make_team(ledger, daily_limit=100)
    with pytest.raises(ValueError, match="already exists"):
        await ledger.create_team(team)
    a = member(1)
    await ledger.create_key(a)
    assert await ledger.team_key_ids("research") == [a.id]
    with pytest.raises(ValueError, match="still has keys"):
        await ledger.delete_team("research")
    await ledger.put_team(team.model_copy(update={"daily_limit": 1000}))
    assert (await ledger.admit(a, req("r1", 10, 500))).admitted  # the new limit applies
    day, _ = await ledger.team_usage(team)
    assert day.reserved == 510
    await ledger.delete_key(a)
    await ledger.delete_team("research")
    assert await ledger.get_team("research") is None
    assert await ledger.count_teams() == 0

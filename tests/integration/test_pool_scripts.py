"""pool_pick.lua and pool_report.lua against a real valkey-server: round robin, least used,
per-member limits, cooling (member and whole provider, only ever extended, dropped once
past), and the per-minute numbers the health view reads."""

from __future__ import annotations

import asyncio

from atlas.ledger.protocol import PoolObservation
from atlas.ledger.redis import RedisLedger

MEMBERS = [("k1", 0, 0), ("k2", 0, 0), ("k3", 0, 0)]


async def test_round_robin_rotates_and_least_used_balances(ledger: RedisLedger) -> None:
    picks = [(await ledger.pick("rr", "round_robin", 10, MEMBERS)).member for _ in range(6)]
    assert sorted(picks[:3]) == ["k1", "k2", "k3"] and picks[3:] == picks[:3]
    await ledger.pick("lu", "least_used", 10, MEMBERS[:1])  # k1 has one request this minute
    picks = [(await ledger.pick("lu", "least_used", 10, MEMBERS)).member for _ in range(2)]
    assert sorted(picks) == ["k2", "k3"]


async def test_limits_skip_a_member_until_the_next_minute(ledger: RedisLedger) -> None:
    members = [("k1", 1, 0), ("k2", 0, 100)]
    assert (await ledger.pick("lim", "round_robin", 60, members)).member == "k1"
    assert (await ledger.pick("lim", "round_robin", 60, members)).member == "k2"
    # k1 is at 1 request/min, k2 would cross 100 tokens/min: nobody until the minute turns.
    p = await ledger.pick("lim", "round_robin", 60, members)
    assert (p.member, p.why) == ("", "over_limit") and 0 < p.wait_ms <= 60_000


async def test_cooling_member_and_provider(ledger: RedisLedger) -> None:
    await ledger.report("cool", [PoolObservation(member="k2", cool_ms=5000, reason="429")])
    await ledger.report("cool", [PoolObservation(member="k2", cool_ms=100, reason="429")])
    picks = {(await ledger.pick("cool", "round_robin", 1, MEMBERS)).member for _ in range(6)}
    assert picks == {"k1", "k3"}
    state = await ledger.pool_state("cool", 1)
    assert set(state.cooling) == {"k2"} and state.cooling["k2"][1] == "429"  # only extended
    everyone = [PoolObservation(member=m, cool_ms=3000, reason="429") for m in ("k1", "k3")]
    await ledger.report("cool", everyone)
    p = await ledger.pick("cool", "round_robin", 1, MEMBERS)
    assert (p.member, p.why) == ("", "cooling") and 2000 < p.wait_ms <= 3000
    whole = PoolObservation(cool_ms=200, cool_scope="provider", reason="503")
    await ledger.report("nopool", [whole])
    p = await ledger.pick("nopool", "round_robin", 1, [])
    assert p.why == "provider_cooling"
    await asyncio.sleep(0.3)
    assert (await ledger.pick("nopool", "round_robin", 1, [])).wait_ms == 0
    await ledger.report("nopool", [PoolObservation(stats={"-|req": 1})])
    assert "*" not in (await ledger.pool_state("nopool", 1)).cooling  # dropped once past


async def test_stats_and_token_corrections(ledger: RedisLedger) -> None:
    await ledger.pick("st", "round_robin", 50, MEMBERS[:1])
    await ledger.report(
        "st",
        [
            PoolObservation(member="k1", stats={"k1|req": 1, "k1|lat3": 1}),
            PoolObservation(member="k1", token_correction=-80, stats={"k1|prompt": 7}),
        ],
    )
    state = await ledger.pool_state("st", 5)
    assert state.use["k1|r"] == 1 and state.use["k1|t"] == 0  # never below zero
    assert state.minutes[-1] == {"k1|req": 1, "k1|lat3": 1, "k1|prompt": 7}
    assert len(state.minutes) == 5

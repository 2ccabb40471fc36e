"""pool_pick.lua and pool_report.lua through RedisLedger against a real valkey-server: how a
member is chosen, skipped and cooled, what the pick answers when nobody can serve, and what
pool_state reads back."""

from __future__ import annotations

import asyncio

import redis

from atlas.ledger import keys
from atlas.ledger.protocol import PoolObservation
from atlas.ledger.redis import RedisLedger

THREE = [("k1", 0, 0), ("k2", 0, 0), ("k3", 0, 0)]


def _now_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def _clear_of_the_minute_boundary(r: redis.Redis, margin_ms: int = 3000) -> None:
    """Per-minute counts reset as the minute turns: start tests about them well inside one."""
    left = 60_000 - _now_ms(r) % 60_000
    if left < margin_ms:
        await asyncio.sleep(left / 1000 + 0.05)


async def _picks(ledger: RedisLedger, provider: str, n: int, members: list[tuple[str, int, int]],
                 strategy: str = "round_robin", estimate: int = 1) -> list[str]:  # fmt: skip
    return [(await ledger.pick(provider, strategy, estimate, members)).member for _ in range(n)]


def _cool(member: str, ms: int, reason: str = "429") -> PoolObservation:
    return PoolObservation(member=member, cool_ms=ms, reason=reason)


def _cool_provider(ms: int, reason: str = "503") -> PoolObservation:
    return PoolObservation(cool_ms=ms, cool_scope="provider", reason=reason)


# ---- choosing ----------------------------------------------------------------------------


async def test_round_robin_rotates_over_the_members(ledger: RedisLedger) -> None:
    assert await _picks(ledger, "p", 7, THREE) == ["k1", "k2", "k3", "k1", "k2", "k3", "k1"]
    # Another provider has its own cursor.
    assert await _picks(ledger, "q", 2, THREE) == ["k1", "k2"]


async def test_round_robin_skips_a_cooling_member(ledger: RedisLedger) -> None:
    await ledger.report("p", [_cool("k2", 10_000)])
    assert await _picks(ledger, "p", 4, THREE) == ["k1", "k3", "k1", "k3"]


async def test_least_used_picks_the_fewest_requests_this_minute(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    await _picks(ledger, "p", 3, [("k1", 0, 0)], "least_used")  # k1: 3 requests
    await _picks(ledger, "p", 1, [("k3", 0, 0)], "least_used")  # k3: 1
    # k2 (0), then k2 and k3 tie at 1 (file order), then k3 (1 < 2), then k2 and k3 at 2.
    assert await _picks(ledger, "p", 5, THREE, "least_used") == ["k2", "k2", "k3", "k2", "k3"]
    state = await ledger.pool_state("p", 1)
    assert {m: state.use[f"{m}|r"] for m in ("k1", "k2", "k3")} == {"k1": 3, "k2": 3, "k3": 3}


# ---- limits ------------------------------------------------------------------------------


async def test_requests_per_minute_skips_a_member_then_everyone_waits_for_the_minute(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    members = [("k1", 1, 0), ("k2", 2, 0)]
    assert await _picks(ledger, "p", 3, members) == ["k1", "k2", "k2"]
    before = _now_ms(redis_sync)
    p = await ledger.pick("p", "round_robin", 1, members)
    assert (p.member, p.why) == ("", "over_limit")
    to_next_minute = 60_000 - before % 60_000
    assert to_next_minute - 1000 <= p.wait_ms <= to_next_minute
    state = await ledger.pool_state("p", 1)
    assert (state.use["k1|r"], state.use["k2|r"]) == (1, 2)  # the refusal counted nothing


async def test_tokens_per_minute_counts_the_estimate(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    members = [("k1", 0, 100), ("k2", 0, 1000)]
    # A first request larger than the whole limit still goes: it could never go otherwise.
    assert (await ledger.pick("p", "round_robin", 150, members)).member == "k1"
    assert (await ledger.pick("p", "round_robin", 150, members)).member == "k2"
    # k1 has 150 of 100 this minute: k2 serves until it would cross its own 1000.
    assert await _picks(ledger, "p", 5, members, estimate=150) == ["k2"] * 5
    p = await ledger.pick("p", "round_robin", 150, members)  # k2 at 900: 1050 > 1000
    assert (p.member, p.why) == ("", "over_limit")
    assert (await ledger.pick("p", "round_robin", 100, members)).member == "k2"  # exactly 1000
    state = await ledger.pool_state("p", 1)
    assert (state.use["k1|t"], state.use["k2|t"]) == (150, 1000)


async def test_settled_tokens_correct_the_estimate(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    members = [("k1", 0, 100)]
    assert (await ledger.pick("p", "round_robin", 60, members)).member == "k1"
    assert (await ledger.pick("p", "round_robin", 60, members)).why == "over_limit"
    await ledger.report("p", [PoolObservation(member="k1", token_correction=-50)])  # used 10
    assert (await ledger.pick("p", "round_robin", 60, members)).member == "k1"  # 70 <= 100
    await ledger.report("p", [PoolObservation(member="k1", token_correction=25)])  # used 85
    state = await ledger.pool_state("p", 1)
    assert state.use["k1|t"] == 95


async def test_a_token_correction_never_drives_the_count_below_zero(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    await ledger.pick("p", "round_robin", 40, [("k1", 0, 0)])
    await ledger.report(
        "p",
        [
            PoolObservation(member="k1", token_correction=-1000),
            PoolObservation(member="", token_correction=-1000),  # no member: nothing to correct
        ],
    )
    state = await ledger.pool_state("p", 1)
    assert (state.use["k1|r"], state.use["k1|t"]) == (1, 0)
    assert set(state.use) == {"k1|r", "k1|t"}


# ---- cooling -----------------------------------------------------------------------------


async def test_when_every_member_cools_the_wait_is_the_shortest_remaining(
    ledger: RedisLedger,
) -> None:
    await ledger.report("p", [_cool("k1", 9000), _cool("k2", 4000), _cool("k3", 6000)])
    p = await ledger.pick("p", "round_robin", 1, THREE)
    assert (p.member, p.why) == ("", "cooling")
    assert 3000 < p.wait_ms <= 4000


async def test_the_wait_is_the_shorter_of_cooling_and_the_next_minute(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync, margin_ms=5000)
    members = [("k1", 1, 0), ("k2", 0, 0)]
    assert (await ledger.pick("p", "round_robin", 1, members)).member == "k1"
    await ledger.report("p", [_cool("k2", 2000)])
    p = await ledger.pick("p", "round_robin", 1, members)
    assert (p.member, p.why) == ("", "cooling") and 1000 < p.wait_ms <= 2000
    await ledger.report("p", [_cool("k2", 120_000)])  # now longer than the minute
    p = await ledger.pick("p", "round_robin", 1, members)
    assert (p.member, p.why) == ("", "over_limit") and p.wait_ms <= 60_000


async def test_a_cooling_member_serves_again_when_its_time_has_passed(
    ledger: RedisLedger,
) -> None:
    await ledger.report("p", [_cool("k1", 150)])
    assert (await ledger.pick("p", "round_robin", 1, THREE[:1])).why == "cooling"
    await asyncio.sleep(0.2)
    assert (await ledger.pick("p", "round_robin", 1, THREE[:1])).member == "k1"


async def test_a_cooling_provider_serves_nobody(ledger: RedisLedger) -> None:
    await ledger.report("p", [_cool_provider(5000)])
    p = await ledger.pick("p", "round_robin", 1, THREE)
    assert (p.member, p.why) == ("", "provider_cooling") and 4000 < p.wait_ms <= 5000
    assert (await ledger.pick("p", "least_used", 1, THREE)).why == "provider_cooling"
    assert (await ledger.pool_state("p", 1)).use == {}  # nothing counted
    state = await ledger.pool_state("p", 1)
    assert set(state.cooling) == {"*"} and state.cooling["*"][1] == "503"


async def test_a_pool_without_members_serves_unless_the_provider_cools(
    ledger: RedisLedger,
) -> None:
    p = await ledger.pick("vllm", "round_robin", 1, [])
    assert (p.member, p.wait_ms, p.why) == ("", 0, "")
    await ledger.report("vllm", [_cool("", 5000)])  # a member-scope cooling without a member
    assert (await ledger.pick("vllm", "round_robin", 1, [])).wait_ms == 0
    await ledger.report("vllm", [_cool_provider(3000, "unreachable")])
    p = await ledger.pick("vllm", "round_robin", 1, [])
    assert (p.member, p.why) == ("", "provider_cooling") and 2000 < p.wait_ms <= 3000


async def test_cooling_only_extends(ledger: RedisLedger) -> None:
    await ledger.report("p", [_cool("k1", 10_000, "429")])
    first = (await ledger.pool_state("p", 1)).cooling["k1"]
    await ledger.report("p", [_cool("k1", 100, "401")])  # shorter: ignored, reason too
    assert (await ledger.pool_state("p", 1)).cooling["k1"] == first
    await ledger.report("p", [_cool("k1", 30_000, "401")])
    until, reason = (await ledger.pool_state("p", 1)).cooling["k1"]
    assert reason == "401" and until > first[0] + 15
    await ledger.report("p", [_cool_provider(5000), _cool_provider(1000, "502")])
    assert (await ledger.pool_state("p", 1)).cooling["*"][1] == "503"


async def test_expired_cooling_entries_are_removed(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    cool = keys.pool_keys("p")[0]
    await ledger.report("p", [_cool("k1", 100), _cool("k2", 60_000), _cool_provider(100)])
    assert set(redis_sync.hkeys(cool)) == {"k1", "k2", "*"}
    await asyncio.sleep(0.15)
    assert set((await ledger.pool_state("p", 1)).cooling) == {"k2"}  # past ones not shown
    await ledger.report("p", [PoolObservation(member="k3", stats={"k3|req": 1})])
    assert set(redis_sync.hkeys(cool)) == {"k2"}  # and dropped by the next report


# ---- pool_state --------------------------------------------------------------------------


async def test_pool_state_reads_cooling_and_the_minutes_report_wrote(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    before_s = _now_ms(redis_sync) / 1000
    await ledger.pick("p", "round_robin", 7, THREE[:1])
    await ledger.report(
        "p",
        [
            PoolObservation(member="k1", cool_ms=20_000, reason="429", stats={"k1|req": 1}),
            PoolObservation(member="k2", cool_ms=5_000, stats={"k2|req": 1, "k2|lat3": 1}),
        ],
    )
    await ledger.report("p", [PoolObservation(member="k1", stats={"k1|req": 2, "k1|s429": 1})])
    state = await ledger.pool_state("p", 3)
    assert state.cooling["k1"][1] == "429" and state.cooling["k2"][1] == "-"  # no reason given
    assert before_s + 19 <= state.cooling["k1"][0] <= before_s + 21
    assert state.use == {"k1|r": 1, "k1|t": 7}
    assert len(state.minutes) == 3 and state.minutes[:2] == [{}, {}]  # newest last
    assert state.minutes[-1] == {"k1|req": 3, "k1|s429": 1, "k2|req": 1, "k2|lat3": 1}
    stats = keys.pool_keys("p")[3] + str(int(_now_ms(redis_sync) // 60_000))
    assert 0 < redis_sync.ttl(stats) <= 2 * 3600


async def test_an_empty_report_writes_nothing(ledger: RedisLedger, redis_sync: redis.Redis) -> None:
    await ledger.report("p", [])
    assert redis_sync.keys("*") == []


# ---- known gaps --------------------------------------------------------------------------


async def test_use_is_one_expiring_hash_per_minute(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    """Past minutes' counts never accumulate: each minute has its own hash, and every write
    to it (a pick, or a correction that arrives late) sets its expiry."""
    await _clear_of_the_minute_boundary(redis_sync)
    prefix = keys.pool_keys("p")[1]
    minute = _now_ms(redis_sync) // 60_000
    await ledger.pick("p", "round_robin", 1, THREE[:1])
    await ledger.report("p", [PoolObservation(member="k1", token_correction=-1)])
    assert sorted(redis_sync.hkeys(f"{prefix}{minute}")) == ["k1|r", "k1|t"]
    assert 0 < redis_sync.pttl(f"{prefix}{minute}") <= 180_000
    assert redis_sync.keys(prefix + "*") == [f"{prefix}{minute}"]


async def test_a_late_correction_leaves_no_key_without_a_ttl(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await _clear_of_the_minute_boundary(redis_sync)
    await ledger.report("q", [PoolObservation(member="k1", token_correction=300)])
    prefix = keys.pool_keys("q")[1]
    names = redis_sync.keys(prefix + "*")
    assert names and all(redis_sync.ttl(n) > 0 for n in names)

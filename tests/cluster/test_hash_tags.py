"""Hash tags verified: every key one Lua script touches is in one cluster slot (the scripts
also build `d:`/`m:`/`h:`/`done:`/`tz`/`eu:` names from the window prefix), global state
shares `{g}`, each model `{m:<model>}`, and different API keys spread over slots and
masters."""

from __future__ import annotations

import inspect
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from redis.cluster import RedisCluster, key_slot

from atlas.keymodel import new_key_id
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.teammodel import TeamRecord
from atlas.windows import window_names
from tests.cluster.conftest import primaries
from tests.factories import key_record

#: builders of one API key's names: all under its tag `{k:<id>}`.
PER_KEY = ("tag", "record", "request_bucket", "token_bucket", "reservations")
PER_KEY += ("reservation_expiry", "reservation_claims", "window_prefix", "window_zone")
#: `lock` is global state ({g}); `model_prefix` is per model; `secret_index` has its own
#: slot and is never touched by a script; a request log day's stream and count share
#: the day's slot.
OTHERS = ("lock", "model_prefix", "secret_index", "alert_fired", "alert_active")
OTHERS += ("request_log_day", "request_log_count", "owner_keys")
#: builders of one provider pool's names: all in the slot of `{p:<provider>}`.
POOL = ("pool_tag", "pool_keys")
#: builders of one team's names: all in the slot of `{t:<team>}`, with its keys' names.
TEAM = ("team_tag", "team_record", "team_limits", "team_members", "team_request_bucket")
TEAM += ("team_token_bucket", "team_window_prefix")
#: builders of one window or history hour by name: in the slot of their key or prefix.
NAMED = ("day_window", "month_window", "history_hour")


def slot(name: str) -> int:
    return int(key_slot(name.encode()))


def script_names(key_id: str, rid: str = "r1", now_s: int = 1_795_435_200) -> dict[str, str]:
    """Every name a script touches for one key: the KEYS it is given (as the ledger builds
    them) and the names it derives from the window prefix, as the Lua code does."""
    w = window_names(now_s)
    prefix = keys.window_prefix(key_id)
    return {
        "request_bucket": keys.request_bucket(key_id),
        "token_bucket": keys.token_bucket(key_id),
        "reservations": keys.reservations(key_id),
        "reservation_expiry": keys.reservation_expiry(key_id),
        "reservation_claims": keys.reservation_claims(key_id),
        "day": f"{prefix}d:{w.day}",
        "month": f"{prefix}m:{w.month}",
        "hour": f"{prefix}h:{w.hour}",
        "done": f"{prefix}done:{rid}",
        "zone": f"{prefix}tz",  # admit writes it, settle and reap read it
        # An end user's day and requests/minute bucket (admit; settle and reap the day).
        "end_user_day": f"{prefix}eu:d:{w.day}",
        "end_user_rpm": f"{prefix}eu:rpm:0123456789abcdef",
        "record": keys.record(key_id),
    }


def test_every_builder_in_keys_is_classified() -> None:
    """A new name builder must be added here (and its slot checked) before it is used."""
    builders = {
        name
        for name, fn in inspect.getmembers(keys, inspect.isfunction)
        if fn.__module__ == keys.__name__
    }
    assert builders == set(PER_KEY) | set(OTHERS) | set(NAMED) | set(POOL) | set(TEAM)


@pytest.mark.parametrize("team", ["research", "a", "x" * 32])
def test_a_teams_names_and_its_keys_share_one_slot(team: str) -> None:
    team_slot = slot(f"t:{team}")
    assert {n: slot(getattr(keys, n)(team)) for n in TEAM} == dict.fromkeys(TEAM, team_slot)
    for key_id in (new_key_id(team), f"key_0.{team}"):
        names = script_names(key_id)
        assert {n: slot(v) for n, v in names.items()} == dict.fromkeys(names, team_slot)
    # Keys of different teams, and of no team, spread over slots as before.
    spread = {slot(keys.tag(new_key_id(f"t{i}"))) for i in range(200)}
    assert len(spread) >= 190


@pytest.mark.parametrize("provider", ["openai", "a-b_c", "x" * 48])
def test_a_pools_names_share_one_slot(provider: str) -> None:
    cool, use, rr, stats = keys.pool_keys(provider)
    names = [cool, use, rr, f"{stats}29552480", keys.pool_tag(provider)]
    assert {slot(n) for n in names} == {slot(f"p:{provider}")}


SAMPLE_IDS = ["key_0", "key_" + "f" * 16]
SAMPLE_IDS += ["key_" + random.Random(i).randbytes(8).hex() for i in range(20)]


@pytest.mark.parametrize("key_id", SAMPLE_IDS)
def test_all_names_of_one_key_map_to_one_slot(key_id: str) -> None:
    tag_slot = slot(f"k:{key_id}")  # Redis Cluster hashes only the text between { and }
    builders: dict[str, Callable[[str], str]] = {n: getattr(keys, n) for n in PER_KEY}
    assert {n: slot(b(key_id)) for n, b in builders.items()} == dict.fromkeys(PER_KEY, tag_slot)
    named = [keys.day_window(key_id, "20261123"), keys.month_window(key_id, "202611")]
    named += [keys.history_hour(keys.window_prefix(key_id), "2026112314")]
    assert {slot(n) for n in named} == {tag_slot}
    for rid in ("r1", "0f3a" * 8, "rid-with-{braces}"):  # rids come after the tag: no effect
        names = script_names(key_id, rid)
        assert {n: slot(v) for n, v in names.items()} == dict.fromkeys(names, tag_slot)


def test_global_and_model_names_share_their_own_slots() -> None:
    g = slot("g")
    global_names = [keys.KEY_INDEX, keys.INFLIGHT, keys.AUDIT, keys.lock("reaper")]
    global_names += [f"{keys.GLOBAL_PREFIX}h:2026112314"]
    global_names += [keys.OWNERS, keys.owner_keys("ada@example.com")]  # one MULTI deletes both
    global_names += [keys.alert_active(1_795_435_200)]  # SUNION of two hours
    assert {slot(n) for n in global_names} == {g}
    for model, tag in (
        ("gpt-4o", "m:gpt-4o"),
        ("a{b}c", "m:a(b)c"),  # braces in client input cannot move the tag
        ("}{", "m:)("),
        ("", "m:unknown"),
        ("x" * 500, "m:" + "x" * 128),
    ):
        prefix = keys.model_prefix(model)
        assert slot(prefix) == slot(f"{prefix}h:2026112314") == slot(tag), model
    for day in ("20261203", "20261204"):  # log_append.lua touches both names of a day
        assert slot(keys.request_log_day(day)) == slot(keys.request_log_count(day))
        assert slot(keys.request_log_day(day)) == slot(f"rl:{day}")
    # Secrets are looked up by hash without a tag: spread over the whole key space.
    assert len({slot(keys.secret_index(f"{i:064x}")) for i in range(100)}) > 95


def test_the_server_computes_the_same_slots(redis_sync: RedisCluster) -> None:
    names = [*script_names("key_abc").values(), keys.KEY_INDEX, keys.model_prefix("a{b}")]
    names += [keys.secret_index("ab" * 32), keys.GLOBAL_PREFIX]
    assert [redis_sync.cluster_keyslot(n) for n in names] == [slot(n) for n in names]


def test_different_api_keys_spread_over_slots_and_masters(redis_sync: RedisCluster) -> None:
    rng = random.Random(20261123)
    ids = ["key_" + rng.randbytes(8).hex() for _ in range(300)]
    slots = [slot(keys.tag(kid)) for kid in ids]
    assert len(set(slots)) >= 290  # about 2.7 collisions expected among 16384 slots
    masters = Counter(redis_sync.get_node_from_key(keys.tag(kid)).name for kid in ids)
    assert len(masters) == 3 and min(masters.values()) >= 70  # a third each, roughly
    fresh = {slot(keys.tag(new_key_id())) for _ in range(300)}  # the real id generator
    assert len(fresh) >= 280


class Recorder:
    """Stands in for a registered script: records the KEYS of every call, then runs it."""

    def __init__(self, script: Any, calls: list[list[str]]) -> None:
        self._script = script
        self._calls = calls

    async def __call__(self, keys: list[str], args: list[Any], **kw: Any) -> Any:
        self._calls.append(list(keys))
        return await self._script(keys=keys, args=args, **kw)

    def __getattr__(self, name: str) -> Any:  # sha, script: used by the reap_keys pipeline
        return getattr(self._script, name)


async def test_scripts_touch_only_their_keys_slot_on_the_cluster(
    ledger: RedisLedger, redis_sync: RedisCluster
) -> None:
    """Run admit (admitted and refused), settle and reap on keys of every master; record the
    KEYS each script gets, and after each step find where the keys really landed."""
    calls: list[list[str]] = []
    for attr in ("admit", "settle", "reap"):
        setattr(ledger.scripts, attr, Recorder(getattr(ledger.scripts, attr), calls))
    limits = {"burst": 1, "rate_per_sec": 0.01, "tokens_per_minute": 10**6}
    recs = [key_record(f"s{i}" * 10, id=f"key_{i:02d}", **limits) for i in range(12)]
    seen: dict[str, set[str]] = {rec.id: set() for rec in recs}

    def snapshot() -> None:
        for node in primaries(redis_sync):
            port = node.get_connection_kwargs()["port"]
            for name in node.scan_iter(match="atlas:{k:*", count=1000):
                kid = name.split("{k:", 1)[1].split("}", 1)[0]
                owner = redis_sync.get_node_from_key(keys.tag(kid))
                assert owner.port == port, (name, "stored off its tag's master")
                assert slot(name) == slot(keys.tag(kid)), name
                seen[kid].add(name.split("}:", 1)[1].split(":", 1)[0])

    for rec in recs:
        assert (await ledger.admit(rec, AdmitRequest("r1", 5, 5, "normal", "m", 1.0))).admitted
        refused = await ledger.admit(rec, AdmitRequest("r2", 5, 5, "normal", "m", 1.0))
        assert refused.reason == "rate_limit_requests"
    snapshot()
    for rec in recs[:6]:
        settle = Settlement(rec.id, "r1", 5, 1, "m", True, "completed", 10**6)
        assert (await ledger.settle(settle)).status == "settled"
    for rec in recs[6:]:
        assert await ledger.lease({rec.id: ["r1"]}) == 1  # claimed by a stream, then lost
        redis_sync.zadd(keys.reservation_expiry(rec.id), {"r1": 0})
        assert await ledger.reap(rec.id) == (1, 10)
    snapshot()
    for key_calls in calls:
        assert len({slot(k) for k in key_calls}) == 1, key_calls
    assert len(calls) == 12 * 2 + 12
    assert {redis_sync.get_node_from_key(keys.tag(r.id)).name for r in recs} == {
        n.name for n in redis_sync.get_primaries()
    }
    for kid, kinds in seen.items():
        assert kinds >= {"rb", "tb", "resv", "d", "m", "h", "done"}, kid


async def test_team_scripts_touch_only_the_teams_slot_on_the_cluster(
    ledger: RedisLedger, redis_sync: RedisCluster
) -> None:
    """A team's keys and the team's limits, buckets and windows in one slot (the teams here
    land on several masters): admit, settle and reap run on the cluster (no CROSSSLOT) and
    enforce the team's quota across keys."""

    calls: list[list[str]] = []
    for attr in ("admit", "settle", "reap"):
        setattr(ledger.scripts, attr, Recorder(getattr(ledger.scripts, attr), calls))
    teams = [f"team-{i}" for i in range(6)]
    for t in teams:
        await ledger.create_team(TeamRecord(id=t, daily_limit=25, tokens_per_minute=1000))
        a = key_record(f"a{t}" * 8, id=f"key_a.{t}", team=t)
        b = key_record(f"b{t}" * 8, id=f"key_b.{t}", team=t)
        assert (await ledger.admit(a, AdmitRequest("r1", 5, 5, "normal", "m", 1.0))).admitted
        assert (await ledger.admit(b, AdmitRequest("r2", 5, 5, "normal", "m", 1.0))).admitted
        refused = await ledger.admit(b, AdmitRequest("r3", 5, 5, "normal", "m", 1.0))
        assert refused.reason == "team_quota_daily"
        assert (await ledger.settle(Settlement(a.id, "r1", 5, 1, "m", True, "done"))).status == (
            "settled"
        )
        redis_sync.zadd(keys.reservation_expiry(b.id), {"r2": 0})
        assert await ledger.reap(b.id) == (1, 0)  # never claimed: released
        day, _ = await ledger.team_usage(TeamRecord(id=t, daily_limit=25))
        assert (day.used, day.reserved) == (6, 0)
    assert len(calls) == 6 * 5
    for key_calls in calls:
        assert len({slot(k) for k in key_calls}) == 1, key_calls

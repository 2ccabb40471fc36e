"""The providers file, provider routing and what provider answers mean (pure logic; the pool
scripts run against real Valkey in tests/e2e/test_providers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from atlas.errors import ConfigError, Denied, LedgerUnavailable
from atlas.ledger.protocol import PoolObservation, PoolPick, PoolState
from atlas.pricing import ModelPrice, PriceBook
from atlas.providers import health
from atlas.providers.config import Cooldown, parse
from atlas.providers.credentials import resolve
from atlas.providers.routing import ProviderRouter, order_of

FILE = """
providers:
  - name: cheap
    base_url: https://cheap.example/v1
    pool: {members: [{id: c1, credential: {env: CHEAP_KEY}}]}
  - name: claude
    base_url: https://api.anthropic.com/v1
    api: anthropic
    pool: {members: [{id: a1, credential: {env: ANTHROPIC}}]}
  - name: local
    base_url: http://10.0.0.5:8000/v1
models:
  - alias: m
    targets: [{provider: local, priority: 2}, {provider: cheap, priority: 1}]
  - alias: "m*"
    routing: weighted
    targets: [{provider: local, weight: 0}, {provider: cheap, weight: 5}]
  - alias: price
    routing: cheapest
    targets: [{provider: claude, price_model: big}, {provider: cheap, price_model: small}]
  - alias: "claude-*"
    targets: [{provider: claude}]
"""
ENV = {"CHEAP_KEY": "sk-cheap", "ANTHROPIC": "sk-ant"}


def test_errors_name_the_file_and_the_field() -> None:
    bad = FILE.replace("id: c1, credential: {env: CHEAP_KEY}", "id: c1, credential: {}")
    with pytest.raises(
        ConfigError, match=r"p\.yaml: providers\[0\]\.pool\.members\[0\]\.credential"
    ):
        parse(bad, "p.yaml")
    with pytest.raises(ConfigError, match=r"models\[0\]\.targets\[0\]\.provider: unknown provider"):
        parse(FILE.replace("provider: local, priority: 2", "provider: nope"), "p.yaml")
    with pytest.raises(ConfigError, match="Extra inputs"):
        parse(FILE.replace("api: anthropic", "api: anthropic\n    secret: sk-x"), "p.yaml")
    with pytest.raises(ConfigError, match="trailing"):
        parse(FILE.replace('alias: "m*"', 'alias: "*m"'), "p.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse("providers: [", "p.yaml")


def test_alias_lookup_prefers_exact_names() -> None:
    cfg = parse(FILE)
    assert cfg.alias_for("m").alias == "m"  # type: ignore[union-attr]
    assert cfg.alias_for("mx").alias == "m*"  # type: ignore[union-attr]
    assert cfg.alias_for("other") is None


def test_credentials_never_show_their_values() -> None:
    cfg = parse(FILE)
    secrets = resolve(cfg, ENV)
    assert secrets.get("cheap", "c1") == "sk-cheap"
    assert "sk-" not in repr(secrets)
    with pytest.raises(ConfigError, match="CHEAP_KEY is not set") as e:
        resolve(cfg, {"ANTHROPIC": "sk-ant"})
    assert "sk-ant" not in str(e.value)
    with pytest.raises(ConfigError, match="printable"):
        resolve(cfg, {**ENV, "CHEAP_KEY": "sk\nx"})


def test_orders() -> None:
    cfg = parse(FILE)
    prices = PriceBook({"big": ModelPrice(prompt=10, completion=30),
                        "small": ModelPrice(prompt=0.1, completion=0.2)})  # fmt: skip
    first = lambda ts: ts[0]  # noqa: E731
    assert order_of(cfg.models[0], prices, first) == ["cheap", "local"]
    # weighted: only weight > 0 may come first; the rest follow by priority
    assert order_of(cfg.models[1], prices, first) == ["cheap", "local"]
    assert order_of(cfg.models[2], prices, first) == ["cheap", "claude"]


class FakePools:
    def __init__(self, picks: dict[str, PoolPick], fail: bool = False) -> None:
        self.picks, self.fail, self.asked = picks, fail, []

    async def pick(
        self, provider: str, strategy: str, estimate: int, members: Sequence[tuple[str, int, int]]
    ) -> PoolPick:
        self.asked.append(provider)
        if self.fail:
            raise LedgerUnavailable("down")
        return self.picks[provider]

    async def report(self, provider: str, observations: Sequence[PoolObservation]) -> None:
        raise AssertionError

    async def pool_state(self, provider: str, minutes: int) -> PoolState:
        raise AssertionError


def _router(pools: FakePools) -> ProviderRouter:
    cfg = parse(FILE)
    return ProviderRouter(cfg, resolve(cfg, ENV), pools, PriceBook({}))


def test_choose_skips_cooling_providers_and_sets_their_credential() -> None:
    pools = FakePools({"cheap": PoolPick("", 4200, "cooling"), "local": PoolPick("", 0, "")})
    c = asyncio.run(_router(pools).choose("m", 10))
    assert c is not None and (c.provider, c.member, c.credential) == ("local", "", None)
    assert pools.asked == ["cheap", "local"]
    c = asyncio.run(_router(FakePools({"claude": PoolPick("a1")})).choose("claude-3", 10))
    assert c is not None and c.credential == ("x-api-key", "sk-ant")
    assert asyncio.run(_router(FakePools({})).choose("unknown", 1)) is None


def test_all_cooling_is_a_503_with_the_shortest_wait() -> None:
    pools = FakePools({"cheap": PoolPick("", 4200, "cooling"), "local": PoolPick("", 900, "x")})
    with pytest.raises(Denied) as e:
        asyncio.run(_router(pools).choose("m", 10))
    assert e.value.status == 503 and e.value.code == "providers_unavailable"
    assert e.value.retry_after_s == 1


def test_without_the_ledger_members_take_turns_locally() -> None:
    c = asyncio.run(_router(FakePools({}, fail=True)).choose("claude-x", 10))
    assert c is not None and c.provider == "claude" and c.member == "a1"


def test_cooling_rules() -> None:
    cd = Cooldown(rate_limited_s=30, unauthorized_s=300, server_error_s=15, max_s=100)
    assert health.cooling(429, False, "7", cd) == (7.0, "member", "429")
    assert health.cooling(429, False, None, cd) == (30.0, "member", "429")
    assert health.cooling(401, False, None, cd) == (100.0, "member", "401")  # capped at max_s
    assert health.cooling(503, False, None, cd) == (15.0, "provider", "503")
    assert health.cooling(0, True, None, cd) == (15.0, "provider", "unreachable")
    assert health.cooling(200, False, "5", cd)[0] == 0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True)
    assert 38 <= health.cooling(429, False, later, cd)[0] <= 40


def test_percentiles_and_summary() -> None:
    minutes = [
        {"m1|req": 10, "m1|err": 1, "m1|lat2": 10, "m1|ttfb0": 10, "m1|prompt": 5},
        {"m2|req": 10, "m2|lat4": 10, "m2|spend": 2_000_000},
    ]
    one = health.summarize(minutes, "m1")
    assert one["requests"] == 10 and one["error_rate"] == 0.1
    assert 50 <= one["latency_ms"]["p50"] <= 100 and one["ttfb_ms"]["p99"] <= 25
    both = health.summarize(minutes, "*")
    assert both["requests"] == 20 and both["usage"]["spend_usd"] == 2.0
    assert 250 <= both["latency_ms"]["p99"] <= 500
    assert health.percentile([0] * len(health.BUCKETS_MS), 0.5) is None

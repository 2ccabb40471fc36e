"""Provider routing (atlas/providers/routing.py), pure: the order of an alias's providers, and
`ProviderRouter.choose` against a fake `Pools` that answers per provider."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from atlas.errors import Denied, LedgerUnavailable
from atlas.ledger.protocol import PoolObservation, PoolPick, PoolState
from atlas.pricing import ModelPrice, PriceBook
from atlas.providers.config import Alias, ProvidersFile, Target, parse
from atlas.providers.credentials import resolve
from atlas.providers.routing import Choice, ProviderRouter, order_of

FILE = """\
providers:
  - name: oai
    base_url: https://api.openai.com/v1
    pool:
      members:
        - {id: o1, credential: {env: O1}, requests_per_minute: 5, tokens_per_minute: 900}
        - {id: o2, credential: {env: O2}}
        - {id: o3, credential: {env: O3}}
  - name: ant
    base_url: https://api.anthropic.com/v1
    api: anthropic
    pool: {strategy: least_used, members: [{id: a1, credential: {env: A1}}]}
  - name: gem
    base_url: https://generativelanguage.googleapis.com/v1beta/openai
    api: gemini
    pool: {members: [{id: g1, credential: {env: G1}}]}
  - name: vllm
    base_url: http://10.0.0.5:8000/v1
models:
  - alias: chat
    targets:
      - {provider: vllm, priority: 2}
      - {provider: oai, priority: 0}
      - {provider: gem, priority: 1}
  - alias: claude
    targets: [{provider: ant}]
  - alias: flash
    targets: [{provider: gem}]
  - alias: "local-*"
    targets: [{provider: vllm}]
"""
ENV = {"O1": "sk-o1", "O2": "sk-o2", "O3": "sk-o3", "A1": "sk-ant-a1", "G1": "AIza-g1"}
FREE = PriceBook({})


def _alias(routing: str, *targets: dict[str, object]) -> Alias:
    return Alias.model_validate({"alias": "m", "routing": routing, "targets": list(targets)})


def _first(targets: list[Target]) -> Target:
    return targets[0]


# ---- order_of ----------------------------------------------------------------------------


def test_priority_order_is_lowest_first_and_file_order_on_ties() -> None:
    alias = _alias(
        "priority",
        {"provider": "c", "priority": 5},
        {"provider": "a", "priority": 1},
        {"provider": "b", "priority": 1},
        {"provider": "d"},
    )
    assert order_of(alias, FREE, _first) == ["d", "a", "b", "c"]


def test_weighted_puts_the_pick_first_and_the_rest_by_priority() -> None:
    alias = _alias(
        "weighted",
        {"provider": "a", "priority": 2, "weight": 1},
        {"provider": "zero", "priority": 0, "weight": 0},
        {"provider": "b", "priority": 1, "weight": 3},
    )
    offered: list[list[str]] = []

    def pick_last(targets: list[Target]) -> Target:
        offered.append([t.provider for t in targets])
        return targets[-1]

    assert order_of(alias, FREE, pick_last) == ["a", "zero", "b"]
    # Only targets with weight > 0 may come first, offered in priority order.
    assert offered == [["b", "a"]]
    assert order_of(alias, FREE, _first) == ["b", "zero", "a"]


def test_cheapest_ranks_by_price_then_priority_and_unpriced_last() -> None:
    prices = PriceBook(
        {
            "big": ModelPrice(prompt=5, completion=15),
            "small": ModelPrice(prompt=0.1, completion=0.4),
            "same": ModelPrice(prompt=0.3, completion=0.4),
        }
    )
    alias = _alias(
        "cheapest",
        {"provider": "unpriced", "price_model": "nowhere"},
        {"provider": "big", "price_model": "big"},
        {"provider": "tie-late", "price_model": "same", "priority": 3},
        {"provider": "small", "price_model": "small", "priority": 9},
        {"provider": "tie-early", "price_model": "same", "priority": 1},
    )
    assert order_of(alias, prices, _first) == ["small", "tie-early", "tie-late", "big", "unpriced"]


def test_cheapest_prices_by_the_alias_and_the_catch_all_price() -> None:
    alias = _alias("cheapest", {"provider": "a", "price_model": "pricey"}, {"provider": "b"})
    # "b" has no price_model: it is priced as the alias ("m"), here by the "*" price.
    catch_all = PriceBook(
        {"pricey": ModelPrice(prompt=9, completion=9), "*": ModelPrice(prompt=1, completion=1)}
    )
    assert order_of(alias, catch_all, _first) == ["b", "a"]
    # Without "*", "pricey" has no price: a target without one comes after every priced one.
    alias_only = PriceBook({"m": ModelPrice(prompt=99, completion=0)})
    assert order_of(alias, alias_only, _first) == ["b", "a"]


# ---- ProviderRouter.choose ---------------------------------------------------------------


class FakePools:
    """Answers each provider's pick from `answers` (a PoolPick, or an exception to raise)."""

    def __init__(self, answers: dict[str, PoolPick | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, int, list[tuple[str, int, int]]]] = []

    async def pick(
        self, provider: str, strategy: str, estimate: int, members: Sequence[tuple[str, int, int]]
    ) -> PoolPick:
        self.calls.append((provider, strategy, estimate, list(members)))
        answer = self.answers[provider]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def report(self, provider: str, observations: Sequence[PoolObservation]) -> None:
        raise AssertionError("routing never reports")

    async def pool_state(self, provider: str, minutes: int) -> PoolState:
        raise AssertionError("routing never reads the pool state")


def _config() -> ProvidersFile:
    return parse(FILE, "routing.yaml")


def _router(pools: FakePools) -> ProviderRouter:
    cfg = _config()
    return ProviderRouter(cfg, resolve(cfg, ENV), pools, FREE, pick_weighted=_first)


async def test_the_first_provider_whose_pick_succeeds_serves() -> None:
    pools = FakePools({"oai": PoolPick("o2"), "gem": PoolPick("g1"), "vllm": PoolPick("")})
    choice = await _router(pools).choose("chat", 321)
    assert choice == Choice("oai", "o2", ("authorization", "Bearer sk-o2"))
    # One pick, with the pool's strategy, the estimate and every member's limits (0: none).
    assert pools.calls == [
        ("oai", "round_robin", 321, [("o1", 5, 900), ("o2", 0, 0), ("o3", 0, 0)])
    ]


async def test_providers_that_answer_a_wait_are_skipped_in_order() -> None:
    pools = FakePools(
        {
            "oai": PoolPick("", 1500, "cooling"),
            "gem": PoolPick("", 200, "over_limit"),
            "vllm": PoolPick(""),
        }
    )
    choice = await _router(pools).choose("chat", 1)
    assert choice == Choice("vllm", "", None)  # no pool: no credential header
    assert [c[0] for c in pools.calls] == ["oai", "gem", "vllm"]
    assert pools.calls[2][3] == []


@pytest.mark.parametrize(
    ("model", "provider", "header"),
    [
        ("chat", "oai", ("authorization", "Bearer sk-o1")),
        ("claude", "ant", ("x-api-key", "sk-ant-a1")),
        ("flash", "gem", ("x-goog-api-key", "AIza-g1")),
    ],
)
async def test_the_credential_header_follows_the_api(
    model: str, provider: str, header: tuple[str, str]
) -> None:
    member = {"oai": "o1", "ant": "a1", "gem": "g1"}[provider]
    pools = FakePools({provider: PoolPick(member)})
    assert await _router(pools).choose(model, 1) == Choice(provider, member, header)
    assert pools.calls[0][1] == ("least_used" if provider == "ant" else "round_robin")


@pytest.mark.parametrize(
    ("waits", "retry"),
    [((4200, 2100, 9000), 3), ((1, 60_000, 60_000), 1), ((59_001, 60_000, 61_000), 60)],
)
async def test_when_nobody_can_serve_it_is_a_503_with_the_shortest_wait(
    waits: tuple[int, int, int], retry: int
) -> None:
    names = ("oai", "gem", "vllm")
    pools = FakePools({n: PoolPick("", w, "cooling") for n, w in zip(names, waits, strict=True)})
    with pytest.raises(Denied) as e:
        await _router(pools).choose("chat", 1)
    denied = e.value
    expected = (503, "providers_unavailable", "server_error")
    assert (denied.status, denied.code, denied.type) == expected
    assert denied.retry_after_s == retry
    assert f"retry in {retry} s" in denied.message and "'chat'" in denied.message
    assert len(pools.calls) == 3


async def test_the_503_names_at_most_64_characters_of_the_model() -> None:
    pools = FakePools({"vllm": PoolPick("", 10, "provider_cooling")})
    with pytest.raises(Denied) as e:
        await _router(pools).choose("local-" + "x" * 500, 1)
    assert ("local-" + "x" * 58 + "'") in e.value.message and "x" * 59 not in e.value.message


async def test_without_the_ledger_members_take_turns_locally() -> None:
    pools = FakePools({"oai": LedgerUnavailable("down"), "gem": PoolPick("g1")})
    router = _router(pools)
    choices = [await router.choose("chat", 1) for _ in range(6)]
    # The first provider serves at once (the next is not asked), members in turn.
    assert {c.provider for c in choices if c} == {"oai"}
    members = [c.member for c in choices if c]
    assert sorted(members[:3]) == ["o1", "o2", "o3"] and members[3:] == members[:3]
    assert choices[0] is not None and choices[0].credential == (
        "authorization",
        f"Bearer {ENV[members[0].upper()]}",
    )
    assert {c[0] for c in pools.calls} == {"oai"}


async def test_without_the_ledger_a_provider_without_a_pool_still_serves() -> None:
    pools = FakePools({"vllm": LedgerUnavailable("down")})
    assert await _router(pools).choose("local-llama", 1) == Choice("vllm", "", None)


async def test_models_no_alias_names_are_left_to_the_default_upstream() -> None:
    pools = FakePools({})
    router = _router(pools)
    assert await router.choose("gpt-4o", 1) is None
    assert not router.serves("gpt-4o") and router.serves("local-anything")
    assert pools.calls == []

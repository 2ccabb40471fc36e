from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from atlas.pricing import ModelPrice, PriceBook, usd
from atlas.settings import Settings


def test_prices_turn_tokens_into_micro_usd() -> None:
    book = PriceBook(
        {"m": ModelPrice(prompt=2.5, completion=10), "*": ModelPrice(prompt=1, completion=1)}
    )
    assert book.cost_micros("m", 1000, 100) == 2500 + 1000
    assert book.cost_micros("other", 10, 10) == 20
    assert PriceBook({}).cost_micros("m", 10**6, 10**6) == 0


def test_usd() -> None:
    assert usd(1_234_567) == 1.234567


def test_cached_cache_write_and_reasoning_have_their_own_prices() -> None:
    price = ModelPrice(prompt=2, completion=8, cached_prompt=0.5, cache_write=2.5, reasoning=10)
    book = PriceBook({"m": price})
    # 1000 prompt tokens of which 600 cached and 100 cache writes; 400 completion of which
    # 300 reasoning: 300 x 2 + 600 x 0.5 + 100 x 2.5 + 100 x 8 + 300 x 10 micro-USD.
    assert book.cost_micros("m", 1000, 400, cached=600, cache_write=100, reasoning=300) == (
        600 + 300 + 250 + 800 + 3000
    )


def test_unpriced_parts_cost_what_their_whole_does() -> None:
    book = PriceBook({"m": ModelPrice(prompt=2, completion=8)})
    plain = book.cost_micros("m", 1000, 400)
    assert plain == 2000 + 3200
    assert book.cost_micros("m", 1000, 400, cached=600, cache_write=100, reasoning=300) == plain
    # Only the cached price set: cache writes stay at the prompt price.
    cheap = PriceBook({"m": ModelPrice(prompt=2, completion=8, cached_prompt=0)})
    assert cheap.cost_micros("m", 1000, 0, cached=1000) == 0
    assert cheap.cost_micros("m", 1000, 0, cache_write=1000) == 2000


def test_cost_rounds_up_to_a_whole_micro_usd_without_float_noise() -> None:
    book = PriceBook({"m": ModelPrice(prompt=0.3, completion=0.3, cached_prompt=0.03)})
    assert book.cost_micros("m", 10, 0) == 3  # 10 x 0.3 is 3.0000000000000004 as floats
    assert book.cost_micros("m", 1, 0) == 1  # 0.3 micro-USD
    assert book.cost_micros("m", 10, 0, cached=10) == 1  # 0.3
    assert book.cost_micros("m", 0, 1) == 1


def test_price_configs_old_and_new_parse_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv(
        "ATLAS_MODEL_PRICES",
        json.dumps(
            {
                "old": {"prompt": 2.5, "completion": 10},
                "new": {"prompt": 3, "completion": 15, "cached_prompt": 0.3, "reasoning": 15},
            }
        ),
    )
    prices = Settings().model_prices
    assert prices["old"] == ModelPrice(prompt=2.5, completion=10)
    assert prices["old"].cached_prompt is None and prices["old"].reasoning is None
    assert prices["new"].cached_prompt == 0.3 and prices["new"].cache_write is None


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": 1, "completion": 1, "cached_prompt": -1},
        {"prompt": 1, "completion": 1, "cached": 0.5},  # a misspelt name is refused
    ],
)
def test_bad_part_prices_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        ModelPrice.model_validate(bad)

from __future__ import annotations

from atlas.pricing import ModelPrice, PriceBook, usd


def test_prices_turn_tokens_into_micro_usd() -> None:
    book = PriceBook(
        {"m": ModelPrice(prompt=2.5, completion=10), "*": ModelPrice(prompt=1, completion=1)}
    )
    assert book.cost_micros("m", 1000, 100) == 2500 + 1000
    assert book.cost_micros("other", 10, 10) == 20
    assert PriceBook({}).cost_micros("m", 10**6, 10**6) == 0


def test_usd() -> None:
    assert usd(1_234_567) == 1.234567

"""Token prices per model, turning usage into spend. Money is counted in integer micro-USD
so the ledger's counters stay exact."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

MICROS_PER_USD = 1_000_000


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: float = Field(ge=0, description="USD per 1M prompt tokens")
    completion: float = Field(ge=0, description="USD per 1M completion tokens")


class PriceBook:
    """Prices by model name; `*` is the price of any model not listed (else free)."""

    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self._prices = prices
        self._default = prices.get("*")

    def price(self, model: str) -> ModelPrice | None:
        return self._prices.get(model, self._default)

    def cost_micros(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        p = self.price(model)
        if p is None:
            return 0
        # USD per 1M tokens is exactly micro-USD per token.
        return math.ceil(prompt_tokens * p.prompt + completion_tokens * p.completion)


def usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)

"""Token prices per model, turning usage into spend. Money is counted in integer micro-USD
so the ledger's counters stay exact."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

MICROS_PER_USD = 1_000_000


class ModelPrice(BaseModel):
    """USD per 1M tokens. The optional prices are of parts of the prompt (cached reads, cache
    writes) and of the completion (reasoning); unset, a part costs what its whole does."""

    model_config = ConfigDict(extra="forbid")

    prompt: float = Field(ge=0, description="USD per 1M prompt tokens")
    completion: float = Field(ge=0, description="USD per 1M completion tokens")
    cached_prompt: float | None = Field(
        None, ge=0, description="USD per 1M prompt tokens read from a cache (default: prompt)"
    )
    cache_write: float | None = Field(
        None, ge=0, description="USD per 1M prompt tokens written to a cache (default: prompt)"
    )
    reasoning: float | None = Field(
        None, ge=0, description="USD per 1M reasoning tokens (default: completion)"
    )


class PriceBook:
    """Prices by model name; `*` is the price of any model not listed (else free)."""

    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self._prices = prices
        self._default = prices.get("*")

    def price(self, model: str) -> ModelPrice | None:
        return self._prices.get(model, self._default)

    def cost_micros(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        cached: int = 0,
        cache_write: int = 0,
        reasoning: int = 0,
    ) -> int:
        """Micro-USD of a usage, rounded up. `cached` and `cache_write` are parts of
        `prompt_tokens`, `reasoning` of `completion_tokens` (callers keep them inside)."""
        p = self.price(model)
        if p is None:
            return 0
        # USD per 1M tokens is exactly micro-USD per token.
        total = (prompt_tokens - cached - cache_write) * p.prompt
        total += (completion_tokens - reasoning) * p.completion
        if cached:
            total += cached * (p.prompt if p.cached_prompt is None else p.cached_prompt)
        if cache_write:
            total += cache_write * (p.prompt if p.cache_write is None else p.cache_write)
        if reasoning:
            total += reasoning * (p.completion if p.reasoning is None else p.reasoning)
        # Rounded to a millionth of a micro-USD first: binary floats make 10 x 0.3 come out as
        # 3.0000000000000004, which must cost 3, not 4.
        return math.ceil(round(total, 6))


def usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)

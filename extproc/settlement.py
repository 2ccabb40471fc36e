"""The one way extproc turns a grant and what was counted into a ledger `Settlement`
(from an ext_proc exchange, or from Envoy's access log)."""

from __future__ import annotations

from atlas.grant import Grant
from atlas.ledger.protocol import Settlement
from atlas.pricing import PriceBook
from extproc.usage import Usage


def settlement_for(
    g: Grant,
    *,
    model: str,
    prompt: int,
    completion: int,
    exact: bool,
    outcome: str,
    prices: PriceBook | None,
    details: Usage | None = None,
) -> Settlement:
    """:param model: the bounded (folded) model name the settlement is recorded under.
    :param details: the reported usage whose cached, cache-write and reasoning counts are
        recorded (None: none reported). They are parts of `prompt` and `completion` and are
        cut to fit inside them, so an upstream's inconsistent details cannot make the
        settlement one the ledger refuses."""
    cached = reasoning = cache_write = 0
    if details is not None:
        cached = min(details.cached_tokens or 0, prompt)
        cache_write = min(details.cache_write_tokens or 0, prompt - cached)
        reasoning = min(details.reasoning_tokens or 0, completion)
    cost = 0
    if prices is not None:
        cost = prices.cost_micros(
            model,
            prompt,
            completion,
            cached=cached,
            cache_write=cache_write,
            reasoning=reasoning,
        )
    return Settlement(
        key_id=g.key_id,
        reservation_id=g.reservation_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        model=model,
        exact=exact,
        outcome=outcome,
        tokens_per_minute=g.tpm,
        cost_micros=cost,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        cache_write_tokens=cache_write,
    )

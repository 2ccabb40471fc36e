"""The one way extproc turns a grant and what was counted into a ledger `Settlement`
(from an ext_proc exchange, or from Envoy's access log)."""

from __future__ import annotations

from atlas.grant import Grant
from atlas.ledger.protocol import Settlement
from atlas.pricing import PriceBook


def settlement_for(
    g: Grant,
    *,
    model: str,
    prompt: int,
    completion: int,
    exact: bool,
    outcome: str,
    prices: PriceBook | None,
) -> Settlement:
    """:param model: the bounded (folded) model name the settlement is recorded under."""
    return Settlement(
        key_id=g.key_id,
        reservation_id=g.reservation_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        model=model,
        exact=exact,
        outcome=outcome,
        tokens_per_minute=g.tpm,
        cost_micros=prices.cost_micros(model, prompt, completion) if prices else 0,
    )

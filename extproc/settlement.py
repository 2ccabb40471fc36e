"""The one way extproc turns a grant and what was counted into a ledger `Settlement`
(from an ext_proc exchange, or from Envoy's access log)."""

from __future__ import annotations

from collections.abc import Callable

from atlas.grant import Grant
from atlas.ledger.protocol import Settlement
from atlas.pricing import PriceBook
from atlas.requestlog import RequestRecord
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
        provider=g.provider,
        member=g.member,
    )


def counted_settlement(
    g: Grant,
    *,
    model: str,
    status: int,
    done: bool,
    usage: Usage | None,
    prompt_seen: int | None,
    prompt_estimate: int,
    completion_estimate: Callable[[], int],
    prices: PriceBook | None,
) -> Settlement:
    """What an exchange is charged: the upstream's reported usage when it gave a total, else
    estimates; an upstream error without usage is refunded.

    :param done: the response ended (else the client or the upstream went away).
    :param prompt_seen: the prompt tokens the upstream reported processing before its final
        usage (Anthropic's message_start), preferred to authz's `prompt_estimate`.
    :param completion_estimate: the generated text's tokens, asked only when no usage came
        (it may tokenize up to 64 KiB of text)."""
    outcome = "completed" if done else "disconnected"
    if status >= 400 and (usage is None or usage.total_tokens is None):
        outcome, prompt, completion, exact = "upstream_error", 0, 0, True
    elif usage is not None and usage.total_tokens is not None:
        prompt = usage.prompt_tokens or 0
        completion = usage.total_tokens - prompt
        exact = True
    else:
        prompt = prompt_seen if prompt_seen is not None else prompt_estimate
        completion = completion_estimate()
        exact = False
    return settlement_for(
        g,
        model=model,
        prompt=max(0, prompt),
        completion=max(0, completion),
        exact=exact,
        outcome=outcome,
        prices=prices,
        details=usage if exact else None,  # an upstream error's are cut to its 0s
    )


def request_record(
    s: Settlement,
    g: Grant | None,
    *,
    status: int,
    latency_ms: float,
    now_s: float,
    started_s: float | None = None,
) -> RequestRecord:
    """The request log's record of a settled exchange (what was charged, and for whom),
    timed at its start: `started_s` (Envoy's, from the access log), else `now_s` less its
    latency."""
    start_ms = started_s * 1000 if started_s else now_s * 1000 - max(0.0, latency_ms)
    return RequestRecord(
        at_ms=int(start_ms),
        request_id=s.reservation_id,
        key_id=s.key_id,
        team=g.team if g is not None else "",
        app=g.app if g is not None else "",
        end_user=g.end_user if g is not None else "",
        model=s.model,
        provider=s.provider,
        member=s.member,
        # ext_proc's body-only mode (ProcMode.JSON) sees no status: a completed answer is 200.
        status=status or (200 if s.outcome == "completed" else 0),
        outcome=s.outcome,
        reason=g.shadow_decision if g is not None else "",
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        cached_tokens=s.cached_tokens,
        exact=s.exact,
        cost_micros=s.cost_micros,
        latency_ms=max(0, round(latency_ms)),
        priority=g.priority if g is not None else "",
        stream=g.stream if g is not None else False,
    )

"""Which provider and pool member serve an admitted request (authz, after admission).

For the request's model alias the providers are tried in the alias's order (priority,
weighted first choice, or cheapest by ATLAS_MODEL_PRICES); the first whose pool has a member
that is not cooling and under its requests/min and tokens/min serves. The pick is one atomic
script per provider tried (atlas/ledger/lua/pool_pick.lua), so every replica sees the same
cooling and the same counts. No provider can serve: a 503 with the shortest wait as
Retry-After.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from atlas import metrics
from atlas.errors import Denied, LedgerUnavailable
from atlas.ledger.protocol import Pools
from atlas.pricing import PriceBook
from atlas.providers.config import CREDENTIAL_HEADER, Alias, Provider, ProvidersFile, Target
from atlas.providers.credentials import Secrets

log = logging.getLogger("atlas.authz")


@dataclass(slots=True, frozen=True)
class Choice:
    provider: str
    member: str  # "" for a provider without a pool
    #: The credential header to set upstream, or None (no pool).
    credential: tuple[str, str] | None


def _price(prices: PriceBook, model: str) -> float:
    p = prices.price(model)
    return math.inf if p is None else p.prompt + p.completion


def order_of(
    alias: Alias, prices: PriceBook, pick_weighted: Callable[[list[Target]], Target]
) -> list[str]:
    """The providers of `alias` in the order they are tried."""
    by_priority = sorted(alias.targets, key=lambda t: t.priority)  # stable: file order on ties
    if alias.routing == "cheapest":
        ranked = sorted(
            by_priority, key=lambda t: (_price(prices, t.price_model or alias.alias), t.priority)
        )
        return [t.provider for t in ranked]
    if alias.routing == "weighted":
        first = pick_weighted([t for t in by_priority if t.weight > 0])
        return [first.provider, *(t.provider for t in by_priority if t is not first)]
    return [t.provider for t in by_priority]


def _weighted(targets: list[Target]) -> Target:
    return random.choices(targets, weights=[t.weight for t in targets])[0]


class ProviderRouter:
    def __init__(
        self,
        config: ProvidersFile,
        secrets: Secrets,
        pools: Pools,
        prices: PriceBook,
        *,
        pick_weighted: Callable[[list[Target]], Target] = _weighted,
    ) -> None:
        self._config = config
        self._secrets = secrets
        self._pools = pools
        self._prices = prices
        self._pick_weighted = pick_weighted
        self._providers = {p.name: p for p in config.providers}
        self._members = {
            p.name: [
                (m.id, m.requests_per_minute or 0, m.tokens_per_minute or 0)
                for m in (p.pool.members if p.pool else [])
            ]
            for p in config.providers
        }
        self._local_turn = 0

    def serves(self, model: str) -> bool:
        return self._config.alias_for(model) is not None

    async def choose(self, model: str, estimate: int) -> Choice | None:
        """The provider and member for `model`, None when no alias names it (the default
        upstream serves it); Denied 503 when every provider is cooling or at its limits."""
        alias = self._config.alias_for(model)
        if alias is None:
            return None
        wait_ms: int | None = None
        for name in order_of(alias, self._prices, self._pick_weighted):
            p = self._providers[name]
            strategy = p.pool.strategy if p.pool else "round_robin"
            try:
                pick = await self._pools.pick(name, strategy, estimate, self._members[name])
            except LedgerUnavailable:
                # Without the shared state, take turns locally: requests still flow.
                metrics.LEDGER_ERRORS.labels(service="authz", op="pool_pick").inc()
                return self._choice(p, self._local_member(p))
            if pick.wait_ms == 0:
                return self._choice(p, pick.member)
            metrics.DECISIONS.labels(service="authz", decision="provider_" + pick.why).inc()
            wait_ms = pick.wait_ms if wait_ms is None else min(wait_ms, pick.wait_ms)
        retry = max(1, math.ceil((wait_ms or 1000) / 1000))
        raise Denied(
            503,
            f"Every provider for model '{model[:64]}' is cooling down or at its limits; "
            f"retry in {retry} s.",
            type="server_error",
            code="providers_unavailable",
            retry_after_s=retry,
        )

    def _local_member(self, p: Provider) -> str:
        if p.pool is None:
            return ""
        self._local_turn += 1
        return p.pool.members[self._local_turn % len(p.pool.members)].id

    def _choice(self, p: Provider, member: str) -> Choice:
        if not member:
            return Choice(p.name, "", None)
        header, prefix = CREDENTIAL_HEADER[p.api]
        return Choice(p.name, member, (header, prefix + self._secrets.get(p.name, member)))

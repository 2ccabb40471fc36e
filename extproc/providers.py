"""What providers did, for their pools and health view: each access-log entry of a request
authz sent to a provider (status, Retry-After, timings) and each settlement of one (tokens,
spend) becomes a `PoolObservation`; they are batched per provider and written with one
pool_report.lua call a provider every 100 ms. Cooling set here is what authz's next pick
reads, on every replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2 as al

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.grant import Grant
from atlas.ledger.protocol import PoolObservation, Pools, Settlement
from atlas.providers import health
from atlas.providers.config import ProvidersFile

log = logging.getLogger("atlas.extproc")

FLUSH_S = 0.1
#: Observations kept per provider while Redis is away (the oldest are dropped past this).
MAX_PENDING = 10_000


def _ms(d: Any) -> float:
    return d.seconds * 1000 + d.nanos / 1e6


def _status_class(status: int, failed: bool) -> str:
    if status == 0 or (failed and status < 500):
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


class ProviderReporter:
    def __init__(self, config: ProvidersFile, pools: Pools, *, clock: Any = time.time) -> None:
        self._config = {p.name: p for p in config.providers}
        self._pools = pools
        self._clock = clock
        self._pending: dict[str, list[PoolObservation]] = {}
        self._cooling_until: dict[tuple[str, str], float] = {}

    def entry(self, entry: al.HTTPAccessLogEntry, grant: Grant) -> None:
        """One access-log entry of a request sent to `grant.provider`."""
        p = self._config.get(grant.provider)
        if p is None:  # a provider the file no longer has (a reload): nothing to cool
            return
        cp = entry.common_properties
        flags = cp.response_flags
        failed = (
            flags.upstream_connection_failure
            or flags.upstream_remote_reset
            or flags.upstream_connection_termination
            or flags.upstream_request_timeout
            or flags.upstream_overflow
            or flags.no_healthy_upstream
        )
        reached = cp.HasField("time_to_first_upstream_tx_byte")
        if not reached and not failed:
            return  # the provider never saw it (the client left first): nothing to learn
        status = (
            entry.response.response_code.value if entry.response.HasField("response_code") else 0
        )
        latency = ttfb = None
        if reached and cp.HasField("time_to_last_upstream_rx_byte"):
            latency = _ms(cp.time_to_last_upstream_rx_byte) - _ms(cp.time_to_first_upstream_tx_byte)
        if reached and cp.HasField("time_to_first_upstream_rx_byte"):
            ttfb = _ms(cp.time_to_first_upstream_rx_byte) - _ms(cp.time_to_first_upstream_tx_byte)
        retry_after = entry.response.response_headers.get("retry-after")
        o = health.observe(
            grant.member, status, bool(failed), retry_after, latency, ttfb, p.cooldown
        )
        member_label = grant.member or health.NO_MEMBER
        metrics.PROVIDER_REQUESTS.labels(
            provider=p.name, member=member_label, status_class=_status_class(status, bool(failed))
        ).inc()
        if latency is not None:
            metrics.PROVIDER_LATENCY.labels(provider=p.name).observe(latency / 1000)
        if ttfb is not None:
            metrics.PROVIDER_TTFB.labels(provider=p.name).observe(ttfb / 1000)
        if o.cool_ms:
            who = "*" if o.cool_scope == "provider" else member_label
            log.warning(
                "provider %s member %s cooling %.1f s after %s", p.name, who, o.cool_ms / 1000,
                o.reason,
            )  # fmt: skip
            self._cooling_until[(p.name, who)] = self._clock() + o.cool_ms / 1000
            metrics.PROVIDER_COOLING.labels(provider=p.name, member=who).set(1)
        self._add(p.name, o)

    def settled(self, s: Settlement, grant: Grant) -> None:
        """A settlement of a request sent to `grant.provider`: tokens and spend, and the
        correction of the estimate the pick counted against the member's tokens/min."""
        if grant.provider not in self._config:
            return
        member = grant.member or health.NO_MEMBER
        used = s.prompt_tokens + s.completion_tokens
        self._add(
            grant.provider,
            health.usage_observation(
                grant.member, s.prompt_tokens, s.completion_tokens, s.cost_micros,
                used - grant.reserved if grant.member else 0,
            ),
        )  # fmt: skip
        tokens = metrics.PROVIDER_TOKENS.labels
        tokens(provider=grant.provider, member=member, kind="prompt").inc(s.prompt_tokens)
        tokens(provider=grant.provider, member=member, kind="completion").inc(s.completion_tokens)
        if s.cost_micros:
            metrics.PROVIDER_SPEND.labels(provider=grant.provider, member=member).inc(
                s.cost_micros / 1e6
            )

    def _add(self, provider: str, o: PoolObservation) -> None:
        pending = self._pending.setdefault(provider, [])
        if len(pending) >= MAX_PENDING:
            del pending[0]
        pending.append(o)

    async def flush(self) -> None:
        batches, self._pending = self._pending, {}
        for provider, observations in batches.items():
            try:
                await self._pools.report(provider, observations)
            except LedgerUnavailable as exc:
                metrics.LEDGER_ERRORS.labels(service="extproc", op="pool_report").inc()
                log.warning("provider %s report kept for the next flush: %s", provider, exc)
                kept = self._pending.setdefault(provider, [])
                kept[:0] = observations[-MAX_PENDING:]
        now = self._clock()
        for (provider, member), until in list(self._cooling_until.items()):
            if until <= now:
                del self._cooling_until[(provider, member)]
                metrics.PROVIDER_COOLING.labels(provider=provider, member=member).set(0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

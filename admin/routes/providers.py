"""Provider health: per provider and pool member, its state (active / cooling / over its
limits / ejected), requests, error rate, latency and time to first byte percentiles and usage
over a window (from the pools' per-minute numbers in the ledger), and Envoy's view of the
provider's cluster (outlier ejections, circuit breaker) from its stats."""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Query

from admin.deps import AdminDep, LedgerDep, SettingsDep
from atlas.ledger.protocol import PoolState
from atlas.providers import config as providers_config
from atlas.providers import health
from atlas.providers.config import Provider, ProvidersFile
from atlas.providers.envoy import cluster_name
from atlas.settings import Settings

router = APIRouter(prefix="/v1/admin", tags=["providers"])

_STAT = re.compile(r'^envoy_cluster_(\w+)\{envoy_cluster_name="(provider_[a-z0-9_-]+)"\} (\S+)$')
_WANTED = {
    "outlier_detection_ejections_active",
    "circuit_breakers_default_rq_open",
    "membership_healthy",
    "membership_total",
}


@functools.lru_cache(maxsize=4)
def _load(path: str) -> ProvidersFile:
    return providers_config.load(path)


async def envoy_cluster_stats(settings: Settings) -> dict[str, dict[str, float]] | None:
    """cluster -> {stat: value} for provider clusters, or None when Envoy cannot be read."""
    if not settings.envoy_admin_url:
        return None
    url = settings.envoy_admin_url.rstrip("/") + "/stats/prometheus"
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            r = await client.get(url)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    out: dict[str, dict[str, float]] = {}
    for line in r.text.splitlines():
        m = _STAT.match(line)
        if m and m.group(1) in _WANTED:
            out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return out


def _member_view(
    p: Provider, member_id: str, rpm: int | None, tpm: int | None, st: PoolState
) -> dict[str, Any]:
    cooling = st.cooling.get(member_id)
    used_r = st.use.get(f"{member_id}|r", 0)
    used_t = st.use.get(f"{member_id}|t", 0)
    state = "active"
    if cooling is not None:
        state = "cooling"
    elif (rpm and used_r >= rpm) or (tpm and used_t >= tpm):
        state = "over_limit"
    return {
        "id": member_id,
        "state": state,
        "cooling_until": cooling[0] if cooling else None,
        "cooling_reason": cooling[1] if cooling else None,
        "rpm": {"used": used_r, "limit": rpm},
        "tpm": {"used": used_t, "limit": tpm},
        **health.summarize(st.minutes, member_id),
    }


def provider_view(
    p: Provider, st: PoolState, envoy: dict[str, dict[str, float]] | None
) -> dict[str, Any]:
    members = [
        _member_view(p, m.id, m.requests_per_minute, m.tokens_per_minute, st)
        for m in (p.pool.members if p.pool else [])
    ]
    stats = None if envoy is None else envoy.get(cluster_name(p.name), {})
    ejected = int(stats.get("outlier_detection_ejections_active", 0)) if stats else 0
    breaker = "unknown" if stats is None else (
        "open" if stats.get("circuit_breakers_default_rq_open", 0) else "closed"
    )  # fmt: skip
    whole = st.cooling.get("*")
    if whole is not None or (members and all(m["state"] == "cooling" for m in members)):
        state = "cooling"
    elif ejected or breaker == "open":
        state = "ejected"
    else:
        state = "active"
    if whole is None and state == "cooling":
        soonest = min(members, key=lambda m: m["cooling_until"])
        whole = (soonest["cooling_until"], soonest["cooling_reason"])
    return {
        "name": p.name,
        "api": p.api,
        "base_url": p.base_url,
        "state": state,
        "cooling_until": whole[0] if whole else None,
        "cooling_reason": whole[1] if whole else None,
        "circuit_breaker": breaker,
        "ejected_hosts": ejected,
        "healthy_hosts": int(stats["membership_healthy"])
        if stats and "membership_healthy" in stats
        else None,
        **health.summarize(st.minutes, "*"),
        "members": members,
    }


@router.get("/providers")
async def providers(
    _: AdminDep,
    settings: SettingsDep,
    ledger: LedgerDep,
    window_s: Annotated[int, Query(ge=60, le=7200, description="seconds")] = 900,
) -> dict[str, Any]:
    """Every provider's and pool member's health over the last `window_s` seconds."""
    if not settings.providers_file:
        return {"window_s": window_s, "configured": False, "providers": []}
    config = _load(settings.providers_file)
    minutes = max(1, window_s // 60)
    states, envoy = await asyncio.gather(
        asyncio.gather(*(ledger.pool_state(p.name, minutes) for p in config.providers)),
        envoy_cluster_stats(settings),
    )
    return {
        "window_s": window_s,
        "configured": True,
        "providers": [
            provider_view(p, st, envoy) for p, st in zip(config.providers, states, strict=True)
        ],
    }

"""Component probes for /healthz: Redis, the two gRPC services, Envoy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from atlas.ledger.protocol import Probe
from atlas.probes import PROBE_TIMEOUT_S, authz_serving, grpc_serving, http_ok
from atlas.settings import Settings


async def _timed(probe: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
    except Exception as exc:
        return {"status": "down", "error": str(exc) or type(exc).__name__}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


async def check_components(settings: Settings, ledger: Probe) -> dict[str, Any]:
    probes: dict[str, Callable[[], Awaitable[Any]]] = {
        "redis": ledger.ping,
        "authz": lambda: authz_serving(settings),
        "extproc": lambda: grpc_serving(f"{settings.extproc_host}:{settings.extproc_port}"),
    }
    envoy = settings.envoy_admin_url
    if envoy:
        ready = envoy.rstrip("/") + "/ready"
        probes["envoy"] = lambda: http_ok(ready)
    results = await asyncio.gather(*(_timed(p) for p in probes.values()))
    return dict(zip(probes, results, strict=True))

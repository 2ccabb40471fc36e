"""Component probes for /healthz: Redis, the two gRPC services, Envoy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings

PROBE_TIMEOUT_S = 1.0


async def grpc_serving(target: str, service: str = "", timeout_s: float = PROBE_TIMEOUT_S) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def http_ready(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        r = await client.get(url)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}")


async def authz_serving(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """authz's own health, in the protocol it serves (GET /healthz, or gRPC health)."""
    host, port = settings.authz_host, settings.authz_port
    if settings.authz_protocol == "grpc":
        await grpc_serving(f"{host}:{port}", timeout_s=timeout_s)
    else:
        await http_ready(f"http://{host}:{port}/healthz", timeout_s=timeout_s)


async def _timed(probe: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
    except Exception as exc:
        return {"status": "down", "error": str(exc) or type(exc).__name__}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


async def check_components(settings: Settings, ledger: RedisLedger) -> dict[str, Any]:
    probes: dict[str, Callable[[], Awaitable[Any]]] = {
        "redis": ledger.ping,
        "authz": lambda: authz_serving(settings),
        "extproc": lambda: grpc_serving(f"{settings.extproc_host}:{settings.extproc_port}"),
    }
    envoy = settings.envoy_admin_url
    if envoy:
        ready = envoy.rstrip("/") + "/ready"
        probes["envoy"] = lambda: http_ready(ready)
    results = await asyncio.gather(*(_timed(p) for p in probes.values()))
    return dict(zip(probes, results, strict=True))

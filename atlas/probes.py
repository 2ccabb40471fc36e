"""Readiness probes shared by admin's /healthz and the local stack: one HTTP GET, one gRPC
health Check, and authz in the protocol it serves.

deploy/docker/healthcheck.py keeps its own synchronous urllib/grpc copy on purpose: it runs
as the image's HEALTHCHECK in a fresh interpreter every few seconds, where an event loop and
httpx would cost more than the check itself."""

from __future__ import annotations

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atlas.settings import Settings

PROBE_TIMEOUT_S = 1.0


async def http_ok(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """:raises RuntimeError: unless GET `url` answers 200."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        r = await client.get(url)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}")


async def grpc_serving(target: str, service: str = "", timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """:raises RuntimeError: unless grpc.health.v1 Check on `target` says SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def authz_serving(settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """authz's own health, in the protocol it serves (GET /healthz, or gRPC health)."""
    host, port = settings.authz_host, settings.authz_port
    if settings.authz_protocol == "grpc":
        await grpc_serving(f"{host}:{port}", timeout_s=timeout_s)
    else:
        await http_ok(f"http://{host}:{port}/healthz", timeout_s=timeout_s)

"""What the two gRPC services share: the server with its health service, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


@contextlib.asynccontextmanager
async def grpc_server(
    address: str,
    *,
    max_message_bytes: int,
    register: Callable[[grpc.aio.Server], None],
    service_name: str,
    grace_s: float,
) -> AsyncIterator[grpc.aio.Server]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(address)
    await server.start()
    for name in (service_name, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield server
    finally:
        # Drain: report NOT_SERVING so health checks move traffic away, then let in-flight
        # calls finish instead of failing them (each holds a reservation or a settlement).
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=grace_s)


async def wait_for_shutdown() -> None:
    """Return on SIGTERM or SIGINT (in the main thread; elsewhere wait until cancelled)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait for them. A cancellation can be swallowed (redis-py's pubsub
    read turns one that meets its socket timeout into a TimeoutError and retries: authz's
    shutdown hung on it), so pending tasks are cancelled again until they end."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)

"""Run the admin app under uvicorn, in-process (tests) or as `atlas admin`."""

from __future__ import annotations

import asyncio

import uvicorn

from admin.app import create_app
from atlas.settings import Settings


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.admin_host,
        port=settings.admin_port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        lifespan="on",
    )
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:  # uvicorn offers no event for this
            await asyncio.sleep(0.02)
        if ready is not None:
            ready.set()

    waiter = asyncio.create_task(announce())
    try:
        await server.serve()  # handles SIGINT/SIGTERM itself and drains connections
    finally:
        waiter.cancel()

"""The end-to-end harness: the real stack (valkey-server, demo upstream, authz, extproc,
admin, Envoy) on free 127.0.0.1 ports, started once per session in dependency order with
readiness polling, logs attached to failing tests, every process stopped at the end."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest_asyncio

from atlas.local.stack import Stack, free_port_settings

ADMIN_TOKEN = "e2e-admin-token"


@contextlib.asynccontextmanager
async def running_stack(
    *,
    valkey_args: tuple[str, ...] = (),
    replicas: int = 1,
    redis_url: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """A whole stack on free ports; `overrides` are settings."""
    settings = free_port_settings(
        admin_token=ADMIN_TOKEN, envoy_concurrency=1, log_level="info", **overrides
    )
    the_stack = Stack(
        settings,
        out=io.StringIO(),
        valkey_args=valkey_args,
        replicas=replicas,
        redis_url=redis_url,
    )
    try:
        await the_stack.start()
    except BaseException:
        print(the_stack.logs())
        await the_stack.stop()
        raise
    try:
        yield the_stack
    finally:
        await the_stack.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stack() -> AsyncIterator[Stack]:
    async with running_stack() as the_stack:
        yield the_stack


@pytest_asyncio.fixture(loop_scope="session")
async def admin(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as client:
        yield client


MakeKey = Callable[..., Awaitable[dict[str, Any]]]


@pytest_asyncio.fixture(loop_scope="session")
async def make_key(admin: httpx.AsyncClient) -> AsyncIterator[MakeKey]:
    created: list[str] = []

    async def make(**fields: Any) -> dict[str, Any]:
        body = {"name": "e2e", "rate_per_sec": 100, "burst": 100, **fields}
        r = await admin.post("/v1/admin/keys", json=body)
        assert r.status_code == 201, r.text
        key: dict[str, Any] = r.json()
        created.append(key["id"])
        return key

    yield make
    for key_id in created:
        await admin.delete(f"/v1/admin/keys/{key_id}")


@pytest_asyncio.fixture(loop_scope="session")
async def client_for(stack: Stack) -> AsyncIterator[Callable[[str], openai.AsyncOpenAI]]:
    clients: list[openai.AsyncOpenAI] = []

    def make(api_key: str) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(
            base_url=stack.proxy_url + "/v1", api_key=api_key, max_retries=0, timeout=30
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()

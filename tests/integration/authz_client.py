"""Run authz in-process against a real valkey-server and call Check like Envoy does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc

from atlas.grant import GRANT_HEADER
from atlas.local.ports import free_port
from atlas.settings import Settings
from authz.service import serve


def check_request(
    secret: str | None,
    body: dict[str, Any] | None = None,
    *,
    raw: bytes | None = None,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    **headers: str,
) -> auth_pb2.CheckRequest:
    h = {":path": path, ":method": method, **headers}
    if secret is not None:
        h["authorization"] = f"Bearer {secret}"
    if raw is None:
        raw = json.dumps(
            body
            or {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]}
        ).encode()
    return auth_pb2.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method=method,
                    path=path,
                    raw_body=raw,
                    header_map=base_pb2.HeaderMap(
                        headers=[
                            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()
                        ]
                    ),
                )
            )
        )
    )


def status_of(resp: auth_pb2.CheckResponse) -> int:
    return resp.denied_response.status.code if resp.HasField("denied_response") else 200


def grant_of(resp: auth_pb2.CheckResponse) -> dict[str, Any]:
    """The grant authz put in its dynamic metadata (atlas.grant: one JSON string)."""
    grant: dict[str, Any] = json.loads(resp.dynamic_metadata[GRANT_HEADER])
    return grant


def headers_of(resp: auth_pb2.CheckResponse) -> dict[str, str]:
    opts = (
        resp.denied_response.headers
        if resp.HasField("denied_response")
        else resp.ok_response.response_headers_to_add
    )
    return {o.header.key: o.header.value for o in opts}


@contextlib.asynccontextmanager
async def running_authz(settings: Settings) -> AsyncIterator[auth_grpc.AuthorizationStub]:
    settings = settings.model_copy(update={"authz_port": free_port(), "authz_protocol": "grpc"})
    ready = asyncio.Event()
    task = asyncio.create_task(serve(settings, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.authz_port}") as channel:
            yield auth_grpc.AuthorizationStub(channel)
    finally:  # a failing test must not leave the server running into the next one
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

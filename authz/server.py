"""Envoy ext_authz over gRPC (ATLAS_AUTHZ_PROTOCOL=grpc): `Authorization/Check`.

This module only translates between protobuf and `authz.policy`; `answer_denied` is the one
place where a `Denied` becomes an HTTP reply.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from google.rpc import code_pb2, status_pb2

from atlas.errors import Denied
from atlas.grant import GRANT_HEADER, KEY_ID_HEADER, PROC_HEADER, PROVIDER_HEADER, REFUSAL_HEADER
from atlas.grpc_service import grpc_server
from atlas.identity import MAX_PRINCIPAL_CHARS
from atlas.openai_errors import denied_body
from atlas.settings import Settings
from authz.answer import admitted, decide
from authz.policy import Authorizer, CheckInput, Verdict

log = logging.getLogger("atlas.authz")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
_FALSE = wrappers_pb2.BoolValue(value=False)
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    404: code_pb2.NOT_FOUND,
    413: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy 1.40 ignores append_action here; only `append` counts, and false overwrites.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append=_FALSE
    )


def check_input(req: auth_pb2.CheckRequest) -> CheckInput:
    http = req.attributes.request.http
    headers: dict[str, str] = {}
    # encode_raw_headers: values arrive as bytes in header_map; older configs use `headers`.
    for hv in http.header_map.headers:
        headers[hv.key.lower()] = hv.raw_value.decode("latin-1")
    if not headers:
        headers = {k.lower(): v for k, v in http.headers.items()}
    body = http.raw_body or http.body.encode()
    partial = headers.get("x-envoy-auth-partial-body") == "true"
    length = headers.get("content-length", "")
    return CheckInput(
        headers=headers,
        path=http.path,
        body=body,
        body_complete=not partial,
        body_size=int(length) if length.isdigit() else 0,
        method=http.method or headers.get(":method", ""),
        principal=req.attributes.source.principal[:MAX_PRINCIPAL_CHARS],
    )


def answer_ok(v: Verdict, inp: CheckInput, settings: Settings) -> auth_pb2.CheckResponse:
    a = admitted(v, inp, settings)
    to_upstream = [_header(k, val) for k, val in a.upstream_headers]
    # The same string metadata Envoy makes of the HTTP protocol's headers.
    metadata = struct_pb2.Struct()
    metadata.update({PROC_HEADER: a.proc})
    if a.grant is not None:
        metadata.update({GRANT_HEADER: a.grant.encode(), KEY_ID_HEADER: a.grant.key_id})
        if a.grant.provider:
            metadata.update({PROVIDER_HEADER: a.grant.provider})
    else:
        metadata.update({"shadow_decision": v.shadow_reason})
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=auth_pb2.OkHttpResponse(
            headers=to_upstream,
            headers_to_remove=a.remove_headers,
            response_headers_to_add=[_header(k, val) for k, val in a.client_headers],
        ),
        dynamic_metadata=metadata,
    )


def answer_denied(d: Denied) -> auth_pb2.CheckResponse:
    headers = [
        _header("content-type", d.content_type),
        _header(REFUSAL_HEADER, d.code or str(d.status)),
    ]
    if d.retry_after_s is not None:
        headers.append(_header("retry-after", str(max(1, math.ceil(d.retry_after_s)))))
        headers.append(_header("retry-after-ms", str(max(0, int(d.retry_after_s * 1000)))))
    headers += [_header(k, val) for k, val in d.headers.items()]
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=_GRPC_CODE.get(d.status, code_pb2.PERMISSION_DENIED), message=d.message
        ),
        denied_response=auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=d.status),
            headers=headers,
            body=denied_body(d).decode(),
        ),
    )


class AuthorizationService(auth_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer, settings: Settings) -> None:
        self._authorizer = authorizer
        self._settings = settings

    async def Check(self, request: auth_pb2.CheckRequest, context: Any) -> auth_pb2.CheckResponse:
        inp = check_input(request)
        verdict = await decide(self._authorizer, inp)
        if isinstance(verdict, Denied):
            return answer_denied(verdict)
        return answer_ok(verdict, inp, self._settings)


async def serve_grpc(
    authorizer: Authorizer,
    settings: Settings,
    *,
    until: Callable[[], Awaitable[None]],
    ready: asyncio.Event | None = None,
) -> None:
    service = AuthorizationService(authorizer, settings)
    address = f"{settings.authz_host}:{settings.authz_port}"
    async with grpc_server(
        address,
        max_message_bytes=settings.grpc_max_message_bytes,
        register=lambda s: auth_grpc.add_AuthorizationServicer_to_server(service, s),
        service_name=SERVICE_NAME,
        grace_s=5,
    ):
        log.info("authz (gRPC ext_authz) listening on %s", address)
        if ready is not None:
            ready.set()
        await until()

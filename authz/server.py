"""Envoy ext_authz gRPC service: `envoy.service.auth.v3.Authorization/Check`.

This module only translates between protobuf and `authz.policy`; `answer_denied` is the one
place where a `Denied` becomes an HTTP reply.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2, wrappers_pb2
from google.rpc import code_pb2, status_pb2

from atlas.errors import Denied
from atlas.grpc_service import grpc_server, stop_tasks, wait_for_shutdown
from atlas.inflight import InflightGauge
from atlas.ledger.redis import RedisLedger
from atlas.metrics import DECISIONS
from atlas.modelnames import ModelNames
from atlas.openai_errors import error_body
from atlas.settings import Settings
from authz.bodyparse import BodyParser
from authz.keycache import KeyCache
from authz.policy import CLIENT_KEY_HEADERS, Authorizer, CheckInput, Verdict, ratelimit_headers
from authz.shedding import Shedder

log = logging.getLogger("atlas.authz")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
_FALSE = wrappers_pb2.BoolValue(value=False)
#: Looked up once: counted on every admitted Check.
_ADMITTED = DECISIONS.labels(service="authz", decision="ok")
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
    )


def _normalized(name: str) -> str:
    # Upstreams that fold `_` into `-` (gunicorn, Werkzeug, CGI-style servers) would read
    # `x_atlas_key_id` as ours.
    return name.lower().replace("_", "-")


def client_headers_to_remove(headers: dict[str, str], *, strip_key: bool) -> list[str]:
    """Client headers that must not reach the upstream: anything posing as Atlas
    (`x-atlas-*` in any spelling), the raw `x-request-priority` (Atlas sends the capped
    `x-atlas-priority`), and with `strip_key` every header that can carry the client's key."""
    remove = []
    for h in headers:
        n = _normalized(h)
        ours = n.startswith("x-atlas-") or n == "x-request-priority"
        if ours or (strip_key and n in CLIENT_KEY_HEADERS):
            remove.append(h)
    return remove


def answer_ok(v: Verdict, inp: CheckInput, settings: Settings) -> auth_pb2.CheckResponse:
    # With an upstream credential of our own, the client's key is never needed upstream.
    strip_key = settings.strip_client_key or settings.upstream_api_key is not None
    remove = client_headers_to_remove(inp.headers, strip_key=strip_key)
    metadata = struct_pb2.Struct()
    if v.key is None or v.admission is None:  # global shadow mode, refused before the ledger
        metadata.update({"shadow_decision": v.shadow_reason})
        return auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=auth_pb2.OkHttpResponse(headers_to_remove=remove),
            dynamic_metadata=metadata,
        )
    to_upstream = [
        _header("x-atlas-key-id", v.key.id),
        _header("x-atlas-priority", v.priority),
    ]
    if settings.upstream_api_key is not None:
        to_upstream.append(
            _header("authorization", "Bearer " + settings.upstream_api_key.get_secret_value())
        )
    # Envoy applies removals after sets: a header we set must not also be removed.
    ours = {o.header.key for o in to_upstream}
    remove = [h for h in remove if h not in ours]
    a = v.admission
    metadata.update(
        {
            "key_id": v.key.id,
            "reservation_id": v.reservation_id,
            "reserved": a.reserved,
            "prompt_estimate": v.request.prompt_tokens,
            "priority": v.priority,
            "model": v.request.model,
            "tpm": v.key.tokens_per_minute or 0,
            "granted_completion": -1 if a.granted_completion is None else a.granted_completion,
            # What the body holds, so extproc can skip reading it when it needs nothing there.
            "body_parsed": v.request.parsed,
            "stream": v.request.stream,
            "include_usage": v.request.include_usage,
            "shadow_decision": v.shadow_reason,
            "degraded": v.degraded,
            "route": v.route,
            "choices": v.request.choices,
        }
    )
    if v.degraded:
        client_headers = [_header("x-atlas-degraded", "ledger-unavailable")]
    else:
        client_headers = [_header(k, val) for k, val in ratelimit_headers(a, v.key).items()]
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=auth_pb2.OkHttpResponse(
            headers=to_upstream,
            headers_to_remove=remove,
            response_headers_to_add=client_headers,
        ),
        dynamic_metadata=metadata,
    )


def answer_denied(d: Denied) -> auth_pb2.CheckResponse:
    headers = [_header("content-type", "application/json")]
    if d.retry_after_s is not None:
        headers.append(_header("retry-after", str(max(1, math.ceil(d.retry_after_s)))))
        headers.append(_header("retry-after-ms", str(max(0, int(d.retry_after_s * 1000)))))
    headers += [_header(k, val) for k, val in d.headers.items()]
    return auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=_GRPC_CODE.get(d.status, code_pb2.PERMISSION_DENIED), message=d.message
        ),
        denied_response=auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=d.status),  # type: ignore[arg-type]
            headers=headers,
            body=error_body(d.message, type=d.type, code=d.code, param=d.param).decode(),
        ),
    )


class AuthorizationService(auth_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer, settings: Settings) -> None:
        self._authorizer = authorizer
        self._settings = settings

    async def Check(self, request: auth_pb2.CheckRequest, context: Any) -> auth_pb2.CheckResponse:
        try:
            inp = check_input(request)
            verdict = await self._authorizer.check(inp)
        except Denied as d:
            DECISIONS.labels(service="authz", decision=d.code or str(d.status)).inc()
            return answer_denied(d)
        except Exception:
            log.exception("Check failed")
            DECISIONS.labels(service="authz", decision="internal_error").inc()
            return answer_denied(
                Denied(
                    500,
                    "Internal error in the rate limiter.",
                    type="server_error",
                    code="internal_error",
                )
            )
        _ADMITTED.inc()
        return answer_ok(verdict, inp, self._settings)


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    ledger = RedisLedger.from_settings(settings)
    cache = KeyCache(ledger.find_key, ttl_s=settings.key_cache_ttl_s)
    background = [asyncio.create_task(cache.follow(ledger.key_changes))]
    shedder = None
    if settings.capacity_tokens:
        gauge = InflightGauge(ledger.add_inflight, interval_s=settings.inflight_sync_s)
        shedder = Shedder(gauge, settings)
        background.append(asyncio.create_task(gauge.run()))
    parser = BodyParser(
        workers=settings.authz_parse_workers, timeout_s=settings.authz_parse_timeout_s
    )
    parser.start()
    authorizer = Authorizer(
        ledger,
        cache,
        settings,
        shedder=shedder,
        names=ModelNames.from_settings(settings),
        parser=parser,
    )
    service = AuthorizationService(authorizer, settings)
    address = f"{settings.authz_host}:{settings.authz_port}"
    try:
        async with grpc_server(
            address,
            max_message_bytes=settings.grpc_max_message_bytes,
            register=lambda s: auth_grpc.add_AuthorizationServicer_to_server(service, s),
            service_name=SERVICE_NAME,
            grace_s=5,
        ):
            log.info("authz listening on %s", address)
            if ready is not None:
                ready.set()
            await wait_for_shutdown()
    finally:
        await stop_tasks(background)
        parser.close()
        if shedder is not None:
            await shedder.gauge.flush()
        await ledger.close()

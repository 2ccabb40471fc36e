"""Envoy's HTTP ext_authz protocol (`http_service`), on a lean asyncio server.

Envoy sends the client's request to authz as an HTTP/1.1 request: the client's method, the
path under `PATH_PREFIX`, its headers (all of them: `allowed_headers` matches every name) and
its body as far as `with_request_body` reads it. A `200` admits; the headers of the answer say
what to add for the upstream (`allowed_upstream_headers`), what to remove
(`x-envoy-auth-headers-to-remove`), what the client gets (`allowed_client_headers_on_success`)
and the grant extproc reads (`dynamic_metadata_from_headers`). Any other status is the
client's answer, with its body and headers. Envoy turns a 5xx into its own bodiless
`status_on_error`, so authz's own 5xx answers travel as `CARRIER_STATUS` codes that the
bootstrap's local_reply_config maps back (body and `Retry-After` intact).

Measured on the 2-core machines (issue 12): gRPC ext_authz costs ~436 µs of Python per Check
with a server that does nothing; this protocol on a raw uvloop Protocol, ~28 µs. Parsing is
httptools (llhttp); only framing and bounds are ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from atlas.errors import Denied
from atlas.grant import (
    GRANT_HEADER,
    HEADERS_TO_REMOVE_HEADER,
    PARTIAL_BODY_HEADER,
    PROC_HEADER,
    REFUSAL_HEADER,
    Grant,
)
from atlas.metrics import DECISIONS
from atlas.openai_errors import denied_body, error_body
from atlas.settings import Settings
from authz.answer import INTERNAL_ERROR, admitted, decide
from authz.policy import Authorizer, CheckInput

log = logging.getLogger("atlas.authz")

#: Envoy's check requests arrive under this path (`http_service.path_prefix`); anything else
#: is not from Envoy's filter (health probes).
PATH_PREFIX = "/check"
HEALTH_PATHS = ("/healthz", "/livez", "/readyz")
#: authz's own 5xx answers, as the 4xx Envoy passes through with body and headers; the
#: bootstrap maps them back (local_reply_config). Real statuses never use these codes.
CARRIER_STATUS = {500: 460, 503: 463}
#: A duplicate's replayed 200 (atlas/idempotency.py) travels as this denial; Atlas's bootstrap
#: and the Istio EnvoyFilter map it back to 200 with authz's body.
REPLAY_CARRIER = 461
#: Bounds on what a peer may send before it is answered 431/413 and disconnected.
MAX_HEADER_BYTES = 96 << 10
MAX_HEADERS = 256
#: Requests a connection may queue (Envoy sends one at a time per connection).
MAX_PIPELINED = 16
UNDELIVERED = DECISIONS.labels(service="authz", decision="undelivered")
_BACKGROUND: set[asyncio.Future[None]] = set()
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    460: b"Atlas Internal Error",
    461: b"Atlas Replay",
    503: b"Service Unavailable",
    463: b"Atlas Unavailable",
}


class Reply:
    """An answer's bytes, and the grant it carries (released if it is never delivered)."""

    __slots__ = ("data", "grant")

    def __init__(self, data: bytes, grant: Grant | None = None) -> None:
        self.data = data
        self.grant = grant


Handler = Callable[[CheckInput], Awaitable[Reply]]


def _header_lines(headers: list[tuple[str, str]]) -> list[bytes]:
    # Envoy and every value here are printable ASCII (the grant is ensure_ascii JSON, ids
    # are hex, header names are ours); latin-1 keeps any byte a client sent as it was.
    return [f"{k}: {v}\r\n".encode("latin-1", "replace") for k, v in headers]


def response(status: int, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    reason = _REASONS.get(status, b"Status")
    head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    head += _header_lines(headers)
    head.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join(head) + body


def answer_denied(d: Denied) -> bytes:
    headers = [("content-type", d.content_type), (REFUSAL_HEADER, d.code or str(d.status))]
    if d.retry_after_s is not None:
        headers.append(("retry-after", str(max(1, -int(-d.retry_after_s // 1)))))
        headers.append(("retry-after-ms", str(max(0, int(d.retry_after_s * 1000)))))
    headers += list(d.headers.items())
    status = REPLAY_CARRIER if d.status == 200 else CARRIER_STATUS.get(d.status, d.status)
    return response(status, headers, denied_body(d))


class CheckService:
    """One Check: CheckInput in, the HTTP answer's bytes out."""

    def __init__(self, authorizer: Authorizer, settings: Settings) -> None:
        self._authorizer = authorizer
        self._settings = settings

    async def __call__(self, inp: CheckInput) -> Reply:
        verdict = await decide(self._authorizer, inp)
        if isinstance(verdict, Denied):
            return Reply(answer_denied(verdict))
        a = admitted(verdict, inp, self._settings)
        # x-atlas-proc and x-atlas-grant become dynamic metadata (x-atlas-key-id is both an
        # upstream header and metadata, for the access log).
        headers = [*a.upstream_headers, (PROC_HEADER, a.proc), *a.client_headers]
        if a.grant is not None:
            headers.append((GRANT_HEADER, a.grant.encode()))
        if a.remove_headers:
            headers.append((HEADERS_TO_REMOVE_HEADER, ",".join(a.remove_headers)))
        return Reply(response(200, headers), a.grant)

    def undelivered(self, grant: Grant) -> None:
        """Envoy closed the connection before this admission's answer was written (the client
        hung up during the Check): nothing will ever settle it, so it is given up now."""
        if grant.degraded:
            return
        UNDELIVERED.inc()
        task = asyncio.ensure_future(self._authorizer.release(grant.key_id, grant.reservation_id))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)


def check_input(method: str, url: bytes, headers: dict[str, str], body: bytes) -> CheckInput | None:
    """The CheckInput of one request from Envoy, or None when it is not a check request."""
    path = url.decode("latin-1")
    if not path.startswith(PATH_PREFIX + "/"):
        return None
    partial = headers.pop(PARTIAL_BODY_HEADER, "") == "true"
    # Envoy's content-length is the length of what it forwarded; a partial body is refused
    # before its size matters.
    return CheckInput(
        headers=headers,
        path=path[len(PATH_PREFIX) :],
        body=body,
        body_complete=not partial,
        body_size=len(body),
        method=method,
    )


class CheckProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection from Envoy. Requests are answered in order; a request that
    cannot be parsed or is over the bounds is answered 400/413/431 and the connection closed."""

    __slots__ = (
        "_body",
        "_body_bytes",
        "_closing",
        "_handler",
        "_header_bytes",
        "_headers",
        "_health",
        "_max_body",
        "_parser",
        "_queue",
        "_transport",
        "_undelivered",
        "_url",
        "_written",
    )

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        health: Callable[[], bool],
        undelivered: Callable[[Grant], None] = lambda g: None,
    ):
        self._handler = handler
        self._undelivered = undelivered
        self._max_body = max_body_bytes
        self._health = health
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[asyncio.Future[Reply]] = deque()
        #: Grants answered since Envoy's last request on this connection: not yet known read.
        self._written: list[Grant] = []
        self._closing = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        # Checks in flight finish (an admission must not be cut halfway); `_flush` gives up
        # the reservations of answers that can no longer be delivered.
        self._transport = None
        if exc is not None:
            # A reset: Envoy closed the connection with our last answer unread (its kernel
            # answers a close over unread data with RST): it gave up that Check, as it does
            # when its client hangs up. Releasing one it did read costs nothing: the
            # exchange's settlement still charges it (a late settlement).
            for grant in self._written:
                self._undelivered(grant)
        self._written.clear()
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "Upgrades are not supported.")
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised (HttpParserCallbackError).
            r = exc.__context__
            if isinstance(r, _Refused):
                self._fail(r.status, r.message)
            else:
                self._fail(400, "Malformed HTTP request.")

    # ---- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        # One request at a time per connection: a new one means the last answer was read.
        self._written.clear()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if len(self._headers) >= MAX_HEADERS:
            raise _Refused(431, "Too many headers.")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prev = self._headers.get(key)
        # Repeated headers join as Envoy joins them in its CheckRequest.
        self._headers[key] = text if prev is None else f"{prev},{text}"

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length", "")
        if length.isdigit() and (len(length) > 18 or int(length) > self._max_body):
            raise _Refused(413, "Request body too large for this gateway.")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            raise _Refused(413, "Request body too large for this gateway.")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            raise _Refused(400, "Upgrades are not supported.")
        method = self._parser.get_method().decode("latin-1")
        url, headers = self._url, self._headers
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._reset()
        if len(self._queue) >= MAX_PIPELINED:
            raise _Refused(431, "Too many pipelined requests.")
        loop = asyncio.get_running_loop()
        inp = check_input(method, url, headers, body)
        if inp is None:
            fut: asyncio.Future[Reply] = loop.create_future()
            fut.set_result(Reply(self._probe(method, url)))
        else:
            fut = asyncio.ensure_future(self._handler(inp))
        self._queue.append(fut)
        fut.add_done_callback(self._flush)

    # ---- answers -------------------------------------------------------------------------
    def _probe(self, method: str, url: bytes) -> bytes:
        path = url.split(b"?", 1)[0].decode("latin-1")
        if method in ("GET", "HEAD") and path in HEALTH_PATHS:
            if self._health():
                return response(200, [("content-type", "text/plain")], b"ok\n")
            return response(503, [("content-type", "text/plain")], b"not serving\n")
        return response(404, [("content-type", "text/plain")], b"not found\n")

    def _flush(self, _: object = None) -> None:
        # Answers leave in request order: the head of the queue first, as soon as it is done.
        while self._queue and self._queue[0].done():
            fut = self._queue.popleft()
            if fut.cancelled():
                continue
            exc = fut.exception()
            reply = Reply(answer_denied(INTERNAL_ERROR)) if exc is not None else fut.result()
            if exc is not None:
                log.error("Check answer failed: %r", exc)
            if self._transport is None or self._transport.is_closing():
                if reply.grant is not None:
                    self._undelivered(reply.grant)
                continue
            self._transport.write(reply.data)
            if reply.grant is not None:
                self._written.append(reply.grant)
        if self._closing and not self._queue and self._transport is not None:
            self._transport.close()

    def _fail(self, status: int, message: str) -> None:
        self._closing = True
        body = error_body(message, type="invalid_request_error", code=None)
        answer = response(
            status, [("content-type", "application/json"), ("connection", "close")], body
        )
        done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        done.set_result(Reply(answer))
        self._queue.append(done)
        self._flush()

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refused(431, "Request headers too large.")


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve_http(
    authorizer: Authorizer,
    settings: Settings,
    *,
    until: Callable[[], Awaitable[None]],
    ready: asyncio.Event | None = None,
) -> None:
    """Listen until `until()` returns, then stop accepting and let answers in flight finish."""
    service = CheckService(authorizer, settings)
    serving = True
    # Room above Envoy's own body limit (it never sends more than max_request_bytes).
    max_body = settings.max_request_bytes + (64 << 10)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: CheckProtocol(
            service,
            max_body_bytes=max_body,
            health=lambda: serving,
            undelivered=service.undelivered,
        ),
        settings.authz_host,
        settings.authz_port,
        backlog=1024,
    )
    log.info("authz (HTTP ext_authz) listening on %s:%s", settings.authz_host, settings.authz_port)
    try:
        if ready is not None:
            ready.set()
        await until()
    finally:
        serving = False  # probes turn unhealthy while the last answers leave
        server.close()
        await server.wait_closed()

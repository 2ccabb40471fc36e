"""The demo upstream server (`DemoUpstream`), `serve` for tests and the command line."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import signal
import sys
from typing import Any, Final

from atlas.local.demo.apis import _HEALTH_BODY, _MODELS_BODY, _POST_ROUTES
from atlas.local.demo.common import (
    _CREATED,
    HISTORY_SIZE,
    MAX_COMPLETION_TOKENS,
    MAX_HOOK_TOKENS,
    MAX_JSON_TOKENS,
    _dumps,
)
from atlas.local.demo.connection import _Connection
from atlas.local.demo.counting import _DEFAULT_VOCAB, _VOCABS
from atlas.local.demo.gemini import _gemini, _is_gemini_path
from atlas.local.demo.hooks import _header_flag, _header_int, _Hooks
from atlas.local.demo.modes import NORMAL, Failure, Mode, ModeError, failure_response, parse_mode
from atlas.local.demo.protocol import _Request
from atlas.local.demo.responses import (
    _ANTHROPIC,
    _GEMINI,
    _OPENAI,
    _ApiError,
    _error_body,
    _json_response,
    _Stream,
    _stream_bytes,
    _stream_head,
)


class DemoUpstream:
    """The demo upstream server. ``await start()`` returns the bound port (useful with port 0)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chunk_delay_s: float = 0.0,
        history_size: int = HISTORY_SIZE,
        fail_status: int | None = None,
        strict: bool = False,
        name: str | None = None,
    ) -> None:
        """:param fail_status: the initial mode: answer every /v1 request with this status (a
        broken replica for retry and outlier-detection tests); /health stays healthy.
        :param strict: refuse unknown OpenAI request fields as OpenAI does (``x-demo-strict``
        overrides it per request).
        :param name: the provider this instance plays, sent back as ``x-demo-provider`` so a
        test sees which instance answered."""
        if name is not None and not _NAME.fullmatch(name):
            raise ValueError("name must be 1..64 of letters, digits and -_.:")
        self.host = host
        self.port = port
        self.chunk_delay_s = chunk_delay_s
        self.strict = strict
        self.name = name
        self._provider = b"" if name is None else f"x-demo-provider: {name}\r\n".encode()
        # None while normal, so the request path pays one attribute test for the feature.
        self._mode: Mode | None = None
        if fail_status is not None:
            self.mode = Mode(Failure(fail_status))
        self._plain_hooks: _Hooks | None = None
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=history_size)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._all_gone: asyncio.Event | None = None

    @property
    def mode(self) -> Mode:
        """The failure mode (see :mod:`atlas.local.demo.modes`); ``PUT /demo/mode`` sets it."""
        return NORMAL if self._mode is None else self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = None if mode.is_normal else mode

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("DemoUpstream already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        if self._connections:
            self._all_gone = asyncio.Event()
            for conn in list(self._connections):
                conn.shutdown()
            # connection_lost runs on a later loop iteration; wait so no transport outlives us.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), 5.0)
            self._all_gone = None
        await server.wait_closed()

    async def __aenter__(self) -> DemoUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _connection_gone(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_gone is not None:
            self._all_gone.set()

    # dispatch ------------------------------------------------------------------------------

    def _record(self, req: _Request, body: Any) -> None:
        self.requests.append(
            {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "headers": req.headers,
                "body": body,
            }
        )

    def _dispatch(self, req: _Request) -> bytes | _Stream:
        path = req.path
        method = req.method
        ka = req.keep_alive
        if path == "/health":
            if method != "GET":
                return _method_not_allowed("GET", ka)
            return _json_response(200, _HEALTH_BODY, ka)
        if path.startswith("/demo/"):
            return self._demo(req)

        raw = req.body
        body: Any = ""
        body_is_json = False
        if raw:
            try:
                body = json.loads(raw)
                body_is_json = True
            except ValueError:
                body = raw.decode("utf-8", "replace")
        self._record(req, body)

        provider = self._provider
        handler = _POST_ROUTES.get(path)
        dialect = _OPENAI
        if handler is not None:
            allowed = "POST"
            if path == "/v1/messages":
                dialect = _ANTHROPIC
        elif _is_gemini_path(path):
            handler = _gemini
            allowed = "POST"
            dialect = _GEMINI
        elif path == "/v1/models" or (path.startswith("/v1/models/") and len(path) > 11):
            allowed = "GET"
        else:
            dialect = _GEMINI if path.startswith("/v1beta/") else _OPENAI
            message = f"Unknown path: {method} {path}"
            return _json_response(404, _error_body(404, message, dialect=dialect), ka, provider)
        if method != allowed:
            return _method_not_allowed(allowed, ka, dialect, provider)

        try:
            status = _header_int(req.headers, "x-demo-status", 400, 599)
            if status is not None:
                message = f"demo upstream: forced status {status}"
                error = _error_body(status, message, dialect=dialect)
                return _json_response(status, error, ka, provider)
            if self._mode is not None:
                failure = self._mode.failure_for(req.headers)
                if failure is not None:
                    return failure_response(failure, dialect, ka, provider)
            if handler is None:
                return _json_response(200, _model_body(path), ka, provider)
            if not body_is_json or not isinstance(body, dict):
                raise _ApiError(
                    400,
                    "We could not parse the JSON body of your request. "
                    "The body must be a JSON object.",
                )
            hooks = self._hooks(req.headers)
            if hooks.json_tokens is not None and body.get("stream") is True:
                raise _ApiError(400, "x-demo-json-tokens is for non-streamed responses")
            result, plan = handler(body, hooks, req)
        except _ApiError as e:
            error = _error_body(e.status, e.message, e.param, dialect, e.code)
            return _json_response(e.status, error, ka, provider)
        if plan is None:
            payload = result if isinstance(result, bytes) else _dumps(result).encode()
            return _json_response(200, payload, ka, provider)
        chunked = req.version == "HTTP/1.1"
        if not chunked:
            # HTTP/1.0 has no chunked coding: the end of the stream is the end of the connection.
            req.keep_alive = False
        if hooks.delay_s > 0 or hooks.abort_after is not None:
            return _Stream(plan.events, hooks.delay_s, hooks.abort_after, plan.done_marker)
        # Unpaced streams are rendered in one go: one write, no task, no per-event awaits.
        head = _stream_head(req.keep_alive, chunked)
        if provider:
            head = head[:-2] + provider + b"\r\n"  # before the blank line that ends the head
        return head + _stream_bytes(plan.events, plan.done_marker, chunked)

    def _demo(self, req: _Request) -> bytes:
        """The test controls under /demo/; never recorded, never failed by the mode."""
        if req.path == "/demo/requests":
            return self._demo_requests(req.method, req.keep_alive)
        if req.path == "/demo/mode":
            return self._demo_mode(req)
        message = f"Unknown path: {req.method} {req.path}"
        return _json_response(404, _error_body(404, message), req.keep_alive)

    def _demo_mode(self, req: _Request) -> bytes:
        method = req.method
        keep_alive = req.keep_alive
        if method == "PUT":
            try:
                self.mode = parse_mode(req.body)
            except ModeError as e:
                return _json_response(400, _error_body(400, str(e)), keep_alive)
        elif method == "DELETE":
            self.mode = NORMAL
        elif method != "GET":
            return _method_not_allowed("GET, PUT, DELETE", keep_alive)
        return _json_response(200, _dumps(self.mode.to_json()).encode(), keep_alive)

    def _demo_requests(self, method: str, keep_alive: bool) -> bytes:
        if method == "GET":
            return _json_response(200, _dumps(list(self.requests)).encode(), keep_alive)
        if method == "DELETE":
            count = len(self.requests)
            self.requests.clear()
            return _json_response(200, _dumps({"deleted": count}).encode(), keep_alive)
        return _method_not_allowed("GET, DELETE", keep_alive)

    def _hooks(self, headers: dict[str, str]) -> _Hooks:
        if not headers.keys() & _HOOK_HEADERS:
            # The benchmarks' case: no hook at all, so one shared (never mutated) _Hooks.
            plain = self._plain_hooks
            if plain is None or (plain.delay_s, plain.strict) != (self.chunk_delay_s, self.strict):
                plain = self._plain_hooks = _Hooks(
                    None, False, self.chunk_delay_s, None, strict=self.strict
                )
            return plain
        delay_ms = _header_int(headers, "x-demo-chunk-delay-ms", 0, 60_000)
        text_class = headers.get("x-demo-text")
        vocab = _DEFAULT_VOCAB
        if text_class is not None:
            found = _VOCABS.get(text_class.strip().lower())
            if found is None:
                raise _ApiError(400, f"header x-demo-text must be one of {', '.join(_VOCABS)}")
            vocab = found
        strict = _header_flag(headers, "x-demo-strict")
        return _Hooks(
            tokens=_header_int(headers, "x-demo-tokens", 0, MAX_COMPLETION_TOKENS),
            no_usage=headers.get("x-demo-no-usage", "").lower() in ("1", "true", "yes"),
            delay_s=self.chunk_delay_s if delay_ms is None else delay_ms / 1000.0,
            abort_after=_header_int(headers, "x-demo-abort-after", 0, 1_000_000),
            json_tokens=_header_int(headers, "x-demo-json-tokens", 0, MAX_JSON_TOKENS),
            cached_tokens=_header_int(headers, "x-demo-cached-tokens", 0, MAX_HOOK_TOKENS),
            cache_write_tokens=_header_int(
                headers, "x-demo-cache-write-tokens", 0, MAX_HOOK_TOKENS
            ),
            reasoning_tokens=_header_int(headers, "x-demo-reasoning-tokens", 0, MAX_HOOK_TOKENS),
            vocab=vocab,
            strict=self.strict if strict is None else strict,
        )


_NAME: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HOOK_HEADERS: Final = frozenset(
    {
        "x-demo-tokens", "x-demo-no-usage", "x-demo-chunk-delay-ms", "x-demo-abort-after",
        "x-demo-json-tokens", "x-demo-cached-tokens", "x-demo-cache-write-tokens",
        "x-demo-reasoning-tokens", "x-demo-text", "x-demo-strict",
    }
)  # fmt: skip


def _model_body(path: str) -> bytes:
    if path == "/v1/models":
        return _MODELS_BODY
    model = path.removeprefix("/v1/models/")
    return _dumps(
        {"id": model, "object": "model", "created": _CREATED, "owned_by": "atlas-demo"}
    ).encode()


def _method_not_allowed(
    allow: str, keep_alive: bool, dialect: str = _OPENAI, extra: bytes = b""
) -> bytes:
    return _json_response(
        405,
        _error_body(405, f"Method not allowed; use {allow}", dialect=dialect),
        keep_alive,
        f"allow: {allow}\r\n".encode() + extra,
    )


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


async def serve(
    host: str,
    port: int,
    *,
    ready: asyncio.Event | None = None,
    chunk_delay_s: float = 0.0,
    strict: bool = False,
) -> None:
    """Serve until cancelled. With ``port=0`` use :class:`DemoUpstream` to learn the port."""
    upstream = DemoUpstream(host, port, chunk_delay_s=chunk_delay_s, strict=strict)
    await upstream.start()
    try:
        if ready is not None:
            ready.set()
        await asyncio.get_running_loop().create_future()
    finally:
        await upstream.stop()


async def _run(
    host: str,
    port: int,
    chunk_delay_s: float,
    fail_status: int | None,
    strict: bool,
    name: str | None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    upstream = DemoUpstream(
        host, port, chunk_delay_s=chunk_delay_s, fail_status=fail_status, strict=strict, name=name
    )
    try:
        try:
            await upstream.start()
        except OSError as e:
            print(f"demo-upstream: cannot listen on {host}:{port}: {e}", file=sys.stderr)
            return 1
        playing = "" if name is None else f" as {name}"
        print(f"demo-upstream listening on {upstream.url}{playing}", flush=True)
        await stop.wait()
        await upstream.stop()
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlas.local.demo",
        description="OpenAI-, Anthropic- and Gemini-compatible demo LLM upstream that counts "
        "tokens with cl100k_base (SSE streaming like vLLM).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--chunk-delay-ms",
        type=float,
        default=0.0,
        help="delay between streamed events (default 0)",
    )
    parser.add_argument(
        "--fail-status",
        type=int,
        default=None,
        help="initial mode: answer every /v1 request with this status (400..599), /health "
        "stays 200; PUT /demo/mode changes it at runtime",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="the provider this instance plays, echoed as the x-demo-provider response header",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse unknown OpenAI request fields (e.g. vLLM's continuous_usage_stats) "
        "with a 400, as OpenAI does",
    )
    args = parser.parse_args(argv)
    if args.chunk_delay_ms < 0:
        parser.error("--chunk-delay-ms must be >= 0")
    if args.fail_status is not None and not 400 <= args.fail_status <= 599:
        parser.error("--fail-status must be 400..599")
    if args.name is not None and not _NAME.fullmatch(args.name):
        parser.error("--name must be 1..64 of letters, digits and -_.:")
    delay_s = args.chunk_delay_ms / 1000.0
    try:
        return asyncio.run(
            _run(args.host, args.port, delay_s, args.fail_status, args.strict, args.name)
        )
    except KeyboardInterrupt:
        return 0

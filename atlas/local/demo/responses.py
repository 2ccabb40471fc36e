"""HTTP responses: status lines, JSON answers, each API's error shape and SSE framing."""

from __future__ import annotations

import http
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from atlas.local.demo.common import _base62_id, _dumps, _dumps_google_pretty


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error" if status >= 400 else "OK"


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {_reason(status)}\r\n".encode()
    return line


_JSON_HEADERS: Final = b"server: atlas-demo-upstream\r\ncontent-type: application/json\r\n"
_CLOSE: Final = b"connection: close\r\n"


def _json_response(status: int, body: bytes, keep_alive: bool, extra: bytes = b"") -> bytes:
    return b"".join(
        (
            _status_line(status),
            _JSON_HEADERS,
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"" if keep_alive else _CLOSE,
            extra,
            b"\r\n",
            body,
        )
    )


def _stream_head(keep_alive: bool, chunked: bool) -> bytes:
    return b"".join(
        (
            _status_line(200),
            b"server: atlas-demo-upstream\r\ncontent-type: text/event-stream\r\n",
            b"cache-control: no-cache\r\n",
            b"transfer-encoding: chunked\r\n" if chunked else b"",
            b"" if keep_alive else _CLOSE,
            b"\r\n",
        )
    )


# Which API an error answers as.
_OPENAI: Final = "openai"
_ANTHROPIC: Final = "anthropic"
_GEMINI: Final = "gemini"


def _error_type(status: int) -> tuple[str, str | None]:
    if status == 401:
        return "authentication_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if status == 404:
        return "invalid_request_error", "not_found"
    if status == 429:
        return "rate_limit_error", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GOOGLE_STATUS: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error_body(
    status: int,
    message: str,
    param: str | None = None,
    dialect: str = _OPENAI,
    code: str | None = None,
) -> bytes:
    if dialect == _ANTHROPIC:
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        etype = _ANTHROPIC_ERROR_TYPES.get(status, fallback)
        return _dumps(
            {
                "type": "error",
                "error": {"type": etype, "message": message},
                "request_id": _base62_id("req_011C", 22),
            }
        ).encode()
    if dialect == _GEMINI:
        fallback = "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
        error = {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, fallback)}
        return (_dumps_google_pretty({"error": error}) + "\n").encode()
    etype, default_code = _error_type(status)
    if code is None and status != 400:
        code = default_code
    return _dumps(
        {"error": {"message": message, "type": etype, "param": param, "code": code}}
    ).encode()


class _ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(slots=True)
class _StreamPlan:
    """A streamed answer: SSE events, each flagged when it carries content."""

    events: list[tuple[str, bool]]
    done_marker: bool


@dataclass(slots=True)
class _Stream:
    """A streamed answer that needs pacing or a fault, so it runs as a task."""

    events: list[tuple[str, bool]]  # (SSE event text, counts as a content event)
    delay_s: float
    abort_after: int | None
    done_marker: bool


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _sse_typed(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def _frame(event: str) -> str:
    # str.isascii() is O(1); only events with non-ASCII text pay for the byte count.
    size = len(event) if event.isascii() else len(event.encode())
    return f"{size:x}\r\n{event}\r\n"


_DONE: Final = _sse("[DONE]")


def _stream_bytes(events: Sequence[tuple[str, bool]], done_marker: bool, chunked: bool) -> bytes:
    texts = [e for e, _ in events]
    if done_marker:
        texts.append(_DONE)
    if chunked:
        return ("".join(map(_frame, texts)) + "0\r\n\r\n").encode()
    return "".join(texts).encode()


_Result = tuple[dict[str, Any] | bytes | None, _StreamPlan | None]

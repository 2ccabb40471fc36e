"""HTTP/1.1 request parsing: an incremental parser (keep-alive, pipelining, Content-Length
and chunked bodies) with no framework."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Final

from atlas.local.demo.common import MAX_BODY_BYTES, MAX_CHUNK_LINE, MAX_HEAD_BYTES


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Head:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    chunked: bool
    content_length: int
    keep_alive: bool
    expect_continue: bool


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def _is_token(value: str) -> bool:
    return bool(value) and all(ord(c) in _TOKEN_CHARS for c in value)


def _parse_head(raw: bytes) -> _Head:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _HttpError(400, "malformed request line")
    method, target, version = parts
    if not _is_token(method) or not target or any(c in target for c in "\t\x00"):
        raise _HttpError(400, "malformed request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise _HttpError(505, f"unsupported protocol version {version}")
        raise _HttpError(400, "malformed request line")

    headers: dict[str, str] = {}
    for line in itertools.islice(lines, 1, None):
        name, sep, value = line.partition(":")
        # RFC 9112 forbids whitespace before the colon and lets servers reject obs-fold.
        if not sep or not _is_token(name):
            raise _HttpError(400, "malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        previous = headers.get(name)
        if previous is None:
            headers[name] = value
        elif name == "content-length":
            if previous != value:
                raise _HttpError(400, "conflicting Content-Length headers")
        else:
            headers[name] = f"{previous}, {value}"

    path, _, query = target.partition("?")
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 defaults to persistent connections, HTTP/1.0 must opt in.
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection

    chunked = False
    content_length = 0
    te = headers.get("transfer-encoding")
    if te is not None:
        codings = [c.strip().lower() for c in te.split(",")]
        if version == "HTTP/1.0" or codings[-1] != "chunked":
            raise _HttpError(400, "bad Transfer-Encoding")
        if codings != ["chunked"]:
            raise _HttpError(501, f"unsupported Transfer-Encoding {te}")
        chunked = True
        # A request carrying both framings is a smuggling vector: serve it, then hang up.
        if "content-length" in headers:
            keep_alive = False
    else:
        cl = headers.get("content-length")
        if cl is not None:
            if not cl.isdigit() or not cl.isascii():
                raise _HttpError(400, "bad Content-Length")
            content_length = int(cl)
            if content_length > MAX_BODY_BYTES:
                raise _HttpError(413, "request body too large")
    expect_continue = headers.get("expect", "").lower() == "100-continue"
    return _Head(
        method, path, query, version, headers, chunked, content_length, keep_alive, expect_continue
    )


class _Parser:
    """Incremental request parser over ``buf``; its state survives between reads so that a
    large body arriving in many segments is not rescanned."""

    __slots__ = (
        "_body_size",
        "_chunk_need",
        "_chunk_state",
        "_chunks",
        "_continue_sent",
        "_head",
        "buf",
    )

    def __init__(self) -> None:
        self.buf = bytearray()
        self._head: _Head | None = None
        self._chunks: list[bytes] = []
        self._chunk_state = 0  # 0: size line, 1: data, 2: trailers
        self._chunk_need = 0
        self._body_size = 0
        self._continue_sent = False

    def wants_continue(self) -> bool:
        """True once per request when the client waits for ``100 Continue`` before its body."""
        head = self._head
        if head is None or not head.expect_continue or self._continue_sent:
            return False
        self._continue_sent = True
        return True

    def next_request(self) -> _Request | None:
        buf = self.buf
        head = self._head
        if head is None:
            # RFC 9112 section 2.2: ignore empty lines before a request line.
            while buf[:2] == b"\r\n":
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise _HttpError(431, "request head too large")
                return None
            if end > MAX_HEAD_BYTES:
                raise _HttpError(431, "request head too large")
            head = _parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            self._head = head
            self._continue_sent = False
        if head.chunked:
            body = self._read_chunked()
            if body is None:
                return None
        else:
            n = head.content_length
            if len(buf) < n:
                return None
            body = bytes(buf[:n])
            del buf[:n]
        self._head = None
        return _Request(
            head.method, head.path, head.query, head.version, head.headers, body, head.keep_alive
        )

    def _read_chunked(self) -> bytes | None:
        buf = self.buf
        while True:
            if self._chunk_state == 1:
                need = self._chunk_need
                if len(buf) < need + 2:
                    return None
                if buf[need : need + 2] != b"\r\n":
                    raise _HttpError(400, "malformed chunk")
                self._chunks.append(bytes(buf[:need]))
                del buf[: need + 2]
                self._chunk_state = 0
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise _HttpError(400, "chunk line too long")
                return None
            if eol > MAX_CHUNK_LINE:
                raise _HttpError(400, "chunk line too long")
            line = bytes(buf[:eol])
            del buf[: eol + 2]
            if self._chunk_state == 2:
                if not line:
                    body = b"".join(self._chunks)
                    self._chunks = []
                    self._chunk_state = 0
                    self._body_size = 0
                    return body
                continue  # trailer fields carry nothing we need
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not size_text or not all(c in _HEX for c in size_text):
                raise _HttpError(400, "malformed chunk size")
            size = int(size_text, 16)
            self._body_size += size
            if self._body_size > MAX_BODY_BYTES:
                raise _HttpError(413, "request body too large")
            if size == 0:
                self._chunk_state = 2
            else:
                self._chunk_need = size
                self._chunk_state = 1

"""Request body rewrites by splicing: what Atlas adds to a request (`stream_options` so the
upstream reports usage, the granted completion limit) without parsing and re-serialising it.

Members are appended before the object's closing brace, and JSON readers (Python's json,
hence vLLM's pydantic models; authz too) keep the last of duplicate keys. Work is linear in
the body, whatever its shape, and any string the client sent (a lone `\\ud800` escape
included) passes byte for byte.
"""

from __future__ import annotations

import json
import re
from typing import Any

from atlas.jsonbound import object_at
from extproc.usage import Endpoint

_JSON_BLANKS = b" \t\r\n"
_OPEN_BRACE, _CLOSE_BRACE = ord("{"), ord("}")
#: Bytes after a member's `{` read to decode a small object member (stream_options).
_MEMBER_CAPTURE = 4096
#: The APIs whose streams report usage only when `stream_options.include_usage` asks.
USAGE_INJECTED_ENDPOINTS = (Endpoint.CHAT, Endpoint.COMPLETIONS)


class Key:
    """Finds the last `"key":` member of a JSON text. Inside a JSON string every quote is
    escaped, so only a real key (or a string value equal to it, which no colon follows) can
    match; a memchr-speed rfind finds candidates, the regex confirms one."""

    __slots__ = ("_needle", "_pattern")

    def __init__(self, key: str, value_start: bytes = b"") -> None:
        self._needle = b'"' + key.encode() + b'"'
        self._pattern = re.compile(re.escape(self._needle) + rb"\s*:\s*" + re.escape(value_start))

    def last(self, body: bytes) -> re.Match[bytes] | None:
        i = len(body)
        while (i := body.rfind(self._needle, 0, i)) >= 0:
            m = self._pattern.match(body, i)
            if m is not None:
                return m
        return None


_STREAM_OPTIONS = Key("stream_options", b"{")
_MAX_COMPLETION_TOKENS = Key("max_completion_tokens")


def _utf8(body: bytes) -> bytes | None:
    """`body` as UTF-8 (JSON may come as UTF-16/32, which json.loads and vLLM accept)."""
    enc = json.detect_encoding(body)
    if enc in ("utf-8", "utf-8-sig"):
        return body
    try:
        return body.decode(enc, "surrogatepass").encode("utf-8", "surrogatepass")
    except (UnicodeError, LookupError):
        return None


def _rstrip_at(buf: bytes, end: int) -> int:
    """Where `buf[:end]` ends without its trailing JSON blanks (no copy)."""
    while end > 0 and buf[end - 1] in _JSON_BLANKS:
        end -= 1
    return end


def append_members(body: bytes, members: list[tuple[str, object]]) -> bytes | None:
    """The JSON object `body` with `members` appended (overriding earlier duplicates)."""
    utf8 = _utf8(body)
    if utf8 is None:
        return None
    end = _rstrip_at(utf8, len(utf8))
    if end < 2 or utf8[end - 1] != _CLOSE_BRACE:
        return None
    inner = _rstrip_at(utf8, end - 1)
    if inner == 0:
        return None
    # ensure_ascii: a client's lone surrogate in stream_options is written back escaped.
    extra = ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in members)
    sep = b"" if utf8[inner - 1] == _OPEN_BRACE else b","
    # One copy of the body, whatever its size.
    return b"".join((memoryview(utf8)[:inner], sep, extra.encode(), memoryview(utf8)[end - 1 :]))


def object_member(body: bytes, key: Key) -> dict[str, Any] | None:
    """The last (winning) small object member `key`, read from a bounded slice."""
    last = key.last(body)
    return None if last is None else object_at(body, last.end() - 1, _MEMBER_CAPTURE)


def clamp_field(endpoint: Endpoint | None, body: bytes, data: dict[str, Any] | None) -> str:
    """Where a request's per-choice completion limit goes, as the upstream reads it (one of
    the fields `atlas.requestbody` reads the limit from)."""
    if endpoint is Endpoint.RESPONSES:
        return "max_output_tokens"
    if endpoint is Endpoint.CHAT:
        used = (
            "max_completion_tokens" in data
            if data is not None
            else _MAX_COMPLETION_TOKENS.last(body) is not None
        )
        return "max_completion_tokens" if used else "max_tokens"
    return "max_tokens"


def rewrite_request(
    body: bytes,
    data: dict[str, Any] | None,
    *,
    endpoint: Endpoint | None,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    granted_completion: int | None,
) -> tuple[bytes | None, bool]:
    """(`body` with Atlas's request changes, whether usage reporting was injected); the
    body is None when it needs no change (or is not an object we can append to).

    :param data: the body already parsed, when it was (else members are read by splicing).
    :param include_usage: the client asked for usage itself.
    :param granted_completion: the completion limit authz reserved, per choice."""
    members: list[tuple[str, object]] = []
    usage_api = stream and endpoint in USAGE_INJECTED_ENDPOINTS
    inject = usage_api and not include_usage
    continuous = usage_api and continuous_usage
    if inject or continuous:
        # Ask the upstream for exact usage; the extra chunk is stripped on the way back.
        opts = (
            data.get("stream_options") if data is not None else object_member(body, _STREAM_OPTIONS)
        )
        merged = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        if continuous:
            # vLLM: usage on every chunk, so a stream cut anywhere is charged exactly.
            merged["continuous_usage_stats"] = True
        members.append(("stream_options", merged))
    if granted_completion is not None:
        # Per choice, as the upstream reads it (authz reserved for every choice).
        members.append((clamp_field(endpoint, body, data), granted_completion))
    if not members:
        return None, False
    new = append_members(body, members)
    return new, new is not None and inject

"""Fast, dependency-free, OpenAI-compatible demo LLM upstream.

`atlas up` uses it as the default upstream, the end-to-end tests put it behind a real Envoy,
and benchmarks drive it hard, so it is a bare ``asyncio.Protocol`` HTTP/1.1 server (keep-alive,
pipelining, Content-Length and chunked request bodies) with no framework and as little
per-request work as possible. Streams are Server-Sent Events framed like vLLM: one HTTP chunk
per SSE event.

Endpoints
---------
``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings``, ``POST /v1/responses``,
``GET|DELETE /demo/requests``. Any model name is accepted and echoed back.

Token model (deterministic, so that a ~chars/4 estimator is close to the truth)
---------------------------------------------------------------------------------
* Prompt tokens = ``ceil(chars / 4)`` (at least 1), where ``chars`` is the total length of all
  prompt text: chat message contents (strings or ``{"type": "text", "text": ...}`` parts; roles
  and other fields count nothing), completion prompts, embedding inputs, Responses ``input``
  plus ``instructions``. Pre-tokenised prompts (lists of ints) count one token per int.
* Completion: exactly N tokens per choice, N = ``max_completion_tokens`` / ``max_tokens`` /
  ``max_output_tokens`` when given, else 16, capped at 4096. Every token is a 4-character
  string from a fixed vocabulary (" the", " fox", ...), so completion text is ``4 * N`` chars.
  ``finish_reason`` is ``"length"`` when a limit was given and reached, else ``"stop"``.
* ``n`` > 1 yields n identical choices; completion tokens = n * N. A list of prompts on
  ``/v1/completions`` yields n choices per prompt.

Test and fault hooks (request headers)
--------------------------------------
* ``x-demo-tokens: N`` -- emit exactly N tokens (0..4096) whatever the request's limit says,
  so tests can fake an upstream that overruns ``max_tokens``.
* ``x-demo-status: CODE`` (400..599) -- answer with that status and an OpenAI-shaped error.
* ``x-demo-no-usage: 1`` -- never report usage, neither in JSON nor in streams.
* ``x-demo-chunk-delay-ms: N`` -- sleep N ms between streamed events (default: the server's
  ``chunk_delay_s``).
* ``x-demo-abort-after: N`` -- in a stream, abort the TCP connection after N content events,
  like an upstream reset. A stream with fewer content events completes normally.
* ``x-demo-json-tokens: N`` -- a non-streamed answer of exactly N tokens per choice
  (0..2**23, i.e. up to 32 MiB of text), for responses bigger than any buffer on the way.

``GET /demo/requests`` lists the last 50 requests seen (method, path, query, lower-cased headers,
body as JSON if it parses, else as a string) and ``DELETE /demo/requests`` clears them.
``/health`` and ``/demo/*`` are not recorded, so health checks cannot push real traffic out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import http
import itertools
import json
import logging
import math
import signal
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DEFAULT_MODELS", "DemoUpstream", "main", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MODELS: Final = ("demo-small", "demo-large")
DEFAULT_COMPLETION_TOKENS: Final = 16
MAX_COMPLETION_TOKENS: Final = 4096
MAX_JSON_TOKENS: Final = 1 << 23
MAX_CHOICES: Final = 128
EMBEDDING_DIMENSIONS: Final = 8
MAX_EMBEDDING_DIMENSIONS: Final = 4096
HISTORY_SIZE: Final = 50
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
MAX_CHUNK_LINE: Final = 4096

VOCABULARY: Final = (
    " the", " fox", " and", " run", " sky", " sea", " red", " big",
    " old", " new", " cat", " dog", " sun", " day", " way", " end",
)  # fmt: skip
_TEXT: Final = "".join(VOCABULARY[i % len(VOCABULARY)] for i in range(MAX_COMPLETION_TOKENS))
# Vocabulary entries are plain ASCII, so their JSON forms can be spliced into templates.
_TOKEN_JSON: Final = tuple(json.dumps(tok) for tok in VOCABULARY)

_CREATED: Final = 1_700_000_000
_ids = itertools.count(1)
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _token_json(i: int) -> str:
    return _TOKEN_JSON[i % len(_TOKEN_JSON)]


def _text(n_tokens: int) -> str:
    if n_tokens <= MAX_COMPLETION_TOKENS:
        return _TEXT[: 4 * n_tokens]
    return (_TEXT * (n_tokens // MAX_COMPLETION_TOKENS + 1))[: 4 * n_tokens]


def _tokens_for_chars(chars: int) -> int:
    return (chars + 3) // 4


def _next_id(prefix: str) -> str:
    return f"{prefix}{next(_ids):024x}"


# --------------------------------------------------------------------------------------------
# HTTP/1.1 parsing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# HTTP responses
# --------------------------------------------------------------------------------------------


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


def _error_body(status: int, message: str, param: str | None = None) -> bytes:
    etype, code = _error_type(status)
    if status == 400:
        code = None
    return _dumps(
        {"error": {"message": message, "type": etype, "param": param, "code": code}}
    ).encode()


class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


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
    # Templates are ASCII-only (json.dumps escapes everything else), so len() is the byte size.
    return f"{len(event):x}\r\n{event}\r\n"


_DONE: Final = _sse("[DONE]")


def _stream_bytes(events: Sequence[tuple[str, bool]], done_marker: bool, chunked: bool) -> bytes:
    texts = [e for e, _ in events]
    if done_marker:
        texts.append(_DONE)
    if chunked:
        return ("".join(map(_frame, texts)) + "0\r\n\r\n").encode()
    return "".join(texts).encode()


# --------------------------------------------------------------------------------------------
# Request options and the OpenAI endpoints
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Hooks:
    tokens: int | None
    no_usage: bool
    delay_s: float
    abort_after: int | None
    json_tokens: int | None = None


def _header_int(headers: dict[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _ApiError(400, f"header {name} must be an integer") from None
    if not low <= value <= high:
        raise _ApiError(400, f"header {name} must be between {low} and {high}")
    return value


def _int_field(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _ApiError(400, f"'{name}' must be an integer >= {low}", name)
    if high is not None:
        value = min(value, high)
    return value


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _ApiError(400, f"'{name}' must be a boolean", name)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model", DEFAULT_MODELS[0])
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "'model' must be a non-empty string", "model")
    return model


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _ApiError(400, "'stream_options' must be an object", "stream_options")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise _ApiError(400, "'stream_options.include_usage' must be a boolean", "stream_options")
    return value


def _plan(limit: int | None, hooks: _Hooks) -> tuple[int, str]:
    if hooks.json_tokens is not None:
        n = hooks.json_tokens
    elif hooks.tokens is not None:
        n = hooks.tokens
    elif limit is not None:
        n = limit
    else:
        n = DEFAULT_COMPLETION_TOKENS
    finish = "length" if limit is not None and n >= limit else "stop"
    return n, finish


def _text_chars(content: Any, param: str) -> int:
    """Characters of a message content: a string, null, or a list of content parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        chars = 0
        for part in content:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    chars += len(text)
            else:
                raise _ApiError(400, f"invalid content part in '{param}'", param)
        return chars
    raise _ApiError(400, f"invalid content in '{param}'", param)


def _prompt_list(value: Any, param: str) -> list[str | list[int]]:
    """Normalise a prompt/input field (string, list of strings, token list(s)) to a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return list(value)
    raise _ApiError(400, f"'{param}' must be a string, a list of strings or token lists", param)


def _prompt_tokens(items: Sequence[str | list[int]]) -> int:
    chars = 0
    ints = 0
    for item in items:
        if isinstance(item, str):
            chars += len(item)
        else:
            ints += len(item)
    return max(1, _tokens_for_chars(chars) + ints)


def _usage_json(prompt: int, completion: int) -> str:
    return (
        f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},'
        f'"total_tokens":{prompt + completion}}}'
    )


def _choice_chunks(
    obj: str,
    rid: str,
    created: int,
    model: str,
    n_choices: int,
    n_tokens: int,
    finish: str,
    usage: str | None,
    *,
    chat: bool,
) -> list[tuple[str, bool]]:
    """SSE events of a chat/text completion stream, laid out like vLLM's.

    Chat streams open each choice with a role delta; every chunk carries ``"usage":null`` when
    usage was asked for, and a final ``"choices":[]`` chunk then carries the totals.
    """
    meta = f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{json.dumps(model)}'
    pre = f'{meta},"choices":[{{"index":'
    end = '}],"usage":null}\n\n' if usage is not None else "}]}\n\n"
    events: list[tuple[str, bool]] = []
    if chat:
        role = '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        events.extend((f"{pre}{c},{role}{end}", False) for c in range(n_choices))
    for t in range(n_tokens):
        tok = _token_json(t)
        body = f'"delta":{{"content":{tok}}}' if chat else f'"text":{tok}'
        for c in range(n_choices):
            events.append((f'{pre}{c},{body},"logprobs":null,"finish_reason":null{end}', True))
    empty = '"delta":{}' if chat else '"text":""'
    for c in range(n_choices):
        events.append((f'{pre}{c},{empty},"logprobs":null,"finish_reason":"{finish}"{end}', False))
    if usage is not None:
        events.append((f'{meta},"choices":[],"usage":{usage}}}\n\n', False))
    return events


def _chat(body: dict[str, Any], hooks: _Hooks) -> tuple[dict[str, Any] | None, _StreamPlan | None]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty array", "messages")
    chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _ApiError(400, f"'messages[{i}]' must be an object", "messages")
        chars += _text_chars(message.get("content"), "messages")
    prompt_tokens = max(1, _tokens_for_chars(chars))
    limit = _int_field(body, "max_completion_tokens", 1, MAX_COMPLETION_TOKENS)
    if limit is None:
        limit = _int_field(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
    n_choices = _int_field(body, "n", 1, MAX_CHOICES) or 1
    model = _model(body)
    stream = _bool_field(body, "stream")
    include_usage = _include_usage(body) and not hooks.no_usage
    n_tokens, finish = _plan(limit, hooks)
    completion_tokens = n_choices * n_tokens
    rid = _next_id("chatcmpl-")
    created = int(time.time())

    if not stream:
        text = _text(n_tokens)
        response: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i in range(n_choices)
            ],
            "system_fingerprint": None,
        }
        if not hooks.no_usage:
            response["usage"] = _usage_dict(prompt_tokens, completion_tokens)
        return response, None

    events = _choice_chunks(
        "chat.completion.chunk", rid, created, model, n_choices, n_tokens, finish,
        _usage_json(prompt_tokens, completion_tokens) if include_usage else None, chat=True,
    )  # fmt: skip
    return None, _StreamPlan(events, done_marker=True)


def _usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completions(
    body: dict[str, Any], hooks: _Hooks
) -> tuple[dict[str, Any] | None, _StreamPlan | None]:
    if "prompt" not in body:
        raise _ApiError(400, "'prompt' is required", "prompt")
    prompts = _prompt_list(body["prompt"], "prompt")
    prompt_tokens = _prompt_tokens(prompts)
    limit = _int_field(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
    n_per_prompt = _int_field(body, "n", 1, MAX_CHOICES) or 1
    n_choices = n_per_prompt * len(prompts)
    model = _model(body)
    stream = _bool_field(body, "stream")
    include_usage = _include_usage(body) and not hooks.no_usage
    n_tokens, finish = _plan(limit, hooks)
    completion_tokens = n_choices * n_tokens
    rid = _next_id("cmpl-")
    created = int(time.time())

    if not stream:
        text = _text(n_tokens)
        response: dict[str, Any] = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i in range(n_choices)
            ],
            "system_fingerprint": None,
        }
        if not hooks.no_usage:
            response["usage"] = _usage_dict(prompt_tokens, completion_tokens)
        return response, None

    events = _choice_chunks(
        "text_completion", rid, created, model, n_choices, n_tokens, finish,
        _usage_json(prompt_tokens, completion_tokens) if include_usage else None, chat=False,
    )  # fmt: skip
    return None, _StreamPlan(events, done_marker=True)


def _embedding_vector(item: str | list[int], dims: int) -> list[float]:
    seed_bytes = item.encode() if isinstance(item, str) else repr(item).encode()
    state = zlib.crc32(seed_bytes) or 1
    values: list[float] = []
    for _ in range(dims):
        # xorshift32: deterministic across processes, unlike hash().
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        values.append(state / 2147483648.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _embeddings(body: dict[str, Any], hooks: _Hooks) -> dict[str, Any]:
    if "input" not in body:
        raise _ApiError(400, "'input' is required", "input")
    items = _prompt_list(body["input"], "input")
    dims = _int_field(body, "dimensions", 1, MAX_EMBEDDING_DIMENSIONS) or EMBEDDING_DIMENSIONS
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _ApiError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        vector = _embedding_vector(item, dims)
        embedding: list[float] | str = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    response: dict[str, Any] = {"object": "list", "data": data, "model": _model(body)}
    if not hooks.no_usage:
        prompt_tokens = _prompt_tokens(items)
        response["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return response


def _responses_input_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list):
        raise _ApiError(400, "'input' must be a string or an array of items", "input")
    chars = 0
    for item in value:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            if "content" in item:
                chars += _text_chars(item["content"], "input")
            elif isinstance(item.get("output"), str):
                chars += len(item["output"])
        else:
            raise _ApiError(400, "'input' items must be objects", "input")
    return chars


def _response_object(
    rid: str,
    created: int,
    model: str,
    body: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def _message_item(mid: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def _responses(
    body: dict[str, Any], hooks: _Hooks
) -> tuple[dict[str, Any] | None, _StreamPlan | None]:
    if "input" not in body:
        raise _ApiError(400, "'input' is required", "input")
    chars = _responses_input_chars(body["input"])
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        chars += len(instructions)
    elif instructions is not None:
        raise _ApiError(400, "'instructions' must be a string", "instructions")
    input_tokens = max(1, _tokens_for_chars(chars))
    limit = _int_field(body, "max_output_tokens", 1, MAX_COMPLETION_TOKENS)
    model = _model(body)
    stream = _bool_field(body, "stream")
    n_tokens, _ = _plan(limit, hooks)
    text = _text(n_tokens)
    usage: dict[str, Any] | None = None
    if not hooks.no_usage:
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + n_tokens,
        }
    rid = _next_id("resp_")
    mid = _next_id("msg_")
    created = int(time.time())
    done_item = _message_item(mid, "completed", text)
    final = _response_object(rid, created, model, body, "completed", [done_item], usage)
    if not stream:
        return final, None

    seq = itertools.count()
    events: list[tuple[str, bool]] = []

    def add(event: str, payload: dict[str, Any], content: bool = False) -> None:
        payload = {"type": event, "sequence_number": next(seq), **payload}
        events.append((_sse_typed(event, _dumps(payload)), content))

    pending = _response_object(rid, created, model, body, "in_progress", [], None)
    add("response.created", {"response": pending})
    add("response.in_progress", {"response": pending})
    add(
        "response.output_item.added",
        {"output_index": 0, "item": _message_item(mid, "in_progress", None)},
    )
    part_ids = {"item_id": mid, "output_index": 0, "content_index": 0}
    add(
        "response.content_part.added",
        {**part_ids, "part": {"type": "output_text", "text": "", "annotations": []}},
    )
    delta_head = '{"type":"response.output_text.delta","sequence_number":'
    delta_ids = f',"item_id":"{mid}","output_index":0,"content_index":0,"delta":'
    for t in range(n_tokens):
        delta = f'{delta_head}{next(seq)}{delta_ids}{_token_json(t)},"logprobs":[]}}'
        events.append((_sse_typed("response.output_text.delta", delta), True))
    add("response.output_text.done", {**part_ids, "text": text, "logprobs": []})
    add(
        "response.content_part.done",
        {**part_ids, "part": {"type": "output_text", "text": text, "annotations": []}},
    )
    add("response.output_item.done", {"output_index": 0, "item": done_item})
    add("response.completed", {"response": final})
    return None, _StreamPlan(events, done_marker=False)


_Handler = Callable[[dict[str, Any], _Hooks], tuple[dict[str, Any] | None, _StreamPlan | None]]


def _embeddings_handler(
    body: dict[str, Any], hooks: _Hooks
) -> tuple[dict[str, Any] | None, _StreamPlan | None]:
    return _embeddings(body, hooks), None


_POST_ROUTES: Final[dict[str, _Handler]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completions,
    "/v1/embeddings": _embeddings_handler,
    "/v1/responses": _responses,
}

_HEALTH_BODY: Final = b'{"status":"ok"}'
_MODELS_BODY: Final = _dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": _CREATED, "owned_by": "atlas-demo"}
            for m in DEFAULT_MODELS
        ],
    }
).encode()


# --------------------------------------------------------------------------------------------
# Connection handling
# --------------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_app",
        "_closing",
        "_drain_waiter",
        "_parser",
        "_task",
        "_transport",
        "_write_paused",
    )

    def __init__(self, app: DemoUpstream) -> None:
        self._app = app
        self._parser = _Parser()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._app._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._app._connection_gone(self)
        if self._task is not None:
            self._task.cancel()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._parser.buf += data
        if self._task is None:
            self._process()

    def pause_writing(self) -> None:
        self._write_paused = True
        # Stop taking pipelined requests from a client that does not read its answers.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        if self._transport is not None and self._task is None and not self._closing:
            self._transport.resume_reading()

    # internals -----------------------------------------------------------------------------

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    async def _drain(self) -> None:
        if self._write_paused and not self._closing:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._closing:
            raise ConnectionResetError("client went away")

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def shutdown(self) -> None:
        """Used when the server stops: drop the connection whatever it is doing."""
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _process(self) -> None:
        transport = self._transport
        assert transport is not None
        while not self._closing:
            try:
                req = self._parser.next_request()
            except _HttpError as e:
                transport.write(_json_response(e.status, _error_body(e.status, e.message), False))
                self._close()
                return
            if req is None:
                if self._parser.wants_continue():
                    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            try:
                result = self._app._dispatch(req)
            except Exception:
                log.exception("demo upstream: unhandled error for %s %s", req.method, req.path)
                transport.write(_json_response(500, _error_body(500, "internal error"), False))
                self._close()
                return
            if isinstance(result, _Stream):
                transport.pause_reading()
                self._task = asyncio.get_running_loop().create_task(
                    self._run_stream(result, req.keep_alive, req.version == "HTTP/1.1")
                )
                return
            transport.write(result)
            if not req.keep_alive:
                self._close()
                return

    async def _run_stream(self, stream: _Stream, keep_alive: bool, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            transport.write(_stream_head(keep_alive, chunked))
            sent_content = 0
            for event, is_content in stream.events:
                if is_content and stream.abort_after is not None:
                    if sent_content >= stream.abort_after:
                        await self._abort_after_flush()
                        return
                    sent_content += 1
                transport.write(_frame(event).encode() if chunked else event.encode())
                await self._drain()
                if stream.delay_s > 0:
                    await asyncio.sleep(stream.delay_s)
            tail = _DONE if stream.done_marker else ""
            if chunked:
                transport.write(((_frame(tail) if tail else "") + "0\r\n\r\n").encode())
            elif tail:
                transport.write(tail.encode())
            await self._drain()
        except (ConnectionError, asyncio.CancelledError):
            transport.abort()
            return
        except Exception:
            log.exception("demo upstream: stream failed")
            transport.abort()
            return
        finally:
            self._task = None
        if not keep_alive:
            self._close()
            return
        if not self._write_paused:
            transport.resume_reading()
        self._process()

    async def _abort_after_flush(self) -> None:
        transport = self._transport
        assert transport is not None
        # abort() discards unsent bytes; let the events before the fault reach the client.
        for _ in range(200):
            if transport.get_write_buffer_size() == 0 or self._closing:
                break
            await asyncio.sleep(0.005)
        self._closing = True
        transport.abort()


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


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
    ) -> None:
        """:param fail_status: answer every /v1 request with this status (a broken replica
        for retry and outlier-detection tests); /health stays healthy."""
        self.host = host
        self.port = port
        self.chunk_delay_s = chunk_delay_s
        self.fail_status = fail_status
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=history_size)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._all_gone: asyncio.Event | None = None

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
        if path == "/demo/requests":
            return self._demo_requests(method, ka)

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

        handler = _POST_ROUTES.get(path)
        if handler is not None:
            allowed = "POST"
        elif path == "/v1/models" or (path.startswith("/v1/models/") and len(path) > 11):
            allowed = "GET"
        else:
            return _json_response(404, _error_body(404, f"Unknown path: {method} {path}"), ka)
        if method != allowed:
            return _method_not_allowed(allowed, ka)

        try:
            status = _header_int(req.headers, "x-demo-status", 400, 599) or self.fail_status
            if status is not None:
                message = f"demo upstream: forced status {status}"
                return _json_response(status, _error_body(status, message), ka)
            if handler is None:
                return _json_response(200, _model_body(path), ka)
            if not body_is_json or not isinstance(body, dict):
                raise _ApiError(
                    400,
                    "We could not parse the JSON body of your request. "
                    "The body must be a JSON object.",
                )
            hooks = self._hooks(req.headers)
            if hooks.json_tokens is not None and body.get("stream") is True:
                raise _ApiError(400, "x-demo-json-tokens is for non-streamed responses")
            result, plan = handler(body, hooks)
        except _ApiError as e:
            return _json_response(e.status, _error_body(e.status, e.message, e.param), ka)
        if plan is None:
            return _json_response(200, _dumps(result).encode(), ka)
        chunked = req.version == "HTTP/1.1"
        if not chunked:
            # HTTP/1.0 has no chunked coding: the end of the stream is the end of the connection.
            req.keep_alive = False
        if hooks.delay_s > 0 or hooks.abort_after is not None:
            return _Stream(plan.events, hooks.delay_s, hooks.abort_after, plan.done_marker)
        # Unpaced streams are rendered in one go: one write, no task, no per-event awaits.
        head = _stream_head(req.keep_alive, chunked)
        return head + _stream_bytes(plan.events, plan.done_marker, chunked)

    def _demo_requests(self, method: str, keep_alive: bool) -> bytes:
        if method == "GET":
            return _json_response(200, _dumps(list(self.requests)).encode(), keep_alive)
        if method == "DELETE":
            count = len(self.requests)
            self.requests.clear()
            return _json_response(200, _dumps({"deleted": count}).encode(), keep_alive)
        return _method_not_allowed("GET, DELETE", keep_alive)

    def _hooks(self, headers: dict[str, str]) -> _Hooks:
        delay_ms = _header_int(headers, "x-demo-chunk-delay-ms", 0, 60_000)
        return _Hooks(
            tokens=_header_int(headers, "x-demo-tokens", 0, MAX_COMPLETION_TOKENS),
            no_usage=headers.get("x-demo-no-usage", "").lower() in ("1", "true", "yes"),
            delay_s=self.chunk_delay_s if delay_ms is None else delay_ms / 1000.0,
            abort_after=_header_int(headers, "x-demo-abort-after", 0, 1_000_000),
            json_tokens=_header_int(headers, "x-demo-json-tokens", 0, MAX_JSON_TOKENS),
        )


def _model_body(path: str) -> bytes:
    if path == "/v1/models":
        return _MODELS_BODY
    model = path.removeprefix("/v1/models/")
    return _dumps(
        {"id": model, "object": "model", "created": _CREATED, "owned_by": "atlas-demo"}
    ).encode()


def _method_not_allowed(allow: str, keep_alive: bool) -> bytes:
    return _json_response(
        405,
        _error_body(405, f"Method not allowed; use {allow}"),
        keep_alive,
        f"allow: {allow}\r\n".encode(),
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
) -> None:
    """Serve until cancelled. With ``port=0`` use :class:`DemoUpstream` to learn the port."""
    upstream = DemoUpstream(host, port, chunk_delay_s=chunk_delay_s)
    await upstream.start()
    try:
        if ready is not None:
            ready.set()
        await asyncio.get_running_loop().create_future()
    finally:
        await upstream.stop()


async def _run(host: str, port: int, chunk_delay_s: float, fail_status: int | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    upstream = DemoUpstream(host, port, chunk_delay_s=chunk_delay_s, fail_status=fail_status)
    try:
        try:
            await upstream.start()
        except OSError as e:
            print(f"demo-upstream: cannot listen on {host}:{port}: {e}", file=sys.stderr)
            return 1
        print(f"demo-upstream listening on {upstream.url}", flush=True)
        await stop.wait()
        await upstream.stop()
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlas.demo_upstream",
        description="OpenAI-compatible demo LLM upstream (SSE streaming like vLLM).",
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
        help="answer every /v1 request with this status (400..599), /health stays 200",
    )
    args = parser.parse_args(argv)
    if args.chunk_delay_ms < 0:
        parser.error("--chunk-delay-ms must be >= 0")
    if args.fail_status is not None and not 400 <= args.fail_status <= 599:
        parser.error("--fail-status must be 400..599")
    try:
        return asyncio.run(
            _run(args.host, args.port, args.chunk_delay_ms / 1000.0, args.fail_status)
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

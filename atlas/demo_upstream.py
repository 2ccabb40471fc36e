"""Fast, OpenAI-, Anthropic- and Gemini-compatible demo LLM upstream that counts like a model.

`atlas up` uses it as the default upstream, the end-to-end tests put it behind a real Envoy,
and benchmarks drive it hard, so it is a bare ``asyncio.Protocol`` HTTP/1.1 server (keep-alive,
pipelining, Content-Length and chunked request bodies) with no framework and as little
per-request work as possible. Streams are Server-Sent Events framed like vLLM: one HTTP chunk
per SSE event, one generated token per content event.

Endpoints
---------
``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings``, ``POST /v1/responses`` (OpenAI and vLLM),
``POST /v1/messages`` (Anthropic Messages), ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent`` (Gemini; ``?alt=sse`` for SSE, else one JSON array; ``/v1/models/``
works too), ``GET|DELETE /demo/requests``. Any model name is accepted and echoed back. Errors
have each API's own shape (OpenAI ``{"error": {message, type, param, code}}``, Anthropic
``{"type": "error", "error": {type, message}}``, Gemini ``{"error": {code, message, status}}``).

Token model: the "truth" Atlas's estimators are tested against
------------------------------------------------------------------
Counts come from a real tokenizer, tiktoken ``cl100k_base`` (loaded offline through
``atlas.tokens.bpe.load_encoding``; without it, ``ceil(chars / 4)`` and a warning), applied the
way each API counts. ``tok(s)`` is the number of cl100k tokens of ``s``:

* Chat completions (OpenAI's published counting): 3 priming tokens, plus per message 3 +
  ``tok(role)`` + content (a string, or parts: ``text``/``refusal`` parts ``tok(text)``, image
  parts as below, other parts 0) + for ``name`` 1 + ``tok(name)``; each assistant tool call
  (or legacy ``function_call``) 3 + ``tok(name)`` + ``tok(arguments)``. ``tools`` (or legacy
  ``functions``): 12 + ``tok`` of their compact JSON (``separators=(",", ":")``, non-ASCII
  kept); ``response_format`` of type ``json_schema``: 8 + ``tok`` of the compact JSON of its
  ``json_schema`` object.
* Images, OpenAI's rule: ``detail: low`` is 85; ``high``/``auto``/absent is 85 + 170 per
  512-px tile after fitting into 2048x2048 and then scaling the shortest side down to 768. The
  size is read from a ``data:`` URL's PNG, GIF, JPEG or WebP header; unknown (a remote URL) is
  taken as 1024x1024, so 765. Anthropic images: ``ceil(w * h / 750)`` after fitting the long
  edge into 1568 px, at most 1600 (unknown: 1024x1024, 1399). Gemini images: 258 per 768-px
  tile (258 when both sides are <= 384; unknown: 258).
* Completions: ``tok`` of each prompt; embeddings: ``tok`` of each input (token-id lists count
  one per id). Responses: ``tok(instructions)`` + the text of every input item (strings,
  ``input_text``/``output_text`` parts, ``function_call`` name + arguments,
  ``function_call_output`` output) and image parts as above, no per-item overhead; ``tools``
  and a ``text.format`` JSON schema as for chat (12 / 8 + ``tok`` of their compact JSON).
* Anthropic Messages: like chat (3 priming, 3 + ``tok(role)`` per message, ``system`` counted
  as a system message), blocks: ``text`` ``tok(text)``, ``image`` as above, ``tool_use`` 3 +
  ``tok(name)`` + ``tok`` of the compact JSON of ``input``, ``tool_result`` its content,
  ``thinking`` ``tok(thinking)``; ``tools`` 12 + ``tok`` of their compact JSON.
* Gemini: ``tok`` of every text part of ``contents`` and ``systemInstruction``, 3 +
  ``tok(name)`` + ``tok(JSON)`` per ``functionCall``/``functionResponse``, images as above;
  ``tools`` 12 + ``tok`` of their compact JSON; no per-turn overhead.

Completion text is drawn from a vocabulary whose every entry is ONE cl100k token, checked at
import (entries that are not, or that would merge with their neighbour, are dropped), so a
choice of N tokens has N content events and ``tok(text) == N``. N is ``max_completion_tokens``
/ ``max_tokens`` / ``max_output_tokens`` / ``maxOutputTokens`` when given, else 16, capped at
4096; ``finish_reason`` is ``length`` (``max_tokens``, ``MAX_TOKENS``) when a limit was given and
reached, else ``stop`` (``end_turn``, ``STOP``). ``n`` / ``candidateCount`` > 1 yields that many
identical choices; a list of prompts on ``/v1/completions`` yields n choices per prompt.

Test and fault hooks (request headers)
--------------------------------------
* ``x-demo-tokens: N`` -- emit exactly N tokens (0..4096) whatever the request's limit says,
  so tests can fake an upstream that overruns ``max_tokens``.
* ``x-demo-text: words|prose|code|cjk`` -- the completion's vocabulary. ``words`` (default):
  16 four-character words (" the", " fox", ...), so the text is ``4 * N`` characters;
  ``prose``: an English paragraph (~5.3 characters a token); ``code``: a Python function
  (~4.0); ``cjk``: Chinese made of characters that are one token each (~1.07).
* ``x-demo-cached-tokens: N`` -- N of the prompt tokens (at most all) were read from a prompt
  cache: OpenAI ``prompt_tokens_details.cached_tokens`` / Responses
  ``input_tokens_details.cached_tokens`` (part of the prompt count), Anthropic
  ``cache_read_input_tokens`` and Gemini ``cachedContentTokenCount`` (part of
  ``promptTokenCount``).
* ``x-demo-cache-write-tokens: N`` -- Anthropic ``cache_creation_input_tokens`` (at most the
  prompt tokens not read from the cache). Anthropic's ``input_tokens`` excludes both cache
  reads and writes: the whole prompt is ``input + cache_creation + cache_read``.
* ``x-demo-reasoning-tokens: N`` -- N hidden reasoning tokens on top of the visible ones. OpenAI
  counts them inside ``completion_tokens`` / ``output_tokens`` (and reports
  ``completion_tokens_details.reasoning_tokens`` / ``output_tokens_details.reasoning_tokens``);
  Anthropic inside ``output_tokens``; Gemini reports them as ``thoughtsTokenCount`` apart from
  ``candidatesTokenCount`` (``totalTokenCount`` = prompt + candidates + thoughts). They are
  not streamed as text, and vLLM's per-chunk continuous usage leaves them out (the final usage
  has them).
* ``x-demo-strict: 1`` (or the server's ``--strict``) -- reject what OpenAI rejects: an unknown
  request field or ``stream_options`` key is a 400 ``invalid_request_error`` "Unrecognized
  request argument supplied: NAME" (vLLM's ``continuous_usage_stats`` included); ``0`` turns a
  strict server lenient for one request.
* ``x-demo-status: CODE`` (400..599) -- answer with that status and the API's error shape.
* ``x-demo-no-usage: 1`` -- never report usage, neither in JSON nor in streams.
* ``x-demo-chunk-delay-ms: N`` -- sleep N ms between streamed events (default: the server's
  ``chunk_delay_s``).
* ``x-demo-abort-after: N`` -- in a stream, abort the TCP connection after N content events,
  like an upstream reset. A stream with fewer content events completes normally.
* ``x-demo-json-tokens: N`` -- a non-streamed answer of exactly N tokens per choice
  (0..2**23, i.e. up to 32 MiB of text), for responses bigger than any buffer on the way.

Usage in streams: OpenAI chat/completions with ``stream_options.include_usage`` end with a
usage-only chunk (``"choices":[]``); with vLLM's ``continuous_usage_stats`` as well, every chunk
carries the cumulative usage of its choice. Responses end with ``response.completed``.
Anthropic's ``message_start`` carries the input usage and ``output_tokens: 1``, its
``message_delta`` the cumulative ``output_tokens``. Gemini sends ``usageMetadata`` on every
chunk, cumulative, the last one complete. Usage details (cached, reasoning) appear in OpenAI
usage only when a hook asks for them, so default answers keep vLLM's plain shape.

``GET /demo/requests`` lists the last 50 requests seen (method, path, query, lower-cased headers,
body as JSON if it parses, else as a string) and ``DELETE /demo/requests`` clears them.
``/health`` and ``/demo/*`` are not recorded, so health checks cannot push real traffic out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import hashlib
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

__all__ = [
    "DEFAULT_MODELS",
    "TEXT_CLASSES",
    "TOKENIZER",
    "VOCABULARY",
    "DemoUpstream",
    "count_tokens",
    "generated_text",
    "main",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_MODELS: Final = ("demo-small", "demo-large")
DEFAULT_COMPLETION_TOKENS: Final = 16
MAX_COMPLETION_TOKENS: Final = 4096
MAX_JSON_TOKENS: Final = 1 << 23
MAX_HOOK_TOKENS: Final = 1 << 30
MAX_CHOICES: Final = 128
EMBEDDING_DIMENSIONS: Final = 8
MAX_EMBEDDING_DIMENSIONS: Final = 4096
HISTORY_SIZE: Final = 50
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
MAX_CHUNK_LINE: Final = 4096

_CREATED: Final = 1_700_000_000
_ids = itertools.count(1)
_dumps = json.JSONEncoder(separators=(",", ":")).encode
# What the token model serialises (tools, schemas, tool inputs): compact, non-ASCII as is.
_dumps_text = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# Google's own JSON style on the wire: `"key": value` pairs joined by a bare comma.
_dumps_google = json.JSONEncoder(separators=(",", ": "), ensure_ascii=False).encode
_dumps_google_pretty = json.JSONEncoder(indent=2, ensure_ascii=False).encode
_BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _next_id(prefix: str) -> str:
    return f"{prefix}{next(_ids):024x}"


def _id_bytes() -> bytes:
    return hashlib.blake2b(next(_ids).to_bytes(8, "big"), digest_size=17).digest()


def _base62_id(prefix: str, width: int) -> str:
    """Anthropic-style ids (``msg_01`` + 22 base-62 characters), unique per process."""
    n = int.from_bytes(_id_bytes(), "big")
    chars = []
    for _ in range(width):
        n, r = divmod(n, 62)
        chars.append(_BASE62[r])
    return prefix + "".join(chars)


# --------------------------------------------------------------------------------------------
# The tokenizer and the completion vocabularies
# --------------------------------------------------------------------------------------------


def _load_tokenizer() -> Any:
    try:
        from atlas.tokens.bpe import load_encoding

        return load_encoding()
    except Exception:  # no tokenizer means counting by characters, never a crash
        return None


_ENC: Final = _load_tokenizer()
#: What the counts come from: ``cl100k_base``, or ``chars/4`` when tiktoken is missing.
TOKENIZER: Final = "cl100k_base" if _ENC is not None else "chars/4"
if _ENC is None:
    log.warning(
        "demo upstream: tiktoken's cl100k_base is not available offline; "
        "counting 4 characters a token"
    )

# Benchmarks send the same prompt again and again: short texts are counted once.
_CACHED_TEXT_CHARS: Final = 4096


def _make_counter(enc: Any) -> Callable[[str], int]:
    if enc is None:

        def by_chars(text: str) -> int:
            return (len(text) + 3) // 4

        return by_chars
    encode = enc.encode_ordinary

    @functools.lru_cache(maxsize=2048)
    def cached(text: str) -> int:
        return len(encode(text))

    def count(text: str) -> int:
        if len(text) <= _CACHED_TEXT_CHARS:
            return cached(text)
        return len(encode(text))

    return count


#: Tokens of a text: cl100k_base when loaded, else ``ceil(chars / 4)``.
count_tokens: Final = _make_counter(_ENC)


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    """A cycle of one-token pieces; token ``i`` of an answer is ``pieces[i % len(pieces)]``."""

    name: str
    pieces: tuple[str, ...]
    json: tuple[str, ...]  # each piece as a JSON string (non-ASCII as is)
    google_json: tuple[str, ...]
    cycle: str
    offsets: tuple[int, ...]  # offsets[i]: characters of the first i pieces

    @classmethod
    def of(cls, name: str, pieces: Sequence[str]) -> _Vocabulary:
        offsets = [0]
        for p in pieces:
            offsets.append(offsets[-1] + len(p))
        return cls(
            name,
            tuple(pieces),
            tuple(json.dumps(p, ensure_ascii=False) for p in pieces),
            tuple(_dumps_google(p) for p in pieces),
            "".join(pieces),
            tuple(offsets),
        )

    def text(self, n_tokens: int) -> str:
        q, r = divmod(n_tokens, len(self.pieces))
        return self.cycle * q + self.cycle[: self.offsets[r]]

    def token_json(self, i: int) -> str:
        return self.json[i % len(self.json)]


def _one_token_pieces(pieces: Sequence[str], enc: Any) -> list[str]:
    """The pieces that are one token each and stay so when joined in order and repeated: a
    piece that is not one token, or whose addition changes how the text so far tokenizes (BPE
    merges across the boundary), is dropped."""
    if enc is None:
        return list(pieces)
    encode = enc.encode_ordinary
    kept: list[str] = []
    tokens: list[int] = []
    text = ""
    for piece in pieces:
        ids = encode(piece)
        if len(ids) == 1 and encode(text + piece) == tokens + ids:
            kept.append(piece)
            tokens += ids
            text += piece
    # The answer repeats the cycle: every prefix across the seam must still count one a piece.
    while kept:
        cycle = "".join(kept)
        k = len(kept)
        bad = next(
            (j for j in range(1, k + 1) if len(encode(cycle + "".join(kept[:j]))) != k + j), None
        )
        if bad is None:
            break
        del kept[-1]
    return kept


_WORDS: Final = (
    " the", " fox", " and", " run", " sky", " sea", " red", " big",
    " old", " new", " cat", " dog", " sun", " day", " way", " end",
)  # fmt: skip
# The source texts are cut into pieces by the tokenizer itself (then checked as above); the
# prose opens with a space so that the cycle's seam (".", " The") does not merge.
_PROSE: Final = (
    " The committee met on a cold morning in early spring to discuss the future of the old"
    " railway station. Several members argued that the building should be restored, while"
    " others believed it would be cheaper to replace it with a modern library, a small market"
    " and a park where children could play safely. After a long and sometimes heated debate,"
    " they agreed to ask the residents what they wanted before making any final decision."
)
_CODE: Final = (
    "def merge_sorted(left: list[int], right: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list."""\n'
    "    result = []\n"
    "    i, j = 0, 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n"
    "            result.append(left[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            result.append(right[j])\n"
    "            j += 1\n"
    "    result.extend(left[i:])\n"
    "    result.extend(right[j:])\n"
    "    return result\n\n\n"
)
# Many Chinese characters are two or three cl100k tokens; those are dropped, so this reads
# less well than the source, but every chunk is one character and one token.
_CJK: Final = (
    "人工智能是计算机科学的一个分支，它试图了解智能的实质，并生产出一种新的能以人类智能相似的"
    "方式做出反应的智能机器。该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。"
)


def _split(text: str, enc: Any) -> list[str]:
    if enc is None:
        return [text[i : i + 4] for i in range(0, len(text), 4)]
    pieces = []
    for token in enc.encode_ordinary(text):
        with contextlib.suppress(UnicodeDecodeError):  # part of a character: not a chunk
            pieces.append(enc.decode_single_token_bytes(token).decode())
    return pieces


def _vocabularies(enc: Any) -> dict[str, _Vocabulary]:
    sources = {
        "words": list(_WORDS),
        "prose": _split(_PROSE, enc),
        "code": _split(_CODE, enc),
        "cjk": _split(_CJK, enc),
    }
    vocabs = {}
    for name, pieces in sources.items():
        kept = _one_token_pieces(pieces, enc)
        if len(kept) < len(pieces):
            log.debug("demo upstream: %s vocabulary keeps %d of %d", name, len(kept), len(pieces))
        vocabs[name] = _Vocabulary.of(name, kept or list(_WORDS))
    return vocabs


_VOCABS: Final = _vocabularies(_ENC)
#: The completion vocabularies, by ``x-demo-text`` value.
TEXT_CLASSES: Final = tuple(_VOCABS)
_DEFAULT_VOCAB: Final = _VOCABS["words"]
#: The default vocabulary: every entry is four characters and one cl100k token.
VOCABULARY: Final = _DEFAULT_VOCAB.pieces


def generated_text(n_tokens: int, text_class: str = "words") -> str:
    """The text of an answer of ``n_tokens`` tokens, as every endpoint generates it."""
    return _VOCABS[text_class].text(n_tokens)


# --------------------------------------------------------------------------------------------
# Image sizes and image tokens
# --------------------------------------------------------------------------------------------

_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(
                data[27:30], "little"
            )
        if kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8 ":
            w = int.from_bytes(data[26:28], "little") & 0x3FFF
            h = int.from_bytes(data[28:30], "little") & 0x3FFF
            return w, h
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _SOF_MARKERS:
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return int(w), int(h)
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            i += 2 + length
    return None


def _base64_image_size(payload: str) -> tuple[int, int] | None:
    # PNG, GIF and WebP headers sit in the first 30 bytes; a JPEG's frame header can be after
    # EXIF data, so a JPEG is decoded whole (bounded by the request size).
    head = payload[:64]
    try:
        data = base64.b64decode(head[: len(head) - len(head) % 4])
        if data[:2] == b"\xff\xd8":
            data = base64.b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        return None
    return _image_size(data)


def _data_url_size(url: Any) -> tuple[int, int] | None:
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    meta, sep, payload = url.partition(",")
    if not sep or not meta.endswith(";base64"):
        return None
    return _base64_image_size(payload)


def _openai_image_tokens(detail: Any, size: tuple[int, int] | None) -> int:
    if detail == "low":
        return 85
    w, h = size or (1024, 1024)
    if w <= 0 or h <= 0:
        return 85
    scale = min(1.0, 2048 / max(w, h))
    fw, fh = w * scale, h * scale
    if min(fw, fh) > 768:
        shrink = 768 / min(fw, fh)
        fw, fh = fw * shrink, fh * shrink
    return 85 + 170 * math.ceil(fw / 512) * math.ceil(fh / 512)


def _anthropic_image_tokens(size: tuple[int, int] | None) -> int:
    w, h = size or (1024, 1024)
    scale = min(1.0, 1568 / max(w, h, 1))
    return min(1600, math.ceil(w * scale * h * scale / 750))


def _gemini_image_tokens(size: tuple[int, int] | None) -> int:
    if size is None or (size[0] <= 384 and size[1] <= 384):
        return 258
    return 258 * math.ceil(size[0] / 768) * math.ceil(size[1] / 768)


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


# --------------------------------------------------------------------------------------------
# Request options and shared accounting
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Hooks:
    tokens: int | None
    no_usage: bool
    delay_s: float
    abort_after: int | None
    json_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    vocab: _Vocabulary = _DEFAULT_VOCAB
    strict: bool = False

    @property
    def details(self) -> bool:
        """OpenAI usage details are reported when a test asked for cached or reasoning."""
        return self.cached_tokens is not None or self.reasoning_tokens is not None


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 us to build
class _Counts:
    """What one answer consumed, before each API's way of reporting it."""

    prompt: int  # every input token, cache reads and writes included
    cached: int  # read from the prompt cache
    cache_write: int  # written to the prompt cache (Anthropic)
    visible: int  # generated text, all choices
    reasoning: int  # hidden, not in the text

    @property
    def completion(self) -> int:
        return self.visible + self.reasoning


def _counts(prompt: int, visible: int, hooks: _Hooks) -> _Counts:
    cached = min(hooks.cached_tokens or 0, prompt)
    write = min(hooks.cache_write_tokens or 0, prompt - cached)
    return _Counts(prompt, cached, write, visible, hooks.reasoning_tokens or 0)


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


def _header_flag(headers: dict[str, str], name: str) -> bool | None:
    raw = headers.get(name)
    if raw is None:
        return None
    value = raw.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise _ApiError(400, f"header {name} must be 1 or 0")


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


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(include_usage, continuous_usage_stats)``; vLLM sends continuous usage only when both
    are set."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise _ApiError(400, "'stream_options' must be an object", "stream_options")
    flags = []
    for key in ("include_usage", "continuous_usage_stats"):
        value = options.get(key, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise _ApiError(400, f"'stream_options.{key}' must be a boolean", "stream_options")
        flags.append(value)
    return flags[0], flags[0] and flags[1]


# What OpenAI's API accepts (2025); in strict mode anything else is refused, as OpenAI does.
_COMMON_FIELDS: Final = frozenset(
    {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"}
)
_CHAT_FIELDS: Final = _COMMON_FIELDS | {
    "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "modalities", "n", "parallel_tool_calls",
    "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "stop", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "verbosity", "web_search_options",
}  # fmt: skip
_COMPLETIONS_FIELDS: Final = _COMMON_FIELDS | {
    "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "presence_penalty", "seed", "stop", "suffix", "temperature", "top_p",
}  # fmt: skip
_EMBEDDINGS_FIELDS: Final = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_RESPONSES_FIELDS: Final = _COMMON_FIELDS | {
    "background", "conversation", "include", "input", "instructions", "max_output_tokens",
    "max_tool_calls", "parallel_tool_calls", "previous_response_id", "prompt",
    "prompt_cache_key", "prompt_cache_retention", "reasoning", "safety_identifier",
    "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p", "truncation",
}  # fmt: skip
_STREAM_OPTION_KEYS: Final = frozenset({"include_usage", "include_obfuscation"})


def _check_strict(body: dict[str, Any], known: frozenset[str], hooks: _Hooks) -> None:
    if not hooks.strict:
        return
    unknown = [key for key in body if key not in known]
    options = body.get("stream_options")
    if isinstance(options, dict):
        unknown += [key for key in options if key not in _STREAM_OPTION_KEYS]
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        raise _ApiError(400, f"Unrecognized request {noun} supplied: {', '.join(unknown)}")


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


# --------------------------------------------------------------------------------------------
# Prompt tokens, the OpenAI way
# --------------------------------------------------------------------------------------------

_PRIMING: Final = 3  # every reply is primed with <|start|>assistant<|message|>
_PER_MESSAGE: Final = 3  # <|start|>{role}<|message|>...<|end|> around each message
_PER_NAME: Final = 1
_PER_CALL: Final = 3  # around each tool call (name, arguments)
_TOOLS_OVERHEAD: Final = 12  # the tools preamble
_SCHEMA_OVERHEAD: Final = 8  # the response-format preamble


def _json_tokens(value: Any) -> int:
    return count_tokens(value if isinstance(value, str) else _dumps_text(value))


def _image_part_tokens(part: dict[str, Any]) -> int:
    image = part.get("image_url")
    detail = part.get("detail")
    url = image
    if isinstance(image, dict):
        url = image.get("url")
        detail = image.get("detail", detail)
    return _openai_image_tokens(detail, _data_url_size(url))


def _part_tokens(part: dict[str, Any]) -> int:
    text = part.get("text")
    if isinstance(text, str):
        return count_tokens(text)
    ptype = part.get("type")
    if ptype in ("image_url", "input_image"):
        return _image_part_tokens(part)
    refusal = part.get("refusal")
    if isinstance(refusal, str):
        return count_tokens(refusal)
    return 0  # audio, files: not modelled


def _content_tokens(content: Any, param: str) -> int:
    """Tokens of a message content: a string, null, or a list of content parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += count_tokens(part)
            elif isinstance(part, dict):
                total += _part_tokens(part)
            else:
                raise _ApiError(400, f"invalid content part in '{param}'", param)
        return total
    raise _ApiError(400, f"invalid content in '{param}'", param)


def _call_tokens(function: Any) -> int:
    if not isinstance(function, dict):
        return 0
    total = _PER_CALL
    name = function.get("name")
    if isinstance(name, str):
        total += count_tokens(name)
    arguments = function.get("arguments")
    if arguments is not None:
        total += _json_tokens(arguments)
    return total


_DEFINITION_KEYS: Final = frozenset({"tools", "functions", "response_format"})


def _definitions_tokens(body: dict[str, Any]) -> int:
    if not body.keys() & _DEFINITION_KEYS:
        return 0
    total = 0
    for key in ("tools", "functions"):
        value = body.get(key)
        if isinstance(value, list) and value:
            total += _TOOLS_OVERHEAD + _json_tokens(value)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and "json_schema" in fmt:
        total += _SCHEMA_OVERHEAD + _json_tokens(fmt["json_schema"])
    return total


def _chat_prompt_tokens(body: dict[str, Any], messages: list[Any]) -> int:
    total = _PRIMING
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _ApiError(400, f"'messages[{i}]' must be an object", "messages")
        role = message.get("role")
        content = message.get("content")
        if len(message) == 2 and type(role) is str and type(content) is str:
            total += _PER_MESSAGE + count_tokens(role) + count_tokens(content)
            continue  # the common message: nothing else to look at
        total += _PER_MESSAGE
        if isinstance(role, str):
            total += count_tokens(role)
        total += _content_tokens(content, "messages")
        name = message.get("name")
        if isinstance(name, str):
            total += _PER_NAME + count_tokens(name)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    total += _call_tokens(call.get("function"))
        if "function_call" in message:
            total += _call_tokens(message["function_call"])
    return total + _definitions_tokens(body)


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
    return sum(count_tokens(item) if isinstance(item, str) else len(item) for item in items)


def _responses_input_tokens(value: Any) -> int:
    if isinstance(value, str):
        return count_tokens(value)
    if not isinstance(value, list):
        raise _ApiError(400, "'input' must be a string or an array of items", "input")
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_tokens(item)
        elif isinstance(item, dict):
            if "content" in item:
                total += _content_tokens(item["content"], "input")
            elif item.get("type") == "function_call":
                total += _call_tokens(item)
            elif "output" in item:
                total += _json_tokens(item["output"])
        else:
            raise _ApiError(400, "'input' items must be objects", "input")
    return total


def _responses_definitions_tokens(body: dict[str, Any]) -> int:
    total = 0
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _TOOLS_OVERHEAD + _json_tokens(tools)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        total += _SCHEMA_OVERHEAD + _json_tokens(fmt)
    return total


# --------------------------------------------------------------------------------------------
# The OpenAI endpoints
# --------------------------------------------------------------------------------------------


def _usage_dict(counts: _Counts, hooks: _Hooks) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": counts.prompt,
        "completion_tokens": counts.completion,
        "total_tokens": counts.prompt + counts.completion,
    }
    if hooks.details:
        usage["prompt_tokens_details"] = {"cached_tokens": counts.cached, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": counts.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def _choice_chunks(
    obj: str,
    rid: str,
    created: int,
    model: str,
    n_choices: int,
    n_tokens: int,
    finish: str,
    usage: str | None,
    vocab: _Vocabulary,
    *,
    chat: bool,
    continuous_prompt: int | None = None,
) -> list[tuple[str, bool]]:
    """SSE events of a chat/text completion stream, laid out like vLLM's.

    Chat streams open each choice with a role delta; every chunk carries ``"usage":null`` when
    usage was asked for, and a final ``"choices":[]`` chunk then carries the totals. With
    ``continuous_prompt`` (vLLM's ``continuous_usage_stats``) every chunk carries its choice's
    cumulative usage instead of null.
    """
    meta = f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{json.dumps(model)}'
    pre = f'{meta},"choices":[{{"index":'
    if continuous_prompt is None:
        end = '}],"usage":null}\n\n' if usage is not None else "}]}\n\n"
        ends = [end] * (n_tokens + 1)
    else:
        p = continuous_prompt
        # vLLM's key order: prompt, total, completion.
        ends = [
            f'}}],"usage":{{"prompt_tokens":{p},"total_tokens":{p + c},'
            f'"completion_tokens":{c}}}}}\n\n'
            for c in range(n_tokens + 1)
        ]
    events: list[tuple[str, bool]] = []
    if chat:
        role = '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        events.extend((f"{pre}{c},{role}{ends[0]}", False) for c in range(n_choices))
    token_json = vocab.json
    k = len(token_json)
    for t in range(n_tokens):
        tok = token_json[t % k]
        body = f'"delta":{{"content":{tok}}}' if chat else f'"text":{tok}'
        end = ends[t + 1]
        for c in range(n_choices):
            events.append((f'{pre}{c},{body},"logprobs":null,"finish_reason":null{end}', True))
    empty = '"delta":{}' if chat else '"text":""'
    end = ends[n_tokens]
    for c in range(n_choices):
        events.append((f'{pre}{c},{empty},"logprobs":null,"finish_reason":"{finish}"{end}', False))
    if usage is not None:
        events.append((f'{meta},"choices":[],"usage":{usage}}}\n\n', False))
    return events


_Result = tuple[dict[str, Any] | bytes | None, _StreamPlan | None]


def _chat(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    _check_strict(body, _CHAT_FIELDS, hooks)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty array", "messages")
    prompt_tokens = _chat_prompt_tokens(body, messages)
    limit = _int_field(body, "max_completion_tokens", 1, MAX_COMPLETION_TOKENS)
    if limit is None:
        limit = _int_field(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
    n_choices = _int_field(body, "n", 1, MAX_CHOICES) or 1
    model = _model(body)
    stream = _bool_field(body, "stream")
    include_usage, continuous = _stream_options(body)
    include_usage = include_usage and not hooks.no_usage
    n_tokens, finish = _plan(limit, hooks)
    counts = _counts(prompt_tokens, n_choices * n_tokens, hooks)
    rid = _next_id("chatcmpl-")
    created = int(time.time())

    if not stream:
        text = hooks.vocab.text(n_tokens)
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
            response["usage"] = _usage_dict(counts, hooks)
        return response, None

    events = _choice_chunks(
        "chat.completion.chunk", rid, created, model, n_choices, n_tokens, finish,
        _dumps(_usage_dict(counts, hooks)) if include_usage else None, hooks.vocab, chat=True,
        continuous_prompt=prompt_tokens if include_usage and continuous else None,
    )  # fmt: skip
    return None, _StreamPlan(events, done_marker=True)


def _completions(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    _check_strict(body, _COMPLETIONS_FIELDS, hooks)
    if "prompt" not in body:
        raise _ApiError(400, "'prompt' is required", "prompt")
    prompts = _prompt_list(body["prompt"], "prompt")
    prompt_tokens = _prompt_tokens(prompts)
    limit = _int_field(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
    n_per_prompt = _int_field(body, "n", 1, MAX_CHOICES) or 1
    n_choices = n_per_prompt * len(prompts)
    model = _model(body)
    stream = _bool_field(body, "stream")
    include_usage, continuous = _stream_options(body)
    include_usage = include_usage and not hooks.no_usage
    n_tokens, finish = _plan(limit, hooks)
    counts = _counts(prompt_tokens, n_choices * n_tokens, hooks)
    rid = _next_id("cmpl-")
    created = int(time.time())

    if not stream:
        text = hooks.vocab.text(n_tokens)
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
            response["usage"] = _usage_dict(counts, hooks)
        return response, None

    events = _choice_chunks(
        "text_completion", rid, created, model, n_choices, n_tokens, finish,
        _dumps(_usage_dict(counts, hooks)) if include_usage else None, hooks.vocab, chat=False,
        continuous_prompt=prompt_tokens if include_usage and continuous else None,
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


def _embeddings(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    _check_strict(body, _EMBEDDINGS_FIELDS, hooks)
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
    return response, None


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


def _responses(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    if hooks.strict:
        unknown = [key for key in body if key not in _RESPONSES_FIELDS]
        if unknown:
            # The Responses API words it differently from Chat Completions.
            raise _ApiError(
                400, f"Unknown parameter: '{unknown[0]}'.", unknown[0], "unknown_parameter"
            )
    if "input" not in body:
        raise _ApiError(400, "'input' is required", "input")
    input_tokens = _responses_input_tokens(body["input"])
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        input_tokens += count_tokens(instructions)
    elif instructions is not None:
        raise _ApiError(400, "'instructions' must be a string", "instructions")
    input_tokens += _responses_definitions_tokens(body)
    limit = _int_field(body, "max_output_tokens", 1, MAX_COMPLETION_TOKENS)
    model = _model(body)
    stream = _bool_field(body, "stream")
    n_tokens, _ = _plan(limit, hooks)
    counts = _counts(input_tokens, n_tokens, hooks)
    text = hooks.vocab.text(n_tokens)
    usage: dict[str, Any] | None = None
    if not hooks.no_usage:
        usage = {
            "input_tokens": counts.prompt,
            "input_tokens_details": {"cached_tokens": counts.cached},
            "output_tokens": counts.completion,
            "output_tokens_details": {"reasoning_tokens": counts.reasoning},
            "total_tokens": counts.prompt + counts.completion,
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
    token_json = hooks.vocab.token_json
    for t in range(n_tokens):
        delta = f'{delta_head}{next(seq)}{delta_ids}{token_json(t)},"logprobs":[]}}'
        events.append((_sse_typed("response.output_text.delta", delta), True))
    add("response.output_text.done", {**part_ids, "text": text, "logprobs": []})
    add(
        "response.content_part.done",
        {**part_ids, "part": {"type": "output_text", "text": text, "annotations": []}},
    )
    add("response.output_item.done", {"output_index": 0, "item": done_item})
    add("response.completed", {"response": final})
    return None, _StreamPlan(events, done_marker=False)


# --------------------------------------------------------------------------------------------
# Anthropic Messages
# --------------------------------------------------------------------------------------------

_ANTHROPIC_FIELDS_REQUIRED: Final = ("model", "max_tokens", "messages")


def _anthropic_error(message: str) -> _ApiError:
    return _ApiError(400, message)


def _anthropic_content_tokens(content: Any, where: str) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, list):
        raise _anthropic_error(f"{where}: Input should be a valid list")
    total = 0
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise _anthropic_error(f"{where}.{i}: Input should be a valid dictionary")
        btype = block.get("type")
        if btype == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise _anthropic_error(f"{where}.{i}.text: Field required")
            total += count_tokens(text)
        elif btype == "image":
            source = block.get("source")
            size = None
            if isinstance(source, dict) and source.get("type") == "base64":
                data = source.get("data")
                size = _base64_image_size(data) if isinstance(data, str) else None
            total += _anthropic_image_tokens(size)
        elif btype == "tool_use":
            name = block.get("name")
            total += _PER_CALL + (count_tokens(name) if isinstance(name, str) else 0)
            total += _json_tokens(block.get("input", {}))
        elif btype == "tool_result":
            inner = block.get("content")
            if inner is not None:
                total += _anthropic_content_tokens(inner, f"{where}.{i}.content")
        elif btype == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str):
                total += count_tokens(thinking)
        elif not isinstance(btype, str):
            raise _anthropic_error(f"{where}.{i}.type: Field required")
    return total


def _anthropic_prompt_tokens(body: dict[str, Any], messages: list[Any]) -> int:
    total = _PRIMING
    system = body.get("system")
    if system is not None:
        total += _PER_MESSAGE + count_tokens("system")
        total += _anthropic_content_tokens(system, "system")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _anthropic_error(f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _anthropic_error(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise _anthropic_error(f"messages.{i}.content: Field required")
        total += _PER_MESSAGE + count_tokens(role)
        total += _anthropic_content_tokens(message["content"], f"messages.{i}.content")
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _TOOLS_OVERHEAD + _json_tokens(tools)
    return total


def _anthropic_usage(counts: _Counts, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": counts.prompt - counts.cached - counts.cache_write,
        "cache_creation_input_tokens": counts.cache_write,
        "cache_read_input_tokens": counts.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": counts.cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _messages(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    for name in _ANTHROPIC_FIELDS_REQUIRED:
        if name not in body:
            raise _anthropic_error(f"{name}: Field required")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise _anthropic_error("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _anthropic_error("max_tokens: Input should be greater than or equal to 1")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _anthropic_error("messages: at least one message is required")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _anthropic_error("stream: Input should be a valid boolean")
    prompt = _anthropic_prompt_tokens(body, messages)
    n_tokens, _ = _plan(min(max_tokens, MAX_COMPLETION_TOKENS), hooks)
    stop_reason = "max_tokens" if n_tokens >= max_tokens else "end_turn"
    counts = _counts(prompt, n_tokens, hooks)
    mid = _base62_id("msg_01", 22)

    if not stream:
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": hooks.vocab.text(n_tokens)}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not hooks.no_usage:
            message["usage"] = _anthropic_usage(counts, counts.completion)
        return message, None

    start: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if not hooks.no_usage:
        # Anthropic reports the input at the start and output_tokens 1 until message_delta.
        start["usage"] = _anthropic_usage(counts, 1)
    events: list[tuple[str, bool]] = [
        (_sse_typed("message_start", _dumps({"type": "message_start", "message": start})), False),
        (
            _sse_typed(
                "content_block_start",
                '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
            ),
            False,
        ),
        # Anthropic's ping carries a space after the colon, unlike every other event.
        (_sse_typed("ping", '{"type": "ping"}'), False),
    ]
    head = 'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
    token_json = hooks.vocab.token_json
    for t in range(n_tokens):
        events.append((f'{head}{{"type":"text_delta","text":{token_json(t)}}}}}\n\n', True))
    events.append(
        (_sse_typed("content_block_stop", '{"type":"content_block_stop","index":0}'), False)
    )
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
    }
    if not hooks.no_usage:
        delta["usage"] = {"output_tokens": counts.completion}
    events.append((_sse_typed("message_delta", _dumps(delta)), False))
    events.append((_sse_typed("message_stop", '{"type":"message_stop"}'), False))
    return None, _StreamPlan(events, done_marker=False)


# --------------------------------------------------------------------------------------------
# Gemini generateContent / streamGenerateContent
# --------------------------------------------------------------------------------------------

_GEMINI_PREFIXES: Final = ("/v1beta/models/", "/v1/models/")
_GEMINI_METHODS: Final = (":generateContent", ":streamGenerateContent")


def _is_gemini_path(path: str) -> bool:
    return path.startswith(_GEMINI_PREFIXES) and path.endswith(_GEMINI_METHODS)


def _gfield(obj: dict[str, Any], camel: str, snake: str) -> Any:
    # Google's JSON mapping accepts the proto's snake_case names as well as camelCase.
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _gemini_error(message: str) -> _ApiError:
    return _ApiError(400, message)


def _gemini_parts_tokens(content: Any, where: str) -> int:
    if isinstance(content, str):
        return count_tokens(content)
    if not isinstance(content, dict):
        raise _gemini_error(f"Invalid value at '{where}': expected a Content object")
    parts = content.get("parts")
    if not isinstance(parts, list):
        raise _gemini_error(
            f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty\n"
        )
    total = 0
    for part in parts:
        if not isinstance(part, dict):
            raise _gemini_error(f"Invalid value at '{where}.parts': expected a Part object")
        text = part.get("text")
        if isinstance(text, str):
            total += count_tokens(text)
            continue
        inline = _gfield(part, "inlineData", "inline_data")
        if isinstance(inline, dict):
            mime = _gfield(inline, "mimeType", "mime_type")
            data = inline.get("data")
            if isinstance(mime, str) and mime.startswith("image/"):
                size = _base64_image_size(data) if isinstance(data, str) else None
                total += _gemini_image_tokens(size)
            continue
        file_data = _gfield(part, "fileData", "file_data")
        if isinstance(file_data, dict):
            mime = _gfield(file_data, "mimeType", "mime_type")
            total += _gemini_image_tokens(None) if str(mime).startswith("image/") else 0
            continue
        for camel, snake, payload in (
            ("functionCall", "function_call", "args"),
            ("functionResponse", "function_response", "response"),
        ):
            call = _gfield(part, camel, snake)
            if isinstance(call, dict):
                name = call.get("name")
                total += _PER_CALL + (count_tokens(name) if isinstance(name, str) else 0)
                total += _json_tokens(call.get(payload, {}))
    return total


def _gemini_prompt_tokens(body: dict[str, Any], contents: list[Any]) -> int:
    total = 0
    for i, content in enumerate(contents):
        total += _gemini_parts_tokens(content, f"contents[{i}]")
    system = _gfield(body, "systemInstruction", "system_instruction")
    if system is not None:
        total += _gemini_parts_tokens(system, "system_instruction")
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _TOOLS_OVERHEAD + _json_tokens(tools)
    return total


def _gemini_usage(counts: _Counts, candidates: int) -> dict[str, Any]:
    """usageMetadata in Gemini's field order; thoughts are apart from candidates."""
    usage: dict[str, Any] = {
        "promptTokenCount": counts.prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": counts.prompt + candidates + counts.reasoning,
    }
    if counts.cached:
        usage["cachedContentTokenCount"] = counts.cached
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": counts.prompt}]
    if counts.cached:
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": counts.cached}]
    if counts.reasoning:
        usage["thoughtsTokenCount"] = counts.reasoning
    return usage


def _gemini(body: dict[str, Any], hooks: _Hooks, req: _Request) -> _Result:
    model, _, method = req.path.rsplit("/", 1)[1].partition(":")
    stream = method == "streamGenerateContent"
    if hooks.json_tokens is not None and stream:
        raise _gemini_error("x-demo-json-tokens is for non-streamed responses")
    sse = "alt=sse" in req.query.split("&")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _gemini_error("* GenerateContentRequest.contents: contents is not specified\n")
    prompt = _gemini_prompt_tokens(body, contents)
    config = _gfield(body, "generationConfig", "generation_config") or {}
    if not isinstance(config, dict):
        raise _gemini_error("Invalid value at 'generation_config': expected an object")
    limit = _gfield(config, "maxOutputTokens", "max_output_tokens")
    n_candidates = _gfield(config, "candidateCount", "candidate_count") or 1
    for name, value in (("max_output_tokens", limit), ("candidate_count", n_candidates)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise _gemini_error(f"Invalid value at 'generation_config.{name}' ({value!r})")
    n_candidates = min(n_candidates, MAX_CHOICES)
    n_tokens, finish = _plan(None if limit is None else min(limit, MAX_COMPLETION_TOKENS), hooks)
    finish_reason = "MAX_TOKENS" if finish == "length" else "STOP"
    counts = _counts(prompt, n_candidates * n_tokens, hooks)
    response_id = base64.urlsafe_b64encode(_id_bytes()).decode()[:22]
    vocab = hooks.vocab

    def chunk(text: str, last: bool, candidates_so_far: int) -> dict[str, Any]:
        candidates = []
        for i in range(n_candidates):
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
            if last:
                candidate["finishReason"] = finish_reason
            candidate["index"] = i
            candidates.append(candidate)
        out: dict[str, Any] = {"candidates": candidates}
        if not hooks.no_usage:
            out["usageMetadata"] = _gemini_usage(counts, candidates_so_far)
        out["modelVersion"] = model
        out["responseId"] = response_id
        return out

    if not stream:
        whole = chunk(vocab.text(n_tokens), True, counts.visible)
        return (_dumps_google_pretty(whole) + "\n").encode(), None

    # One token a chunk (real Gemini sends a few); an empty answer is one empty final chunk.
    pieces = [(vocab.pieces[t % len(vocab.pieces)], t + 1) for t in range(n_tokens)] or [("", 0)]
    objects = [
        chunk(text, i == len(pieces) - 1, n_candidates * so_far)
        for i, (text, so_far) in enumerate(pieces)
    ]
    if not sse:
        # Without alt=sse the stream is one JSON array, its elements arriving one by one.
        body_text = "[" + ",\r\n".join(_dumps_google_pretty(o) for o in objects) + "]"
        return body_text.encode(), None
    # Google ends every SSE event with CRLF CRLF.
    events = [(f"data: {_dumps_google(o)}\r\n\r\n", n_tokens > 0) for o in objects]
    return None, _StreamPlan(events, done_marker=False)


_Handler = Callable[[dict[str, Any], _Hooks, _Request], _Result]

_POST_ROUTES: Final[dict[str, _Handler]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completions,
    "/v1/embeddings": _embeddings,
    "/v1/responses": _responses,
    "/v1/messages": _messages,
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
        strict: bool = False,
    ) -> None:
        """:param fail_status: answer every /v1 request with this status (a broken replica
        for retry and outlier-detection tests); /health stays healthy.
        :param strict: refuse unknown OpenAI request fields as OpenAI does (``x-demo-strict``
        overrides it per request)."""
        self.host = host
        self.port = port
        self.chunk_delay_s = chunk_delay_s
        self.fail_status = fail_status
        self.strict = strict
        self._plain_hooks: _Hooks | None = None
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
            return _json_response(404, _error_body(404, message, dialect=dialect), ka)
        if method != allowed:
            return _method_not_allowed(allowed, ka, dialect)

        try:
            status = _header_int(req.headers, "x-demo-status", 400, 599) or self.fail_status
            if status is not None:
                message = f"demo upstream: forced status {status}"
                return _json_response(status, _error_body(status, message, dialect=dialect), ka)
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
            result, plan = handler(body, hooks, req)
        except _ApiError as e:
            error = _error_body(e.status, e.message, e.param, dialect, e.code)
            return _json_response(e.status, error, ka)
        if plan is None:
            payload = result if isinstance(result, bytes) else _dumps(result).encode()
            return _json_response(200, payload, ka)
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


def _method_not_allowed(allow: str, keep_alive: bool, dialect: str = _OPENAI) -> bytes:
    return _json_response(
        405,
        _error_body(405, f"Method not allowed; use {allow}", dialect=dialect),
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
    host: str, port: int, chunk_delay_s: float, fail_status: int | None, strict: bool
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    upstream = DemoUpstream(
        host, port, chunk_delay_s=chunk_delay_s, fail_status=fail_status, strict=strict
    )
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


def true_prompt_tokens(api: str, body: dict[str, Any]) -> int:
    """The prompt tokens this upstream reports for `body` on `api` ("chat", "messages",
    "gemini"): the truth Atlas's prompt estimates are measured against (bench/estimation)."""
    if api == "chat":
        return _chat_prompt_tokens(body, body["messages"])
    if api == "messages":
        return _anthropic_prompt_tokens(body, body["messages"])
    if api == "gemini":
        return _gemini_prompt_tokens(body, body["contents"])
    raise ValueError(f"unknown api {api!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m atlas.demo_upstream",
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
        help="answer every /v1 request with this status (400..599), /health stays 200",
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
    try:
        return asyncio.run(
            _run(args.host, args.port, args.chunk_delay_ms / 1000.0, args.fail_status, args.strict)
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

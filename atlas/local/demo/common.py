"""Limits, ids and JSON encoders shared by the demo upstream's modules."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Final

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

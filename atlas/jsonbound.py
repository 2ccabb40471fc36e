"""JSON parsing with bounded work, for bodies from clients and upstreams.

`json.loads` holds the GIL and the event loop for its whole run: 8 MB of tiny nested arrays
takes ~0.45 s on these machines, while 8 MB of prose takes ~2 ms. The cost follows the
number of JSON values, which `structure_count` bounds from above in ~1 ms per MB (it also
counts brackets and commas inside strings, so it never under-counts).
"""

from __future__ import annotations

import json
from typing import Any

#: ~10 ms of json.loads in the worst shape (nested empty containers) on these machines.
MAX_INLINE_STRUCTURE = 50_000


def structure_count(body: bytes | bytearray | memoryview) -> int:
    """An upper bound on the JSON values in `body`: containers opened plus commas."""
    b = bytes(body) if isinstance(body, memoryview) else body
    return b.count(b"[") + b.count(b"{") + b.count(b",")


_DECODER = json.JSONDecoder()


def object_at(buf: bytes | bytearray, start: int, max_bytes: int) -> dict[str, Any] | None:
    """The JSON object whose `{` is at `buf[start]`, read from at most `max_bytes` bytes
    (so a member found by a scan is decoded without parsing the rest of the body)."""
    text = bytes(buf[start : start + max_bytes]).decode("utf-8", "replace")
    try:
        obj, _ = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def loads_bounded(body: bytes | bytearray, max_structure: int = MAX_INLINE_STRUCTURE) -> Any | None:
    """The parsed JSON, or None when it is not JSON or would cost more than `max_structure`."""
    if structure_count(body) > max_structure:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None

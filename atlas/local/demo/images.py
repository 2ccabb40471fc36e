"""Image sizes read from data: URLs, and each API's image-token rule."""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any, Final

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

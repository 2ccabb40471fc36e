"""Incremental Server-Sent Events decoder for streamed LLM responses.

Parsing follows the WHATWG "event stream interpretation" rules (HTML Living Standard, section
9.2.6): lines end in CRLF, LF or CR; a blank line ends an event; ``data`` lines are joined with
LF; one space after the colon is dropped; lines starting with a colon are comments; a UTF-8 BOM
at the very start of the stream is ignored.

Unlike a browser, the decoder hands back *every* byte it was fed, because ext_proc forwards or
strips events verbatim: the ``raw`` of all returned events, in order and including ``flush()``,
concatenates to exactly the input.  Blocks the spec would not dispatch (keep-alive comments,
stray blank lines, ``id``/``retry``/``event``-only blocks) come back as ``comment=True`` events.
Comment lines *inside* an event that carries ``data`` stay in that event's ``raw``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "Event", "SSEDecoder"]

DEFAULT_MAX_EVENT_SIZE = 1 << 20

_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A
_BOM = b"\xef\xbb\xbf"
# A blank line is a line terminator directly after another one.  CR followed by LF is a single
# terminator, hence the lookahead: without it "\r\n" alone would read as two.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# Bytes held back while passing an oversized event through: the longest blank-line marker that
# can straddle two chunks is "\r\n" + "\r", so two bytes of context are enough to spot its end.
_TAIL = 2
_MIN_MAX_EVENT_SIZE = 16


class Event(NamedTuple):
    """One blank-line-terminated block of the stream (a tuple: immutable, and built once per
    streamed chunk, so it costs a fraction of a frozen dataclass).

    ``event`` is the value of the last ``event:`` field, or None when absent or empty (the spec
    then calls it "message").  ``data`` is the ``data:`` values joined with LF.  ``raw`` is the
    exact input bytes of the block, from its first byte through its terminating blank line.

    ``comment``: the block has no ``data`` field (only comments, blank lines or other fields), so
    the spec would not dispatch it; ``event`` is None and ``data`` is empty.
    ``overflow``: part of a block larger than the decoder's ``max_event_size``; it was not parsed
    (``event`` None, ``data`` empty) and only ``raw`` is meaningful.  One oversized block may come
    back as several overflow events; the last one ends with the block's blank line, every one
    before it has ``continued=True``.
    ``truncated``: returned by ``flush()`` for trailing bytes that never got their blank line.
    """

    event: str | None
    data: bytes
    raw: bytes
    comment: bool = False
    overflow: bool = False
    truncated: bool = False
    continued: bool = False


def _parse_block(raw: bytes, skip: int, cr: bool, truncated: bool) -> Event:
    n = len(raw)
    if (
        not (skip or cr)
        and raw.startswith(b"data:")
        and raw.endswith(b"\n\n")
        and raw.find(b"\n") == n - 2
    ):
        # The common block, one `data:` line and its blank line: nothing else to look at.
        value = raw[5 : n - 2]
        return Event(None, value[1:] if value[:1] == b" " else value, raw, truncated=truncated)
    text = raw[skip:] if skip else raw
    lines = _LINE_END.split(text) if cr else text.split(b"\n")
    parts: list[bytes] = []
    event_type: bytes | None = None
    for line in lines:
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value[:1] == b" " else value)
            continue
        if not line or line[0] == _COLON:
            continue
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            parts.append(value)
        elif name == b"event":
            event_type = value
    if not parts:
        return Event(None, b"", raw, comment=True, truncated=truncated)
    data = parts[0] if len(parts) == 1 else b"\n".join(parts)
    name_str = event_type.decode("utf-8", "replace") if event_type else None
    return Event(name_str, data, raw, truncated=truncated)


class SSEDecoder:
    """Turns arbitrary chunks of an SSE byte stream into `Event`s; does no I/O.

    A block is returned as soon as its blank line is complete, with one exception: when a chunk
    ends in CR that CR might be the first half of a CRLF, so the block waits for the next byte
    (or ``flush()``).  That keeps ``raw`` identical for every chunking of the same stream.

    Memory is bounded by ``max_event_size``: a block growing beyond it is passed through as
    ``overflow`` events instead of being buffered.
    """

    __slots__ = ("_at_start", "_cr", "_discarding", "_max", "_pending", "_resume")

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        if max_event_size < _MIN_MAX_EVENT_SIZE:
            raise ValueError(f"max_event_size must be at least {_MIN_MAX_EVENT_SIZE}")
        self._max = max_event_size
        self._pending = bytearray()
        # Where to resume looking for a blank line in _pending, so a slowly arriving large event
        # is scanned once rather than once per chunk.
        self._resume = 0
        # LF-only streams (the common case) get a plain bytes.find; the regex path is only
        # switched on once a CR shows up.
        self._cr = False
        self._discarding = False
        self._at_start = True

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered for an event that is not complete yet."""
        return len(self._pending)

    def feed(self, chunk: bytes | bytearray) -> list[Event]:
        """Decode `chunk`; return the events it completed, in stream order."""
        if not chunk:
            return []
        if not self._cr and b"\r" in chunk:
            self._cr = True
        pending = self._pending
        n = len(chunk)
        if (
            not pending
            and not self._cr
            and not self._discarding
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n\n") == n - 2
            and n <= self._max
            and chunk[0] != _LF
            and not (self._at_start and chunk.startswith(_BOM))
        ):
            # Exactly one whole LF-terminated block, nothing buffered: what Envoy sends when
            # the upstream writes an event at a time. Same result as _scan, without its work.
            self._at_start = False
            return [_parse_block(bytes(chunk), 0, False, truncated=False)]
        if pending:
            pending += chunk
            return self._scan(pending, final=False)
        return self._scan(chunk, final=False)

    def flush(self) -> list[Event]:
        """End of stream: return what is still buffered; a block lacking its blank line comes
        back parsed as far as it goes, with ``truncated=True``."""
        pending = self._pending
        if not pending:
            return []
        return self._scan(pending, final=True)

    def _find_end(self, buf: bytes | bytearray, start: int, final: bool) -> int:
        if not self._cr:
            i = buf.find(b"\n\n", start)
            return -1 if i < 0 else i + 2
        m = _BLANK_LINE.search(buf, start)
        if m is None:
            return -1
        end = m.end()
        if end == len(buf) and buf[end - 1] == _CR and not final:
            return -1
        return end

    def _scan(self, buf: bytes | bytearray, final: bool) -> list[Event]:
        events: list[Event] = []
        n = len(buf)
        pos = 0
        search = self._resume if buf is self._pending else 0
        while pos < n:
            if self._discarding:
                end = self._find_end(buf, max(search, pos), final)
                if end < 0:
                    break
                events.append(Event(None, b"", bytes(buf[pos:end]), overflow=True))
                self._discarding = False
                pos = search = end
                continue
            body = pos
            if self._at_start and pos == 0 and buf.startswith(_BOM):
                body = 3
            first = buf[body] if body < n else -1
            if first == _LF:
                end = body + 1
            elif first == _CR:
                if body + 1 < n:
                    end = body + 2 if buf[body + 1] == _LF else body + 1
                elif final:
                    end = body + 1
                else:
                    break
            else:
                end = self._find_end(buf, max(search, body), final)
                if end < 0:
                    break
            self._at_start = False
            raw = bytes(buf[pos:end])
            if end - pos > self._max:
                events.append(Event(None, b"", raw, overflow=True))
            else:
                events.append(_parse_block(raw, body - pos, self._cr, truncated=False))
            pos = search = end

        if final:
            if pos < n:
                raw = bytes(buf[pos:])
                if self._discarding:
                    events.append(Event(None, b"", raw, overflow=True, truncated=True))
                else:
                    skip = 3 if self._at_start and raw.startswith(_BOM) else 0
                    events.append(_parse_block(raw, skip, self._cr, truncated=True))
            self._pending = bytearray()
            self._resume = 0
            self._discarding = False
            return events

        if (self._discarding or n - pos > self._max) and n - pos > _TAIL:
            part = bytes(buf[pos : n - _TAIL])
            events.append(Event(None, b"", part, overflow=True, continued=True))
            pos = n - _TAIL
            self._discarding = True
            self._at_start = False
        if buf is self._pending:
            del buf[:pos]
        elif pos < n:
            self._pending = bytearray(memoryview(buf)[pos:])
        self._resume = max(0, len(self._pending) - _TAIL)
        return events

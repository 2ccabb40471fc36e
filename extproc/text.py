"""Generated text as it passes in JSON: the string literals of the few keys that hold it,
found by regex (no parse), counted in characters and kept (bounded) to be tokenized when a
settlement needs an estimate. Shared by the JSON and the stream accountants.
"""

from __future__ import annotations

import json
import math
import re

from atlas import tokens
from atlas.requestbody import CHARS_PER_TOKEN

# The body of a JSON string literal, unrolled so matching stays linear on hostile input.
_JSON_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'
# Inside a JSON string every quote is escaped, so `"key":` can only match a real object key.
CHAT_TEXT = re.compile(
    rb'"(content|reasoning_content|reasoning|refusal|arguments)"\s*:\s*' + _JSON_STRING,
    re.DOTALL,
)
COMPLETIONS_TEXT = re.compile(rb'"text"\s*:\s*' + _JSON_STRING, re.DOTALL)
ANTHROPIC_TEXT = re.compile(rb'"(text|partial_json|thinking)"\s*:\s*' + _JSON_STRING, re.DOTALL)
OPEN_TEXT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|refusal|arguments)"\s*:\s*"')
DELTA_TEXT = re.compile(rb'"delta"\s*:\s*' + _JSON_STRING, re.DOTALL)
TYPE_FIELD = re.compile(rb'"type"\s*:\s*"([^"\\]*)"')


def string_chars(literal: bytes) -> int:
    """Characters of the decoded JSON string whose body (between the quotes) is `literal`."""
    if b"\\" in literal:
        try:
            return len(json.loads(b'"' + literal + b'"'))
        except ValueError:
            return len(literal)
    if literal.isascii():
        return len(literal)
    return len(literal.decode("utf-8", "replace"))


#: Bytes of generated text (JSON string bodies) kept to be tokenized at settlement time; the
#: characters past it are estimated at the kept text's tokens per character.
MAX_KEPT_TEXT = 64 << 10


class Text:
    """Generated text seen so far, as the JSON string bodies it came in (decoded once, when
    an estimate is needed), bounded by `MAX_KEPT_TEXT`."""

    __slots__ = ("chars", "dropped", "kept")

    def __init__(self) -> None:
        self.kept = bytearray()
        self.chars = 0
        self.dropped = 0  # characters seen but not kept

    def add(self, literal: bytes) -> int:
        """Keep one JSON string body; its decoded character count."""
        n = string_chars(literal)
        self.chars += n
        if len(self.kept) + len(literal) <= MAX_KEPT_TEXT:
            self.kept += literal  # whole literals only: escapes never split
        else:
            self.dropped += n
        return n

    def add_unread(self, chars: int) -> None:
        """Text too big to read (an oversized event): counted, not kept."""
        self.chars += chars
        self.dropped += chars

    def tokens(self) -> int:
        if not self.chars:
            return 0
        kept = bytes(self.kept)
        try:
            text = json.loads(b'"' + kept + b'"') if b"\\" in kept else kept.decode()
        except ValueError:
            text = kept.decode("utf-8", "replace")
        # Off the request path (a settlement without usage): all the kept text is tokenized.
        n = tokens.counter().count(text, exact_up_to=MAX_KEPT_TEXT) if text else 0
        if self.dropped:
            kept_chars = self.chars - self.dropped
            rate = n / kept_chars if kept_chars > 0 and n else 1 / CHARS_PER_TOKEN
            n += math.ceil(self.dropped * rate)
        return n


#: Every `CHAT_TEXT` match starts with one of these, so none can start before the first.
_CHAT_TEXT_KEYS = (b'"content"', b'"reasoning', b'"refusal"', b'"arguments"')


def first_text_key(data: bytes) -> int:
    """Where the first `CHAT_TEXT` key could start in `data` (-1: none): substring finds
    skip the id/model/created prefix the regex would otherwise try at every quote."""
    first = -1
    for key in _CHAT_TEXT_KEYS:
        i = data.find(key)
        if i >= 0 and (first < 0 or i < first):
            first = i
    return first

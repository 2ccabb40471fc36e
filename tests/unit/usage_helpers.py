"""Test helpers for reading usage out of whole JSON answers."""

from __future__ import annotations

from atlas.jsonbound import loads_bounded
from extproc.usage import Usage, body_usage


def usage_from_json(body: bytes | bytearray) -> Usage | None:
    """The usage of a whole non-streaming answer (chat, completions, embeddings, responses,
    Anthropic, Gemini) parsed with bounded work, as `JsonBodyAccountant` reads a kept body."""
    if not isinstance(body, bytes | bytearray) or (
        b'"usage"' not in body and b'"usageMetadata"' not in body
    ):
        return None
    return body_usage(loads_bounded(body))

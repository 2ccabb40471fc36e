"""OpenAI-shaped error bodies, so unchanged OpenAI SDKs raise the right exception."""

from __future__ import annotations

import json

from atlas.errors import Denied


def error_body(message: str, *, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


def denied_body(d: Denied) -> bytes:
    """What a refusal's answer carries: its own body (a replayed response), else the error."""
    if d.body is not None:
        return d.body
    return error_body(d.message, type=d.type, code=d.code, param=d.param)

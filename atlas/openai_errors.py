"""OpenAI-shaped error bodies, so unchanged OpenAI SDKs raise the right exception."""

from __future__ import annotations

import json


def error_body(message: str, *, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()

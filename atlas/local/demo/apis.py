"""The POST routes of every API, the static bodies and each API's prompt count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from atlas.local.demo.anthropic import _anthropic_prompt_tokens, _messages
from atlas.local.demo.common import _CREATED, DEFAULT_MODELS, _dumps
from atlas.local.demo.counting import _chat_prompt_tokens
from atlas.local.demo.gemini import _gemini_prompt_tokens
from atlas.local.demo.hooks import _Hooks
from atlas.local.demo.openai import _chat, _completions, _embeddings, _responses
from atlas.local.demo.protocol import _Request
from atlas.local.demo.responses import _Result

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

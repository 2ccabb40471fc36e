"""Which requests authz lets through, and what each may cost.

By default only the endpoints Atlas accounts for are forwarded: OpenAI's four that generate
or embed tokens, Anthropic's Messages (`/v1/messages`), Gemini's `generateContent` and
`streamGenerateContent` (`/v1beta/models/{model}:...`, or `/v1/models/...`), and
`GET /v1/models`. Anything else under `/v1/` would be billed to the
gateway's upstream credential at no cost to the key (batches, images, files, realtime
sessions), so it is a 404 unless the operator lists it in `ATLAS_EXTRA_ENDPOINTS`; those are
admitted under the key's request rate limit with nothing reserved.

Paths are matched case-sensitively without their query string, after refusing every spelling
that an upstream could resolve to another path (`..`, `.`, `//`, `%2e`, `%2f`, `%5c`, `\\`):
whatever Envoy normalises, `/v1/chat/completions/../batches` is never matched as chat.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from atlas.errors import Denied


@dataclass(slots=True, frozen=True)
class Route:
    name: str  # a bounded label: the endpoint, or "models" / "extra"
    reads_body: bool  # the body is an LLM request: parse it, estimate, check the model
    generates: bool  # completion tokens are reserved


LLM_ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route("chat", True, True),
    "/v1/completions": Route("completions", True, True),
    "/v1/responses": Route("responses", True, True),
    "/v1/embeddings": Route("embeddings", True, False),
    "/v1/messages": Route("messages", True, True),
}
#: Gemini names the model and the method in the path: /v1beta/models/{model}:{method}.
GEMINI = Route("gemini", True, True)
_GEMINI_PREFIXES = ("/v1beta/models/", "/v1/models/")
_GEMINI_METHODS = (":generateContent", ":streamGenerateContent")
#: Longest model name a Gemini path may carry (the same bound as a body's `model`).
_MAX_GEMINI_MODEL = 256


def gemini_call(path: str) -> tuple[str, bool] | None:
    """(model, streamed) of a Gemini generate path, else None."""
    for prefix in _GEMINI_PREFIXES:
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        for method in _GEMINI_METHODS:
            if rest.endswith(method):
                model = rest[: -len(method)]
                if 0 < len(model) <= _MAX_GEMINI_MODEL and "/" not in model and ":" not in model:
                    return model, method == ":streamGenerateContent"
    return None


MODELS = Route("models", False, False)
EXTRA = Route("extra", False, False)

_ENCODED = ("%2e", "%2f", "%5c", "\\", "//")


def request_path(raw: str) -> str:
    """The path without query or fragment; 400 for any dot-segment or encoded separator."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    lowered = path.lower()
    if any(bad in lowered for bad in _ENCODED) or any(
        seg in (".", "..") for seg in path.split("/")
    ):
        raise Denied(
            400,
            "Invalid request path: dot-segments and encoded slashes are not allowed.",
            type="invalid_request_error",
            code="invalid_path",
        )
    return path


class Endpoints:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        """:param extra: `"METHOD /path"` entries; both parts may use `fnmatch` globs."""
        self._extra = [tuple(e.split(None, 1)) for e in extra]

    def route(self, method: str, path: str) -> Route:
        """:param path: as `request_path` returned it (checked, without its query)."""
        method = method.upper()
        if method == "POST":
            found = LLM_ROUTES.get(path)
            if found is not None:
                return found
            if gemini_call(path) is not None:
                return GEMINI
        if method == "GET" and (path == "/v1/models" or fnmatch.fnmatchcase(path, "/v1/models/*")):
            return MODELS
        for m, p in self._extra:
            if fnmatch.fnmatchcase(method, m.upper()) and fnmatch.fnmatchcase(path, p):
                return EXTRA
        raise Denied(
            404,
            f"Unknown endpoint: {method} {path[:200]}. This gateway forwards "
            "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, "
            "/v1/messages, /v1beta/models/{model}:generateContent (and "
            ":streamGenerateContent) and /v1/models.",
            type="invalid_request_error",
            code="unknown_endpoint",
        )

"""How a caller presents a secret: one parser for authz (client keys) and admin (client keys
on the self-serve routes, the admin token)."""

from __future__ import annotations

from collections.abc import Mapping

#: Headers a client may carry its key in: OpenAI's, Anthropic's, Azure's and Gemini's.
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (any case of the scheme)."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def client_key(headers: Mapping[str, str]) -> str | None:
    """The client's API key from any header that can carry one (lower-case names)."""
    token = bearer(headers.get("authorization", ""))
    if token is not None:
        return token
    for name in CLIENT_KEY_HEADERS[1:]:
        api_key = headers.get(name, "").strip()
        if api_key:
            return api_key
    return None

"""Idempotency keys: a client's retry of a request it already sent is never run or charged
twice. The key is the client's `Idempotency-Key` header (the name the OpenAI and Anthropic
SDKs and Stripe-style APIs use; `X-Idempotency-Key` too), scoped to the API key that sent it:
the ledger keeps one record per (API key, idempotency key) under the API key's hash tag
(admit.lua, settle.lua), with a hash of the request's body so a different body under the
same key is told apart. Only hashes reach Redis."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from atlas.errors import Denied
from atlas.grant import IDEMPOTENT_REPLAY_HEADER
from atlas.ledger.protocol import Admission

#: Header names read, in order (lowercase: Envoy's).
HEADERS = ("idempotency-key", "x-idempotency-key")
#: Longest idempotency key accepted (SDKs send UUIDs; Stripe allows 255).
MAX_KEY_CHARS = 255


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The request's idempotency key, or None; ValueError when it is empty, too long or not
    printable ASCII."""
    for name in HEADERS:
        value = headers.get(name)
        if value is not None:
            if (
                not 0 < len(value) <= MAX_KEY_CHARS
                or not value.isascii()
                or not value.isprintable()
            ):
                raise ValueError(
                    f"The {name} header must be 1-{MAX_KEY_CHARS} printable ASCII characters."
                )
            return value
    return None


def tag(key: str) -> str:
    """What the ledger knows an idempotency key by (32 hex digits)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def body_hash(body: bytes) -> str:
    """What tells a retry from a different request under the same key (32 hex digits)."""
    return hashlib.sha256(body).hexdigest()[:32]


def request_tags(headers: Mapping[str, str], body: bytes) -> tuple[str, str]:
    """(key tag, body hash) of a request that sent an idempotency key, else ('', '').

    :raises Denied: 400 for a malformed key.
    """
    try:
        key = idempotency_key(headers)
    except ValueError as exc:
        raise Denied(400, str(exc), type="invalid_request_error", code=None) from exc
    return ("", "") if key is None else (tag(key), body_hash(body))


def stored(content_type: str, body: bytes) -> str:
    """A response as the ledger keeps it for replays (its content type, then its body)."""
    return content_type + "\n" + body.decode()


def refusal(a: Admission) -> Denied:
    """The answer to a duplicate (admit.lua's `idempotency_*` reasons): the stored response,
    or the 409/422 that says why it cannot run."""
    if a.reason == "idempotency_replay":
        ctype, _, body = a.replay.partition("\n")
        return Denied(
            200,
            "A replay of the completed request with this Idempotency-Key.",
            type="",
            code="idempotency_replay",
            body=body.encode(),
            content_type=ctype or "application/json",
            headers={IDEMPOTENT_REPLAY_HEADER: "true"},
        )
    if a.reason == "idempotency_mismatch":
        return Denied(
            422,
            "This Idempotency-Key was used with a different request body.",
            type="invalid_request_error",
            code="idempotency_key_reused",
        )
    if a.reason == "idempotency_completed":
        return Denied(
            409,
            "The request with this Idempotency-Key completed; its response was too large to"
            " keep for replay.",
            type="invalid_request_error",
            code="idempotency_completed",
        )
    return Denied(
        409,
        "A request with this Idempotency-Key is in progress; retry after it completes.",
        type="invalid_request_error",
        code="idempotency_in_progress",
        retry_after_s=max(1, math.ceil(a.retry_after_ms / 1000)),
    )

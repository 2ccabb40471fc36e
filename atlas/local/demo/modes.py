"""A demo instance's failure mode: a whole provider failing, or single pool keys getting 429s.

End-to-end tests put several Atlas providers (or several keys of one pool) in front of demo
instances and flip them at runtime with ``PUT /demo/mode``. A mode is replaced whole, never
patched, so each test states everything it relies on. It is bounded and validated here, so a
bad PUT is a clear 400, never a crash or a memory sink; once parsed it is immutable, so the
server can swap it in one assignment.

JSON shape (every key optional on PUT; GET always shows all three)::

    {"fail_status": 503 | null, "fail_retry_after": 5 | null,
     "credentials": {"<secret>": {"status": 429, "retry_after": 2 | null}}}

A request's credential is the token of ``Authorization: Bearer X``, or ``x-api-key: X``
(Anthropic), or ``x-goog-api-key: X`` (Gemini). A listed credential wins over ``fail_status``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from atlas.local.demo.common import _dumps
from atlas.local.demo.responses import _OPENAI, _error_body, _json_response

MAX_CREDENTIALS: Final = 64
MAX_SECRET_CHARS: Final = 256
MAX_RETRY_AFTER_S: Final = 3600
MAX_MODE_BYTES: Final = 64 * 1024
_MODE_KEYS: Final = frozenset({"fail_status", "fail_retry_after", "credentials"})
_FAILURE_KEYS: Final = frozenset({"status", "retry_after"})


class ModeError(ValueError):
    """A mode that does not validate; the message is the 400's."""


@dataclass(frozen=True, slots=True)
class Failure:
    """How to answer: an error status and, when set, a ``Retry-After`` in seconds."""

    status: int
    retry_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "retry_after": self.retry_after}


@dataclass(frozen=True, slots=True)
class Mode:
    """``fail`` answers every API request; ``credentials`` answer requests carrying that key."""

    fail: Failure | None = None
    credentials: Mapping[str, Failure] = field(default_factory=dict)

    @property
    def is_normal(self) -> bool:
        return self.fail is None and not self.credentials

    def failure_for(self, headers: Mapping[str, str]) -> Failure | None:
        if self.credentials:
            for secret in _secrets(headers):
                failure = self.credentials.get(secret)
                if failure is not None:
                    return failure
        return self.fail

    def to_json(self) -> dict[str, Any]:
        fail = self.fail
        return {
            "fail_status": None if fail is None else fail.status,
            "fail_retry_after": None if fail is None else fail.retry_after,
            "credentials": {k: v.to_json() for k, v in self.credentials.items()},
        }


NORMAL: Final = Mode()


def _secrets(headers: Mapping[str, str]) -> Iterator[str]:
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            yield token.strip()
    for name in ("x-api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value:
            yield value


def parse_mode(raw: bytes) -> Mode:
    """The mode a ``PUT /demo/mode`` body describes; :class:`ModeError` says what is wrong."""
    if len(raw) > MAX_MODE_BYTES:
        raise ModeError(f"mode body must be at most {MAX_MODE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModeError("mode body must be JSON") from None
    if not isinstance(data, dict):
        raise ModeError("mode must be a JSON object")
    _check_keys(data, _MODE_KEYS, "mode")
    raw_status = data.get("fail_status")
    status = None if raw_status is None else _status(raw_status, "fail_status")
    retry_after = _retry_after(data.get("fail_retry_after"), "fail_retry_after")
    if status is None and retry_after is not None:
        raise ModeError("fail_retry_after needs fail_status")
    fail = None if status is None else Failure(status, retry_after)
    return Mode(fail, _credentials(data.get("credentials")))


def _credentials(value: object) -> dict[str, Failure]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModeError("credentials must be an object of secret -> {status, retry_after}")
    if len(value) > MAX_CREDENTIALS:
        raise ModeError(f"credentials: at most {MAX_CREDENTIALS} entries")
    result: dict[str, Failure] = {}
    for secret, spec in value.items():
        if not 0 < len(secret) <= MAX_SECRET_CHARS or not _is_secret(secret):
            raise ModeError(
                f"credential secrets must be 1..{MAX_SECRET_CHARS} printable ASCII characters "
                "without spaces"
            )
        where = f"credentials[{secret!r}]"
        if not isinstance(spec, dict):
            raise ModeError(f"{where} must be an object {{status, retry_after}}")
        _check_keys(spec, _FAILURE_KEYS, where)
        status = _status(spec.get("status"), f"{where}.status")
        result[secret] = Failure(
            status, _retry_after(spec.get("retry_after"), f"{where}.retry_after")
        )
    return result


def _is_secret(secret: str) -> bool:
    return secret.isascii() and secret.isprintable() and " " not in secret


def _check_keys(data: dict[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ModeError(
            f"{where}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(known))}"
        )


def _int_in(value: object, low: int, high: int) -> int | None:
    """``value`` when it is an integer (not a bool) in ``low..high``, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def _status(value: object, where: str) -> int:
    status = _int_in(value, 400, 599)
    if status is None:
        raise ModeError(f"{where} must be an integer 400..599")
    return status


def _retry_after(value: object, where: str) -> int | None:
    if value is None:
        return None
    seconds = _int_in(value, 0, MAX_RETRY_AFTER_S)
    if seconds is None:
        raise ModeError(f"{where} must be null or an integer 0..{MAX_RETRY_AFTER_S} (seconds)")
    return seconds


def failure_response(failure: Failure, dialect: str, keep_alive: bool, extra: bytes) -> bytes:
    """The error a failing provider answers, in the request's API shape. OpenAI's 429 and 401
    carry the type and code OpenAI itself sends, which clients and Atlas classify by."""
    status, retry = failure.status, failure.retry_after
    if dialect == _OPENAI and status == 429:
        wait = "" if retry is None else f" Please try again in {retry}s."
        message = f"Rate limit reached on requests per min (RPM) (demo upstream mode).{wait}"
        body = _openai_error(message, "requests", "rate_limit_exceeded")
    elif dialect == _OPENAI and status == 401:
        message = "Incorrect API key provided (demo upstream mode)."
        body = _openai_error(message, "invalid_request_error", "invalid_api_key")
    else:
        body = _error_body(status, f"demo upstream: mode status {status}", dialect=dialect)
    if retry is not None:
        extra += b"retry-after: %d\r\n" % retry
    return _json_response(status, body, keep_alive, extra)


def _openai_error(message: str, etype: str, code: str) -> bytes:
    return _dumps(
        {"error": {"message": message, "type": etype, "param": None, "code": code}}
    ).encode()

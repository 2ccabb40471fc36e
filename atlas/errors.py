"""The few error types Atlas raises; each service translates them at one boundary."""

from __future__ import annotations

from typing import Any


class AtlasError(Exception):
    """Base of every error Atlas raises on purpose."""


class ConfigError(AtlasError):
    """Settings or a config file are invalid; the message names the setting."""


class LedgerUnavailable(AtlasError):
    """Redis/Valkey could not be reached or answered with an error."""


class Denied(AtlasError):
    """A request is refused. `code` and `type` follow OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.param = param  # the request field at fault, as in OpenAI's error body
        #: The answer's own body (a replayed response), instead of the OpenAI error.
        self.body = body
        self.content_type = content_type
        #: The key (or app) record refused, once authz identified it (the request log's).
        self.subject: Any = None

    def __repr__(self) -> str:
        return f"Denied({self.status}, {self.code!r}, {self.message!r})"

"""The response a client got, kept for the duplicates of an idempotent request
(atlas/idempotency.py): exactly the bytes sent on (after Atlas cut out a usage chunk it
injected), up to ATLAS_IDEMPOTENCY_MAX_RESPONSE_BYTES."""

from __future__ import annotations

from atlas.idempotency import stored


class KeptResponse:
    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self.over = False

    def add(self, data: bytes) -> None:
        if self.over or not data:
            return
        if len(self._buf) + len(data) > self._limit:
            self.over = True  # too big to replay: a duplicate is told the original completed
            self._buf = bytearray()
            return
        self._buf += data

    def outcome(self, *, completed: bool, content_type: str) -> tuple[str, str]:
        """(what becomes of the idempotency key, the stored response): `store` a completed
        response that fits, `unstored` one that does not, `drop` a failed request's key so
        that its retry runs."""
        if not completed:
            return "drop", ""
        if self.over:
            return "unstored", ""
        try:
            return "store", stored(content_type, bytes(self._buf))
        except UnicodeDecodeError:
            return "unstored", ""

"""Reservation ids: 24 hex digits of the operating system's randomness, as
`secrets.token_hex(12)` gives, read a block at a time. One `getrandom` call per Check was ~2 %
of authz's CPU at saturation (py-spy, `python -m bench --only authz`)."""

from __future__ import annotations

import os

ID_BYTES = 12
#: Ids per read of the OS's randomness.
BLOCK_IDS = 512


class ReservationIds:
    """A callable giving a new id each call (one process; authz never forks after start)."""

    __slots__ = ("_at", "_block")

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def __call__(self) -> str:
        at = self._at
        if at + ID_BYTES > len(self._block):
            self._block = os.urandom(ID_BYTES * BLOCK_IDS)
            at = 0
        self._at = at + ID_BYTES
        return self._block[at : at + ID_BYTES].hex()

"""A fake ledger for unit tests of pure logic (integration tests use a real valkey-server)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from atlas.errors import LedgerUnavailable
from atlas.keymodel import KeyRecord
from atlas.ledger.protocol import (
    Admission,
    AdmitRequest,
    KeyUsage,
    Ledger,
    Settlement,
    SettleOutcome,
    SettleResult,
    Window,
)


def admission(admitted: bool = True, reason: str = "", **kw: object) -> Admission:
    base: dict[str, object] = dict(
        admitted=admitted,
        reason=reason,
        retry_after_ms=0,
        granted_completion=None,
        reserved=100,
        requests_remaining=9,
        requests_reset_ms=100,
        tokens_remaining=None,
        tokens_reset_ms=0,
        day_used=0,
        day_reserved=100,
        day_reset_s=2000,
        month_used=0,
        month_reserved=100,
        month_reset_s=3000,
        now_ms=1_000_000,
    )
    base.update(kw)
    return Admission(**base)  # type: ignore[arg-type]


class FakeLedger:
    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.admits: list[AdmitRequest] = []
        self.settlements: list[Settlement] = []
        self.released: list[tuple[str, str]] = []
        self.next_admission = admission()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise LedgerUnavailable("fake: down")

    async def ping(self) -> None:
        self._check()

    async def create_key(self, rec: KeyRecord) -> None:
        self._check()
        self.keys[rec.secret_hash] = rec

    async def get_key(self, key_id: str) -> KeyRecord | None:
        self._check()
        return next((r for r in self.keys.values() if r.id == key_id), None)

    async def find_key(self, secret_hash: str) -> KeyRecord | None:
        self._check()
        return self.keys.get(secret_hash)

    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission:
        self._check()
        self.admits.append(req)
        return self.next_admission

    async def settle(self, s: Settlement) -> SettleResult:
        self._check()
        self.settlements.append(s)
        return SettleResult("settled", s.prompt_tokens + s.completion_tokens, 0)

    async def settle_many(self, ss: Sequence[Settlement]) -> list[SettleOutcome]:
        return [await self.settle(s) for s in ss]

    async def release(self, releases: Mapping[str, Collection[str]]) -> int:
        self._check()
        self.released += [(k, rid) for k, rids in releases.items() for rid in rids]
        return sum(len(r) for r in releases.values())

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]:
        return 0, 0

    async def usage(self, rec: KeyRecord) -> KeyUsage:
        w = Window(limit=rec.daily_limit, used=0, reserved=0, requests=0, resets_at_s=0)
        return KeyUsage(rec.id, w, w, 0)


_: Ledger = FakeLedger()

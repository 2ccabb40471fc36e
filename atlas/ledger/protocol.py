"""What authz, extproc and admin may ask of the ledger. Only `atlas.ledger.redis` implements
it against Redis; unit tests use fakes checked against this Protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from atlas.keymodel import KeyRecord
from atlas.settings import Priority


@dataclass(slots=True, frozen=True)
class AdmitRequest:
    reservation_id: str
    prompt_tokens: int
    completion_tokens: int
    priority: Priority
    model: str
    ceiling: float
    shadow: bool = False
    clamp: bool = False
    cost_micros: int = 0  # price of the estimate (monthly budgets)


@dataclass(slots=True, frozen=True)
class Admission:
    admitted: bool
    reason: str  # '' when every rule passed; in shadow mode the rule that would have refused
    retry_after_ms: int
    granted_completion: int | None  # lowered max_tokens when clamped
    reserved: int
    requests_remaining: int
    requests_reset_ms: int
    tokens_remaining: int | None  # None when the key has no tokens/minute limit
    tokens_reset_ms: int
    day_used: int
    day_reserved: int
    day_reset_s: int
    month_used: int
    month_reserved: int
    month_reset_s: int
    now_ms: int
    month_spend_micros: int = 0


@dataclass(slots=True, frozen=True)
class Settlement:
    key_id: str
    reservation_id: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    exact: bool
    outcome: str  # completed | upstream_error | disconnected | ...
    tokens_per_minute: int = 0  # the key's limit when admitted; the bucket gets the refund
    cost_micros: int = 0  # price of the actual usage


@dataclass(slots=True, frozen=True)
class SettleResult:
    status: str  # settled | duplicate | late | unreserved
    charged: int
    refunded: int


@dataclass(slots=True, frozen=True)
class HourRow:
    ts: int  # start of the hour, epoch seconds
    fields: dict[str, int]  # requests, prompt, completion, refunded, spend, denied, ...

    def get(self, name: str) -> int:
        return self.fields.get(name, 0)

    @property
    def total(self) -> int:
        return self.get("prompt") + self.get("completion")


@dataclass(slots=True, frozen=True)
class ReapTotals:
    reaped: int  # reservations settled by the reaper
    charged: int  # tokens charged for them
    released: int  # tokens they had reserved


@dataclass(slots=True, frozen=True)
class Window:
    limit: int
    used: int
    reserved: int
    requests: int
    resets_at_s: int
    spend_micros: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


@dataclass(slots=True, frozen=True)
class KeyUsage:
    key_id: str
    daily: Window
    monthly: Window
    open_reservations: int


class Ledger(Protocol):
    async def ping(self) -> None: ...

    async def create_key(self, rec: KeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def find_key(self, secret_hash: str) -> KeyRecord | None: ...

    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission: ...

    async def settle(self, s: Settlement) -> SettleResult: ...

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]: ...

    async def usage(self, rec: KeyRecord) -> KeyUsage: ...

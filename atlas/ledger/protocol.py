"""What authz, extproc and admin may ask of the ledger, as narrow ports by concern: callers
type against the port they use (authz: `Admissions`; extproc: `Settlements`, `Leases`,
`Reaping`; admin: `AdminLedger`, with its tenancy stores in atlas/ledger/admin_protocol.py).
Only `atlas.ledger.redis` implements them against Redis;
unit tests use fakes checked against these Protocols. No caller names a Redis key: history
is asked for by `HistoryScope`, windows by key id and calendar name."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from atlas import limits
from atlas.errors import LedgerUnavailable
from atlas.keymodel import KeyRecord
from atlas.settings import Priority
from atlas.windows import Zone

#: Completions one request may generate (`n` x `best_of` x prompts), at most.
MAX_REQUEST_CHOICES = limits.MAX_CHOICES * limits.MAX_CHOICES * limits.MAX_PROMPTS
#: Reservation ids and key ids are ours (short tokens); anything longer is not.
MAX_ID_CHARS = 128


class LedgerInputError(ValueError):
    """A number or id handed to the ledger is outside `atlas.limits` bounds (or a script
    refused its input). Nothing was written; retrying the same input cannot succeed."""


#: AdmitRequest.unattended values (0: an ext_proc stream claims it).
UNATTENDED, UNATTENDED_STREAM = 1, 2


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
    #: completions the request generates (n x best_of x prompts); with clamp, the granted
    #: max_tokens is per choice and `completion_tokens` is the total over all choices.
    choices: int = 1
    #: settled from Envoy's access log (no ext_proc stream claims it): claimed at admission,
    #: held for the claim timeout (UNATTENDED) or, a stream, for the TTL (UNATTENDED_STREAM).
    unattended: int = 0
    #: the end user's tag (`atlas.keymodel.end_user_tag`; '' = no end-user limit applies).
    end_user_tag: str = ""
    #: the request's idempotency key and body, hashed (atlas/idempotency.py; '' = none).
    idempotency_tag: str = ""
    body_hash: str = ""


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
    #: a duplicate of a completed idempotent request: the stored response to replay.
    replay: str = ""


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
    # Parts of the counts above (extproc/usage.py `Usage`): cached reads and cache writes are
    # inside prompt_tokens, reasoning inside completion_tokens; 0 when not reported.
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    #: The provider and pool member that served it (atlas/providers; "" without providers).
    provider: str = ""
    member: str = ""
    #: The request's idempotency key tag, and what becomes of it: store (`response` is
    #: kept for duplicates), unstored (completed, too big), drop (failed: a retry runs).
    idempotency_tag: str = ""
    idempotency: str = ""
    response: str = ""


@dataclass(slots=True, frozen=True)
class SettleResult:
    status: str  # settled | duplicate | late | unreserved | malformed
    charged: int
    refunded: int


#: One settlement's end in a batch (`Settlements.settle_many`).
SettleOutcome = SettleResult | LedgerInputError | LedgerUnavailable


@dataclass(slots=True, frozen=True)
class HourRow:
    ts: int  # start of the hour, epoch seconds
    fields: dict[str, int]  # requests, prompt, completion, cached, reasoning, spend, denied, ...

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
    abandoned: int = 0  # of those, never claimed by an ext_proc stream (charged 0)
    failed_keys: int = 0  # keys whose reap script failed (the others were still reaped)
    malformed: int = 0  # unreadable reservation entries removed
    #: each reservation reaped: (key id, reservation id, tokens charged, claimed, priority,
    #: model), for the request log.
    lost: tuple[tuple[str, str, int, bool, str, str], ...] = ()


@dataclass(slots=True, frozen=True)
class Window:
    limit: int
    used: int
    reserved: int
    requests: int
    resets_at_s: int
    spend_micros: int = 0
    # Settled tokens by kind (parts of the settled prompts and completions, see `Settlement`;
    # cached ones are in `used` unless the quotas leave them out).
    cached: int = 0
    reasoning: int = 0
    cache_write: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


@dataclass(slots=True, frozen=True)
class KeyUsage:
    key_id: str
    daily: Window
    monthly: Window
    open_reservations: int


@dataclass(slots=True, frozen=True)
class HistoryScope:
    """Whose hourly history: one key's, one model's (all keys together) or everyone's."""

    kind: Literal["key", "model", "global"]
    name: str = ""

    @classmethod
    def key(cls, key_id: str) -> HistoryScope:
        return cls("key", key_id)

    @classmethod
    def model(cls, model: str) -> HistoryScope:
        return cls("model", model)


#: Every key and model together.
GLOBAL_HISTORY = HistoryScope("global")


class Probe(Protocol):
    async def ping(self) -> None: ...


class KeyStore(Protocol):
    """Key records: by id, by secret hash, in creation order, and their changes."""

    async def create_key(self, rec: KeyRecord) -> None: ...

    async def put_key(
        self,
        rec: KeyRecord,
        *,
        old_secret_hash: str | None = None,
        old_lookup_hashes: list[str] | None = None,
    ) -> None: ...

    async def delete_key(self, rec: KeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def find_key(self, secret_hash: str) -> KeyRecord | None: ...

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]: ...

    async def list_key_ids(self, offset: int = 0, limit: int = 100) -> list[str]: ...

    async def count_keys(self) -> int: ...

    def key_changes(self) -> AsyncIterator[str]: ...


class Admissions(Protocol):
    """What authz asks on each Check: admit (and reserve), or give a reservation up."""

    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission: ...

    async def release(self, releases: Mapping[str, Collection[str]]) -> int: ...


class Leases(Protocol):
    """Claims of live ext_proc streams on their reservations (and giving them up)."""

    async def lease(self, leases: Mapping[str, Collection[str]]) -> int: ...

    async def release(self, releases: Mapping[str, Collection[str]]) -> int: ...


class Settlements(Protocol):
    """Charging what a request used (also a replayed journal entry's), and reaping."""

    async def settle(self, s: Settlement) -> SettleResult: ...

    async def settle_many(self, ss: Sequence[Settlement]) -> list[SettleOutcome]:
        """Each settlement's result in one round trip, or its own `LedgerInputError` or
        `LedgerUnavailable` (that script alone failed).
        :raises LedgerUnavailable: no answer (some may have run: a retry is `duplicate`)."""
        ...

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]: ...

    async def flush_history(self) -> None:
        """Write shared history a ledger buffers (a no-op for one that does not)."""


class Reaping(Protocol):
    """What the reaper walks: the key index, under a lease one replica holds."""

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool: ...

    async def list_key_ids(self, offset: int = 0, limit: int = 100) -> list[str]: ...

    async def reap_keys(self, key_ids: Sequence[str], *, charge: bool = True) -> ReapTotals: ...


class History(Protocol):
    """Quota windows and hourly history, read for reports (and written by simulations)."""

    @property
    def hour_offset_s(self) -> int: ...

    def zone_of(self, rec: KeyRecord | None) -> Zone: ...

    def hour_start(self, epoch_s: float) -> int: ...

    async def server_time(self) -> float: ...

    async def usage(self, rec: KeyRecord) -> KeyUsage: ...

    async def history(self, scope: HistoryScope, start_ts: int, hours: int) -> list[HourRow]: ...

    async def day_windows(self, key_ids: Sequence[str], day: str) -> list[dict[str, int]]: ...

    async def add_history(
        self, entries: Sequence[tuple[HistoryScope, int, dict[str, int]]]
    ) -> None: ...

    async def add_day_window(self, key_id: str, day: str, fields: dict[str, int]) -> None: ...

    async def add_month_window(self, key_id: str, month: str, fields: dict[str, int]) -> None: ...


class Audit(Protocol):
    async def audit(self, entry: dict[str, Any]) -> None: ...

    async def audit_entries(
        self, limit: int, before: str | None = None
    ) -> list[dict[str, Any]]: ...


@dataclass(slots=True, frozen=True)
class PoolPick:
    """A pool's answer: the member to use, or how long until one may serve and why."""

    member: str
    wait_ms: int = 0
    why: str = ""


@dataclass(slots=True, frozen=True)
class PoolObservation:
    """What one request did at a provider (from Envoy's access log or a settlement)."""

    member: str = ""
    cool_ms: int = 0
    cool_scope: str = "member"  # member | provider
    reason: str = ""
    #: Tokens used minus the estimate the pick counted (per-minute use of the member).
    token_correction: int = 0
    #: "<member or *>|<field>" -> amount added to this minute's stats.
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class PoolState:
    """A provider's shared state for the health view: cooling entries (member or "*" ->
    (until epoch s, reason)), this minute's use per member, and per-minute stats."""

    cooling: dict[str, tuple[float, str]]
    use: dict[str, int]  # "<member>|r" / "<member>|t" -> this minute's count
    minutes: list[dict[str, int]]  # newest last


class Pools(Protocol):
    """Provider key pools shared by every replica: picks, cooling, per-minute numbers."""

    async def pick(
        self, provider: str, strategy: str, estimate: int, members: Sequence[tuple[str, int, int]]
    ) -> PoolPick: ...

    async def report(self, provider: str, observations: Sequence[PoolObservation]) -> None: ...

    async def pool_state(self, provider: str, minutes: int) -> PoolState: ...


class Ledger(Protocol):
    """The core every ledger backend (and the unit tests' fake) provides."""

    async def ping(self) -> None: ...

    async def create_key(self, rec: KeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def find_key(self, secret_hash: str) -> KeyRecord | None: ...

    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission: ...

    async def settle(self, s: Settlement) -> SettleResult: ...

    async def settle_many(self, ss: Sequence[Settlement]) -> list[SettleOutcome]: ...

    async def release(self, releases: Mapping[str, Collection[str]]) -> int: ...

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]: ...

    async def usage(self, rec: KeyRecord) -> KeyUsage: ...


def _check(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise LedgerInputError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise LedgerInputError(f"{name} must be 1..{MAX_ID_CHARS} characters")


_MAX_COST_MICROS = limits.MAX_BUDGET_USD * 1_000_000
#: An end user's tag: hex digits (a hash), never braces (it is part of a key's names).
_TAG = re.compile(r"[0-9a-f]{1,32}")


def check_admit(req: AdmitRequest) -> None:
    """Bounds of an admission (Lua numbers are doubles: exact and printable only this far).

    :raises LedgerInputError: naming the field.
    """
    p, c = req.prompt_tokens, req.completion_tokens
    if (  # every admission: the common case in one expression, each field named below
        type(p) is int
        and type(c) is int
        and p >= 0
        and c >= 0
        and p + c <= limits.MAX_RESERVATION_TOKENS
        and type(req.choices) is int
        and 1 <= req.choices <= MAX_REQUEST_CHOICES
        and type(req.cost_micros) is int
        and 0 <= req.cost_micros <= _MAX_COST_MICROS
        and type(req.reservation_id) is str
        and 0 < len(req.reservation_id) <= MAX_ID_CHARS
        and 0 < req.ceiling <= 1
        and (not req.end_user_tag or _TAG.fullmatch(req.end_user_tag) is not None)
        and not req.idempotency_tag
    ):
        return
    _check_id("reservation_id", req.reservation_id)
    _check("prompt_tokens", req.prompt_tokens, 0, limits.MAX_RESERVATION_TOKENS)
    _check("completion_tokens", req.completion_tokens, 0, limits.MAX_RESERVATION_TOKENS)
    _check(
        "prompt_tokens + completion_tokens",
        req.prompt_tokens + req.completion_tokens,
        0,
        limits.MAX_RESERVATION_TOKENS,
    )
    _check("choices", req.choices, 1, MAX_REQUEST_CHOICES)
    _check("cost_micros", req.cost_micros, 0, _MAX_COST_MICROS)
    if not 0 < req.ceiling <= 1:
        raise LedgerInputError(f"ceiling must be in (0, 1], got {req.ceiling!r}")
    for name in ("end_user_tag", "idempotency_tag", "body_hash"):
        tag = getattr(req, name)
        if tag and _TAG.fullmatch(tag) is None:
            raise LedgerInputError(f"{name} must be 1-32 lowercase hex digits")


def check_settlement(s: Settlement) -> None:
    """Bounds of a settlement (usage beyond one request's bound is not believable).

    :raises LedgerInputError: naming the field.
    """
    _check_id("key_id", s.key_id)
    _check_id("reservation_id", s.reservation_id)
    _check("prompt_tokens", s.prompt_tokens, 0, limits.MAX_RESERVATION_TOKENS)
    _check("completion_tokens", s.completion_tokens, 0, limits.MAX_RESERVATION_TOKENS)
    _check("cost_micros", s.cost_micros, 0, limits.MAX_BUDGET_USD * 1_000_000)
    _check("cached_tokens", s.cached_tokens, 0, s.prompt_tokens)
    _check("cache_write_tokens", s.cache_write_tokens, 0, s.prompt_tokens - s.cached_tokens)
    _check("reasoning_tokens", s.reasoning_tokens, 0, s.completion_tokens)
    if s.idempotency_tag and (
        _TAG.fullmatch(s.idempotency_tag) is None
        or s.idempotency not in ("store", "unstored", "drop")
    ):
        raise LedgerInputError("idempotency_tag must be hex, idempotency store|unstored|drop")

"""The Lua scripts (`lua/*.lua`), registered once, and a codec per script: its KEYS and ARGV
in the order the script's header documents, and its reply decoded. The argument order lives
here and in the headers only; tests/unit/test_policy_ledger_command.py pins that admit's
pre-encoded command is what redis-py would send for the same KEYS and ARGV.

redis-py's script object re-loads a script after a NOSCRIPT (server restart, failover).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from atlas import limits
from atlas.keymodel import KeyRecord, team_of
from atlas.ledger import keys
from atlas.ledger.protocol import Admission, AdmitRequest, ReapTotals, Settlement, SettleResult
from atlas.pricing import MICROS_PER_USD

#: How long settle's and reap's `done:<rid>` markers make a settlement idempotent, s.
DONE_MARKER_TTL_S = 3 * 86400
#: Reservations one reap call settles per key; the next pass takes the rest.
REAP_BATCH = 100
#: Per-key pieces of admit's command kept (cleared past this many keys).
MAX_CACHED_ADMIT_KEYS = 10_000


def load_script(name: str) -> str:
    pkg = resources.files("atlas.ledger") / "lua"
    prelude = (pkg / "_clock.lua").read_text()
    return prelude + "\n" + (pkg / f"{name}.lua").read_text()


@dataclass(slots=True)
class Scripts:
    """redis-py script objects, one per state change (the parts of a ledger share one)."""

    admit: Any
    settle: Any
    reap: Any
    lease: Any
    release: Any

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(
            *(
                client.register_script(load_script(name))
                for name in ("admit", "settle", "reap", "lease", "release")
            )
        )


# ---- RESP encoding (what redis-py's encoder sends, built once and reused) ------------------
def encoded(value: object) -> bytes:
    """An argument as redis-py's encoder sends it (ints and floats by repr, text as UTF-8)."""
    return value.encode() if isinstance(value, str) else repr(value).encode()


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def bulk_int(value: int) -> bytes:
    """An integer argument as redis-py's encoder sends it (its decimal text)."""
    text = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(text), text)


def evalsha(sha: str, ks: Sequence[str], args: Sequence[object]) -> bytes:
    """One EVALSHA as RESP bytes."""
    return b"".join(
        (
            b"*%d\r\n" % (3 + len(ks) + len(args)),
            bulk(b"EVALSHA"),
            bulk(sha.encode()),
            bulk_int(len(ks)),
            *(bulk(k.encode()) for k in ks),
            *(bulk(encoded(v)) for v in args),
        )
    )


_BULK_BOOL = (bulk(b"0"), bulk(b"1"))
_UNATTENDED = (*_BULK_BOOL, bulk(b"2"))


# ---- admit.lua -------------------------------------------------------------------------
@dataclass(slots=True)
class AdmitCodec:
    """admit.lua: 6 KEYS (10 for a key of a team), 22 ARGV, a 17-element reply. `args` is
    the generic form (cluster: redis-py routes the script), `command` the same EVALSHA
    pre-encoded: the key's part once per record (the key cache hands out the same record
    until it changes), the request's part per call."""

    ttl_ms: int
    history_ttl_s: int
    claim_ms: int
    _consts: tuple[bytes, bytes, bytes] = field(init=False, repr=False)
    _pieces: dict[str, tuple[KeyRecord, bytes, bytes, bytes, bytes, bytes]] = field(
        init=False, repr=False, default_factory=dict
    )
    _floats: dict[float, bytes] = field(init=False, repr=False, default_factory=dict)
    _texts: dict[str, bytes] = field(init=False, repr=False, default_factory=dict)

    N_ARGS = 28

    def __post_init__(self) -> None:
        self._consts = (
            bulk_int(self.ttl_ms),
            bulk_int(self.history_ttl_s),
            bulk_int(self.claim_ms),
        )

    @staticmethod
    def keys(key_id: str) -> list[str]:
        own = [
            keys.request_bucket(key_id),
            keys.token_bucket(key_id),
            keys.reservations(key_id),
            keys.reservation_expiry(key_id),
            keys.window_prefix(key_id),
            keys.reservation_claims(key_id),
        ]
        team = team_of(key_id)
        if not team:
            return own
        return [
            *own,
            keys.team_limits(team),
            keys.team_request_bucket(team),
            keys.team_token_bucket(team),
            keys.team_window_prefix(team),
        ]

    @staticmethod
    def key_limits(rec: KeyRecord) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """The key's ARGV: (ARGV[4..8] rate .. monthly), (ARGV[10] max_concurrent),
        (ARGV[18] budget), (ARGV[24..25] its end users' daily quota and requests/minute)."""
        # A record stored before its limits were bounded still works: past the bounds a
        # limit means "unlimited" either way, and only bounded numbers stay exact.
        return (
            [
                repr(float(min(rec.rate_per_sec, limits.MAX_RATE_PER_SEC))),
                min(rec.burst, limits.MAX_BURST),
                min(rec.tokens_per_minute or 0, limits.MAX_TOKEN_LIMIT),
                min(rec.daily_limit, limits.MAX_TOKEN_LIMIT),
                min(rec.monthly_limit, limits.MAX_TOKEN_LIMIT),
            ],
            [min(rec.max_concurrent or 0, limits.MAX_CONCURRENT)],
            [round(min(rec.monthly_budget_usd or 0, limits.MAX_BUDGET_USD) * MICROS_PER_USD)],
            [
                min(rec.end_user_daily_limit or 0, limits.MAX_TOKEN_LIMIT),
                min(rec.end_user_requests_per_minute or 0, limits.MAX_END_USER_RPM),
            ],
        )

    def args(self, rec: KeyRecord, req: AdmitRequest, zone: str) -> list[Any]:
        """ARGV[1..28], as admit.lua's header lists them."""
        rate_to_monthly, concurrent, budget, end_user = self.key_limits(rec)
        return [
            req.reservation_id,
            req.prompt_tokens,
            req.completion_tokens,
            *rate_to_monthly,
            repr(float(req.ceiling)),
            *concurrent,
            self.ttl_ms,
            zone,
            int(req.shadow),
            int(req.clamp),
            req.priority,
            req.model,
            self.history_ttl_s,
            *budget,
            req.cost_micros,
            self.claim_ms,
            req.choices,
            int(req.unattended),
            req.end_user_tag,
            *end_user,
            req.idempotency_tag,
            req.body_hash,
            self.ttl_ms,
        ]

    def command(self, sha: str, rec: KeyRecord, req: AdmitRequest, zone: bytes) -> bytes:
        """EVALSHA `sha` with `keys(rec.id)` and `args(...)` as RESP bytes; `zone` is the
        zone argument already encoded (`Zones.arg`)."""
        pieces = self._pieces.get(rec.id)
        if pieces is None or pieces[0] is not rec:
            pieces = self._encode_key_pieces(sha, rec)
        _, head, rate_to_monthly, concurrent, budget, end_user = pieces
        ttl, hist_ttl, claim = self._consts
        return b"".join(
            (
                head,
                bulk(req.reservation_id.encode()),
                bulk_int(req.prompt_tokens),
                bulk_int(req.completion_tokens),
                rate_to_monthly,
                self._float_arg(req.ceiling),
                concurrent,
                ttl,
                zone,
                _BULK_BOOL[bool(req.shadow)],
                _BULK_BOOL[bool(req.clamp)],
                self._text_arg(req.priority),
                self._text_arg(req.model),
                hist_ttl,
                budget,
                bulk_int(req.cost_micros),
                claim,
                bulk_int(req.choices),
                _UNATTENDED[req.unattended],
                bulk(req.end_user_tag.encode()),
                end_user,
                bulk(req.idempotency_tag.encode()),
                bulk(req.body_hash.encode()),
                ttl,
            )
        )

    def _encode_key_pieces(
        self, sha: str, rec: KeyRecord
    ) -> tuple[KeyRecord, bytes, bytes, bytes, bytes, bytes]:
        if len(self._pieces) >= MAX_CACHED_ADMIT_KEYS:
            self._pieces.clear()
        ks = self.keys(rec.id)
        head = [
            b"*%d\r\n" % (3 + len(ks) + self.N_ARGS),
            bulk(b"EVALSHA"),
            bulk(sha.encode()),
            bulk_int(len(ks)),
            *(bulk(k.encode()) for k in ks),
        ]
        rate_to_monthly, concurrent, budget, end_user = (
            b"".join(bulk(encoded(v)) for v in part) for part in self.key_limits(rec)
        )
        pieces = (rec, b"".join(head), rate_to_monthly, concurrent, budget, end_user)
        self._pieces[rec.id] = pieces
        return pieces

    def _float_arg(self, value: float) -> bytes:
        arg = self._floats.get(value)
        if arg is None:
            arg = bulk(repr(float(value)).encode())
            if len(self._floats) < 64:  # the ceilings: one per priority
                self._floats[value] = arg
        return arg

    def _text_arg(self, value: str) -> bytes:
        """Priorities and folded model names: few distinct values (bounded all the same)."""
        arg = self._texts.get(value)
        if arg is None:
            arg = bulk(value.encode())
            if len(self._texts) >= 1024:
                self._texts.clear()
            self._texts[value] = arg
        return arg

    @staticmethod
    def decode(r: Sequence[Any], rec: KeyRecord) -> Admission:
        granted = int(r[3])
        return Admission(
            admitted=bool(int(r[0])),
            reason=str(r[1]),
            retry_after_ms=int(r[2]),
            granted_completion=None if granted < 0 else granted,
            reserved=int(r[4]),
            requests_remaining=int(r[5]),
            requests_reset_ms=int(r[6]),
            tokens_remaining=None if not rec.tokens_per_minute else int(r[7]),
            tokens_reset_ms=int(r[8]),
            day_used=int(r[9]),
            day_reserved=int(r[10]),
            day_reset_s=int(r[11]),
            month_used=int(r[12]),
            month_reserved=int(r[13]),
            month_reset_s=int(r[14]),
            now_ms=int(r[15]),
            month_spend_micros=int(r[16]),
            replay=str(r[17]),
        )


# ---- settle.lua ------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class SettleCodec:
    """settle.lua: 5 KEYS (8 for a key of a team), 17 ARGV; replies {status, charged,
    refunded, now_ms, hour}."""

    history_ttl_s: int
    counts_cached: bool
    idempotency_ttl_s: int = 86_400

    @staticmethod
    def keys(key_id: str) -> list[str]:
        own = [
            keys.reservations(key_id),
            keys.reservation_expiry(key_id),
            keys.token_bucket(key_id),
            keys.window_prefix(key_id),
            keys.reservation_claims(key_id),
        ]
        team = team_of(key_id)
        if not team:
            return own
        return [
            *own,
            keys.team_limits(team),
            keys.team_token_bucket(team),
            keys.team_window_prefix(team),
        ]

    def args(self, s: Settlement, zone: str) -> list[int | str]:
        """ARGV[1..17]; `zone` is the default zone argument (for a key with none stored)."""
        return [
            s.reservation_id,
            s.prompt_tokens,
            s.completion_tokens,
            zone,
            min(max(0, s.tokens_per_minute), limits.MAX_TOKEN_LIMIT),
            int(s.exact),
            DONE_MARKER_TTL_S,
            self.history_ttl_s,
            max(0, s.cost_micros),
            s.cached_tokens,
            s.cache_write_tokens,
            s.reasoning_tokens,
            int(self.counts_cached),
            s.idempotency_tag,
            s.idempotency,
            s.response,
            self.idempotency_ttl_s,
        ]

    @staticmethod
    def decode(r: Sequence[Any]) -> tuple[SettleResult, str]:
        """(the result, the history hour it was charged in: `YYYYMMDDHH`)."""
        return SettleResult(status=str(r[0]), charged=int(r[1]), refunded=int(r[2])), str(r[4])


# ---- reap.lua --------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class ReapCodec:
    """reap.lua: 4 KEYS (5 for a key of a team), 5 ARGV; replies {reaped, charged,
    released, abandoned, malformed, [rid, charged, claimed, priority, model, ...]}."""

    history_ttl_s: int

    @staticmethod
    def keys(key_id: str) -> list[str]:
        own = [
            keys.reservations(key_id),
            keys.reservation_expiry(key_id),
            keys.window_prefix(key_id),
            keys.reservation_claims(key_id),
        ]
        team = team_of(key_id)
        return [*own, keys.team_window_prefix(team)] if team else own

    def args(self, zone: str, *, charge: bool) -> list[int | str]:
        return [zone, int(charge), REAP_BATCH, DONE_MARKER_TTL_S, self.history_ttl_s]

    @staticmethod
    def totals(
        rows: Sequence[Sequence[Any]], *, failed_keys: int = 0, key_ids: Sequence[str] = ()
    ) -> ReapTotals:
        """The replies summed; `key_ids` (the keys of `rows`, in order) names each
        reservation reaped."""
        lost = []
        for n, r in enumerate(rows):
            flat, kid = r[5], key_ids[n] if n < len(key_ids) else ""
            for i in range(0, len(flat) - 4, 5):
                rid, charged, claimed, priority, model = flat[i : i + 5]
                lost.append(
                    (kid, str(rid), int(charged), int(claimed) == 1, str(priority), str(model))
                )
        return ReapTotals(
            lost=tuple(lost),
            reaped=sum(int(r[0]) for r in rows),
            charged=sum(int(r[1]) for r in rows),
            released=sum(int(r[2]) for r in rows),
            abandoned=sum(int(r[3]) for r in rows),
            failed_keys=failed_keys,
            malformed=sum(int(r[4]) for r in rows),
        )


# ---- lease.lua and release.lua ---------------------------------------------------------
def _claim_keys(key_id: str) -> list[str]:
    return [
        keys.reservations(key_id),
        keys.reservation_expiry(key_id),
        keys.reservation_claims(key_id),
    ]


@dataclass(slots=True, frozen=True)
class LeaseCodec:
    """lease.lua: 3 KEYS; ARGV[1] ttl ms, ARGV[2..] reservation ids; replies a count."""

    ttl_ms: int

    keys = staticmethod(_claim_keys)

    def args(self, rids: Collection[str]) -> list[int | str]:
        return [self.ttl_ms, *rids]

    @staticmethod
    def decode(rows: Sequence[Any]) -> int:
        return sum(int(r) for r in rows)


@dataclass(slots=True, frozen=True)
class ReleaseCodec:
    """release.lua: 3 KEYS; ARGV[1..] reservation ids; replies a count."""

    keys = staticmethod(_claim_keys)

    @staticmethod
    def args(rids: Collection[str]) -> list[int | str]:
        return list(rids)

    @staticmethod
    def decode(rows: Sequence[Any]) -> int:
        return sum(int(r) for r in rows)

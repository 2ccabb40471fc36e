"""The request log's record: one per request Atlas decided (admitted and settled, or refused),
never its prompt or completion text. Written in batches off the request path
(atlas/requestlog_writer.py), stored one Redis stream per UTC day (atlas/ledger/redis/
requestlog.py), read by admins (admin/routes/requests.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from atlas.limits import MAX_END_USER_CHARS

#: Strings a record keeps at most (client input: models, end users).
MAX_FIELD_CHARS = 200

#: What became of the request.
#: (`replayed`: a duplicate answered from its Idempotency-Key's stored response.)
OUTCOMES = (
    "completed",
    "upstream_error",
    "disconnected",
    "released",
    "refused",
    "reaped",
    "replayed",
)


@dataclass(slots=True)
class RequestRecord:
    at_ms: int  # when the request started (reached Atlas), epoch ms
    request_id: str  # the reservation id ("" for a refusal)
    key_id: str = ""  # "" when no key was identified (a 401)
    team: str = ""
    app: str = ""
    end_user: str = ""
    model: str = ""
    provider: str = ""
    member: str = ""
    status: int = 0  # HTTP status the client got (0: unknown, e.g. a hang-up)
    outcome: str = "completed"
    reason: str = ""  # the refusal's code (rate_limit_requests, team_quota_daily, ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    exact: bool = True  # counts from the upstream's usage (False: estimated)
    cost_micros: int = 0  # spend, USD millionths
    latency_ms: int = 0
    priority: str = ""
    stream: bool = False

    def row(self) -> list[object]:
        """The record's values in COLUMNS order (strings bounded; bools as 0/1): one row of a
        batch entry (atlas/ledger/redis/requestlog.py)."""
        out: list[object] = []
        for name, kind in _KINDS:
            v = getattr(self, name)
            if kind == "str":
                out.append(v[: MAX_END_USER_CHARS if name == "end_user" else MAX_FIELD_CHARS])
            else:
                out.append(int(v))
        return out

    @classmethod
    def from_row(cls, columns: Sequence[str], row: Sequence[object]) -> RequestRecord:
        """The record of a stored row written with `columns` (an older or newer writer's
        columns: unknown ones ignored, missing ones defaulted; a value of the wrong type is
        defaulted too)."""
        kw: dict[str, object] = {"at_ms": 0, "request_id": ""}
        for name, v in zip(columns, row, strict=False):
            kind = _KIND_OF.get(name)
            if kind == "str" and isinstance(v, str):
                kw[name] = v[:MAX_FIELD_CHARS]
            elif kind == "int" and type(v) is int:
                kw[name] = v
            elif kind == "bool" and type(v) is int:
                kw[name] = v == 1
        return cls(**kw)  # type: ignore[arg-type]

    @property
    def day(self) -> str:
        """The UTC day (`YYYYMMDD`) whose stream holds it."""
        return datetime.fromtimestamp(self.at_ms / 1000, UTC).strftime("%Y%m%d")


#: Each field's name and type name ("str", "int", "bool"), read once: the annotations are
#: strings (`from __future__ import annotations`).
_KINDS: tuple[tuple[str, str], ...] = tuple(
    (f.name, str(f.type)) for f in dataclasses.fields(RequestRecord)
)
_KIND_OF = dict(_KINDS)
#: The names of a row's values, in order (stored once per batch entry).
COLUMNS: tuple[str, ...] = tuple(name for name, _ in _KINDS)

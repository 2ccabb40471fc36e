"""The request log: one record per request (atlas/requestlog.py), newest first, filtered and
paged; exported as CSV or JSON lines. Days are read newest first, each one stream; a query
reads at most MAX_SCAN records (then its cursor continues where it stopped)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from admin.deps import AdminDep, LedgerDep, SettingsDep
from atlas.ledger.admin_protocol import RequestLog
from atlas.requestlog import OUTCOMES, RequestRecord
from atlas.settings import Settings

router = APIRouter(prefix="/v1/admin/requests", tags=["request log"])

#: Records one query reads at most (filters may match few of them).
MAX_SCAN = 50_000
#: Rows one export writes at most.
MAX_EXPORT_ROWS = 100_000
#: Entries read from Redis per round trip (an entry is one writer's batch: 1 to 500 records).
PAGE = 50
#: How far another host's clock may be behind Redis's (a record's time is its host's), ms.
CLOCK_SLACK_MS = 60_000
CURSOR = r"^\d{8}/\d{1,20}-\d{1,20}/\d{1,4}$"
Outcome = Literal[
    "completed", "upstream_error", "disconnected", "released", "refused", "reaped", "replayed"
]
assert set(OUTCOMES) == set(Outcome.__args__)  # type: ignore[attr-defined]
Text = Annotated[str | None, Query(max_length=200)]


class RequestOut(BaseModel):
    at: datetime
    request_id: str
    key_id: str
    team: str
    app: str
    end_user: str
    model: str
    provider: str
    member: str
    status: int
    outcome: str
    reason: str = Field(description="The refusal's code (or a shadow verdict); '' if none")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    exact: bool = Field(description="Counts from the upstream's usage; false: estimated")
    spend_usd: float
    latency_ms: int
    priority: str
    stream: bool

    @classmethod
    def of(cls, r: RequestRecord) -> RequestOut:
        return cls(
            at=datetime.fromtimestamp(r.at_ms / 1000, UTC),
            **{k: getattr(r, k) for k in cls.model_fields if k not in ("at", "spend_usd")},
            spend_usd=r.cost_micros / 1_000_000,
        )


class RequestLogList(BaseModel):
    items: list[RequestOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page")


@dataclass(frozen=True, slots=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    key_id: str | None = None
    team: str | None = None
    app: str | None = None
    end_user: str | None = None
    model: str | None = None
    provider: str | None = None
    status: int | None = None
    outcome: str | None = None
    exact: bool | None = None

    def match(self, r: RequestRecord) -> bool:
        for name in ("key_id", "team", "app", "end_user", "model", "provider", "status"):
            want = getattr(self, name)
            if want is not None and getattr(r, name) != want:
                return False
        return (self.outcome is None or r.outcome == self.outcome) and (
            self.exact is None or r.exact == self.exact
        )


def filters(
    since: Annotated[
        datetime | None, Query(description="ISO time; default: the log's start")
    ] = None,
    until: Annotated[datetime | None, Query(description="ISO time; default: now")] = None,
    key_id: Text = None,
    team: Text = None,
    app: Text = None,
    end_user: Text = None,
    model: Text = None,
    provider: Text = None,
    status: Annotated[int | None, Query(ge=0, le=599)] = None,
    outcome: Outcome | None = None,
    exact: bool | None = None,
) -> Filters:
    return Filters(
        since, until, key_id, team, app, end_user, model, provider, status, outcome, exact
    )


FiltersDep = Annotated[Filters, Depends(filters)]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _cursor_day(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "cursor"), "msg": "not a cursor"}]
        ) from None


async def _scan(
    log: RequestLog, f: Filters, settings: Settings, cursor: str | None, budget: int
) -> AsyncIterator[tuple[str, RequestRecord | None]]:
    """(cursor, record) for each matching record, newest logged first; at the end of
    `budget` reads one (cursor, None) to continue from (none when the log is exhausted).
    A record's time is when its request started; it is logged (an entry of its day's
    stream) when it ended, so entries are read from `until` plus the longest a request
    can run, and a day ends at the first entry older than `since`."""
    now = datetime.now(UTC)
    until = min(_aware(f.until), now) if f.until else now
    oldest = now - timedelta(days=settings.request_log_days + 1)
    since = max(_aware(f.since), oldest) if f.since else oldest
    since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000)
    top = None if f.until is None else f"{until_ms + 1000 * settings.reservation_ttl_s}-0"
    day = until.replace(hour=0, minute=0, second=0, microsecond=0)
    resume: tuple[str, int] | None = None  # (entry id, its records not read yet)
    if cursor:  # "<day>/<entry id>/<records of it left>" (checked by the route)
        day_text, entry, unread = cursor.split("/")
        at = _cursor_day(day_text)
        if at <= day:  # (a cursor beyond `until` starts at `until`)
            day, resume = at, (entry, int(unread))
    read = 0
    while day.date() >= since.date():
        name = day.strftime("%Y%m%d")
        before = _just_after(resume[0]) if resume else top
        while True:
            rows = await log.request_log_page(name, before, PAGE)
            for rid, recs in rows:
                if int(rid.split("-")[0]) < since_ms - CLOCK_SLACK_MS:
                    return
                left = len(recs)
                if resume is not None and rid == resume[0]:
                    left = min(left, resume[1])
                resume = None
                for i in range(left - 1, -1, -1):
                    if read >= budget:
                        yield f"{name}/{rid}/{i + 1}", None
                        return
                    read += 1
                    rec = recs[i]
                    if since_ms <= rec.at_ms <= until_ms and f.match(rec):
                        yield f"{name}/{rid}/{i}", rec
            if len(rows) < PAGE:
                break
            before = rows[-1][0]
        day -= timedelta(days=1)
        resume = None


def _just_after(entry: str) -> str:
    """The stream id right after `entry` (reading before it includes `entry`)."""
    ms, seq = entry.split("-")
    return f"{ms}-{int(seq) + 1}"


@router.get("", response_model=RequestLogList)
async def request_log(
    _: AdminDep,
    ledger: LedgerDep,
    settings: SettingsDep,
    f: FiltersDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=CURSOR, max_length=64)] = None,
) -> RequestLogList:
    """Request records, newest first, matching every filter given."""
    items: list[RequestOut] = []
    async for at, rec in _scan(ledger, f, settings, cursor, MAX_SCAN):
        if rec is None:
            return RequestLogList(items=items, next_cursor=at)
        items.append(RequestOut.of(rec))
        if len(items) == limit:
            return RequestLogList(items=items, next_cursor=at)
    return RequestLogList(items=items, next_cursor=None)


@router.get("/export")
async def export_request_log(
    _: AdminDep,
    ledger: LedgerDep,
    settings: SettingsDep,
    f: FiltersDep,
    format: Literal["csv", "jsonl"] = "csv",
) -> StreamingResponse:
    """Every matching record (at most MAX_EXPORT_ROWS), newest first, as CSV or JSON lines."""
    columns = list(RequestOut.model_fields)

    async def rows() -> AsyncIterator[str]:
        if format == "csv":
            yield ",".join(columns) + "\r\n"
        n = 0
        async for _, rec in _scan(ledger, f, settings, None, MAX_EXPORT_ROWS):
            if rec is None or n >= MAX_EXPORT_ROWS:
                return
            out = RequestOut.of(rec).model_dump(mode="json")
            n += 1
            if format == "jsonl":
                yield json.dumps(out, separators=(",", ":")) + "\n"
            else:
                buf = io.StringIO()
                csv.writer(buf).writerow([out[c] for c in columns])
                yield buf.getvalue()

    media = "text/csv" if format == "csv" else "application/x-ndjson"
    name = f"atlas-requests.{format}"
    return StreamingResponse(
        rows(), media_type=media, headers={"content-disposition": f"attachment; filename={name}"}
    )

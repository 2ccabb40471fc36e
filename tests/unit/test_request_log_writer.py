"""The request log's record and its batched writer: rows round-trip, strings bounded, the
buffer keeps the newest while the store is away, scopes for the alerter are marked."""

from __future__ import annotations

import json
from collections.abc import Sequence

from atlas.errors import LedgerUnavailable
from atlas.requestlog import COLUMNS, MAX_FIELD_CHARS, RequestRecord
from atlas.requestlog_writer import RequestLogWriter


class Store:
    def __init__(self) -> None:
        self.batches: list[tuple[list[RequestRecord], list[str]]] = []
        self.down = False

    async def log_requests(self, records: Sequence[RequestRecord], dirty: Sequence[str]) -> None:
        if self.down:
            raise LedgerUnavailable("down")
        self.batches.append((list(records), list(dirty)))

    async def request_log_page(
        self, day: str, before: str | None, count: int
    ) -> list[tuple[str, list[RequestRecord]]]:
        return []


def rec(i: int, **kw: object) -> RequestRecord:
    return RequestRecord(at_ms=1_764_000_000_000 + i, request_id=f"r{i}", **kw)  # type: ignore[arg-type]


def test_rows_round_trip_and_are_bounded() -> None:
    r = rec(1, key_id="key_a.eng", team="eng", model="m" * 1000, exact=False, stream=True)
    back = RequestRecord.from_row(COLUMNS, json.loads(json.dumps(r.row())))
    assert back.model == "m" * MAX_FIELD_CHARS
    assert (back.exact, back.stream, back.team, back.at_ms) == (False, True, "eng", r.at_ms)
    assert rec(0).day == "20251124"


def test_a_row_of_other_columns_or_wrong_types_reads_defaulted() -> None:
    """Another version's writer (columns added, dropped, reordered) or a damaged row."""
    back = RequestRecord.from_row(["junk", "status", "model", "exact"], [1, "x", 7, 1])
    assert (back.status, back.model, back.exact, back.at_ms) == (0, "", True, 0)
    short = RequestRecord.from_row(["at_ms", "request_id", "status"], [5, "r5"])
    assert (short.at_ms, short.request_id, short.status) == (5, "r5", 0)


async def test_batches_mark_scopes_and_keep_the_newest_while_down() -> None:
    store = Store()
    w = RequestLogWriter(store, service="test", max_batch=2, max_buffer=3)
    w.add(rec(1, key_id="a", team="t"))
    w.add(rec(2, key_id="b"))
    w.add(rec(3))
    assert await w.flush() == 3
    assert [len(b) for b, _ in store.batches] == [2, 1]
    assert store.batches[0][1] == ["key:a", "key:b", "team:t"]
    store.down = True
    for i in range(4, 9):
        w.add(rec(i))
    assert await w.flush() == 0
    assert w.pending == 3
    store.down = False
    assert await w.flush() == 3
    assert [r.request_id for b, _ in store.batches[2:] for r in b] == ["r6", "r7", "r8"]

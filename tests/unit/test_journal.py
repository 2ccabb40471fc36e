"""The settlement journal: bounded, replayed exactly once per entry, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import REGISTRY

from atlas.errors import LedgerUnavailable
from atlas.ledger.protocol import LedgerInputError, Settlement, SettleResult
from extproc.journal import SettlementJournal


def s(rid: str) -> Settlement:
    return Settlement("key_1", rid, 10, 20, "m", True, "completed", 0, 30)


async def test_replay_settles_in_order_and_keeps_what_still_fails(tmp_path: Path) -> None:
    j = SettlementJournal(tmp_path / "j.journal", max_bytes=1 << 20)
    for rid in ("a", "b", "c"):
        assert j.append(s(rid))
    seen: list[str] = []

    async def flaky(x: Settlement) -> SettleResult:
        if x.reservation_id == "b":
            raise LedgerUnavailable("down")
        seen.append(x.reservation_id)
        return SettleResult("settled", 30, 0)

    assert await j.replay(flaky) == 1
    assert [e.reservation_id for e in j.entries()] == ["b", "c"]

    async def ok(x: Settlement) -> SettleResult:
        seen.append(x.reservation_id)
        if x.reservation_id == "b":
            j.append(s("d"))  # a settlement journaled while the replay runs
        return SettleResult("settled", 30, 0)

    assert await j.replay(ok) == 2
    assert [e.reservation_id for e in j.entries()] == ["d"]
    assert await j.replay(ok) == 1
    assert seen == ["a", "b", "c", "d"] and j.entries() == [] and j.size() == 0
    assert await j.replay(ok) == 0


def test_journal_is_bounded_and_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    j = SettlementJournal(path, max_bytes=400)
    written = sum(j.append(s(str(i))) for i in range(10))
    assert 0 < written < 10 and j.size() <= 400
    with path.open("ab") as f:
        f.write(b"{not json\n")
    assert len(j.entries()) == written


async def test_a_poisoned_entry_is_set_aside_and_the_rest_replayed(tmp_path: Path) -> None:
    """An entry no ledger takes (numbers beyond the bounds, a line that is no settlement)
    used to stop the replay there forever, holding every later settlement of every key."""
    j = SettlementJournal(tmp_path / "j.journal", max_bytes=1 << 20)
    assert j.append(s("a"))
    assert j.append(Settlement("key_1", "poison", 10, 10**14, "m", True, "completed"))
    with j.path.open("ab") as f:
        f.write(b'{"key_id": "key_1"}\n')  # JSON, but no settlement
    assert j.append(s("c"))
    seen: list[str] = []

    async def ledger(x: Settlement) -> SettleResult:
        if x.completion_tokens > 10**13:
            raise LedgerInputError("completion_tokens out of bounds")
        seen.append(x.reservation_id)
        return SettleResult("settled", 30, 0)

    before = (
        REGISTRY.get_sample_value("atlas_journal_settlements_total", {"event": "rejected"}) or 0
    )
    assert await j.replay(ledger) == 2
    assert seen == ["a", "c"] and j.entries() == []
    rejected = [json.loads(line) for line in j.rejected_path.read_text().splitlines()]
    assert [r["reason"].split()[0] for r in rejected] == ["completion_tokens", "unreadable"]
    assert '"poison"' in rejected[0]["line"]
    after = REGISTRY.get_sample_value("atlas_journal_settlements_total", {"event": "rejected"})
    assert after == before + 2

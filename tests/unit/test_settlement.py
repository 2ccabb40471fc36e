"""Cached, cache-write and reasoning tokens in settlements (extproc/settlement.py), from an
ext_proc exchange to the journal and the metrics, without Redis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.grant import Grant
from atlas.ledger.protocol import (
    LedgerInputError,
    Settlement,
    SettleOutcome,
    SettleResult,
    check_settlement,
)
from atlas.pricing import ModelPrice, PriceBook
from extproc.exchange import Exchange
from extproc.journal import SettlementJournal
from extproc.settlement import settlement_for
from extproc.settler import MAX_BATCH, Finished, Settler
from extproc.usage import Usage
from tests.unit.fakes import FakeLedger

GRANT = Grant(key_id="key_s", reservation_id="r1", reserved=500, prompt_estimate=9, model="m")
PRICES = PriceBook({"m": ModelPrice(prompt=2, completion=8, cached_prompt=0.5, reasoning=4)})


def settle(details: Usage | None, prompt: int = 100, completion: int = 40) -> Settlement:
    return settlement_for(
        GRANT,
        model="m",
        prompt=prompt,
        completion=completion,
        exact=True,
        outcome="completed",
        prices=PRICES,
        details=details,
    )


def test_details_are_recorded_and_priced() -> None:
    s = settle(Usage(cached_tokens=80, reasoning_tokens=30, cache_write_tokens=15))
    assert (s.cached_tokens, s.cache_write_tokens, s.reasoning_tokens) == (80, 15, 30)
    assert s.cost_micros == 5 * 2 + 80 * 0.5 + 15 * 2 + 10 * 8 + 30 * 4
    check_settlement(s)


def test_without_details_the_parts_are_zero() -> None:
    s = settle(None)
    assert (s.cached_tokens, s.cache_write_tokens, s.reasoning_tokens) == (0, 0, 0)
    assert s.cost_micros == 100 * 2 + 40 * 8
    s = settle(Usage(prompt_tokens=100))  # details not reported: None, not 0
    assert (s.cached_tokens, s.reasoning_tokens) == (0, 0)


def test_details_beyond_their_whole_are_cut_to_fit() -> None:
    s = settle(Usage(cached_tokens=150, cache_write_tokens=10, reasoning_tokens=99))
    assert (s.cached_tokens, s.cache_write_tokens, s.reasoning_tokens) == (100, 0, 40)
    check_settlement(s)
    s = settle(Usage(cached_tokens=70, cache_write_tokens=50))
    assert (s.cached_tokens, s.cache_write_tokens) == (70, 30)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cached_tokens", 101, "cached_tokens"),
        ("cached_tokens", -1, "cached_tokens"),
        ("cache_write_tokens", 1, "cache_write_tokens"),  # with 100 cached already
        ("reasoning_tokens", 41, "reasoning_tokens"),
    ],
)
def test_the_ledger_refuses_parts_outside_their_whole(field: str, value: int, message: str) -> None:
    s = replace(settle(None), cached_tokens=100)
    with pytest.raises(LedgerInputError, match=message):
        check_settlement(replace(s, **{field: value}))


def _exchange() -> Exchange:
    ex = Exchange()
    ex.start(GRANT, "/v1/chat/completions")
    ex.on_request_body(json.dumps({"model": "m"}).encode())
    return ex


def test_an_exchange_settles_the_details_of_a_json_body() -> None:
    ex = _exchange()
    ex.on_response_headers(
        {":status": "200", "content-type": "application/json", "content-length": "300"}, False
    )
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "total_tokens": 140,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 32},
    }
    ex.on_response_body(json.dumps({"usage": usage}).encode(), True)
    s = ex.settlement(PRICES)
    assert s is not None and s.exact
    assert (s.prompt_tokens, s.completion_tokens, s.cached_tokens, s.reasoning_tokens) == (
        100,
        40,
        64,
        32,
    )
    assert s.cost_micros == 36 * 2 + 32 + 8 * 8 + 32 * 4


def test_an_exchange_settles_the_details_of_a_stream() -> None:
    ex = _exchange()
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    usage = {
        "input_tokens": 12,
        "output_tokens": 7,
        "total_tokens": 19,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens_details": {"reasoning_tokens": 5},
    }
    chunk = {"id": "c", "choices": [], "usage": usage}
    ex.on_response_body(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n", True)
    s = ex.settlement()
    assert s is not None and s.exact and (s.cached_tokens, s.reasoning_tokens) == (8, 5)


def test_estimates_and_upstream_errors_carry_no_details() -> None:
    err = _exchange()
    err.on_response_headers({":status": "500", "content-type": "application/json"}, False)
    body = {"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 5}}}
    err.on_response_body(json.dumps(body).encode(), True)
    s = err.settlement()
    assert s is not None and s.outcome == "upstream_error" and s.cached_tokens == 0
    cut = _exchange()
    cut.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    cut.on_response_body(b'data: {"choices":[{"delta":{"content":"hello"}}]}\n\n', False)
    s = cut.settlement()
    assert s is not None and not s.exact and (s.cached_tokens, s.reasoning_tokens) == (0, 0)


def test_the_journal_keeps_the_details_and_reads_entries_written_before_them(
    tmp_path: Path,
) -> None:
    j = SettlementJournal(tmp_path / "j.jsonl", max_bytes=1 << 20)
    s = settle(Usage(cached_tokens=80, reasoning_tokens=30, cache_write_tokens=15))
    assert j.append(s)
    old = {
        "key_id": "key_s",
        "reservation_id": "r0",
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "model": "m",
        "exact": True,
        "outcome": "completed",
        "tokens_per_minute": 0,
        "cost_micros": 0,
    }
    with j.path.open("a") as f:
        f.write(json.dumps(old) + "\n")
    first, second = j.entries()
    assert first == s
    assert (second.reservation_id, second.cached_tokens, second.reasoning_tokens) == ("r0", 0, 0)


def _tokens(key_id: str) -> dict[str, float]:
    return {
        sample.labels["kind"]: sample.value
        for family in metrics.TOKENS_USED.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("key_id") == key_id
    }


async def test_metrics_count_tokens_by_kind() -> None:
    ledger = FakeLedger()
    settler = Settler(ledger)
    detailed = settle(Usage(cached_tokens=80, reasoning_tokens=30, cache_write_tokens=15))
    settler.submit(replace(detailed, key_id="key_kinds"), None)
    settler.submit(replace(settle(None), key_id="key_plain", reservation_id="r2"), None)
    await settler.drain()
    assert _tokens("key_kinds") == {
        "prompt": 100,
        "completion": 40,
        "cached": 80,
        "cache_write": 15,
        "reasoning": 30,
    }
    # A key whose upstream reports no parts gets no series for them.
    assert _tokens("key_plain") == {"prompt": 100, "completion": 40}


class FlakyBatches(FakeLedger):
    """settle_many answers from a script: each entry a whole-batch outage or per-item ends."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = script
        self.calls: list[list[str]] = []

    async def settle_many(self, ss: Sequence[Settlement]) -> list[SettleOutcome]:
        self.calls.append([s.reservation_id for s in ss])
        step = self.script.pop(0) if self.script else None
        if isinstance(step, LedgerUnavailable):
            raise step
        out: list[SettleOutcome] = []
        for s in ss:
            end = (step or {}).get(s.reservation_id)
            out.append(end if end is not None else SettleResult("settled", 1, 0))
        return out


def _batch(*rids: str) -> list[Finished]:
    return [Finished(replace(settle(None), reservation_id=r), None) for r in rids]


async def test_a_batch_retries_only_what_redis_did_not_take_then_journals_it(
    tmp_path: Path,
) -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    # One settlement's script met a busy server, one was refused: only the first is retried.
    ledger = FlakyBatches([{"a": LedgerUnavailable("BUSY"), "b": LedgerInputError("big")}])
    settler = Settler(ledger, sleep=sleep)
    settler.submit_many(_batch("a", "b", "c"))
    await settler.drain()
    assert ledger.calls == [["a", "b", "c"], ["a"]] and slept == [0.05]
    # However many Envoy sends at once, one round trip carries at most MAX_BATCH.
    ledger = FlakyBatches([])
    many = Settler(ledger)
    many.submit_many(_batch(*(f"r{i}" for i in range(MAX_BATCH + 3))))
    await many.drain()
    assert [len(c) for c in ledger.calls] == [MAX_BATCH, 3]
    # Redis gone for every attempt: the whole batch goes to the journal, once each.
    journal = SettlementJournal(tmp_path / "j.jsonl", max_bytes=1 << 20)
    down = LedgerUnavailable("down")
    ledger = FlakyBatches([down, down, down])
    settler = Settler(ledger, journal=journal, sleep=sleep)
    settler.submit_many(_batch("d", "e"))
    await settler.drain()
    assert len(ledger.calls) == 3
    kept: list[str] = []

    async def replay(s: Settlement) -> SettleResult:
        kept.append(s.reservation_id)
        return SettleResult("settled", 1, 0)

    await journal.replay(replay)
    assert kept == ["d", "e"]

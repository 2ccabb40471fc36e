"""Calibrated token estimate by character class, for when no tokenizer is loaded or the text is
too long to tokenize on the request path. It estimates cl100k_base counts.

How it works. The text's UTF-8 bytes are mapped to 19 byte classes with a single
`bytes.translate` (ASCII lower/upper letters, digits, punctuation, spaces, newlines, the lead
bytes of accented Latin, Cyrillic, Greek, Arabic/Hebrew, Indic, CJK, Hangul and 4-byte characters
such as emoji, and continuation bytes). numpy then counts adjacent class pairs (one `bincount`).
Most features are sums over those pair counts, so that part of the estimate is one dot product:

* characters of each class: CJK, Hangul, Indic and emoji cost one or more tokens each; Latin
  letters only a little, since BPE merges them;
* word starts (a letter after a non-letter): cl100k makes about one token per common word, with
  its leading space; `camel` (a lower→upper change) splits identifiers;
* runs: digits go in groups of up to 3, a run of punctuation is usually one token (with a
  leading space and trailing newlines), a newline run is one token, and a space before a digit
  is its own token;
* what the pair counts cannot see: runs of 2+ spaces (one token whatever their length:
  indentation, aligned columns), words of 12+ bytes (compounds cost more), and accent density
  (Latin text with accents is not English: its words cost more).

The estimate is kept between bytes / 128 (cl100k's longest token is 128 bytes) and bytes (a
token is at least one byte): no input, however odd, is estimated outside what it can cost.

The coefficients below were fitted by `scripts/fit_estimator.py` on
`tests/data/corpus/fit.jsonl`; the held-out errors are in docs/benchmarks.md
(`python -m bench --only estimation`), with the CPU cost per KB.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# ---- byte classes --------------------------------------------------------------------------

SP, NL, LOW, UP, DIG, PUN, C_EA, C_UM, CONT, L1, LATX, CYR, GRK, ARB, IND, SYM, CJK, HANG, AST = (
    range(19)
)
#: Number of byte classes; pair codes are prev * K + cur.
K = 19
CLASS_NAMES = (
    "space",
    "newline",
    "lower",
    "upper",
    "digit",
    "punct",
    "cont-é",
    "cont-ä",
    "cont",
    "latin1",
    "latin-ext",
    "cyrillic",
    "greek",
    "arabic",
    "indic",
    "symbol",
    "cjk",
    "hangul",
    "astral",
)


def _byte_class(b: int) -> int:
    if b in (0x20, 0x09):
        return SP
    if b in (0x0A, 0x0B, 0x0C, 0x0D):
        return NL
    if 0x61 <= b <= 0x7A:
        return LOW
    if 0x41 <= b <= 0x5A:
        return UP
    if 0x30 <= b <= 0x39:
        return DIG
    if b < 0x80:  # other ASCII, controls and NUL included: the tokenizer's "punctuation"
        return PUN
    if b in (0xA8, 0xA9):  # after 0xC3: è é
        return C_EA
    if b in (0xA4, 0xB6, 0xBC, 0x9F):  # after 0xC3: ä ö ü ß
        return C_UM
    if b <= 0xBF:
        return CONT
    if b == 0xC3:  # U+00C0..00FF: Latin-1 letters
        return L1
    if 0xC4 <= b <= 0xC9:  # U+0100..027F: Latin Extended
        return LATX
    if 0xD0 <= b <= 0xD4:  # U+0400..052F
        return CYR
    if 0xCD <= b <= 0xCF:  # U+0340..03FF
        return GRK
    if 0xCA <= b <= 0xCC or 0xD5 <= b <= 0xDF:  # IPA, diacritics, Armenian..Thaana
        return ARB
    if b == 0xE0:  # U+0800..0FFF: Devanagari and the other Indic scripts, Thai, Tibetan
        return IND
    if 0xE3 <= b <= 0xE9:  # U+3000..9FFF: CJK punctuation, kana, Han
        return CJK
    if 0xEA <= b <= 0xED:  # U+A000..DFFF: Hangul syllables (and lone surrogates)
        return HANG
    if b >= 0xF0:  # 4-byte characters: emoji, rare Han
        return AST
    return SYM  # U+0080..00BF, U+1000..2FFF (punctuation, symbols), U+E000..FFFF


#: `bytes.translate` table: byte -> class.
CLASS_TABLE = bytes(_byte_class(b) for b in range(256))
_WORDISH = (LOW, UP, L1, LATX, CYR, GRK, ARB, C_EA, C_UM, CONT)
#: For long words: letter and continuation bytes -> b"w", anything else -> b".".
_WORD_TABLE = bytes(0x77 if c in _WORDISH else 0x2E for c in CLASS_TABLE)

#: Classes that start a word (the tokenizer's \p{L}) and those that continue one.
WORD = (LOW, UP, L1, LATX, CYR, GRK, ARB)
_IN_WORD = (*WORD, C_EA, C_UM, CONT)
LONG_WORD_BYTES = 12
#: Accented-letter share of Latin letters at which text counts as fully non-English.
ACCENT_SATURATION = 0.02

# ---- features ------------------------------------------------------------------------------

#: Features that are sums over class pairs (prev, cur): name -> predicate. Unigram counts are
#: pair counts summed over `prev`; the first byte is paired with a virtual newline.
PAIR_FEATURES: dict[str, Callable[[int, int], bool]] = {
    "letters": lambda p, c: c in (LOW, UP),
    "words": lambda p, c: c in WORD and p not in _IN_WORD,
    "camel": lambda p, c: p == LOW and c == UP,
    "upper_runs": lambda p, c: c == UP and p != UP,
    "digits": lambda p, c: c == DIG,
    "digit_runs": lambda p, c: c == DIG and p != DIG,
    "space_digit": lambda p, c: p == SP and c == DIG,
    "punct": lambda p, c: c == PUN,
    "punct_runs": lambda p, c: c == PUN and p != PUN,
    "punct_word": lambda p, c: p == PUN and c in WORD,
    "spaces": lambda p, c: c == SP,
    "indents": lambda p, c: p == NL and c == SP,
    "newline_runs": lambda p, c: c == NL and p != NL,
    "punct_newline": lambda p, c: p == PUN and c == NL,
    "accented": lambda p, c: c in (L1, LATX),
    "e_grave_acute": lambda p, c: p == L1 and c == C_EA,
    "umlauts": lambda p, c: p == L1 and c == C_UM,
    "cyrillic_words": lambda p, c: c == CYR and p not in (CYR, C_EA, C_UM, CONT),
    "greek": lambda p, c: c == GRK,
    "arabic": lambda p, c: c == ARB,
    "indic": lambda p, c: c == IND,
    "symbols": lambda p, c: c == SYM,
    "cjk": lambda p, c: c == CJK,
    "hangul": lambda p, c: c == HANG,
    "astral": lambda p, c: c == AST,
}
#: Features computed apart from the pair counts.
EXTRA_FEATURES = ("space_runs", "long_words", "words_accented")
FEATURES = (*PAIR_FEATURES, *EXTRA_FEATURES)
#: Features whose coefficient may be negative (they mark a merge: "(self", "):\n").
SIGNED = frozenset({"punct_word", "punct_newline", "spaces", "e_grave_acute"})

#: (K*K, n pair features) 0/1 matrix: pair histogram -> pair features.
PAIR_MATRIX = np.array(
    [[1.0 if f(p, c) else 0.0 for f in PAIR_FEATURES.values()] for p in range(K) for c in range(K)]
)
_COL = {name: i for i, name in enumerate(PAIR_FEATURES)}

#: Bytes per numpy pass: bounds the temporaries (8 bytes per input byte) on huge inputs.
CHUNK = 1 << 16
#: cl100k_base's longest token (128 spaces): no text has fewer than bytes / 128 tokens.
MAX_TOKEN_BYTES = 128


def scan(data: bytes) -> tuple[np.ndarray, int]:
    """Counts of adjacent byte-class pairs in UTF-8 `data` (the first byte paired with a
    newline before it), and the number of runs of 2+ spaces."""
    x = np.frombuffer(bytes((NL,)) + data.translate(CLASS_TABLE), np.uint8)
    spaced = b"  " in data  # most prose has no run to count: skip the numpy passes
    if len(x) <= CHUNK + 1:
        return _pairs(x), _space_runs(x) if spaced else 0
    hist = np.zeros(K * K, np.intp)
    runs = 0
    for start in range(0, len(x) - 1, CHUNK):
        # Pairs ending at start+1 .. start+CHUNK, and the space runs starting there (a run
        # starts at j when x[j-1], x[j], x[j+1] are not-space, space, space): two bytes shared.
        seg = x[start : start + CHUNK + 2]
        hist += _pairs(seg[: CHUNK + 1])
        runs += _space_runs(seg) if spaced else 0
    return hist, runs


def _pairs(x: np.ndarray) -> np.ndarray:
    codes = np.multiply(x[:-1], K, dtype=np.intp)
    codes += x[1:]
    return np.bincount(codes, minlength=K * K)


def _space_runs(x: np.ndarray) -> int:
    """Runs of 2+ spaces starting at 1 .. len(x)-2 (x[0] is never counted as a start)."""
    space = x == SP
    two = space[1:] & space[:-1]
    return int(np.count_nonzero(two[1:] > two[:-1]))


def _long_words(data: bytes) -> int:
    return data.translate(_WORD_TABLE).count(b"w" * LONG_WORD_BYTES)


def _accent_share(letters: float, accented: float) -> float:
    """0 for ASCII-only Latin text, rising to 1 at `ACCENT_SATURATION` accented letters."""
    return min(1.0, accented / max(1.0, letters + accented) / ACCENT_SATURATION)


def features_utf8(data: bytes) -> np.ndarray:
    """The feature vector (in `FEATURES` order) of UTF-8 `data`."""
    hist, runs = scan(data)
    pair = hist @ PAIR_MATRIX
    share = _accent_share(pair[_COL["letters"]], pair[_COL["accented"]])
    return np.concatenate([pair, [runs, _long_words(data), pair[_COL["words"]] * share]])


def features(text: str) -> np.ndarray:
    """The feature vector (in `FEATURES` order) of `text`; what scripts/fit_estimator.py fits."""
    return features_utf8(text.encode("utf-8", "surrogatepass"))


# ---- fitted coefficients -------------------------------------------------------------------
# BEGIN FITTED (written by scripts/fit_estimator.py --write; do not edit by hand)
#: Tokens per unit of each feature, fitted on tests/data/corpus/fit.jsonl against
#: cl100k_base by scripts/fit_estimator.py (class-balanced least relative error).
COEFFICIENTS: dict[str, float] = {
    "letters": 0.0062,
    "words": 0.9897,
    "camel": 2.1938,
    "upper_runs": 0.0644,
    "digits": 0.2221,
    "digit_runs": 0.7673,
    "space_digit": 0.9627,
    "punct": 0.3488,
    "punct_runs": 0.6204,
    "punct_word": -0.5139,
    "spaces": -0.0182,
    "indents": 0.0000,
    "newline_runs": 0.6808,
    "punct_newline": -0.5641,
    "accented": 0.9532,
    "e_grave_acute": -0.5605,
    "umlauts": 2.3675,
    "cyrillic_words": 1.1476,
    "greek": 0.7569,
    "arabic": 0.5054,
    "indic": 1.2313,
    "symbols": 2.1076,
    "cjk": 1.1271,
    "hangul": 1.2207,
    "astral": 2.6341,
    "space_runs": 1.1495,
    "long_words": 1.4075,
    "words_accented": 0.2980,
}
# END FITTED

_PAIR_COEF = np.array([COEFFICIENTS[n] for n in PAIR_FEATURES])
_EXTRA_COEF = [COEFFICIENTS[n] for n in EXTRA_FEATURES]
#: Pair histogram -> (the pair part of the estimate, letters, accented letters, words), as
#: rows (`np.dot(_MODEL, hist)` is the fastest form for one histogram).
_MODEL = np.ascontiguousarray(
    np.column_stack(
        [PAIR_MATRIX @ _PAIR_COEF]
        + [PAIR_MATRIX[:, _COL[n]] for n in ("letters", "accented", "words")]
    ).T
)
_RUNS_C, _LONG_C, _WORDS_ACC_C = _EXTRA_COEF


def count_utf8(data: bytes) -> int:
    """Estimated tokens of UTF-8 `data` (invalid sequences count as U+FFFD, as decoding with
    errors='replace' gives)."""
    if not data:
        return 0
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = data.decode("utf-8", "replace").encode("utf-8")
    return _estimate(data)


def count(text: str) -> int:
    """Estimated cl100k tokens of `text`, without a tokenizer. Never raises for a str (lone
    surrogates count as 3-byte characters)."""
    if not text:
        return 0
    return _estimate(text.encode("utf-8", "surrogatepass"))


def _estimate(data: bytes) -> int:
    hist, runs = scan(data)
    pair, letters, accented, words = np.dot(_MODEL, hist).tolist()
    total = (
        pair
        + _RUNS_C * runs
        + _LONG_C * _long_words(data)
        + _WORDS_ACC_C * words * _accent_share(letters, accented)
    )
    # Every token covers 1 .. MAX_TOKEN_BYTES bytes, which bounds the count on both sides.
    return min(len(data), max(1, -(-len(data) // MAX_TOKEN_BYTES), round(total)))

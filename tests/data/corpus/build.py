"""Builds the token-estimation corpus: `fit.jsonl` (for scripts/fit_estimator.py) and
`heldout.jsonl` (for the tests and bench/estimation.py), one `{"class": ..., "text": ...}` a line.

    .venv/bin/python tests/data/corpus/build.py        # rewrites both files, deterministically

Sources, all written for or by this project (no downloaded text): the hand-written sentences in
`seeds/` (prose in eleven languages, chat lines, a few languages' code), the project's own
Python, JavaScript, Lua, shell, YAML, CSS and Markdown files at `SOURCE_COMMIT` (so a rebuild
gives the same corpus whatever the work tree holds), and seeded generators for JSON, numbers,
chat request bodies and encoded data (base64, hex digests, UUIDs, JWT-like tokens).

Held-out samples never share material with fit samples: prose takes even-numbered seed lines
for the fit set and odd-numbered ones for the held-out set; code and Markdown take the first
half of each file's lines for fit and the second half for held-out; the generators use a
different random seed per split. Sample lengths are spread log-uniformly over 20..4096
characters, and no sample has more than 4 KiB of UTF-8 (chat bodies are as long as their
messages and tools make them, within that).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import math
import random
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SEEDS = HERE / "seeds"
#: The commit whose files the code and Markdown samples are cut from.
SOURCE_COMMIT = "100681b5fe36debbbcd9159231cbcf86fbd03300"

#: Samples per class in each split.
PER_CLASS = 20
MIN_CHARS, MAX_CHARS = 20, 4096
#: And at most this much UTF-8 (4 KiB), which keeps CJK and other multi-byte samples small.
MAX_BYTES = 4096

CLASSES = (
    "english",
    "latin",
    "cyrillic",
    "other_script",
    "cjk",
    "python",
    "code",
    "json",
    "numbers",
    "emoji_chat",
    "chat_tools",
    "markdown",
    "encoded",
)

Split = int  # 0 = fit, 1 = held-out


def _lines(name: str, split: Split) -> list[str]:
    lines = [x for x in (SEEDS / name).read_text().splitlines() if x.strip()]
    return lines[split::2]


def _lengths(rng: random.Random, n: int) -> list[int]:
    """`n` lengths spread log-uniformly over MIN_CHARS..MAX_CHARS (one per stratum), shuffled."""
    lo, hi = math.log(MIN_CHARS), math.log(MAX_CHARS)
    out = [round(math.exp(lo + (j + rng.random()) / n * (hi - lo))) for j in range(n)]
    rng.shuffle(out)
    return out


def _cut(text: str, n: int) -> str:
    """`text` cut to about `n` characters, at a space when one is near."""
    if len(text) <= n:
        return text
    space = text.rfind(" ", n - 16, n)
    return text[:space] if space > 0 else text[:n]


def _prose(langs: tuple[str, ...]) -> Callable[[random.Random, Split, int, int], str]:
    def make(rng: random.Random, split: Split, i: int, n: int) -> str:
        pool = _lines(f"{langs[i % len(langs)]}.txt", split)
        parts: list[str] = []
        size = 0
        while size < n:
            s = rng.choice(pool)
            sep = "\n\n" if parts and rng.random() < 0.15 else " "
            parts.append((sep if parts else "") + s)
            size += len(s) + 1
        return _cut("".join(parts), n)

    return make


def _repo_files(patterns: tuple[str, ...]) -> list[str]:
    """The texts of the project's files matching `patterns` at `SOURCE_COMMIT` (not the work
    tree, which moves: a rebuild gives the same corpus)."""
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", SOURCE_COMMIT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    picked = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return [
        subprocess.run(
            ["git", "show", f"{SOURCE_COMMIT}:{n}"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        for n in sorted(picked)
        if not n.startswith("tests/data/") and n != "docs/benchmarks.md"  # bench rewrites it
    ]


def _code(texts: list[str]) -> Callable[[random.Random, Split, int, int], str]:
    halves: list[list[str]] = [[], []]
    for t in texts:
        lines = t.splitlines(keepends=True)
        if len(lines) < 8 or max(map(len, lines)) > 400:  # skip minified or tiny files
            continue
        mid = len(lines) // 2
        halves[0].append("".join(lines[:mid]))
        halves[1].append("".join(lines[mid:]))

    def make(rng: random.Random, split: Split, i: int, n: int) -> str:
        text = rng.choice(halves[split])
        start = rng.randrange(max(1, len(text) - n))
        out = text[text.rfind("\n", 0, start) + 1 :]
        while len(out) < n:  # a file shorter than the sample: go on with another one
            out += "\n" + rng.choice(halves[split])
        return out[:n]

    return make


_WORDS = (  # noqa: SIM905 - reads better as one string
    "id name status created updated owner region model tokens prompt completion total price "
    "currency items tags enabled limit window count error message code detail user account "
    "project latency_ms bytes host port path method version type value score rank"
).split()
_PHRASES = _lines("en.txt", 0) + _lines("en.txt", 1)


def _value(rng: random.Random, depth: int) -> object:
    r = rng.random()
    if depth < 3 and r < 0.18:
        return {rng.choice(_WORDS): _value(rng, depth + 1) for _ in range(rng.randint(1, 6))}
    if depth < 3 and r < 0.28:
        return [_value(rng, depth + 1) for _ in range(rng.randint(1, 5))]
    if r < 0.45:
        return rng.randint(0, 10 ** rng.randint(1, 9))
    if r < 0.55:
        return round(rng.uniform(-1000, 1000), rng.randint(1, 6))
    if r < 0.62:
        return rng.choice([True, False, None])
    if r < 0.70:
        return f"{rng.getrandbits(128):032x}"
    if r < 0.77:
        return (
            f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
        )
    if r < 0.85:
        return rng.choice(_WORDS) + "-" + str(rng.randint(1, 999))
    phrase = rng.choice(_PHRASES)
    return phrase[: rng.randint(8, len(phrase))]


def _json(rng: random.Random, split: Split, i: int, n: int) -> str:
    indent = (None, 2, 4)[i % 3]
    seps = (",", ":") if rng.random() < 0.4 and indent is None else None
    out = ""
    while len(out) < n:
        doc = {rng.choice(_WORDS): _value(rng, 0) for _ in range(rng.randint(2, 8))}
        out += json.dumps(doc, indent=indent, separators=seps) + "\n"
    return out[:n]


def _numbers(rng: random.Random, split: Split, i: int, n: int) -> str:
    kind = i % 5
    rows: list[str] = []
    if kind == 0:
        rows.append("date,region,requests,tokens,cost_usd,p50_ms,p99_ms")
    elif kind == 1:
        rows += ["| month | revenue | costs | margin | growth |", "|---|---:|---:|---:|---:|"]
    while sum(map(len, rows)) < n:
        d = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if kind == 0:
            rows.append(
                f"{d},{rng.choice(['eu-west-1', 'us-east-2', 'ap-south-1'])},"
                f"{rng.randint(0, 99999)},{rng.randint(0, 9_999_999)},"
                f"{rng.uniform(0, 5000):.2f},{rng.uniform(0.1, 40):.1f},{rng.uniform(5, 900):.1f}"
            )
        elif kind == 1:
            rows.append(
                f"| {d[:7]} | {rng.randint(1000, 9_999_999):,} | {rng.randint(1000, 999_999):,}"
                f" | {rng.uniform(-20, 60):.1f}% | {rng.uniform(-5, 15):+.2f}% |"
            )
        elif kind == 2:
            rows.append(
                f"{d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}."
                f"{rng.randint(0, 999):03d}Z {rng.choice(['INFO', 'WARN', 'DEBUG'])} "
                f"ip=10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} "
                f"status={rng.choice([200, 200, 201, 429, 503])} "
                f"latency_ms={rng.uniform(0.2, 950):.3f} bytes={rng.randint(0, 2**20)}"
            )
        elif kind == 3:
            rows.append(" ".join(f"{rng.gauss(0, 100):10.4f}" for _ in range(rng.randint(3, 8))))
        else:
            rows.append(
                f"{rng.randint(1, 999)}. +1 ({rng.randint(200, 999)}) {rng.randint(100, 999)}-"
                f"{rng.randint(1000, 9999)}  ${rng.uniform(0, 99999):,.2f}  "
                f"{rng.randint(0, 100)}/{rng.randint(1, 100)}  x{rng.random():.6g}"
            )
    return "\n".join(rows)[:n]


_EMOJI = (  # noqa: SIM905 - a list literal would spell the ZWJ sequences as escapes
    "😂 🤣 😍 🥰 😭 🙏 👍 👍🏽 👏🏻 🔥 🎉 🥳 💯 😅 😎 🤔 🙄 😴 🍕 🍺 ☕ ✨ ❤️ 💔 💕 ✅ ❌ 🚀 🌧️ "
    "☀️ 🌈 🐱 🐶 🏖️ ⚽ 🏆 💸 📈 📉 👀 🤯 😱 🙈 💪🏾 👨‍👩‍👧‍👦 👩🏻‍💻 🏳️‍🌈 🇫🇷 🇯🇵 🇧🇷 🇺🇸 🫶 🥲"
).split()


def _emoji_chat(rng: random.Random, split: Split, i: int, n: int) -> str:
    pool = _lines("chat.txt", split)
    names = ("ana", "bo", "chen", "dmitri", "eve", "farah", "gus")
    out: list[str] = []
    while sum(map(len, out)) < n:
        line = rng.choice(pool)
        words = line.split()
        for _ in range(rng.randint(1, 4)):
            pos = rng.randint(0, len(words))
            words.insert(pos, "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 3))))
        text = " ".join(words)
        if rng.random() < 0.3:
            text += rng.choice(("!!", "?!", " " + rng.choice(_EMOJI) * rng.randint(2, 5)))
        if i % 2:
            out.append(f"{rng.choice(names)}: {text}")
        else:
            out.append(text)
    return "\n".join(out)[:n]


_TOOLS = [
    ("get_weather", "Get the current weather for a city.", {"city": "string", "unit": "string"}),
    ("search_docs", "Search the internal documentation.", {"query": "string", "limit": "integer"}),
    ("create_ticket", "Open a support ticket.", {"title": "string", "priority": "string"}),
    ("convert_currency", "Convert an amount.", {"amount": "number", "to": "string"}),
    ("run_sql", "Run a read-only SQL query on the warehouse.", {"sql": "string"}),
    ("send_email", "Send an email to a user.", {"to": "string", "subject": "string"}),
    ("lookup_order", "Find an order by its id.", {"order_id": "string"}),
]


def _tool(rng: random.Random, t: tuple[str, str, dict[str, str]]) -> dict[str, object]:
    name, desc, props = t
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {
                    k: {"type": v, "description": f"The {k.replace('_', ' ')}."}
                    for k, v in props.items()
                },
                "required": list(props)[: rng.randint(1, len(props))],
            },
        },
    }


def _chat_tools(rng: random.Random, split: Split, i: int, n: int) -> str:
    langs = ("en", "en", "fr", "de", "es", "ru", "zh", "ja")
    pool = _lines(f"{langs[i % len(langs)]}.txt", split)
    tools = rng.sample(_TOOLS, 1 if n < 1000 else rng.randint(1, 4))
    messages: list[dict[str, object]] = []
    if n > 600:
        messages.append({"role": "system", "content": "You are a helpful assistant."})
    body: dict[str, object] = {
        "model": rng.choice(("gpt-4o-mini", "gpt-4.1", "llama-3.1-8b")),
        "messages": messages,
        "tools": [_tool(rng, t) for t in tools],
        "tool_choice": "auto",
    }

    def text() -> str:
        return json.dumps(body, ensure_ascii=bool(i % 3 == 0), indent=None if i % 4 else 2)

    while True:
        call_id = f"call_{rng.getrandbits(96):024x}"
        args = {"query": rng.choice(pool)[:40], "limit": rng.randint(1, 20)}
        result = {"ok": True, "results": [rng.choice(pool) for _ in range(rng.randint(1, 2))]}
        call = {"id": call_id, "type": "function", "function": {"name": rng.choice(tools)[0]}}
        call["function"]["arguments"] = json.dumps(args)  # type: ignore[index]
        for m in (
            {"role": "user", "content": " ".join(rng.sample(pool, rng.randint(1, 2)))},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
            {"role": "assistant", "content": rng.choice(pool)},
        ):
            messages.append(m)
            if len(text()) >= n:
                return text()[:MAX_CHARS]


def _encoded(rng: random.Random, split: Split, i: int, n: int) -> str:
    """Base64 (as in data URLs and pasted files), hex digests, UUIDs, JWT-like tokens."""
    kind = i % 4
    out = ""
    while len(out) < n:
        raw = rng.randbytes(rng.randint(16, 3000))
        if kind == 0:
            b64 = base64.b64encode(raw).decode()
            if rng.random() < 0.5:
                b64 = "\n".join(b64[j : j + 76] for j in range(0, len(b64), 76))
            out += rng.choice(("data:image/png;base64,", "", "file: ")) + b64 + "\n"
        elif kind == 1:
            out += f"sha256:{raw[:32].hex()}  {rng.choice(_WORDS)}-{rng.randint(1, 99)}.tar.gz\n"
        elif kind == 2:
            out += f"{rng.choice(_WORDS)}={uuid.UUID(bytes=raw[:16])}\n"
        else:
            seg = [
                base64.urlsafe_b64encode(raw[a:b]).decode().rstrip("=")
                for a, b in ((0, 24), (24, 120), (120, 152))
            ]
            out += f"Authorization: Bearer {'.'.join(seg)}\n"
    return out[:n]


MAKERS: dict[str, Callable[[random.Random, Split, int, int], str]] = {
    "english": _prose(("en",)),
    "latin": _prose(("fr", "de", "es")),
    "cyrillic": _prose(("ru",)),
    "other_script": _prose(("el", "ar", "hi")),
    "cjk": _prose(("zh", "ja", "ko")),
    "python": _code(_repo_files(("*.py",))),
    "code": _code(
        [
            (SEEDS / "misc_code.txt").read_text(),
            *_repo_files(("*.js", "*.lua", "*.css", "*.html", "*.sh", "*.yaml", "Makefile")),
        ]
    ),
    "json": _json,
    "numbers": _numbers,
    "emoji_chat": _emoji_chat,
    "chat_tools": _chat_tools,
    "markdown": _code(_repo_files(("*.md",))),
    "encoded": _encoded,
}


def build(split: Split) -> list[dict[str, str]]:
    rows = []
    for k, cls in enumerate(CLASSES):
        rng = random.Random(f"atlas-corpus-{cls}-{split}-{k}")
        for i, n in enumerate(_lengths(rng, PER_CLASS)):
            text = MAKERS[cls](rng, split, i, n)
            text = text.encode()[:MAX_BYTES].decode("utf-8", "ignore")
            rows.append({"class": cls, "text": text})
    return rows


def main() -> None:
    for split, name in ((0, "fit.jsonl"), (1, "heldout.jsonl")):
        rows = build(split)
        with (HERE / name).open("w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} samples, {sum(len(r['text']) for r in rows)} chars")


if __name__ == "__main__":
    main()

"""Tables: the summary against the issue's targets, the details, and `docs/benchmarks.md`."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.procs import REPO, TICK_S
from bench.shapes import CHUNKS, HALF, PACED_CONNECTIONS, PACED_DELAY_MS, REFERENCE

if TYPE_CHECKING:
    from bench.run import Measured

SATURATED = 0.85  # share of one core from which a single-threaded process is the bottleneck
DISTURBED = 0.25  # cores used by other workloads from which a phase is called disturbed


# ---- machine ------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout + p.stderr).strip()


def machine_facts() -> dict[str, str]:
    from atlas.envoy_config import envoy_binary
    from atlas.local.valkey import valkey_binary

    cpuinfo = Path("/proc/cpuinfo").read_text()
    m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    cpu = m.group(1).strip() if m else platform.processor() or "unknown"
    os_name = platform.platform()
    if os.path.exists("/etc/os-release"):
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        os_name = m.group(1) if m else os_name
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    envoy = _run([envoy_binary(), "--version"])
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    valkey = re.search(r"v=(\S+)", _run([valkey_binary(), "--version"]))
    wrk = shutil.which("wrk")
    wrk_v = re.search(r"wrk (\S+)", _run([wrk, "-v"])) if wrk else None
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?"
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    atlas_env = sorted(k for k in os.environ if k.startswith("ATLAS_"))
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": f"{os.cpu_count()} (usable by this run: {len(os.sched_getaffinity(0))})",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "os": f"{os_name}, kernel {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "envoy": m.group(1) if m else envoy.split("\n")[0],
        "valkey": valkey.group(1) if valkey else "?",
        "wrk": wrk_v.group(1) if wrk_v else "?",
        "client loop": loop,
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "ATLAS_* environment": ", ".join(atlas_env) or "none (defaults)",
    }


# ---- formatting helpers -------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} ms"


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f} µs" if v >= 10 else f"{v:.1f} µs"


def _pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def _num(v: float) -> str:
    return f"{v:,.0f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _slices(m: Measured) -> str:
    return ", ".join(f"{x:,.0f}" for x in m.data.get("slices_rps", []))


def phase_line(m: Measured) -> str:
    busiest = max((n for n in m.cpu if n not in ("client", "harness")), key=m.util, default="?")
    lat = m.data.get("latency_ms") or m.data.get("ttfb_ms") or {}
    what = "TTFB " if "ttfb_ms" in m.data else ""
    return (
        f"{m.phase:<13} {m.path:<8} {m.rps:>9,.0f} req/s  {what}p50 {lat.get('p50', 0):.2f} ms "
        f"p99 {lat.get('p99', 0):.2f} ms  busiest {busiest} {_pct(m.util(busiest))} of a core"
        + (f"  (slices: {_slices(m)} req/s)" if len(m.data.get("slices_rps", [])) > 1 else "")
    )


# ---- targets ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    fmt: Callable[[float], str]
    how: str
    #: The same figure for the floor (do-nothing servers behind Atlas's Envoy), when measured.
    floor: float | None = None

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        v, t = self.value, self.limit
        if self.higher_is_better:
            if v >= t:
                return f"**met** ({v / t:.1f}× the target)" if t else "**met**"
            if v <= 0:
                return "**not met**"
            return f"**not met**: {v / t:.0%} of the target, needs {t / v:.1f}× more"
        if v <= t:
            return "**met**" + (f" ({t - v:.2f} to spare)" if self.fmt is _ms else "")
        return f"**not met**: {v / t:.1f}× the limit" if t > 0 else "**not met**"

    def vs_floor(self) -> str:
        """Atlas's distance from its design's floor: a difference, or a share for ratios."""
        if self.value is None or self.floor is None:
            return "–"
        if self.higher_is_better:
            return f"{self.value / self.floor:.0%} of the floor's" if self.floor else "–"
        return self.fmt(self.value - self.floor)


def _get(results: Mapping[str, Measured], key: str) -> Measured | None:
    return results.get(key)


def _lat(m: Measured | None, which: str, q: str) -> float | None:
    if m is None:
        return None
    v = (m.data.get(which) or {}).get(q)
    return None if v is None else float(v)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _added(
    r: Mapping[str, Measured], phase: str, which: str, q: str, path: str = "atlas"
) -> float | None:
    """`path`'s percentile minus bare Envoy's in the same phase."""
    return _diff(_lat(r.get(f"{phase}/{path}"), which, q), _lat(r.get(f"{phase}/bare"), which, q))


def _vs_bare(r: Mapping[str, Measured], phase: str, path: str = "atlas") -> float | None:
    m, bare = r.get(f"{phase}/{path}"), r.get(f"{phase}/bare")
    return m.rps / bare.rps if m and bare and bare.rps else None


def targets(results: Mapping[str, Measured]) -> list[Target]:
    """The performance issue's targets (issue 12), in its order."""
    r = results
    hl_a = _get(r, "half-load/atlas")
    ps_a = _get(r, "paced-stream/atlas")
    ps_sse = _get(r, "usage-paced-stream/sse")
    az = _get(r, "authz/authz")
    chunk = ps_a.cpu["extproc"] / (ps_a.requests * CHUNKS) * 1e6 if ps_a else None
    sse_chunk = ps_sse.cpu["extproc"] / (ps_sse.requests * CHUNKS) * 1e6 if ps_sse else None
    opt_in = "opt-in ATLAS_STREAM_USAGE_FROM_ENVOY, the client asks for usage"
    per_core = az.requests / az.cpu["authz"] if az and az.cpu.get("authz") else None
    protocol = az.data.get("protocol", "grpc") if az else "?"
    return [
        Target(
            "Added latency on a quiet machine, median, plain completion",
            _added(r, "serial", "latency_ms", "p50"),
            1.0,
            False,
            _ms,
            "one keep-alive connection, one request at a time (serial phase)",
            floor=_added(r, "serial", "latency_ms", "p50", "floor"),
        ),
        Target(
            "Added time to first byte on a quiet machine, median, stream",
            _added(r, "single-stream", "ttfb_ms", "p50"),
            1.5,
            False,
            _ms,
            "one stream at a time, paced upstream (single-stream phase)",
            floor=_added(r, "single-stream", "ttfb_ms", "p50", "floor"),
        ),
        Target(
            "Added latency at half of Atlas's max: p50",
            _added(r, "half-load", "latency_ms", "p50"),
            1.0,
            False,
            _ms,
            "open-loop generator, same rate on both",
        ),
        Target(
            "Added latency at half of Atlas's max: p99",
            _added(r, "half-load", "latency_ms", "p99"),
            3.0,
            False,
            _ms,
            "open-loop generator, same rate on both",
        ),
        Target(
            "Non-streamed max throughput vs bare Envoy",
            _vs_bare(r, "nonstream-max"),
            0.20,
            True,
            _pct,
            "wrk max load, same connections",
            floor=_vs_bare(r, "nonstream-max", "floor"),
        ),
        Target(
            "Streamed max throughput vs bare Envoy",
            _vs_bare(r, "stream-max"),
            0.15,
            True,
            _pct,
            f"wrk max load, {CHUNKS}-token streams",
        ),
        Target(
            "Python CPU per plain completion, all Atlas processes (authz+extproc+admin)",
            hl_a.python_us_per_request() if hl_a else None,
            300.0,
            False,
            _us,
            "half-load phase: authz + extproc + admin CPU / completions",
        ),
        Target(
            "extproc CPU per streamed chunk",
            chunk,
            50.0,
            False,
            _us,
            f"extproc CPU / (streams × {CHUNKS}), paced streams; includes per-request messages",
        ),
        Target(
            "authz Checks per CPU-second, with Redis",
            per_core,
            6000.0,
            True,
            _num,
            f"{protocol} load on authz alone; Checks / authz CPU-seconds",
        ),
        Target(
            f"Added time to first byte, median, stream ({opt_in})",
            _added(r, "usage-single-stream", "ttfb_ms", "p50", "sse"),
            1.5,
            False,
            _ms,
            "one stream at a time, paced upstream (usage-single-stream phase)",
        ),
        Target(
            f"Streamed max throughput vs bare Envoy ({opt_in})",
            _vs_bare(r, "usage-stream-max", "sse"),
            0.15,
            True,
            _pct,
            f"wrk max load, {CHUNKS}-token streams with include_usage",
        ),
        Target(
            f"extproc CPU per streamed chunk ({opt_in})",
            sse_chunk,
            50.0,
            False,
            _us,
            f"extproc CPU (settling from the access log) / (streams × {CHUNKS})",
        ),
    ]


# ---- the report ---------------------------------------------------------------------------

ORDER = ("envoy", "authz", "extproc", "valkey", "admin", "upstream", "client", "harness")


def _upstream_check(r: Mapping[str, Measured], n_up: int) -> tuple[str, list[str]]:
    """The upstream alone vs behind bare Envoy; `n_up` processes share its port."""
    rows, verdicts = [], []
    for phase, label in (("nonstream-max", "non-streaming"), ("stream-max", "streaming")):
        alone = r.get(f"{phase}/upstream")
        bare = r.get(f"{phase}/bare")
        atlas = r.get(f"{phase}/atlas")
        if alone is None:
            continue
        row = [label, f"{alone.rps:,.0f}", _pct(alone.util("upstream"))]
        for m in (bare, atlas):
            row += [f"{m.rps:,.0f}", _pct(m.util("upstream"))] if m else ["–", "–"]
        rows.append(row)
        if bare is not None:
            per_proc = bare.util("upstream") / n_up
            ok = per_proc < SATURATED and alone.rps > 1.2 * bare.rps
            procs = f" ({n_up} processes, {_pct(per_proc)} each)" if n_up > 1 else ""
            verdicts.append(
                f"{label}: the upstream alone serves {alone.rps:,.0f} req/s; behind bare Envoy "
                f"at {bare.rps:,.0f} req/s it was busy {_pct(bare.util('upstream'))} of one "
                f"core{procs}"
                + (
                    " — **not the bottleneck**."
                    if ok
                    else " — **it may be the bottleneck of the bare path**: results understate "
                    "bare Envoy (and overstate Atlas's ratio); check with `--upstreams 2`."
                )
            )
    head = [
        "load",
        "upstream alone req/s",
        "its CPU",
        "bare Envoy req/s",
        "upstream CPU",
        "Atlas req/s",
        "upstream CPU",
    ]
    return _table(head, rows) if rows else "", verdicts


#: Proxied paths in report order, with their row labels.
PATH_LABELS = (
    ("bare", "bare Envoy"),
    ("floor", "floor: Atlas's Envoy + do-nothing servers"),
    ("atlas", "Envoy + Atlas"),
    ("sse", "Envoy + Atlas, opt-in stream usage from Envoy"),
)
#: "a minus b" rows under a table: (label, a, b).
DIFF_ROWS = (
    ("**added by Atlas** (Atlas − bare)", "atlas", "bare"),
    ("floor − bare", "floor", "bare"),
    ("**Atlas − floor**", "atlas", "floor"),
    ("**added by the opt-in** (opt-in − bare)", "sse", "bare"),
)


def _ext_proc_msgs(m: Measured) -> int:
    """Messages Envoy sent to ext_proc, over every ext_proc filter (one per mode)."""
    return sum(
        n
        for k, n in m.stats.items()
        if k.startswith("http.atlas.ext_proc.") and k.endswith("stream_msgs_sent")
    )


def _diff_rows(
    r: Mapping[str, Measured], phase: str, cells: Callable[[Measured, Measured], list[str]]
) -> list[list[str]]:
    rows = []
    for label, a, b in DIFF_ROWS:
        ma, mb = r.get(f"{phase}/{a}"), r.get(f"{phase}/{b}")
        if ma and mb:
            rows.append([label, *cells(ma, mb)])
    return rows


def _max_table(r: Mapping[str, Measured], phase: str) -> str:
    bare = r.get(f"{phase}/bare")
    rows = []
    for path, label in (("upstream", "upstream directly"), *PATH_LABELS):
        m = r.get(f"{phase}/{path}")
        if m is None:
            continue
        lat = m.data["latency_ms"]
        msgs = _ext_proc_msgs(m)
        rows.append(
            [
                label,
                f"{m.rps:,.0f}",
                _ms(lat["p50"]),
                _ms(lat["p90"]),
                _ms(lat["p99"]),
                _ms(lat["max"]),
                str(sum(m.data["errors"].values())),
                _us(m.proxy_us_per_request()) if path != "upstream" else "–",
                _us(m.python_us_per_request()) if path in ("floor", "atlas", "sse") else "–",
                f"{m.rps / bare.rps:.0%}" if bare and path in ("floor", "atlas", "sse") else "–",
                f"{msgs / m.requests:.1f}" if msgs and m.requests else "–",
                _slices(m),
            ]
        )

    def cells(a: Measured, b: Measured) -> list[str]:
        la, lb = a.data["latency_ms"], b.data["latency_ms"]
        return [
            "",
            *(_ms(la[q] - lb[q]) for q in ("p50", "p90", "p99")),
            "",
            "",
            _us(a.proxy_us_per_request() - b.proxy_us_per_request()),
            _us(a.python_us_per_request() - b.python_us_per_request()),
            "",
            "",
            "",
        ]

    rows += _diff_rows(r, phase, cells)
    head = [
        "path",
        "req/s",
        "p50",
        "p90",
        "p99",
        "max",
        "errors",
        "proxy CPU / req",
        "Python CPU / req",
        "vs bare",
        "ext_proc msgs / req",
        "req/s per slice",
    ]
    return _table(head, rows)


def _serial_table(r: Mapping[str, Measured]) -> str:
    rows = []
    for path, label in PATH_LABELS:
        m = r.get(f"serial/{path}")
        if m is None:
            continue
        lat = m.data["latency_ms"]
        msgs = _ext_proc_msgs(m)
        rows.append(
            [
                label,
                f"{m.requests:,}",
                f"{m.rps:,.0f}",
                *(_ms(lat[q]) for q in ("p50", "p90", "p99", "p999")),
                _us(m.us_per_request("envoy")),
                _us(m.python_us_per_request()) if path != "bare" else "–",
                f"{msgs / m.requests:.1f}" if msgs and m.requests else "–",
            ]
        )

    def cells(a: Measured, b: Measured) -> list[str]:
        la, lb = a.data["latency_ms"], b.data["latency_ms"]
        return [
            "",
            "",
            *(_ms(la[q] - lb[q]) for q in ("p50", "p90", "p99", "p999")),
            _us(a.us_per_request("envoy") - b.us_per_request("envoy")),
            _us(a.python_us_per_request() - b.python_us_per_request()),
            "",
        ]

    rows += _diff_rows(r, "serial", cells)
    head = [
        "path",
        "requests",
        "req/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "Envoy CPU / req",
        "Python CPU / req",
        "ext_proc msgs / req",
    ]
    return _table(head, rows)


def _idempotency_table(r: Mapping[str, Measured]) -> str:
    """Plain completions through Atlas without and with an Idempotency-Key, one at a time."""
    rows = []
    for phase, label in (
        ("serial", "no Idempotency-Key"),
        ("serial-idempotent", "a new Idempotency-Key each (read by extproc, stored)"),
        ("serial-replay", "a duplicate each (answered by authz from the stored response)"),
    ):
        m = r.get(f"{phase}/atlas")
        if m is None:
            continue
        lat = m.data["latency_ms"]
        rows.append(
            [
                label,
                f"{m.requests:,}",
                *(_ms(lat[q]) for q in ("p50", "p99")),
                _us(m.us_per_request("envoy")),
                _us(m.python_us_per_request()),
                f"{_ext_proc_msgs(m) / m.requests:.1f}" if m.requests else "–",
            ]
        )
    head = ["Envoy + Atlas", "requests", "p50", "p99", "Envoy CPU / req", "Python CPU / req"]
    return _table([*head, "ext_proc msgs / req"], rows) if len(rows) > 1 else ""


def _floor_table(r: Mapping[str, Measured]) -> str:
    """The design's floor next to bare Envoy and Atlas, one figure per row."""
    figures: list[tuple[str, str, Callable[[Measured], float], Callable[[float], str]]] = [
        ("serial", "plain completion, one at a time: p50", _pctl("latency_ms", "p50"), _ms),
        ("serial", "plain completion, one at a time: p99", _pctl("latency_ms", "p99"), _ms),
        ("single-stream", "stream, one at a time: TTFB p50", _pctl("ttfb_ms", "p50"), _ms),
        ("single-stream", "stream, one at a time: TTFB p99", _pctl("ttfb_ms", "p99"), _ms),
        ("nonstream-max", "non-streamed max throughput, req/s", lambda m: m.rps, _num),
        ("serial", "Envoy CPU / plain completion (one at a time)", _cpu("envoy"), _us),
        ("serial", "Python CPU / plain completion (one at a time)", _py_cpu, _us),
        ("nonstream-max", "Envoy CPU / plain completion (max load)", _cpu("envoy"), _us),
        ("nonstream-max", "Python CPU / plain completion (max load)", _py_cpu, _us),
    ]
    rows = []
    for phase, label, get, fmt in figures:
        ms = {p: r.get(f"{phase}/{p}") for p in ("bare", "floor", "atlas")}
        if ms["floor"] is None:
            continue
        v = {p: get(m) if m is not None else None for p, m in ms.items()}
        rel = []
        for a, b in (("floor", "bare"), ("atlas", "floor")):
            x, y = v[a], v[b]
            if x is None or y is None:
                rel.append("–")
            elif fmt is _num:  # throughput: a share
                rel.append(f"{x / y:.0%}" if y else "–")
            else:
                rel.append(fmt(x - y))
        rows.append([label, *(fmt(x) if x is not None else "–" for x in v.values()), *rel])
    head = [
        "figure",
        "bare Envoy",
        "floor",
        "Envoy + Atlas",
        "floor − bare (req/s: floor / bare)",
        "Atlas − floor (req/s: Atlas / floor)",
    ]
    return _table(head, rows) if rows else ""


def _pctl(which: str, q: str) -> Callable[[Measured], float]:
    return lambda m: float(m.data[which][q])


def _cpu(name: str) -> Callable[[Measured], float]:
    return lambda m: m.us_per_request(name)


def _py_cpu(m: Measured) -> float:
    return m.python_us_per_request()


def _half_table(r: Mapping[str, Measured]) -> str:
    rows = []
    for path, label in (("bare", "bare Envoy"), ("atlas", "Envoy + Atlas")):
        m = r.get(f"half-load/{path}")
        if m is None:
            continue
        d = m.data
        lat, lag = d["latency_ms"], d["schedule_lag_ms"]
        rows.append(
            [
                label,
                f"{d['target_rate']:,.0f}",
                f"{d['achieved_rate']:,.0f}",
                _ms(lat["p50"]),
                _ms(lat["p90"]),
                _ms(lat["p99"]),
                _ms(lat["p999"]),
                _ms(d["latency_from_due_ms"]["p99"]),
                _ms(lag["p99"]),
                str(d["queued_for_connection"]),
                _pct(m.util("client")),
            ]
        )
    a, b = r.get("half-load/atlas"), r.get("half-load/bare")
    if a and b:
        la, lb = a.data["latency_ms"], b.data["latency_ms"]
        fa, fb = a.data["latency_from_due_ms"], b.data["latency_from_due_ms"]
        rows.append(
            [
                "**added by Atlas**",
                "",
                "",
                _ms(la["p50"] - lb["p50"]),
                _ms(la["p90"] - lb["p90"]),
                _ms(la["p99"] - lb["p99"]),
                _ms(la["p999"] - lb["p999"]),
                _ms(fa["p99"] - fb["p99"]),
                "",
                "",
                "",
            ]
        )
    head = [
        "path",
        "target req/s",
        "achieved",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "p99 from due time",
        "scheduler lag p99",
        "waited for a connection",
        "generator CPU",
    ]
    return _table(head, rows)


def _paced_table(r: Mapping[str, Measured], phase: str) -> str:
    rows = []
    for path, label in PATH_LABELS:
        m = r.get(f"{phase}/{path}")
        if m is None:
            continue
        d = m.data
        events = ", ".join(f"{k}×{v}" for k, v in d["sse_events_per_stream"].items())
        rows.append(
            [
                label,
                f"{m.rps:,.1f}",
                _ms(d["ttfb_ms"]["p50"]),
                _ms(d["ttfb_ms"]["p99"]),
                _ms(d["body_ms"]["p50"]),
                _ms(d["total_ms"]["p99"]),
                _ms(d["read_gap_ms"]["p50"]),
                _ms(d["read_gap_ms"]["p99"]),
                f"{d['reads_per_stream']:.1f}",
                events,
            ]
        )

    def cells(a: Measured, b: Measured) -> list[str]:
        da, db = a.data, b.data
        pairs = (
            ("ttfb_ms", "p50"),
            ("ttfb_ms", "p99"),
            ("body_ms", "p50"),
            ("total_ms", "p99"),
            ("read_gap_ms", "p50"),
            ("read_gap_ms", "p99"),
        )
        return ["", *(_ms(da[w][q] - db[w][q]) for w, q in pairs), "", ""]

    rows += _diff_rows(r, phase, cells)
    head = [
        "path",
        "streams/s",
        "TTFB p50",
        "TTFB p99",
        "body (first→last byte) p50",
        "whole stream p99",
        "gap between reads p50",
        "gap p99",
        "reads / stream",
        "SSE events / stream × streams",
    ]
    return _table(head, rows)


def _chunk_lines(
    r: Mapping[str, Measured], phase: str = "paced-stream", path: str = "atlas"
) -> list[str]:
    a = r.get(f"{phase}/{path}")
    if a is None:
        return []
    ext = a.cpu["extproc"]
    n = a.requests
    msgs = _ext_proc_msgs(a)
    who = "" if phase == "paced-stream" else f"*{dict(PATH_LABELS)[path]}*: "
    lines = [
        f"- {who}extproc CPU per streamed chunk (all-in): {_us(ext / (n * CHUNKS) * 1e6)} = "
        f"{ext:.2f} CPU-s / ({n:,} streams × {CHUNKS} chunks); this includes each stream's "
        "per-request messages (request headers and body, response headers, settlement).",
        f"- {who}extproc CPU per stream: {_us(ext / n * 1e6)}; Envoy sent extproc "
        f"{msgs / n:.1f} messages per stream"
        + (f" ({_us(ext / msgs * 1e6)} per message)." if msgs else "."),
    ]
    hl = r.get("half-load/atlas")
    if hl is not None and hl.requests and path == "atlas":
        per_req = hl.cpu["extproc"] / hl.requests
        marginal = (ext / n - per_req) / CHUNKS
        lines.append(
            f"- Marginal estimate: (extproc CPU per stream − per non-streamed request "
            f"{_us(per_req * 1e6)} at half load) / {CHUNKS} = {_us(marginal * 1e6)} per chunk."
        )
    if a.wall_s:
        lines.append(
            f"- {who}extproc was busy {_pct(a.util('extproc'))} of one core delivering "
            f"{n * CHUNKS / a.wall_s:,.0f} chunks/s."
        )
    return lines


def _authz_table(r: Mapping[str, Measured]) -> str:
    m = r.get("authz/authz")
    if m is None:
        return ""
    d = m.data
    rows = [
        [
            d.get("protocol", "grpc"),
            f"{m.rps:,.0f}",
            str(d["concurrency"]),
            str(d.get("connections", d.get("channels", "?"))),
            _ms(d["latency_ms"]["p50"]),
            _ms(d["latency_ms"]["p99"]),
            _pct(m.util("authz")),
            f"{m.requests / m.cpu['authz']:,.0f}" if m.cpu.get("authz") else "–",
            _us(m.us_per_request("authz")),
            _us(m.us_per_request("valkey")),
            _pct(m.util("client")),
        ]
    ]
    head = [
        "protocol",
        "Check/s",
        "in flight",
        "connections",
        "p50",
        "p99",
        "authz CPU (of a core)",
        "Checks per authz CPU-second",
        "authz CPU / Check",
        "Valkey CPU / Check",
        "client CPU",
    ]
    return _table(head, rows)


def _cpu_tables(r: Mapping[str, Measured]) -> tuple[str, str]:
    per_req, util = [], []
    for key, m in r.items():
        names = [n for n in ORDER if n in m.cpu]
        per_req.append(
            [key, f"{m.requests:,}"]
            + [_us(m.us_per_request(n)) if n in names else "" for n in ORDER]
            + [
                _us(m.proxy_us_per_request())
                if m.path in ("bare", "floor", "atlas", "sse")
                else "–"
            ]
        )
        util.append(
            [key, f"{m.rps:,.0f}"]
            + [_pct(m.util(n)) if n in names else "" for n in ORDER]
            + [
                f"{m.machine_busy_s / m.wall_s:.2f} of {os.cpu_count()}" if m.wall_s else "–",
                _pct(m.machine_irq_s / m.wall_s) if m.wall_s else "–",
                _pct(m.other_util()),
            ]
        )
    head1 = ["phase/path", "requests", *ORDER, "proxy total"]
    head2 = [
        "phase/path",
        "req/s",
        *ORDER,
        "machine busy (cores)",
        "irq+softirq",
        "other processes",
    ]
    return _table(head1, per_req), _table(head2, util)


def _bottlenecks(r: Mapping[str, Measured]) -> list[str]:
    out = []
    ncpu = os.cpu_count() or 1
    for key, m in r.items():
        if m.phase not in ("nonstream-max", "stream-max", "authz") or not m.wall_s:
            continue
        hot = [f"{n} {_pct(m.util(n))}" for n in ORDER[:-1] if m.util(n) >= SATURATED]
        busy = m.machine_busy_s / m.wall_s
        machine = f"machine {busy:.2f} of {ncpu} cores busy"
        if busy >= 0.9 * ncpu:
            machine += " (CPU-bound: every core busy"
            other = m.other_util()
            machine += f", {other:.2f} cores by other workloads)" if other >= DISTURBED else ")"
        costs = sorted(
            ((n, m.us_per_request(n)) for n in ORDER[:-1] if m.cpu.get(n)),
            key=lambda x: -x[1],
        )
        per_req = ", ".join(f"{n} {_us(v)}" for n, v in costs if v >= 1)
        head = f"at or near a full core: {', '.join(hot)}" if hot else "no process at a full core"
        out.append(f"- `{key}`: {head}; {machine}. CPU per request: {per_req}.")
    return out


def _context(r: Mapping[str, Measured], connections: int) -> list[str]:
    """One line per headline number, for the summary."""
    out = []
    se_b, se_f, se_a = (r.get(f"serial/{p}") for p in ("bare", "floor", "atlas"))
    if se_b and se_a:
        lb, la = se_b.data["latency_ms"], se_a.data["latency_ms"]
        line = (
            f"One plain completion at a time ({se_a.requests:,} per path, one keep-alive "
            f"connection): bare Envoy p50 {lb['p50']:.2f} / p99 {lb['p99']:.2f} ms, Envoy + "
            f"Atlas p50 {la['p50']:.2f} / p99 {la['p99']:.2f} ms: added "
            f"{la['p50'] - lb['p50']:.2f} ms p50, {la['p99'] - lb['p99']:.2f} ms p99"
        )
        if se_f:
            lf = se_f.data["latency_ms"]
            line += (
                f"; the floor (do-nothing servers) adds {lf['p50'] - lb['p50']:.2f} ms p50, "
                f"{lf['p99'] - lb['p99']:.2f} ms p99, so Atlas's own logic costs "
                f"{la['p50'] - lf['p50']:.2f} ms p50"
            )
        out.append(line + ".")
    ns_b, ns_a = r.get("nonstream-max/bare"), r.get("nonstream-max/atlas")
    if ns_b and ns_a:
        out.append(
            f"Non-streaming maximum (wrk, {connections} connections): bare Envoy "
            f"{ns_b.rps:,.0f} req/s (p50 {ns_b.data['latency_ms']['p50']:.2f} ms), Envoy + Atlas "
            f"{ns_a.rps:,.0f} req/s (p50 {ns_a.data['latency_ms']['p50']:.2f} ms); half load "
            f"= {HALF * ns_a.rps:,.0f} req/s. The issue's reference: {REFERENCE}."
        )
    ns_f = r.get("nonstream-max/floor")
    if ns_b and ns_f:
        out.append(
            f"The floor at maximum load: {ns_f.rps:,.0f} req/s ({ns_f.rps / ns_b.rps:.0%} of "
            f"bare Envoy), {ns_f.python_us_per_request():.0f} µs of Python and "
            f"{ns_f.us_per_request('envoy'):.0f} µs of Envoy CPU per request."
        )
    for path in ("bare", "atlas"):
        m = r.get(f"half-load/{path}")
        if m is None:
            continue
        d = m.data
        if d["achieved_rate"] < 0.97 * d["target_rate"] or d["queued_for_connection"]:
            out.append(
                f"At half load the {path} path fell behind: {d['achieved_rate']:,.0f} of "
                f"{d['target_rate']:,.0f} req/s answered per second, "
                f"{d['queued_for_connection']} requests waited for a free connection; its "
                "latencies include that queueing."
            )
        if m.util("client") > 0.7 or d["schedule_lag_ms"].get("p99", 0) > 5:
            out.append(
                f"The open-loop generator struggled on the {path} path (CPU "
                f"{_pct(m.util('client'))}, scheduler lag p99 "
                f"{d['schedule_lag_ms']['p99']:.1f} ms): treat its latencies with care."
            )
    st_b, st_a = r.get("stream-max/bare"), r.get("stream-max/atlas")
    if st_b and st_a:
        out.append(
            f"Streaming maximum: bare Envoy {st_b.rps:,.0f} streams/s, Envoy + Atlas "
            f"{st_a.rps:,.0f} streams/s ({st_a.rps / st_b.rps:.0%})."
        )
    one_b, one_a = r.get("single-stream/bare"), r.get("single-stream/atlas")
    if one_b and one_a:
        added = one_a.data["ttfb_ms"]["p50"] - one_b.data["ttfb_ms"]["p50"]
        out.append(
            f"Time to first byte with one stream at a time (no queueing): added {added:.2f} ms "
            f"p50 (bare {one_b.data['ttfb_ms']['p50']:.2f} ms, Atlas "
            f"{one_a.data['ttfb_ms']['p50']:.2f} ms"
            + (
                f", floor {one_f.data['ttfb_ms']['p50']:.2f} ms"
                if (one_f := r.get("single-stream/floor"))
                else ""
            )
            + ")."
        )
    hl_a = r.get("half-load/atlas")
    if hl_a:
        parts = ", ".join(
            f"{n} {hl_a.us_per_request(n):.0f} µs" for n in ("authz", "extproc", "admin")
        )
        out.append(
            f"Python CPU per plain completion at half load: {hl_a.python_us_per_request():.0f} "
            f"µs ({parts}); one at a time: "
            + (f"{se_a.python_us_per_request():.0f} µs." if se_a else "not run.")
        )
    return out


def _disturbance(r: Mapping[str, Measured], quiet_before: str | None) -> list[str]:
    hit = [(k, m.other_util()) for k, m in r.items() if m.other_util() >= DISTURBED]
    if not hit:
        return []
    worst = max(hit, key=lambda x: x[1])
    return [
        f"**Warning: other workloads shared this machine during the run** (up to "
        f"{worst[1]:.2f} cores in `{worst[0]}`; {len(hit)} of {len(r)} phases above "
        f"{DISTURBED:.2f} cores; busy before start: {quiet_before or '?'}). Everything here "
        "competes for the same cores, so absolute numbers and ratios are disturbed; run again "
        "on a quiet machine for numbers to compare.",
    ]


def _summary_rows(r: Mapping[str, Measured], n_up: int) -> list[list[str]]:
    rows = [
        [
            t.name,
            t.fmt(t.value) if t.value is not None else "–",
            ("≥ " if t.higher_is_better else "≤ ") + t.fmt(t.limit),
            t.verdict(),
            t.fmt(t.floor) if t.floor is not None else "–",
            t.vs_floor(),
        ]
        for t in targets(r)
    ]
    alone, bare = r.get("nonstream-max/upstream"), r.get("nonstream-max/bare")
    if alone and bare:
        busy = bare.util("upstream") / n_up
        ok = busy < SATURATED and alone.rps > 1.2 * bare.rps
        rows.append(
            [
                "Upstream not the bottleneck (non-streaming, behind bare Envoy)",
                f"{busy:.0%} of a core"
                + (" per process" if n_up > 1 else "")
                + f"; alone {alone.rps / bare.rps:.1f}× bare's req/s",
                f"< {SATURATED:.0%} of a core; > 1.2×",
                "**met**" if ok else "**not met**: see the upstream section",
                "",
                "",
            ]
        )
    return rows


def render(
    results: Mapping[str, Measured],
    facts: Mapping[str, str],
    command: str,
    args: argparse.Namespace,
) -> tuple[str, str]:
    summary = _table(
        ["target", "measured", "target", "met?", "floor", "Atlas vs floor"],
        _summary_rows(results, args.upstreams),
    )
    up_table, up_verdicts = _upstream_check(results, args.upstreams)
    ctx = _context(results, args.connections) + up_verdicts
    warn = _disturbance(results, facts.get("busy cores before start"))
    stdout_summary = "\n".join(
        ["", summary, "", *warn, *ctx, "", "Bottlenecks:", *_bottlenecks(results)]
    )
    per_req, util = _cpu_tables(results)
    md: list[str] = [
        "# Benchmarks",
        "",
        "Written by `python -m bench` (`make bench`); every run rewrites this file. Bare Envoy "
        "and Envoy + Atlas run side by side in one run on the same machine, the same Envoy "
        "binary with one worker (`--concurrency 1`) and the same demo upstream, and get the "
        "same load. The targets are ratios and differences within that one run. These are "
        "benchmarks, not timed tests: CI never runs them.",
        "",
        "## Machine and command",
        "",
        _table(["", ""], [[k, str(v)] for k, v in facts.items()]),
        "",
        "```sh",
        command,
        "```",
        "",
        f"Phases of {args.duration:g} s per path"
        + (f", cut into {args.rounds} slices that alternate the paths" if args.rounds > 1 else "")
        + (" (`--quick`: short phases, noisier numbers)" if args.quick else "")
        + (f", only `{args.only}`" if args.only else "")
        + (f", {args.replicas} authz and extproc replicas" if args.replicas != 1 else "")
        + ".",
        "",
        "## Summary against the targets",
        "",
        summary,
        "",
        *[f"{line}\n" for line in warn],
        *[f"- {line}" for line in ctx],
        "",
        "## How it was measured",
        "",
        "- **Paths.** *bare Envoy*: `envoy/bare.yaml.tmpl` (listener, connection manager, "
        "access log, `/v1/` route and timeouts as `envoy/atlas.yaml.tmpl`; only the router "
        "filter). *Envoy + Atlas*: `atlas.local.stack.Stack` (Valkey, authz, extproc, admin, Envoy "
        "from `envoy/atlas.yaml.tmpl`) with one API key, made through the admin API, whose "
        "limits cannot be reached. Both proxy to the same demo upstream ("
        + (
            "one `python -m atlas.local.demo` process"
            if args.upstreams == 1
            else f"{args.upstreams} `atlas.local.demo` processes sharing one port"
        )
        + "); both get the same requests (a chat completion with `max_tokens` 16, or "
        f"{CHUNKS} tokens with `stream: true`, and the key in `Authorization`). *floor*: "
        "the Atlas bootstrap (`atlas.envoy_config.render`, HTTP ext_authz, the per-request "
        "ext_proc modes) in front of do-nothing servers (`bench/floor.py`): an HTTP authz "
        "(uvloop `asyncio.Protocol` + httptools) that answers every Check 200 with a fixed "
        "grant and `x-atlas-proc: json` (`splice` for streams: the Lua filter), and a "
        "grpc.aio ext_proc that "
        "answers every message with an empty (pass-through) response: what the design costs "
        "before any of Atlas's logic, Redis included. Every Envoy's access log is read by the "
        "benchmark process.",
        "- **One at a time** (quiet-machine latency): `bench/loadgen.py serial`, "
        f"{args.serial_requests:,} plain completions per path, each written as soon as the "
        "previous answer's last byte arrived, over one keep-alive connection, on bare, floor "
        "and Atlas in alternating slices, before any load phase. Latency runs from the write "
        "to the answer's last byte.",
        "- **Maximum load**: `wrk -t1 -c<connections> --latency` with a Lua script (closed "
        "loop: at saturation, latency is mostly queueing). Any socket error or status >= 400 "
        "stops the run, as does any Envoy 4xx/5xx, ext_authz denial or error, or ext_proc "
        "failure or timeout.",
        "- **Added latency at half load**: wrk cannot hold a rate (Debian has no `wrk2`), so "
        "`bench/loadgen.py rate` (raw asyncio, uvloop when installed, its own process) sends "
        "requests at fixed times (open loop) at "
        f"{HALF:.0%} of Atlas's measured maximum, on both paths, over a pool of keep-alive "
        "connections; latency runs from the request's write to the answer's last byte. Its "
        "scheduler lag, achieved rate and CPU show whether the generator kept up.",
        "- **Streaming at maximum load**: wrk as above with `stream: true`; the upstream sends "
        "its events (role, 64 tokens, finish, usage when asked) back to back, so Envoy passes "
        "them on in a few reads (see ext_proc messages per request).",
        f"- **Paced streams** (TTFB, per-chunk cost): `bench/loadgen.py stream`, "
        f"{PACED_CONNECTIONS} connections each streaming one answer after another (and once "
        f"more with a single connection), the upstream pausing {PACED_DELAY_MS} ms between "
        "events (`x-demo-chunk-delay-ms`), so every chunk crosses Envoy (and extproc, where "
        "the exchange's mode reads it) on its own, as with a real model. TTFB runs from the "
        "request's write to the first body byte. A default stream (no `include_usage` from "
        "the client) is `splice`d: Envoy's Lua filter cuts the usage chunk, the access log "
        "settles it, so its extproc CPU per chunk is that settlement spread over the chunks "
        "(the Lua work is in Envoy's CPU).",
        "- **authz alone**: `bench/authzload.py` against the stack's authz with Valkey, over "
        "the protocol the stack's Envoy uses (`ATLAS_AUTHZ_PROTOCOL`): *http*, what Envoy's "
        "HTTP ext_authz client sends (`POST /v1/chat/completions`, the client's headers, "
        "`x-envoy-auth-partial-body: false`, the JSON body) over keep-alive HTTP/1.1 "
        "connections, one Check at a time on each (Envoy's pool); *grpc*, grpc.aio unary "
        "`Check` calls with a CheckRequest like Envoy's (raw headers, JSON body). Checks per "
        'CPU-second of authz is the "per core" figure.',
        "- **Python CPU per plain completion**: authz + extproc + admin CPU over the half-load "
        "phase / its completions (the floor's do-nothing servers count as authz and "
        "extproc).",
        "- **CPU**: utime+stime from `/proc/<pid>/stat` (whole process trees) before and after "
        "each phase; wrk and the generators from `wait4`. *client* is the load generator, "
        "*harness* this benchmark's own process (it drains every Envoy's access log). *proxy "
        "total* is Envoy + authz + extproc + Valkey + admin. Everything shares the same "
        "cores, so CPU one process uses is CPU the others cannot. In the one-at-a-time "
        "phase the generator samples the services' CPU around its own requests (its start-up, "
        "when they only idle, is left out); /proc counts in ticks of "
        f"{1000 * TICK_S:.0f} ms, so a short slice's CPU per request is rounded by up to a tick "
        "per process.",
        "",
        "## Is the upstream the bottleneck?",
        "",
        up_table or "not run",
        "",
        *[f"- {v}" for v in up_verdicts],
        "",
        "## The design's floor: do-nothing servers behind Atlas's Envoy",
        "",
        _floor_table(results) or "not run",
        "",
        "## One plain completion at a time (quiet machine)",
        "",
        _serial_table(results) if "serial/bare" in results else "not run",
        "",
        "## Idempotent requests, one at a time (issue 17)",
        "",
        _idempotency_table(results) or "not run",
        "",
        "## Non-streaming, maximum load (wrk)",
        "",
        _max_table(results, "nonstream-max") if "nonstream-max/bare" in results else "not run",
        "",
        "## Added latency at half of Atlas's maximum (open loop)",
        "",
        _half_table(results) if "half-load/bare" in results else "not run",
        "",
        f"## Streaming ({CHUNKS} chunks), maximum load (wrk)",
        "",
        _max_table(results, "stream-max") if "stream-max/bare" in results else "not run",
        "",
        f"## Paced streams, {PACED_CONNECTIONS} at a time: time to first byte, per-chunk cost",
        "",
        _paced_table(results, "paced-stream") if "paced-stream/bare" in results else "not run",
        "",
        *_chunk_lines(results),
        "",
        "## Paced streams, one at a time (time to first byte without queueing)",
        "",
        _paced_table(results, "single-stream") if "single-stream/bare" in results else "not run",
        "",
        "## Streams whose client asks for usage: ext_proc, or the opt-in Envoy path",
        "",
        "The same three stream phases with `stream_options.include_usage` (nothing for Atlas "
        "to strip) on bare Envoy, on the default stack (the `observe` ext_proc filter reads "
        "every chunk) and on a second stack with `ATLAS_STREAM_USAGE_FROM_ENVOY=true` "
        "(Envoy's sse_to_metadata lifts the usage, the access log settles it; no ext_proc), "
        "started for these phases only.",
        "",
        f"### Maximum load (wrk, {CHUNKS} chunks)",
        "",
        _max_table(results, "usage-stream-max")
        if "usage-stream-max/bare" in results
        else "not run",
        "",
        f"### Paced, {PACED_CONNECTIONS} at a time",
        "",
        _paced_table(results, "usage-paced-stream")
        if "usage-paced-stream/bare" in results
        else "not run",
        "",
        *_chunk_lines(results, "usage-paced-stream", "atlas"),
        *_chunk_lines(results, "usage-paced-stream", "sse"),
        "",
        "### Paced, one at a time",
        "",
        _paced_table(results, "usage-single-stream")
        if "usage-single-stream/bare" in results
        else "not run",
        "",
        "## authz alone, with Redis (Valkey)",
        "",
        _authz_table(results) or "not run",
        "",
        "## CPU per request, by process",
        "",
        per_req,
        "",
        "At low load (one at a time, half load, paced and single streams) a process's CPU per "
        "request includes "
        "its fixed cost per wake-up and its idle timers, so it is higher than at maximum load, "
        "where work is batched.",
        "",
        "## CPU use during each phase (share of one core)",
        "",
        util,
        "",
        "*irq+softirq*: kernel time outside any process (mostly loopback TCP). *other "
        "processes*: the rest of the machine's busy time, not spent by anything this run "
        "started: another workload on the machine; when it is large the run was disturbed.",
        "",
        "## Bottlenecks",
        "",
        *_bottlenecks(results),
        "",
    ]
    return "\n".join(md), stdout_summary

"""The benchmark run: start everything, drive each phase, check it, measure CPU, report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from atlas.local.ports import free_port
from atlas.local.procs import ComponentDied
from atlas.local.stack import Stack, free_port_settings
from bench import estimation, report
from bench.bare import bare_envoy
from bench.floor import floor_services
from bench.procs import (
    Service,
    cpu_delta,
    cpu_snapshot,
    demo_upstream,
    machine_cpu,
    python_env,
    run_tool,
    shared_upstreams,
)
from bench.shapes import (
    HALF,
    KEY_LIMITS,
    NONSTREAM_BODY,
    PACED_CONNECTIONS,
    PACED_DELAY_MS,
    STREAM_BODY,
    STREAM_USAGE_BODY,
)
from bench.wrk import WrkResult, run_wrk, write_script

ADMIN_TOKEN = "bench-admin-token-0123456789"
#: Envoy counters (every Envoy here uses stat_prefix "atlas") checked and reported per phase.
STATS_FILTER = r"^http\.atlas\.(downstream_rq_[1-5]xx|ext_authz\.|ext_proc\.)"
#: Envoy counters that must not move during a phase: 4xx/5xx, and any ext_authz or ext_proc
#: filter's failures (each ext_proc filter of the per-request modes may have its own prefix).
MUST_STAY_ZERO = re.compile(
    r"^http\.atlas\.(downstream_rq_[45]xx"
    r"|ext_authz\.(.+\.)?(denied|error|failure_mode_allowed)"
    r"|ext_proc\.(.+\.)?(streams_failed|message_timeouts|failure_mode_allowed"
    r"|spurious_msgs_received))$"
)
PROXY_PROCS = ("envoy", "authz", "extproc", "valkey", "admin")
#: Atlas's Python processes (the floor's do-nothing servers count under the same names).
PYTHON_PROCS = ("authz", "extproc", "admin")
#: Paths with an Envoy in front of the upstream.
PROXIED = ("bare", "floor", "atlas")
#: The opt-in stream fast path: a second stack with ATLAS_STREAM_USAGE_FROM_ENVOY=true, up
#: only for its phases (streams whose client asks for usage), on the same upstream.
SSE = "sse"


class BenchError(RuntimeError):
    """A phase saw errors: the numbers would be meaningless."""


@dataclass
class Measured:
    """One load phase on one path, with the CPU every process spent during it."""

    phase: str
    path: str  # upstream | bare | floor | atlas | authz
    tool: str
    requests: int
    seconds: float  # the load's own measuring window
    wall_s: float  # the CPU sampling window (tool start to exit)
    cpu: dict[str, float]  # process -> CPU seconds
    machine_busy_s: float  # all CPUs, whole machine (/proc/stat)
    machine_irq_s: float  # of which interrupts and softirqs (loopback TCP mostly)
    data: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def util(self, name: str) -> float:
        """Share of one core used by `name` during the phase."""
        return self.cpu.get(name, 0.0) / self.wall_s if self.wall_s else 0.0

    def us_per_request(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.requests * 1e6 if self.requests else 0.0

    def proxy_us_per_request(self) -> float:
        return sum(self.us_per_request(n) for n in PROXY_PROCS if n in self.cpu)

    def python_us_per_request(self) -> float:
        """authz + extproc + admin CPU per request (the Python side of the proxy)."""
        return sum(self.us_per_request(n) for n in PYTHON_PROCS if n in self.cpu)

    def other_util(self) -> float:
        """Cores used by processes this run did not start (another workload on the machine)."""
        if not self.wall_s:
            return 0.0
        other = self.machine_busy_s - self.machine_irq_s - sum(self.cpu.values())
        return max(0.0, other) / self.wall_s

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "path": self.path,
            "tool": self.tool,
            "requests": self.requests,
            "seconds": self.seconds,
            "rps": self.rps,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu,
            "machine_busy_s": self.machine_busy_s,
            "machine_irq_s": self.machine_irq_s,
            "data": self.data,
            "stats": self.stats,
        }


class _Discard(io.StringIO):
    """The Stack's log sink: services' output is kept in its tails, not printed."""

    def write(self, s: str) -> int:
        return len(s)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.duration = args.duration
        self.tmp = tempfile.TemporaryDirectory(prefix="atlas-bench-")
        self.workdir = Path(self.tmp.name)
        self.upstreams: list[Service] = []
        self.bare: Service | None = None
        self.floor: dict[str, Service] = {}
        self.stack: Stack | None = None
        self.sse_stack: Stack | None = None
        self.key = ""
        self.sse_key = ""
        self.authz_key = ""
        self.results: dict[str, Measured] = {}
        self.quiet_before: float | None = None  # cores busy before anything started
        self.waited_s = 0.0

    # ---- lifecycle ----------------------------------------------------------------------
    async def _busy_cores(self, seconds: float = 1.0) -> float:
        """Cores the machine's processes used over `seconds` (before anything of ours runs)."""
        busy0, irq0 = machine_cpu()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        busy1, irq1 = machine_cpu()
        return (busy1 - busy0 - (irq1 - irq0)) / (time.monotonic() - t0)

    async def start(self) -> None:
        t_wait = time.monotonic()
        self.quiet_before = await self._busy_cores()
        deadline = time.monotonic() + self.args.wait_quiet
        quiet_for = 0
        if self.args.wait_quiet and self.quiet_before > 0.25:
            print(f"bench: waiting for a quiet machine ({self.quiet_before:.2f} cores busy)")
        while quiet_for < 3 and time.monotonic() < deadline:
            quiet_for = quiet_for + 1 if self.quiet_before <= 0.25 else 0
            self.quiet_before = await self._busy_cores()
        self.waited_s = time.monotonic() - t_wait
        if self.quiet_before > 0.25:
            print(
                f"bench: WARNING: {self.quiet_before:.2f} cores were already busy before the "
                "benchmark started: another workload will disturb the numbers",
                flush=True,
            )
        up_port = free_port()
        self.upstream_url = f"http://127.0.0.1:{up_port}"
        n = self.args.upstreams
        self.upstreams = [demo_upstream(up_port)] if n == 1 else shared_upstreams(up_port, n)
        for svc in self.upstreams:
            await svc.start()
        self.bare_port, bare_admin = free_port(), free_port()
        self.bare_admin_url = f"http://127.0.0.1:{bare_admin}"
        self.bare = bare_envoy(self.upstream_url, self.bare_port, bare_admin, self.workdir)
        await self.bare.start()
        settings = free_port_settings(
            admin_token=ADMIN_TOKEN, envoy_concurrency=1, upstream=self.upstream_url
        )
        extra = {"replicas": self.args.replicas} if self.args.replicas != 1 else {}
        self.stack = Stack(settings, out=_Discard(), **extra)
        try:
            await self.stack.start()
        except ComponentDied:
            print(self.stack.logs(), file=sys.stderr)
            raise
        self.atlas_port = self.stack.settings.proxy_port
        self.key = await self._create_key("bench")
        self.authz_key = await self._create_key("bench-authz")
        self.floor_port, floor_admin = free_port(), free_port()
        self.floor_admin_url = f"http://127.0.0.1:{floor_admin}"
        self.floor = floor_services(
            self.upstream_url,
            self.floor_port,
            floor_admin,
            self.workdir,
            self.stack.settings.max_request_bytes,
        )
        for svc in self.floor.values():
            await svc.start()

    async def start_sse(self) -> None:
        """The opt-in stack, for its phases only (it idles beside the others otherwise)."""
        settings = free_port_settings(
            admin_token=ADMIN_TOKEN,
            envoy_concurrency=1,
            upstream=self.upstream_url,
            stream_usage_from_envoy=True,
        )
        self.sse_stack = Stack(settings, out=_Discard())
        try:
            await self.sse_stack.start()
        except ComponentDied:
            print(self.sse_stack.logs(), file=sys.stderr)
            raise
        self.sse_key = await self._create_key("bench-sse", self.sse_stack)

    async def stop_sse(self) -> None:
        if self.sse_stack is not None:
            await self.sse_stack.stop()
            self.sse_stack = None

    async def stop(self) -> None:
        # Atlas and the floor first (their Envoys stop sending), then the baseline, then the
        # shared upstream.
        await self.stop_sse()
        if self.stack is not None:
            await self.stack.stop()
        floor = self.floor
        for svc in (floor.get("envoy"), floor.get("extproc"), floor.get("authz")):
            if svc is not None:
                await svc.stop()
        for svc in (self.bare, *self.upstreams):
            if svc is not None:
                await svc.stop()
        self.tmp.cleanup()

    async def _create_key(self, name: str, stack: Stack | None = None) -> str:
        stack = stack or self.stack
        assert stack is not None
        async with httpx.AsyncClient(
            base_url=stack.admin_url,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        ) as client:
            r = await client.post("/v1/admin/keys", json={"name": name, **KEY_LIMITS})
        if r.status_code != 201:
            raise BenchError(f"admin refused the benchmark key: {r.status_code} {r.text}")
        return str(r.json()["api_key"])

    def pids(self) -> dict[str, dict[str, list[int]]]:
        """Process groups per path; replicas ("authz-1") count with their service."""
        assert self.stack is not None and self.bare is not None
        atlas: dict[str, list[int]] = {}
        for name, child in self.stack.children.items():
            if child.proc is not None:
                atlas.setdefault(name.split("-", 1)[0], []).append(child.proc.pid)
        up = [svc.pid for svc in self.upstreams]
        floor = {name: [svc.pid] for name, svc in self.floor.items()}
        sse: dict[str, list[int]] = {}
        for name, child in (self.sse_stack.children if self.sse_stack else {}).items():
            if child.proc is not None:
                sse.setdefault(name.split("-", 1)[0], []).append(child.proc.pid)
        return {
            "upstream": {"upstream": up},
            "bare": {"envoy": [self.bare.pid], "upstream": up},
            "floor": {**floor, "upstream": up},
            "atlas": {**atlas, "upstream": up},
            SSE: {**sse, "upstream": up},
        }

    def check_alive(self) -> None:
        assert self.stack is not None
        for stack in (self.stack, self.sse_stack):
            if stack is not None and stack.died is not None and stack.died.done():
                raise BenchError(f"an Atlas stack lost a process: {stack.died.result()}")
        for svc in (*self.upstreams, self.bare, *self.floor.values()):
            if svc is not None and not svc.alive():
                raise BenchError(f"{svc.name} exited: {svc.log()}")

    # ---- measuring ----------------------------------------------------------------------
    async def envoy_stats(self, path: str) -> dict[str, int]:
        if path not in (*PROXIED, SSE):
            return {}
        assert self.stack is not None
        base = {
            "bare": self.bare_admin_url,
            "floor": self.floor_admin_url,
            "atlas": self.stack.envoy_admin_url,
            SSE: self.sse_stack.envoy_admin_url if self.sse_stack else "",
        }[path]
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"{base}/stats", params={"filter": STATS_FILTER})
        out = {}
        for line in r.text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    async def measure(self, phase: str, path: str, tool: str, load: Any) -> Measured:
        """Run `load` (a coroutine returning (requests, seconds, client_cpu_s, data)) with CPU
        and Envoy counters sampled around it; check the phase was clean."""
        self.check_alive()
        pids = self.pids()["atlas" if path == "authz" else path]
        stats0 = await self.envoy_stats(path)
        cpu0 = cpu_snapshot(pids)
        own0 = os.times()
        busy0, irq0 = machine_cpu()
        t0 = time.monotonic()
        requests, seconds, client_cpu, data = await load
        wall = time.monotonic() - t0
        busy1, irq1 = machine_cpu()
        own1 = os.times()
        cpu = cpu_delta(cpu0, cpu_snapshot(pids))
        window = data.pop("cpu_window", None)
        if window:  # the generator sampled CPU around its own window (no start-up in it)
            cpu, wall, client_cpu = dict(window["cpu_s"]), window["wall_s"], window["client_s"]
            busy0, busy1, irq0, irq1 = 0.0, window["busy_s"], 0.0, window["irq_s"]
            data["cpu_sampled_by"] = "generator"
        stats1 = await self.envoy_stats(path)
        cpu["client"] = client_cpu
        cpu["harness"] = (own1.user - own0.user) + (own1.system - own0.system)
        stats = {k: v - stats0.get(k, 0) for k, v in stats1.items()}
        m = Measured(
            phase, path, tool, requests, seconds, wall, cpu, busy1 - busy0, irq1 - irq0, data, stats
        )
        self.check_alive()
        bad = {k: n for k, n in stats.items() if n and MUST_STAY_ZERO.match(k)}
        if phase == "serial-replay":  # a replay is authz's answer: Envoy counts it denied
            bad = {k: n for k, n in bad.items() if not k.endswith("ext_authz.denied")}
        if bad:
            raise BenchError(f"{phase} on {path}: Envoy counted failures: {bad}")
        return m

    async def compare(
        self, phase: str, tool: str, paths: tuple[str, ...], load: Callable[[str, float], Any]
    ) -> dict[str, Measured]:
        """`phase` on each path, in `rounds` alternating slices of the phase's duration (so a
        disturbance or drift hits every path alike); slices merged per path."""
        rounds = self.args.rounds
        seconds = self.duration / rounds
        slices: dict[str, list[Measured]] = {p: [] for p in paths}
        for i in range(rounds):
            order = paths if i % 2 == 0 else paths[::-1]
            for path in order:
                slices[path].append(await self.measure(phase, path, tool, load(path, seconds)))
        out = {}
        for path, ms in slices.items():
            m = merge(ms)
            self.results[f"{phase}/{path}"] = m
            print(f"bench: {report.phase_line(m)}", flush=True)
            out[path] = m
        return out

    # ---- loads --------------------------------------------------------------------------
    def _headers(self, paced: bool = False, path: str = "atlas") -> dict[str, str]:
        key = self.sse_key if path == SSE else self.key
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        if paced:
            h["x-demo-chunk-delay-ms"] = str(PACED_DELAY_MS)
        return h

    def url(self, path: str) -> str:
        ports = {"bare": self.bare_port, "floor": self.floor_port, "atlas": self.atlas_port}
        if self.sse_stack is not None:
            ports[SSE] = self.sse_stack.settings.proxy_port
        port = ports.get(path)
        return self.upstream_url if port is None else f"http://127.0.0.1:{port}"

    def port(self, path: str) -> int:
        return int(self.url(path).rsplit(":", 1)[1])

    async def _wrk(self, path: str, script: Path, seconds: float) -> Any:
        r: WrkResult = await run_wrk(self.url(path), script, seconds, self.args.connections)
        if r.error_count:
            raise BenchError(f"wrk against {path}: errors {r.errors}\n{r.output}")
        data = {"latency_ms": r.latency_ms, "errors": r.errors, "connections": r.connections}
        return r.requests, r.duration_s, r.cpu_s, data

    async def _loadgen(self, argv: list[str]) -> dict[str, Any]:
        run = await run_tool([sys.executable, "-m", *argv], env=python_env())
        line = next((x for x in run.output.splitlines() if x.startswith("BENCHJSON ")), None)
        if run.returncode != 0 or line is None:
            raise BenchError(f"{argv[0]} failed (exit {run.returncode}):\n{run.output}")
        data: dict[str, Any] = json.loads(line.removeprefix("BENCHJSON "))
        data["_cpu_s"] = run.cpu_s
        return data

    async def _rate(self, path: str, rate: float, seconds: float) -> Any:
        argv = ["bench.loadgen", "rate", "--port", str(self.port(path)), "--rate", f"{rate:.1f}"]
        argv += ["--duration", str(seconds), "--body", json.dumps(NONSTREAM_BODY)]
        for k, v in self._headers().items():
            if k != "Content-Type":
                argv += ["--header", f"{k}: {v}"]
        d = await self._loadgen(argv)
        if d["dropped"] or set(d["statuses"]) != {"200"} or d["completed"] != d["issued"]:
            raise BenchError(f"open-loop load on {path} saw errors: {d}")
        return d["completed"], d["completed"] / d["achieved_rate"], d.pop("_cpu_s"), d

    async def _serial(self, path: str, requests: int, idempotency: str = "none") -> Any:
        pids = ";".join(f"{n}={','.join(map(str, g))}" for n, g in self.pids()[path].items())
        argv = ["bench.loadgen", "serial", "--port", str(self.port(path))]
        argv += ["--idempotency", idempotency]
        argv += ["--requests", str(requests), "--body", json.dumps(NONSTREAM_BODY)]
        argv += ["--cpu-pids", pids]
        for k, v in self._headers().items():
            if k != "Content-Type":
                argv += ["--header", f"{k}: {v}"]
        d = await self._loadgen(argv)
        if d["error"] or set(d["statuses"]) != {"200"} or d["completed"] != requests:
            raise BenchError(f"serial requests on {path} saw errors: {d}")
        return d["completed"], d["elapsed_s"], d.pop("_cpu_s"), d

    def _serial_load(self, requests: int, idempotency: str) -> Callable[[str, float], Any]:
        return lambda path, _seconds: self._serial(path, requests, idempotency)

    async def _streams(
        self, path: str, seconds: float, connections: int, body: Any = STREAM_BODY
    ) -> Any:
        argv = ["bench.loadgen", "stream", "--port", str(self.port(path))]
        argv += ["--connections", str(connections), "--duration", str(seconds)]
        argv += ["--body", json.dumps(body)]
        for k, v in self._headers(paced=True, path=path).items():
            if k != "Content-Type":
                argv += ["--header", f"{k}: {v}"]
        d = await self._loadgen(argv)
        if d["incomplete"] or set(d["statuses"]) != {"200"} or not d["completed"]:
            raise BenchError(f"paced streams on {path} saw errors: {d}")
        return d["completed"], d["completed"] / d["rate"], d.pop("_cpu_s"), d

    async def _authz(self, seconds: float, concurrency: int) -> Any:
        assert self.stack is not None
        s = self.stack.settings
        argv = ["bench.authzload", "--target", f"{s.authz_host}:{s.authz_port}"]
        argv += ["--protocol", s.authz_protocol]
        argv += ["--key", self.authz_key, "--duration", str(seconds)]
        argv += ["--concurrency", str(concurrency)]
        d = await self._loadgen(argv)
        if d["errors"] or set(d["codes"]) != {"200"}:
            raise BenchError(f"authz load saw errors or refusals: {d}")
        return d["checks"], d["elapsed_s"], d.pop("_cpu_s"), d

    # ---- the phases ---------------------------------------------------------------------
    async def run(self) -> None:
        only = self.args.only
        ns = write_script(
            self.workdir / "nonstream.lua", "/v1/chat/completions", NONSTREAM_BODY, self._headers()
        )
        st = write_script(
            self.workdir / "stream.lua", "/v1/chat/completions", STREAM_BODY, self._headers()
        )
        warm = 1 if self.args.quick else 2
        print("bench: warming up (not measured)", flush=True)
        for path in PROXIED:
            for script in (ns, st):
                r = await run_wrk(self.url(path), script, warm, self.args.connections)
                if r.error_count:
                    raise BenchError(f"warm-up against {path}: errors {r.errors}\n{r.output}")
        three = ("upstream", "bare", "atlas")
        two = ("bare", "atlas")
        if only in (None, "nonstream", "serial"):
            # First, while the machine is quiet: one request at a time, nothing queues.
            per_slice = max(1, self.args.serial_requests // self.args.rounds)
            await self.compare(
                "serial", "loadgen serial", PROXIED, lambda p, _t: self._serial(p, per_slice)
            )
            # The same through Atlas with an Idempotency-Key: each a first request, then each
            # a duplicate answered from the stored response.
            for phase, idem in (("serial-idempotent", "new"), ("serial-replay", "same")):
                await self.compare(
                    phase, "loadgen serial", ("atlas",), self._serial_load(per_slice, idem)
                )
        if only in (None, "nonstream"):
            got = await self.compare(
                "nonstream-max",
                "wrk",
                ("upstream", *PROXIED),
                lambda p, t: self._wrk(p, ns, t),
            )
            rate = HALF * got["atlas"].rps
            if rate < 10:
                raise BenchError(f"Atlas's maximum is {got['atlas'].rps:.1f} req/s: too low")
            await self.compare(
                "half-load", "loadgen rate", two, lambda p, t: self._rate(p, rate, t)
            )
        if only in (None, "stream"):
            await self.compare("stream-max", "wrk", three, lambda p, t: self._wrk(p, st, t))
            await self.compare(
                "paced-stream",
                "loadgen stream",
                two,
                lambda p, t: self._streams(p, t, PACED_CONNECTIONS),
            )
            await self.compare(
                "single-stream", "loadgen stream", PROXIED, lambda p, t: self._streams(p, t, 1)
            )
        if only in (None, "authz"):
            conc = self.args.authz_concurrency
            print("bench: warming up authz (not measured)", flush=True)
            await self._authz(warm, conc)
            await self.compare("authz", "authzload", ("authz",), lambda p, t: self._authz(t, conc))
        if only in (None, "stream", SSE):  # last: the default's phases keep their places
            await self._sse_phases(warm)

    def _usage_streams(self, connections: int) -> Callable[[str, float], Any]:
        return lambda path, seconds: self._streams(path, seconds, connections, STREAM_USAGE_BODY)

    async def _sse_phases(self, warm: float) -> None:
        """Streams whose client asks for usage: the default path (ext_proc observes them)
        and the opt-in one (Envoy's sse_to_metadata reads the usage, no ext_proc)."""
        print("bench: starting the opt-in stack (ATLAS_STREAM_USAGE_FROM_ENVOY=true)", flush=True)
        await self.start_sse()
        scripts = {
            p: write_script(
                self.workdir / f"usage-{p}.lua",
                "/v1/chat/completions",
                STREAM_USAGE_BODY,
                self._headers(path=p),
            )
            for p in ("bare", "atlas", SSE)
        }
        paths = ("bare", "atlas", SSE)
        for p in paths:
            r = await run_wrk(self.url(p), scripts[p], warm, self.args.connections)
            if r.error_count:
                raise BenchError(f"warm-up against {p}: errors {r.errors}\n{r.output}")
        try:
            await self.compare(
                "usage-stream-max", "wrk", paths, lambda p, t: self._wrk(p, scripts[p], t)
            )
            for phase, conns in (
                ("usage-paced-stream", PACED_CONNECTIONS),
                ("usage-single-stream", 1),
            ):
                await self.compare(phase, "loadgen stream", paths, self._usage_streams(conns))
        finally:
            await self.stop_sse()


# ---- merging the slices of a phase -------------------------------------------------------

#: Counters that add up across slices; other numbers (rates, settings) take the median.
_SUMMED = {
    "issued",
    "completed",
    "dropped",
    "queued_for_connection",
    "incomplete",
    "checks",
    "requests",
}


def _merge_data(items: list[Any], key: str = "") -> Any:
    first = items[0]
    if isinstance(first, dict):
        if "p50" in first:  # percentiles: the median slice's, each on its own; max of max
            return {
                k: (
                    max(i[k] for i in items)
                    if k == "max"
                    else sum(i[k] for i in items)
                    if k == "n"
                    else statistics.median(i[k] for i in items)
                )
                for k in first
            }
        keys = dict.fromkeys(k for i in items for k in i)
        if all(isinstance(v, int | float) for i in items for v in i.values()):
            return {k: sum(i.get(k, 0) for i in items) for k in keys}  # counts by status etc.
        return {k: _merge_data([i[k] for i in items if k in i], k) for k in keys}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    if key in _SUMMED:
        return sum(items)
    return statistics.median(items)


def merge(ms: list[Measured]) -> Measured:
    """One Measured from slices of the same phase and path: totals add up, percentiles are
    the median over slices, and each slice's req/s is kept in data["slices_rps"]."""
    if len(ms) == 1:
        m = ms[0]
        m.data["slices_rps"] = [m.rps]
        return m
    cpu: dict[str, float] = {}
    stats: dict[str, int] = {}
    for m in ms:
        for k, v in m.cpu.items():
            cpu[k] = cpu.get(k, 0.0) + v
        for k, n in m.stats.items():
            stats[k] = stats.get(k, 0) + n
    data = _merge_data([m.data for m in ms])
    data["slices_rps"] = [m.rps for m in ms]
    return Measured(
        phase=ms[0].phase,
        path=ms[0].path,
        tool=ms[0].tool,
        requests=sum(m.requests for m in ms),
        seconds=sum(m.seconds for m in ms),
        wall_s=sum(m.wall_s for m in ms),
        cpu=cpu,
        machine_busy_s=sum(m.machine_busy_s for m in ms),
        machine_irq_s=sum(m.machine_irq_s for m in ms),
        data=data,
        stats=stats,
    )


# ---- entry --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Bare Envoy vs Envoy + Atlas on the same upstream, same load, one run; "
        "writes docs/benchmarks.md. How to read it: bench/__main__.py.",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per load phase")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--quick", action="store_true", help="short phases (~1 minute in all)")
    p.add_argument(
        "--only",
        choices=("serial", "nonstream", "stream", SSE, "authz", "estimation"),
        default=None,
    )
    p.add_argument(
        "--serial-requests",
        type=int,
        default=None,
        help="requests per path in the one-at-a-time phase (default 1000, --quick 300)",
    )
    p.add_argument(
        "--authz-concurrency", type=int, default=32, help="Checks in flight in the authz phase"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="slices each phase is cut into, alternating the paths (default 3, --quick 1)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other workloads to go quiet before starting",
    )
    p.add_argument(
        "--upstreams",
        type=int,
        default=1,
        help="demo upstream processes sharing one port (SO_REUSEPORT); default 1",
    )
    p.add_argument(
        "--replicas", type=int, default=1, help="authz and extproc processes each (default 1)"
    )
    p.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"),
        help="Markdown report to (re)write; '-' writes none",
    )
    p.add_argument("--json", default=None, help="also write every raw measurement here")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 15.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.serial_requests is None:
        args.serial_requests = 300 if args.quick else 1000
    if args.serial_requests < args.rounds:
        p.error("--serial-requests must be >= --rounds")
    if args.rounds < 1 or args.duration / args.rounds < 1:
        p.error("--rounds must be >= 1 and leave >= 1 s per slice")
    if args.duration < 1:
        p.error("--duration must be >= 1")
    return args


async def _main(args: argparse.Namespace, command: str) -> tuple[int, str, str]:
    """Exit code, Markdown report, raw JSON."""
    # SIGTERM (a killed `make bench`) stops like Ctrl-C: cancel, then stop every process.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    facts = report.machine_facts()
    bench = Bench(args)
    started = time.monotonic()
    try:
        print("bench: starting upstream, bare Envoy and the Atlas stack", flush=True)
        await bench.start()
        await bench.run()
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr, flush=True)
        if bench.stack is not None:
            print(bench.stack.logs(), file=sys.stderr)
        for svc in bench.floor.values():
            print(f"--- {svc.name} ---\n    {svc.log()}", file=sys.stderr)
        return 1, "", ""
    finally:
        with contextlib.suppress(Exception):
            await bench.stop()
    facts["run time"] = f"{time.monotonic() - started - bench.waited_s:.0f} s" + (
        f" (after waiting {bench.waited_s:.0f} s for a quiet machine)" if args.wait_quiet else ""
    )
    if bench.quiet_before is not None:
        facts["busy cores before start"] = f"{bench.quiet_before:.2f} (other workloads)"
    text, summary = report.render(bench.results, facts, command, args)
    print(summary, flush=True)
    raw = json.dumps({k: m.to_json() for k, m in bench.results.items()}, indent=1)
    return 0, text, raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only == "estimation":  # no servers: only its own section of the report is rewritten
        return estimation.main(["--output", args.output] + (["--quick"] if args.quick else []))
    if shutil.which("wrk") is None:
        print("bench: needs wrk on PATH (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    shown = sys.argv[1:] if argv is None else argv
    command = "python -m bench" + "".join(f" {a}" for a in shown)
    try:
        code, text, raw = asyncio.run(_main(args, command))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    if code == 0:
        text = estimation.merge(text, estimation.render(args.quick))
    if code == 0 and args.output != "-":
        Path(args.output).write_text(text)
        print(f"bench: wrote {args.output}", flush=True)
    if code == 0 and args.json:
        Path(args.json).write_text(raw)
    return code

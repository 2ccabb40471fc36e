"""Processes: start and stop the ones the benchmark owns, and measure CPU of any of them.

Starting, readiness polling and stopping are `atlas.local.procs` (the local stack's own);
this module adds what only the benchmark needs.

CPU comes from ``/proc/<pid>/stat`` (utime + stime, in clock ticks) summed over a process and
its live descendants (so a service that forks workers is still counted whole), plus what it
has reaped (cutime + cstime). Short-lived tools (wrk, the load generators) are measured exactly
with ``wait4``'s rusage instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from atlas.local.procs import Child, die_with_parent
from atlas.probes import http_ok

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


# ---- CPU ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw.rsplit(")", 1)[1].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def cpu_ticks(pid: int, kids: Mapping[int, list[int]] | None = None) -> int:
    """utime+stime of `pid` and its live descendants, plus reaped children's; 0 if gone."""
    kids = _children_map() if kids is None else kids
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        fields = _stat_fields(p)
        if fields is None:
            continue
        # After the ')' split: [0]=state, [11]=utime, [12]=stime, [13]=cutime, [14]=cstime.
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        todo.extend(kids.get(p, ()))
    return total


def cpu_snapshot(pids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """CPU seconds so far of each named group of process trees (e.g. every authz replica)."""
    kids = _children_map()
    return {name: sum(cpu_ticks(p, kids) for p in group) * TICK_S for name, group in pids.items()}


def machine_cpu() -> tuple[float, float]:
    """(busy, of which irq+softirq) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy * TICK_S, (fields[5] + fields[6]) * TICK_S


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


# ---- measured one-shot tools (wrk, load generators) ----------------------------------------


@dataclass
class ToolRun:
    argv: list[str]
    returncode: int
    output: str
    cpu_s: float
    wall_s: float


async def run_tool(argv: list[str], *, env: Mapping[str, str] | None = None) -> ToolRun:
    """Run a tool to completion; its exact CPU time comes from wait4. Killed if cancelled."""
    start = time.monotonic()
    # Spawned from the loop's thread on purpose: PR_SET_PDEATHSIG follows the spawning thread.
    proc = subprocess.Popen(  # noqa: ASYNC220
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        preexec_fn=die_with_parent,
        cwd=REPO,
    )

    def wait() -> tuple[str, int, float]:
        assert proc.stdout is not None
        out = proc.stdout.read().decode("utf-8", "replace")
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return out, proc.returncode, usage.ru_utime + usage.ru_stime

    try:
        out, rc, cpu = await asyncio.to_thread(wait)
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        raise
    return ToolRun(argv, rc, out, cpu, time.monotonic() - start)


def python_env() -> dict[str, str]:
    """Environment for `python -m bench.<tool>` children: the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---- long-running children the benchmark owns (upstream, bare Envoy) -----------------------


@dataclass
class Service(Child):
    """A child the benchmark owns: run from the checkout, which it can import."""

    def __post_init__(self) -> None:
        self.env = python_env() if self.env is None else self.env
        self.cwd = REPO if self.cwd is None else self.cwd


def shared_upstreams(port: int, n: int) -> list[Service]:
    """`n` identical demo upstreams on one port (`python -m bench.upstream`, SO_REUSEPORT)."""
    out = []
    for i in range(n):
        svc = Service(
            f"upstream-{i}",
            [sys.executable, "-m", "bench.upstream", "--host", "127.0.0.1", "--port", str(port)],
            ready=lambda: asyncio.sleep(0),
        )

        async def listening(svc: Service = svc) -> None:
            if not any("listening" in line for line in svc.tail):
                raise RuntimeError("not listening yet")

        svc.ready = listening
        out.append(svc)
    return out


def demo_upstream(port: int) -> Service:
    return Service(
        "upstream",
        [sys.executable, "-m", "atlas.local.demo", "--host", "127.0.0.1", "--port", str(port)],
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
    )

"""Closed-loop maximum-throughput load with wrk (Debian's `wrk` package).

One Lua script per request shape: a fixed POST, and a `done` hook that prints the summary and
the latency percentiles as one JSON line (`BENCHJSON {...}`), so nothing is scraped from
wrk's human output.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import run_tool

_LUA = """\
wrk.method = "POST"
wrk.path = [==[{path}]==]
wrk.body = [==[{body}]==]
{headers}
local req = nil
request = function()
  if req == nil then req = wrk.format() end
  return req
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"p50":%f,"p90":%f,"p99":%f,"p999":%f,"mean":%f,"max":%f}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
"""


def write_script(path: Path, url_path: str, body: dict[str, Any], headers: dict[str, str]) -> Path:
    lines = "\n".join(f"wrk.headers[ [==[{k}]==] ] = [==[{v}]==]" for k, v in headers.items())
    path.write_text(
        _LUA.format(path=url_path, body=json.dumps(body, separators=(",", ":")), headers=lines)
    )
    return path


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu_s: float  # wrk's own CPU (wait4)
    connections: int
    output: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("bench: wrk not found; install it: apt-get install -y wrk")
    return found


async def run_wrk(
    base_url: str, script: Path, duration_s: float, connections: int, threads: int = 1
) -> WrkResult:
    argv = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        base_url,
    ]
    run = await run_tool(argv)
    line = next((x for x in run.output.splitlines() if x.startswith("BENCHJSON ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {run.returncode}):\n{run.output}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        errors=data["errors"],
        latency_ms={k: v / 1000.0 for k, v in data["latency_us"].items()},
        cpu_s=run.cpu_s,
        connections=connections,
        output=run.output,
    )

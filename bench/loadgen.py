"""HTTP/1.1 load generators wrk cannot be: an open-loop fixed-rate one, and a streaming client
that times the first body byte. Raw asyncio protocols (uvloop when installed), run as their own
process so the benchmark's event loop (which drains the services' logs) cannot disturb them:

    python -m bench.loadgen rate   --port P --rate R --duration S --body JSON [--header K:V]
    python -m bench.loadgen stream --port P --connections C --duration S --body JSON [...]
    python -m bench.loadgen serial --port P --requests N --body JSON [--header K:V]

Each prints one JSON line with percentiles (milliseconds) and counts.

*rate*: request i is due at t0 + i/R whether or not earlier ones have answered (open loop,
like wrk2); each goes out on an idle keep-alive connection of a pre-opened pool. Latency is
measured from the moment the request was written to the last byte of the answer; the
scheduler's lateness (written - due) is reported too, and so is the latency from the due time
(which adds any wait for a free connection: coordinated-omission-free).

*stream*: C connections, each sending the next request when the previous stream ended
(closed loop). Per stream: time to first body byte (from the request written), duration of
the body (first to last byte), the gaps between body reads, and the SSE events received.

*serial*: N requests one at a time over one keep-alive connection, the next written as soon as
the previous answer's last byte arrived: what one request costs on a quiet machine, with no
queueing and no batching anywhere. Latency runs from the write to the answer's last byte.
With `--cpu-pids`, the generator samples those processes' CPU (and the machine's) around its
own measuring window: a short phase's numbers then leave out the generator's start-up, when
the measured processes only idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

perf = time.perf_counter
MIN_SLEEP_S = 0.001


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean of `values` (seconds) in milliseconds (scale)."""
    if not values:
        return {}
    v = sorted(values)
    n = len(v)

    def at(q: float) -> float:
        return v[min(n - 1, max(0, round(q * n + 0.5) - 1))] * scale

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": v[-1] * scale,
        "mean": sum(v) / n * scale,
        "n": n,
    }


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; Content-Length or chunked."""

    def __init__(self, on_done: Callable[[Conn], None], lost: Callable[[Conn], None]) -> None:
        self.on_done = on_done
        self.lost = lost
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.head_done = False
        self.length: int | None = None  # Content-Length, or None when chunked
        self.chunk_need = -1  # chunked: bytes left in the current chunk (+2 for CRLF), -1: size
        self.body_bytes = 0
        self.body = bytearray()
        self.keep_body = False
        self.reads: list[float] = []
        self.t_due = 0.0
        self.t_sent = 0.0
        self.t_first = 0.0
        self.t_done = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost(self)

    def send(self, request: bytes, t_due: float, keep_body: bool = False) -> None:
        self._reset()
        self.keep_body = keep_body
        self.busy = True
        self.t_due = t_due
        assert self.transport is not None
        self.t_sent = perf()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = perf()
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").lower().split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            self.length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name == "content-length":
                    self.length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    self.length = None
            del self.buf[: end + 4]
            self.head_done = True
        before = self.body_bytes
        if self.length is not None:
            take = min(len(self.buf), self.length - self.body_bytes)
            self._body(self.buf[:take])
            del self.buf[:take]
            finished = self.body_bytes >= self.length
        else:
            finished = self._chunked()
        if self.body_bytes > before:
            if not self.t_first:
                self.t_first = now
            self.reads.append(now)
        if finished:
            self.t_done = now
            self.busy = False
            self.on_done(self)

    def _body(self, data: bytes | bytearray) -> None:
        self.body_bytes += len(data)
        if self.keep_body:
            self.body += data

    def _chunked(self) -> bool:
        """Decode what `buf` holds; True at the last chunk. chunk_need: -1 = at a size line,
        else data bytes left in the current chunk (then its CRLF)."""
        buf = self.buf
        while True:
            if self.chunk_need < 0:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return False
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                if size == 0:  # last chunk, no trailers: "0\r\n\r\n"
                    if len(buf) < eol + 4:
                        return False
                    del buf[: eol + 4]
                    return True
                del buf[: eol + 2]
                self.chunk_need = size
            if self.chunk_need > 0:
                take = min(len(buf), self.chunk_need)
                if take:
                    self._body(buf[:take])
                    del buf[:take]
                    self.chunk_need -= take
                if self.chunk_need > 0:
                    return False
            if len(buf) < 2:
                return False
            del buf[:2]
            self.chunk_need = -1


def build_request(host: str, port: int, path: str, body: bytes, headers: list[str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connect(host: str, port: int, on_done: Any, lost: Any) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(on_done, lost), host, port)
    return conn


# ---- open loop at a fixed rate ------------------------------------------------------------


async def run_rate(args: argparse.Namespace) -> dict[str, Any]:
    request = build_request(args.host, args.port, args.path, args.body.encode(), args.header)
    idle: deque[Conn] = deque()
    waiting: deque[float] = deque()  # due times of requests that found no idle connection
    lat_sent: list[float] = []
    lat_due: list[float] = []
    lag: list[float] = []
    statuses: dict[int, int] = {}
    dropped = 0
    queued = 0
    done = asyncio.Event()
    outstanding = 0

    def on_done(c: Conn) -> None:
        nonlocal outstanding
        outstanding -= 1
        statuses[c.status] = statuses.get(c.status, 0) + 1
        lat_sent.append(c.t_done - c.t_sent)
        lat_due.append(c.t_done - c.t_due)
        lag.append(c.t_sent - c.t_due)
        if waiting:
            outstanding += 1
            c.send(request, waiting.popleft())
        else:
            idle.append(c)
        if outstanding == 0 and finished_issuing:
            done.set()

    def lost(c: Conn) -> None:
        nonlocal dropped, outstanding
        if c.busy:
            dropped += 1
            outstanding -= 1
            c.busy = False
        if c in idle:
            idle.remove(c)

    finished_issuing = False
    for conn in await asyncio.gather(
        *(_connect(args.host, args.port, on_done, lost) for _ in range(args.pool))
    ):
        idle.append(conn)
    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    t0 = perf() + 0.05
    i = 0
    while i < total:
        now = perf()
        due = t0 + i * interval
        if due > now:
            # Event-loop timers tick in milliseconds: a shorter sleep returns at once and the
            # loop would spin, stealing CPU from what is measured. Sleep >= 1 ms, then send
            # everything that fell due (the lag is reported; latency starts at the write).
            await asyncio.sleep(max(due - now, MIN_SLEEP_S))
            continue
        while i < total and t0 + i * interval <= now:
            d = t0 + i * interval
            if idle:
                outstanding += 1
                idle.popleft().send(request, d)
            else:
                waiting.append(d)
                queued += 1
            i += 1
    issue_end = perf()
    finished_issuing = True
    if outstanding or waiting:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
    end = perf()
    return {
        "mode": "rate",
        "target_rate": args.rate,
        "issued": total,
        "completed": len(lat_sent),
        "achieved_rate": len(lat_sent) / (end - t0),
        "issue_rate": total / (issue_end - t0),
        "statuses": {str(k): v for k, v in statuses.items()},
        "dropped": dropped,
        "pool": args.pool,
        "queued_for_connection": queued,
        "latency_ms": percentiles(lat_sent),
        "latency_from_due_ms": percentiles(lat_due),
        "schedule_lag_ms": percentiles(lag),
    }


# ---- one at a time ------------------------------------------------------------------------


def parse_pids(spec: str) -> dict[str, list[int]]:
    """`envoy=12;authz=34,35` -> {"envoy": [12], "authz": [34, 35]}."""
    out: dict[str, list[int]] = {}
    for part in filter(None, spec.split(";")):
        name, _, pids = part.partition("=")
        out[name] = [int(x) for x in pids.split(",") if x]
    return out


class CpuWindow:
    """CPU of named process groups and of the machine over one window (bench.procs)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        from bench import procs  # only here: the other modes stay light to start

        self.procs = procs
        self.pids = pids

    def start(self) -> None:
        self.cpu0 = self.procs.cpu_snapshot(self.pids)
        self.machine0 = self.procs.machine_cpu()
        self.own0 = time.process_time()
        self.t0 = perf()

    def stop(self) -> dict[str, Any]:
        wall = perf() - self.t0
        own = time.process_time() - self.own0
        busy1, irq1 = self.procs.machine_cpu()
        cpu = self.procs.cpu_delta(self.cpu0, self.procs.cpu_snapshot(self.pids))
        busy0, irq0 = self.machine0
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "client_s": own,  # this generator's own CPU in the window
            "busy_s": busy1 - busy0,
            "irq_s": irq1 - irq0,
        }


async def run_serial(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body.encode()
    headers = list(args.header)
    if args.idempotency == "same":  # every request a duplicate of one that completed
        headers.append(f"Idempotency-Key: bench-{os.getpid()}-{time.time_ns()}")
    request = build_request(args.host, args.port, args.path, body, headers)
    run_id = f"bench-{os.getpid()}-{time.time_ns()}"
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Conn] = loop.create_future()

    def on_done(c: Conn) -> None:
        if not fut.done():
            fut.set_result(c)

    def lost(c: Conn) -> None:
        if not fut.done():
            fut.set_exception(ConnectionError("connection closed"))

    conn = await _connect(args.host, args.port, on_done, lost)
    latency: list[float] = []
    statuses: dict[int, int] = {}
    error = ""
    window = CpuWindow(parse_pids(args.cpu_pids)) if args.cpu_pids else None
    if window is not None:
        window.start()
    if args.idempotency == "same":
        # The original, not measured; then its settlement's moment to reach Redis.
        fut = loop.create_future()
        conn.send(request, perf())
        await asyncio.wait_for(fut, 30)
        await asyncio.sleep(0.5)
    t0 = perf()
    for i in range(args.requests):
        fut = loop.create_future()
        if args.idempotency == "new":  # every request a first one
            key = f"Idempotency-Key: {run_id}-{i}"
            request = build_request(args.host, args.port, args.path, body, [*headers, key])
        conn.send(request, perf())
        try:
            c = await asyncio.wait_for(fut, 30)
        except (ConnectionError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"  # one connection: the run ends here
            break
        statuses[c.status] = statuses.get(c.status, 0) + 1
        latency.append(c.t_done - c.t_sent)
    elapsed = perf() - t0
    cpu_window = window.stop() if window is not None else None
    if conn.transport is not None:
        conn.transport.close()
    return {
        "mode": "serial",
        "cpu_window": cpu_window,
        "requests": args.requests,
        "completed": len(latency),
        "elapsed_s": elapsed,
        "rate": len(latency) / elapsed if elapsed else 0.0,
        "statuses": {str(k): v for k, v in statuses.items()},
        "error": error,
        "latency_ms": percentiles(latency),
    }


# ---- streaming client ---------------------------------------------------------------------


async def run_stream(args: argparse.Namespace) -> dict[str, Any]:
    request = build_request(args.host, args.port, args.path, args.body.encode(), args.header)
    ttfb: list[float] = []
    total: list[float] = []
    body_time: list[float] = []
    gaps: list[float] = []
    events: dict[int, int] = {}
    statuses: dict[int, int] = {}
    incomplete = 0
    loop = asyncio.get_running_loop()
    deadline = perf() + args.duration

    async def worker() -> None:
        nonlocal incomplete
        fut: asyncio.Future[Conn] | None = None

        def on_done(c: Conn) -> None:
            if fut is not None and not fut.done():
                fut.set_result(c)

        def lost(c: Conn) -> None:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection closed"))

        conn = await _connect(args.host, args.port, on_done, lost)
        while perf() < deadline:
            fut = loop.create_future()
            conn.send(request, perf(), keep_body=True)
            try:
                c = await asyncio.wait_for(fut, 30)
            except (ConnectionError, TimeoutError):
                incomplete += 1
                conn = await _connect(args.host, args.port, on_done, lost)
                continue
            statuses[c.status] = statuses.get(c.status, 0) + 1
            n = bytes(c.body).count(b"data:")
            if not c.body.rstrip().endswith(b"data: [DONE]"):
                incomplete += 1
            events[n] = events.get(n, 0) + 1
            ttfb.append(c.t_first - c.t_sent)
            total.append(c.t_done - c.t_sent)
            body_time.append(c.reads[-1] - c.reads[0])
            gaps.extend(b - a for a, b in zip(c.reads, c.reads[1:], strict=False))
        if conn.transport is not None:
            conn.transport.close()

    t0 = perf()
    await asyncio.gather(*(worker() for _ in range(args.connections)))
    elapsed = perf() - t0
    return {
        "mode": "stream",
        "connections": args.connections,
        "completed": len(ttfb),
        "rate": len(ttfb) / elapsed,
        "statuses": {str(k): v for k, v in statuses.items()},
        "incomplete": incomplete,
        "sse_events_per_stream": {str(k): v for k, v in sorted(events.items())},
        "reads_per_stream": (len(gaps) + len(ttfb)) / len(ttfb) if ttfb else 0.0,
        "ttfb_ms": percentiles(ttfb),
        "total_ms": percentiles(total),
        "body_ms": percentiles(body_time),
        "read_gap_ms": percentiles(gaps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("mode", choices=("rate", "stream", "serial"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--body", required=True, help="JSON request body")
    p.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=100.0, help="rate mode: requests/s")
    p.add_argument("--pool", type=int, default=64, help="rate mode: keep-alive connections")
    p.add_argument("--connections", type=int, default=8, help="stream mode: concurrent streams")
    p.add_argument("--requests", type=int, default=1000, help="serial mode: requests to send")
    p.add_argument(
        "--cpu-pids",
        default="",
        help="serial mode: 'name=pid,pid;name=pid' whose CPU to sample around the window",
    )
    p.add_argument(
        "--idempotency",
        choices=("none", "new", "same"),
        default="none",
        help="serial mode: an Idempotency-Key per request (new) or one for all (same: replays)",
    )
    args = p.parse_args(argv)
    run = {"rate": run_rate, "stream": run_stream, "serial": run_serial}[args.mode]
    try:
        import uvloop  # optional: lower client overhead
    except ImportError:
        result = asyncio.run(run(args))
        result["loop"] = "asyncio"
    else:
        result = uvloop.run(run(args))
        result["loop"] = "uvloop"
    print("BENCHJSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Supervised child processes: start, poll until ready, keep the output's tail, stop.

One copy for the local stack (`atlas.local.stack`) and the benchmark (`bench.procs`).
Children get SIGTERM when their parent dies (PR_SET_PDEATHSIG), so nothing outlives the
process that started them, and run in their own process group, so Ctrl-C reaches the
parent only and it stops the children in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from atlas.lifetime import die_with_parent_signal

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
#: Lines of output kept per child, for the message when it dies.
TAIL_LINES = 40


class ComponentDied(RuntimeError):
    pass


def die_with_parent() -> None:
    """preexec_fn: a killed parent (even SIGKILL) takes its children; own process group, so
    Ctrl-C reaches the parent only and it stops the children in order."""
    die_with_parent_signal(signal.SIGTERM)
    os.setpgrp()


async def poll_until_ready(
    name: str,
    proc: asyncio.subprocess.Process,
    ready: Callable[[], Awaitable[Any]],
    timeout_s: float,
    exited: Callable[[], str],
) -> None:
    """Call `ready` every 50 ms until it succeeds. :raises ComponentDied: when the process
    exits first (message from `exited`) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.returncode is not None:
            raise ComponentDied(exited())
        try:
            await ready()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ComponentDied(f"{name} not ready after {timeout_s:.0f}s ({exc})") from exc
        await asyncio.sleep(0.05)


async def redis_ping(url: str, timeout_s: float = 0.5) -> None:
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        await client.ping()
    finally:
        await client.aclose()


@dataclass
class Child:
    """One supervised process: stdout and stderr merged, read line by line into `tail`."""

    name: str
    argv: list[str]
    ready: Callable[[], Awaitable[Any]]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: asyncio.subprocess.Process | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def fresh(self) -> Child:
        """The same command, not started, with the output seen so far."""
        return dataclasses.replace(
            self, proc=None, pump=None, tail=deque(self.tail, maxlen=TAIL_LINES)
        )

    async def start(
        self,
        timeout_s: float = READY_TIMEOUT_S,
        *,
        echo: Callable[[str], None] | None = None,
        exited: Callable[[int], None] | None = None,
    ) -> None:
        """Start and wait until `ready` succeeds. :param echo: called with each output line.
        :param exited: called with the return code when the process ends.
        :raises ComponentDied: it exited or was not ready within `timeout_s`."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            preexec_fn=die_with_parent,
        )
        self.pump = asyncio.create_task(self._pump(echo, exited))
        await poll_until_ready(self.name, self.proc, self.ready, timeout_s, self.death_message)

    async def _pump(
        self, echo: Callable[[str], None] | None, exited: Callable[[int], None] | None
    ) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            if echo is not None:
                echo(line)
        rc = await self.proc.wait()
        if exited is not None:
            exited(rc)

    def log(self, lines: int = 8) -> str:
        return "\n    ".join(list(self.tail)[-lines:]) or "(no output)"

    def death_message(self, rc: int | None = None) -> str:
        rc = self.proc.returncode if rc is None and self.proc else rc
        how = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"code {rc}"
        return f"{self.name} exited with {how}; its last output:\n    {self.log()}"

    async def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal it and wait until it is gone and its output read."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        await self.proc.wait()
        if self.pump is not None:
            await asyncio.gather(self.pump, return_exceptions=True)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; a no-op when it never started."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pump, 2)

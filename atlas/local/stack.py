"""The local stack: Valkey, a demo upstream, authz, extproc, admin and Envoy as child processes.

`Stack` is used in-process by the end-to-end tests, by the benchmark and by `atlas up`.
Children start in dependency order and each is polled until it answers (`atlas.local.procs`);
output is prefixed with the child's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from pydantic import AliasChoices, SecretStr

from atlas.envoy_config import EnvoyParams, ListenerTls, envoy_binary, render
from atlas.local.ports import free_port, reserve
from atlas.local.procs import Child, ComponentDied, redis_ping
from atlas.local.valkey import valkey_argv
from atlas.probes import authz_serving, grpc_serving, http_ok
from atlas.providers import config as providers_config
from atlas.settings import Settings


def _legacy_names() -> frozenset[str]:
    """The environment names settings still read besides `ATLAS_*` (`atlas.settings._legacy`)."""
    names: set[str] = set()
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(
                c for c in alias.choices if isinstance(c, str) and not c.startswith("ATLAS_")
            )
    return frozenset(names)


#: Legacy names a child process must not inherit when it is given exact settings.
LEGACY_ENV_NAMES = _legacy_names()


#: Timeout of one readiness probe (s); probes repeat every 50 ms until the child is ready.
PROBE_S = 0.5
_NAME_WIDTH = len("upstream")

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


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that gives a child exactly these settings."""
    inherited = os.environ.items()
    env = {k: v for k, v in inherited if not k.startswith("ATLAS_") and k not in LEGACY_ENV_NAMES}
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
        scheme = "https" if self.settings.listener_tls_cert_file else "http"
        return f"{scheme}://127.0.0.1:{self.settings.proxy_port}"

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
        reserve([int(getattr(s, name)) for name in PORT_SETTINGS])
        if self._external_redis is None:
            port = free_port()
            self.settings = s = s.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
            await self._spawn(
                Child(
                    "valkey",
                    valkey_argv(port, self.workdir, "--loglevel", "warning", *self._valkey_args),
                    ready=lambda: redis_ping(s.redis_url),
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
                        "atlas.local.demo",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(s.demo_upstream_port),
                    ],
                    ready=lambda: http_ok(upstream + "/health", timeout_s=PROBE_S),
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
                    ready=lambda: grpc_serving(
                        f"{s.extproc_host}:{s.extproc_port}", timeout_s=PROBE_S
                    ),
                )
            ),
            self._spawn(
                Child(
                    "admin",
                    [*py, "admin"],
                    env=env,
                    ready=lambda: http_ok(self.admin_url + "/livez", timeout_s=PROBE_S),
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
                    sse_usage=s.stream_usage_from_envoy,
                    providers=providers_config.load(s.providers_file) if s.providers_file else None,
                    listener_tls=ListenerTls(
                        s.listener_tls_cert_file, s.listener_tls_key_file, s.listener_client_ca_file
                    )
                    if s.listener_tls_cert_file and s.listener_tls_key_file
                    else None,
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
                ready=lambda: http_ok(self.envoy_admin_url + "/ready", timeout_s=PROBE_S),
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
                ready = functools.partial(grpc_serving, f"127.0.0.1:{port}", timeout_s=PROBE_S)
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
        await child.start(
            echo=functools.partial(self._echo, child.name),
            exited=functools.partial(self._exited, child),
        )

    def _echo(self, name: str, line: str) -> None:
        self._out.write(f"{name:<{_NAME_WIDTH}} | {line}\n")
        self._out.flush()

    def _exited(self, child: Child, rc: int) -> None:
        if not self.stopping and self.died is not None and not self.died.done():
            self.died.set_result(child.death_message(rc))

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop one component abruptly (fault tests); the stack keeps running."""
        await self.children[name].kill(sig)

    async def restart(self, name: str) -> None:
        """Start a stopped component again, same command, and wait until it is ready."""
        child = self.children[name]
        if child.alive():
            await child.stop()
        await self._spawn(child.fresh())

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
                await child.stop()
        self._tmp.cleanup()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n" + "\n".join(c.tail) for c in self.children.values())


async def _authz_ok(s: Settings, host: str, port: int) -> None:
    await authz_serving(s.model_copy(update={"authz_host": host, "authz_port": port}))


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
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()), stack.died}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
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

#!/usr/bin/env python3
"""Container health check for every Atlas service: `atlas-healthcheck [COMMAND [FLAGS...]]`.

The image's HEALTHCHECK cannot know which service the container runs, so with no arguments
this reads the command line of the container's Atlas process (PID 1, or the first Atlas
process when an init such as `docker run --init` is PID 1) and checks that service the way
Envoy or Kubernetes would:

    authz            GET /healthz on its port (Envoy's HTTP ext_authz protocol, the
                     default), or gRPC health when ATLAS_AUTHZ_PROTOCOL=grpc
    extproc          gRPC health (grpc.health.v1 Check, service "") on the gRPC port
    admin            GET /livez on the admin port
    demo-upstream    GET /health on the demo upstream's port

Ports and hosts come from the same `ATLAS_*` environment and flags the service itself read
(`atlas.cli` parses them), so `atlas authz --authz-port 6000` is probed on 6000. A wildcard
listen address (0.0.0.0, ::) is probed on loopback. Exit 0: healthy; 1: unhealthy or
nothing to check, with the reason on stderr (Docker reserves exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

TIMEOUT_S = 3.0
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
ATLAS_MODULES = {"atlas", "atlas.cli", "atlas.__main__"}


def atlas_args(cmdline: Sequence[str]) -> list[str] | None:
    """The Atlas arguments inside a process command line, or None if it is not Atlas.

    Recognises `[python] /usr/local/bin/atlas CMD ...`, `python -m atlas[.cli] CMD ...` and
    `python -m atlas.local.demo ...` (read as `demo-upstream ...`).
    """
    for i, arg in enumerate(cmdline):
        if arg == "-m" and i + 1 < len(cmdline):
            module = cmdline[i + 1]
            if module in ATLAS_MODULES:
                return list(cmdline[i + 2 :])
            if module == "atlas.local.demo":
                return ["demo-upstream", *cmdline[i + 2 :]]
            return None
        if os.path.basename(arg) == "atlas":
            return list(cmdline[i + 1 :])
    return None


def _cmdline(pid_dir: Path) -> list[str]:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:  # the process went away, or it is not ours to read
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_atlas_args(proc: Path = Path("/proc")) -> list[str] | None:
    """Arguments of the container's Atlas process: PID 1 first, then the lowest PID."""
    found = atlas_args(_cmdline(proc / "1"))
    if found is not None:
        return found
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        if pid != os.getpid():
            found = atlas_args(_cmdline(proc / str(pid)))
            if found is not None:
                return found
    return None


def _local(host: str) -> str:
    if host in WILDCARDS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _http_ok(url: str) -> None:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")


def _grpc_serving(target: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        raise RuntimeError(f"{target}: gRPC health {name}")


def target_of(args: Sequence[str]) -> tuple[str, str]:
    """(kind, address) to probe for Atlas arguments: ("grpc", "host:port") or ("http", url)."""
    command, rest = args[0], list(args[1:])
    if command == "demo-upstream":
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=9000)
        ns, _ = parser.parse_known_args(rest)
        return "http", f"http://{_local(ns.host)}:{ns.port}/health"
    if command not in ("authz", "extproc", "admin"):
        raise ValueError(f"atlas {command}: not a long-running service")
    from atlas.cli import build_parser
    from atlas.settings import Settings, load_settings

    try:
        ns = build_parser().parse_args([command, *rest])
    except SystemExit as exc:  # argparse already printed why
        raise ValueError(f"atlas {command}: bad arguments {rest}") from exc
    settings = load_settings({k: v for k, v in vars(ns).items() if k in Settings.model_fields})
    if command == "authz":
        # One port, the protocol authz serves on it: HTTP answers /healthz itself, and a
        # gRPC probe against it would fail on the HTTP/2 preface (and the reverse).
        address = f"{_local(settings.authz_host)}:{settings.authz_port}"
        if settings.authz_protocol == "grpc":
            return "grpc", address
        return "http", f"http://{address}/healthz"
    if command == "extproc":
        return "grpc", f"{_local(settings.extproc_host)}:{settings.extproc_port}"
    return "http", f"http://{_local(settings.admin_host)}:{settings.admin_port}/livez"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or find_atlas_args()
    if not args:
        print("atlas-healthcheck: no Atlas service found to check", file=sys.stderr)
        return 1
    try:
        kind, address = target_of(args)
        if kind == "grpc":
            _grpc_serving(address)
        else:
            _http_ok(address)
    except Exception as exc:
        print(f"atlas-healthcheck: {args[0]} unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

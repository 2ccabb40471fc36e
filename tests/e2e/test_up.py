"""`atlas up` as a user runs it: one ready line, Ctrl-C leaves nothing behind, and a dying
component stops the stack with a message naming it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from atlas.local.ports import free_port

READY_TIMEOUT_S = 60


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Up:
    def __init__(self, log: Path) -> None:
        self.ports = {
            name: free_port()
            for name in (
                "port",
                "admin-port",
                "envoy-admin-port",
                "authz-port",
                "extproc-port",
                "authz-metrics-port",
                "extproc-metrics-port",
                "demo-upstream-port",
            )
        }
        argv = [sys.executable, "-m", "atlas.cli", "up"]
        for name, port in self.ports.items():
            argv += [f"--{name}", str(port)]
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            out = self.output()
            for line in out.splitlines():
                if line.startswith("atlas: ready:"):
                    return line
            assert self.proc.poll() is None, out
            time.sleep(0.05)
        raise AssertionError("no ready line:\n" + self.output())


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path / "up.log")
    yield u
    if u.proc.poll() is None:
        u.proc.kill()
        u.proc.wait()


def test_ready_line_token_and_ctrl_c_leaves_no_process(up: Up) -> None:
    line = up.wait_ready()
    assert f"proxy http://127.0.0.1:{up.ports['port']}" in line
    assert f"admin http://127.0.0.1:{up.ports['admin-port']}" in line
    out = up.output()
    token = next(ln.split(": ")[-1] for ln in out.splitlines() if "admin token" in ln)
    assert "authz    |" in out and "upstream |" in out  # output prefixed by component
    r = httpx.post(
        f"http://127.0.0.1:{up.ports['admin-port']}/v1/admin/keys",
        headers={"authorization": f"Bearer {token}"},
        json={"name": "x"},
    )
    assert r.status_code == 201
    children = _children(up.proc.pid)
    assert len(children) == 6  # valkey, upstream, authz, extproc, admin, envoy
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0, up.output()
    assert [p for p in children if _alive(p)] == []


def test_a_dying_component_stops_the_stack_naming_it(up: Up) -> None:
    up.wait_ready()
    authz = httpx.get(f"http://127.0.0.1:{up.ports['authz-metrics-port']}/metrics")
    assert authz.status_code == 200
    children = _children(up.proc.pid)
    cmdlines = {p: (Path("/proc") / str(p) / "cmdline").read_bytes() for p in children}
    victim = next(p for p, cmd in cmdlines.items() if cmd.endswith(b"authz\x00"))
    os.kill(victim, signal.SIGKILL)
    assert up.proc.wait(30) == 1
    assert "authz exited with signal SIGKILL" in up.output()
    assert [p for p in children if _alive(p)] == []

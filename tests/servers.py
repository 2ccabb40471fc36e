"""Real servers for tests: a valkey-server on a free 127.0.0.1 port, polled until it answers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from atlas.stack import free_port, valkey_argv

READY_TIMEOUT_S = 10


def start_valkey(workdir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        valkey_argv(port, workdir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                return proc, url
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise
                time.sleep(0.02)
    finally:
        client.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

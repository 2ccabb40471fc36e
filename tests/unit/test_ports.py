"""Free ports for local stacks: never one the process was given for a component that does
not listen yet, nor one handed out before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from atlas.local import ports


class Picks:
    """A stand-in for `random.Random()` that proposes the given ports in order."""

    def __init__(self, proposals: list[int]) -> None:
        self._it: Iterator[int] = iter(proposals)

    def randint(self, _low: int, _high: int) -> int:
        return next(self._it)


def test_reserved_and_issued_ports_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ISSUED", set())
    base = ports._ephemeral_low() - 3000
    reserved, issued, fresh = base, base + 1, base + 2
    monkeypatch.setattr(ports.random, "Random", lambda: Picks([reserved, issued, fresh]))
    ports.reserve([reserved])
    ports._ISSUED.add(issued)
    assert ports.free_port() == fresh
    assert fresh in ports._ISSUED

"""The ledger seam holds: no code outside atlas/ledger spells a Redis key name (it asks the
ledger for a `HistoryScope` or a window by key id), and only the composition roots name the
Redis adapter; everything else types against a port of atlas/ledger/protocol.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("atlas", "authz", "extproc", "admin")
#: Where a process builds its ledger (and closes it).
COMPOSITION_ROOTS = {"admin/app.py", "authz/service.py", "extproc/server.py", "atlas/cli.py"}

KEY_SPELLING = re.compile(
    r"atlas\.ledger\.keys|from atlas\.ledger import keys"
    r"|[\"']atlas:[^\s\"']"  # a literal key name ("atlas:{g}:...", not "atlas: ready")
    r"|f[\"'](d|m|h|done):\{"  # a window or history name built by hand
)


def product_files() -> dict[str, str]:
    out = {}
    for top in PRODUCT:
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith("atlas/ledger/"):
                out[rel] = path.read_text()
    return out


def test_no_caller_spells_a_redis_key() -> None:
    found = {rel for rel, text in product_files().items() if KEY_SPELLING.search(text)}
    assert found == set()


def test_only_composition_roots_name_the_redis_adapter() -> None:
    found = {rel for rel, text in product_files().items() if "RedisLedger" in text}
    assert found - COMPOSITION_ROOTS == set()

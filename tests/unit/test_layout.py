"""The dependency rule and the size rule of README's "Layout", pinned.

- `atlas/` is the base layer: nothing under it imports a service (`authz`, `extproc`,
  `admin`) except the CLI (`atlas/cli.py`), which wires them.
- Services do not import each other: what crosses authz -> Envoy -> extproc is in the
  contract module (`atlas/grant.py`), which is the only place that spells its header names
  and metadata namespaces.
- No product module over `MAX_LINES` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("authz", "extproc", "admin")
PRODUCT = ("atlas", *SERVICES)
CONTRACT = ROOT / "atlas" / "grant.py"
#: The CLI is the one module under atlas/ that may import the services.
WIRING = {ROOT / "atlas" / "cli.py"}
MAX_LINES = 450
#: Literals only the contract module may spell: its metadata namespaces and header prefix.
CONTRACT_LITERALS = ("atlas.usage", "atlas.extproc", "envoy.filters.http.ext_authz")
CONTRACT_PREFIX = "x-atlas-"


def product_files() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level packages `path` imports anywhere (function-level imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_base_layer_imports_no_service() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_packages(p) & set(SERVICES))
        for p in (ROOT / "atlas").rglob("*.py")
        if p not in WIRING
    }
    assert {f: s for f, s in offenders.items() if s} == {}


def test_services_do_not_import_each_other() -> None:
    crossing = {}
    for service in SERVICES:
        for p in (ROOT / service).rglob("*.py"):
            others = imported_packages(p) & (set(SERVICES) - {service})
            if others:
                crossing[str(p.relative_to(ROOT))] = sorted(others)
    assert crossing == {}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String literals of `path`, logger names left out (`getLogger("atlas.extproc")` names
    a logger, not the metadata namespace it happens to share a spelling with)."""
    tree = ast.parse(path.read_text(), str(path))
    loggers = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getLogger"
        for arg in node.args
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in loggers
    ]


def test_only_the_contract_spells_what_crosses_envoy() -> None:
    spelled = []
    for p in product_files():
        if p == CONTRACT:
            continue
        for line, text in _string_constants(p):
            if text in CONTRACT_LITERALS or text.startswith(CONTRACT_PREFIX):
                spelled.append(f"{p.relative_to(ROOT)}:{line}: {text!r}")
    assert spelled == []


def test_the_contract_defines_what_the_rule_protects() -> None:
    """The rule above would pass vacuously if the contract lost its names."""
    texts = {text for _, text in _string_constants(CONTRACT)}
    assert set(CONTRACT_LITERALS) <= texts
    assert any(t.startswith(CONTRACT_PREFIX) and len(t) > len(CONTRACT_PREFIX) for t in texts)


def test_no_product_module_is_too_long() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in product_files()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_checks_see_the_whole_tree() -> None:
    """A moved folder must not make the rules above check nothing."""
    files = product_files()
    assert len(files) > 40
    assert all(any(p.is_relative_to(ROOT / top) for p in files) for top in PRODUCT)

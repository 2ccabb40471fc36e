"""The dashboard's ES modules fit together without a build step: index.html loads the entry
module, every relative import names a file the admin serves and a name that file exports, and
no module is left out of the graph. A broken import only shows in a browser otherwise, and the
browser test skips where Chromium is missing."""

from __future__ import annotations

import re

from admin.routes.dashboard import DASHBOARD_DIR, asset_path

ENTRY = "main.js"
STATIC = "/dashboard/static/"
IMPORT = re.compile(r'^import\s*\{([^}]*)\}\s*from\s*"([^"]+)";', re.M | re.S)
ANY_IMPORT = re.compile(r"^import\b", re.M)
EXPORT = re.compile(
    r"^export\s+(?:async\s+)?(?:function|const|let|class)\s+([A-Za-z_$][\w$]*)", re.M
)


def modules() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(DASHBOARD_DIR.glob("*.js"))}


def imports(source: str) -> list[tuple[str, set[str]]]:
    """(specifier, names) of each `import { a, b } from "..."`; the only form the page uses."""
    found = [
        (spec, {n.strip() for n in names.split(",") if n.strip()})
        for names, spec in IMPORT.findall(source)
    ]
    assert len(found) == len(ANY_IMPORT.findall(source)), "an import this check cannot read"
    return found


def test_index_loads_uplot_then_the_entry_module() -> None:
    html = (DASHBOARD_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)></script>", html)
    assert scripts == [
        ' src="/dashboard/static/vendor/uPlot.iife.min.js" defer',
        f' type="module" src="{STATIC}{ENTRY}"',
    ]
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith(STATIC), ref  # nothing from elsewhere
        assert asset_path(ref.removeprefix(STATIC)) is not None, ref


def test_every_import_resolves_to_an_export_and_every_module_is_used() -> None:
    sources = modules()
    exports = {name: set(EXPORT.findall(src)) for name, src in sources.items()}
    reached, todo = set(), [ENTRY]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for spec, names in imports(sources[name]):
            assert spec.startswith("./") and spec.endswith(".js"), f"{name}: {spec}"
            target = spec.removeprefix("./")
            assert target in sources and asset_path(target) is not None, f"{name}: {spec}"
            assert names <= exports[target], (
                f"{name}: {sorted(names - exports[target])} from {spec}"
            )
            todo.append(target)
    assert reached == set(sources), f"not imported by anything: {sorted(set(sources) - reached)}"


def test_the_patterns_read_imports_and_exports() -> None:
    # The graph check above is only as good as these expressions; pin them on a known input.
    src = 'import {\n  a, b,\n} from "./x.js";\nimport { c } from "./y.js";\n'
    assert imports(src) == [("./x.js", {"a", "b"}), ("./y.js", {"c"})]
    assert EXPORT.findall("export const a = 1;\nexport async function b() {}\nconst c = 2;\n") == [
        "a",
        "b",
    ]


def test_modules_are_small() -> None:
    sizes = {name: len(src.splitlines()) for name, src in modules().items()}
    assert max(sizes.values()) <= 300, sizes

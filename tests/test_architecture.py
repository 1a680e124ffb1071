"""The house stays one-way-down: every import in mgrow/ points to its own layer or below (the
order written once, in docs/architecture.md), nothing is circular, no module imports the
package root, no module is over 450 lines, and every docstring says what it may import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mgrow"
MAX_LINES = 450


def layer_order() -> list[str]:
    """Return the layer names of docs/architecture.md's table, bottom first."""
    text = (ROOT / "docs/architecture.md").read_text()
    block = re.search(r"## Layers, top to bottom\s+```text\n(.*?)```", text, re.S).group(1)
    rows = [line.split()[0] for line in block.splitlines()[1:] if line.strip()]
    return rows[::-1]


def modules() -> dict[str, Path]:
    """Return every module of mgrow by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Return the mgrow modules `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub where there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "mgrow" or t.startswith("mgrow.")}
    return found


def layer_of(module: str, order: list[str]) -> int:
    """Return the rank of a module's layer (higher is above); the package root is the top."""
    if module in ("mgrow", "mgrow.__main__"):
        return len(order)
    return order.index(module.split(".")[1])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    order = layer_order()
    missing = sorted({m.split(".")[1] for m in graph if m not in ("mgrow", "mgrow.__main__")}
                     - set(order))
    assert not missing, f"modules without a layer in docs/architecture.md: {missing}"
    assert len(set(order)) == len(order)


def test_imports_point_down_and_never_to_the_root(graph):
    order = layer_order()
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in sorted(targets)
              if layer_of(t, order) > layer_of(m, order)
              or (t == "mgrow" and m != "mgrow.__main__")]
    assert upward == [], f"{len(upward)} imports of a higher layer: {upward}"


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:  # depth-first: grey nodes on the path
        state[node] = "grey"
        for t in sorted(graph.get(node, ())):
            if state.get(t) == "grey":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[node] = "black"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], f"{len(cycles)} import cycles: {[' -> '.join(c) for c in cycles]}"


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    """The graph reading itself: relative imports of modules and of names resolve."""
    mods = modules()
    g = imports("mgrow.growth.methods", mods["mgrow.growth.methods"], set(mods))
    assert {"mgrow.growth.datadriven", "mgrow.growth.grid", "mgrow.arch", "mgrow.limits",
            "mgrow.errors"} <= g
    order = layer_order()
    assert layer_of("mgrow.cli.main", order) > layer_of("mgrow.api", order) \
        > layer_of("mgrow.errors", order) == 0


def test_modules_are_small_and_say_what_they_may_import():
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines"
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if name != "mgrow.__main__":
            assert re.search(r"\bimports?\b", doc, re.I), \
                f"{path.relative_to(ROOT)}: the docstring does not say what it may import"

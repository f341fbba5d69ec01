"""The house rules of ARCHITECTURE.md, read from the code with `ast`: no import cycle within or
between packages, and no upward import (cluster <- train <- tune, cluster <- serve; serve never
imports train or tune) except the CLI's lazy dispatch in cluster/cli/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# who may import whom: a package may import those of a lower level; serve and train share one
# level and may not import each other (adapters are files)
LEVEL = {"cluster": 0, "train": 1, "serve": 1, "tune": 2}
CLI = Path("cluster/cli")  # the package of the `lorafleet` command


def module_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file, lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for pkg in LEVEL:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT)
            mod = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, ast.Import):
                    names = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                    names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
                else:
                    continue
                targets |= {m for m in names if m.split(".")[0] in LEVEL}
            graph[mod] = targets
    known = set(graph)
    # `from cluster.store import storage` names the module cluster.store.storage
    return {m: {t for t in ts if t in known and t != m} for m, ts in graph.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return cycles


def test_find_cycles_sees_a_cycle():
    # the checker itself can fail: a three-module loop and a self-contained chain
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_within_or_between_packages():
    graph = {m: ts for m, ts in module_graph().items() if not m.startswith("cluster.cli.")}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports_except_the_cli_dispatch():
    upward = []
    for mod, targets in module_graph().items():
        src = Path(*mod.split(".")).with_suffix(".py")
        if src.is_relative_to(CLI):
            continue
        pkg = mod.split(".")[0]
        for t in targets:
            other = t.split(".")[0]
            if other != pkg and LEVEL[other] >= LEVEL[pkg]:
                upward.append(f"{mod} imports {t}")
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(sorted(upward))


def test_the_cli_imports_our_other_packages_only_lazily():
    top = [
        n.module
        for f in sorted((ROOT / CLI).glob("*.py"))
        for n in ast.parse(f.read_text()).body
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in LEVEL
    ]
    assert all(m.startswith("cluster") for m in top), top

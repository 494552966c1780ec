"""recpre's modules import each other without cycles (lazy imports inside functions included), and the
low-level ones do not reach up into the layers built on them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recpre"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recpre"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    assert cycle(import_graph()) is None, " -> ".join(cycle(import_graph()))


def test_low_level_modules_do_not_import_upward():
    graph = import_graph()
    upward = {
        "recpre.checkpoint": (
            "recpre.interop",
            "recpre.eval",
            "recpre.weights",
            "recpre.train_step",
            "recpre.train_state",
        ),
        "recpre.config": ("recpre.settings", "recpre.model", "recpre.fabric"),
        "recpre.model": (
            "recpre.fabric",
            "recpre.settings",
            "recpre.checkpoint",
            "recpre.train_step",
            "recpre.train_state",
        ),
        "recpre.fabric": ("recpre.model", "recpre.checkpoint", "recpre.train_step", "recpre.train_state"),
    }
    for module, banned in upward.items():
        bad = sorted(t for t in graph[module] if any(t == b or t.startswith(b + ".") for b in banned))
        assert not bad, f"{module} imports {bad}"

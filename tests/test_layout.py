"""The package's import graph: no cycles, and arrows only go down from one wing to the next.

Every import counts, including the ones inside functions: a lazy import hides a cycle from the
interpreter but not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "compress"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports; ``from pkg import name`` counts ``pkg.name`` when that is a
    module of ours (``from compress import masks`` needs masks, not the whole package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def graph() -> dict[str, set[str]]:
    return {name: {m for m in imports(p) if m in MODULES} - {name} for name, p in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_find_cycle_finds_a_lazy_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    assert find_cycle(graph()) is None


# What each wing may import from the package besides itself, errors and the shared core
# (masks, distributed, schedules). Anything not listed is an arrow pointing up or sideways.
ALLOWED = {
    "recipe": set(),
    "analysis": set(),
    "sparsity": {"recipe", "analysis", "compress.algorithm"},
    "pruning": {"recipe", "analysis", "sparsity", "compress.algorithm"},
    "deploy": {"pruning", "analysis", "sparsity", "recipe"},
    "compress.algorithm": {"recipe"},
    "compress.algorithms": {"sparsity", "pruning", "compress.algorithm", "compress.distillation"},
    "compress.distillation": {"recipe", "compress.algorithm"},
    "compress.accuracy_aware": {"recipe", "compress.algorithm", "compress.controller"},
}
CORE = {
    "compress",
    "compress.errors",
    "compress.masks",
    "compress.distributed",
    "compress.schedules",
    "compress.experts",  # which parameters are fused experts: torch only, read by every wing
    "compress.deploy.files",  # the file defences (size caps, safe loads): torch and errors only
}


@pytest.mark.parametrize("source", sorted(ALLOWED))
def test_arrows_only_go_down(source: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        if wing(module) == source
        for target in targets
        if target not in CORE and wing(target) not in ALLOWED[source] | {source}
    )
    assert wrong == []


def test_the_package_never_imports_lightning_or_the_callbacks() -> None:
    banned = ("pytorch_lightning", "lightning", "callbacks")
    wrong = sorted(
        f"{module_name(p)} imports {m}"
        for p in MODULES.values()
        for m in imports(p)
        if m.split(".")[0] in banned
    )
    assert wrong == []

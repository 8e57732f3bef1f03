"""DESIGN.md's one-way data flow: the stages (pipeline, inference, outputs, send, web) do not import
each other; only the runner and the app factory wire them. Imports for type checking only (under
``if TYPE_CHECKING:``) do not count: they do not run."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

STAGES = ("pipeline", "inference", "outputs", "send", "web")


def _runtime_imports(path: Path) -> set[str]:
    """The node packages a module imports when it runs (module level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("node.")}


def test_no_stage_imports_another() -> None:
    crossings = []
    for stage in STAGES:
        for path in sorted((REPO / "node" / stage).rglob("*.py")):
            for name in _runtime_imports(path):
                other = name.split(".")[1]
                if other in STAGES and other != stage:
                    crossings.append(f"{path.relative_to(REPO)} imports {name}")
    assert not crossings, "stages import each other:\n" + "\n".join(crossings)

"""The packages import each other only as ARCHITECTURE.md §4 allows: the contracts at the bottom, the score
side, the decoder and the front-ends beside each other, the engine above them, the server on top; training
never imports the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"proto", "workers", "decoder", "frontends", "engine", "server", "training", "benchmarks", "deploy"}
ALLOWED = {
    "proto": {"proto"},
    "workers": {"proto", "workers"},
    "decoder": {"proto", "decoder"},
    "frontends": {"proto", "frontends"},
    "engine": {"proto", "workers", "decoder", "frontends", "engine"},
    "training": OURS - {"server"},
}


def _imports(path: Path) -> set[str]:
    """Top-level packages of ours that ``path`` imports (anywhere in the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_the_layout_allows(package: str) -> None:
    wrong = {
        str(path.relative_to(REPO)): sorted(_imports(path) - ALLOWED[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    wrong = {path: names for path, names in wrong.items() if names}
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"

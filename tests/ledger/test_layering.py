"""eecp.ledger stays the pure core: it imports the standard library, the core (errors, clock,
config) and itself, nothing that does I/O or belongs to a higher layer."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import eecp.ledger

ALLOWED = ("eecp.core", "eecp.ledger")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_ledger_imports_only_the_core_and_the_standard_library() -> None:
    modules = sorted(Path(eecp.ledger.__file__).parent.glob("*.py"))
    assert len(modules) >= 8
    for path in modules:
        for name in imports(path):
            top = name.split(".")[0]
            if top == "eecp":
                assert name.startswith(ALLOWED), f"{path.name} imports {name}"
            else:
                assert top in sys.stdlib_module_names or top == "__future__", (
                    f"{path.name} imports {name}")

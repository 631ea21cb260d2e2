"""eecp.ledger's layers: the pure core imports the standard library, the core (errors, clock,
config) and itself, nothing that does I/O or belongs to a higher layer; the service modules
above it may also use the store's API (eecp.store, never peewee) and trio."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import eecp.ledger

PURE = ("money", "periods", "journal", "idempotency", "availability", "eligibility",
        "settlement", "stake", "trust", "routing")
PURE_ALLOWED = ("eecp.core", *(f"eecp.ledger.{name}" for name in PURE))
SERVICE_ALLOWED = ("eecp.core", "eecp.ledger", "eecp.store")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_pure_core_imports_only_the_core_and_the_standard_library() -> None:
    root = Path(eecp.ledger.__file__).parent
    for name in PURE:
        for imported in imports(root / f"{name}.py"):
            top = imported.split(".")[0]
            if top == "eecp":
                assert imported.startswith(PURE_ALLOWED), f"{name}.py imports {imported}"
            else:
                assert top in sys.stdlib_module_names or top == "__future__", (
                    f"{name}.py imports {imported}")


def test_the_service_uses_the_store_api_and_trio_but_no_database_driver() -> None:
    modules = sorted(Path(eecp.ledger.__file__).parent.glob("*.py"))
    service = [p for p in modules if p.stem not in PURE and p.stem != "__init__"]
    assert len(service) >= 8
    for path in service:
        for imported in imports(path):
            top = imported.split(".")[0]
            if top == "eecp":
                assert imported.startswith(SERVICE_ALLOWED), f"{path.name} imports {imported}"
            else:
                assert top in sys.stdlib_module_names or top in ("__future__", "trio"), (
                    f"{path.name} imports {imported}")

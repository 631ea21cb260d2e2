"""Fixtures shared by the tests: the library patches every process applies at its start, the
agent's (a dev PKI, a stand-in agent directory) and the store's databases
(:mod:`tests.databases`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eecp import patches
from eecp.dev import pki as devpki
from tests.databases import backend, pg_url, sqlite_backend
from tests.skips import pytest_runtest_makereport

__all__ = [
    "agent_dir", "backend", "library_patches", "pg_url", "pki_dir", "pytest_runtest_makereport",
    "sqlite_backend",
]


@pytest.fixture(scope="session", autouse=True)
def library_patches() -> None:
    """What ``eecp serve``, ``eecp demo`` and ``eecp-agent`` apply once at their start (serve()
    and run_agent() do not: a process may run them many times), so that the tests run eecp
    and the agent as they run in production."""
    patches.apply_all()


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dev-pki")
    devpki.ensure_pki(path)
    return path


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    """A small stand-in agent directory, so measurements do not change with our sources."""
    root = tmp_path / "agent-under-test"
    (root / "pkg").mkdir(parents=True)
    (root / "agent.py").write_text("print('hello from the agent')\n")
    (root / "pkg" / "helper.py").write_text("VALUE = 1\n")
    return root

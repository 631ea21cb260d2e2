"""Fixtures shared by several test modules: the agent's (a dev PKI, a stand-in agent directory)
and the store's databases (:mod:`tests.databases`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eecp.dev import pki as devpki
from tests.databases import backend, pg_url, sqlite_backend

__all__ = ["agent_dir", "backend", "pg_url", "pki_dir", "sqlite_backend"]


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

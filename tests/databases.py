"""The databases store tests run against: SQLite in a temporary directory, and PostgreSQL — the
server EECP_TEST_PG_URL names, else a throwaway one (:mod:`tests.pgserver`, when the postgresql
package is installed: ``.ci/run`` installs it); without either the PostgreSQL runs are skipped,
saying so. Each PostgreSQL test gets a fresh schema (``search_path`` set through the URL's
``options``). The fixtures are registered in ``tests/conftest.py``."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eecp.core.config import Config
from tests import pgserver

PG_URL_ENV = "EECP_TEST_PG_URL"


@dataclass
class Backend:
    """One database to run the suite against, plus a side door for doing things by hand."""

    name: str
    config: Config
    raw_url: str | None = None  # PostgreSQL: libpq URI with the test schema on search_path

    def raw(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Run one statement outside the store (autocommit) and return its rows."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.config.db_path)
            try:
                cur = conn.execute(sql, params)
                rows = cur.fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        import psycopg2

        pg = psycopg2.connect(self.raw_url)
        try:
            pg.autocommit = True
            with pg.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            pg.close()


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str | None]:
    """The PostgreSQL server of this run: EECP_TEST_PG_URL's, else a throwaway one (started
    once, on first use), else None."""
    url = os.environ.get(PG_URL_ENV, "").strip()
    if url:
        yield url
    elif pgserver.unavailable() is not None:
        yield None
    else:
        with pgserver.running_server() as url:
            yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", Config(db_path=tmp_path / "nested" / "dir" / "cp.db"))
        return
    url = request.getfixturevalue("pg_url")
    if url is None:
        pytest.skip(f"no PostgreSQL to run the store suite on: {PG_URL_ENV} is not set and "
                    f"no throwaway server can be started ({pgserver.unavailable()})")
    with fresh_schema(url) as scoped:
        yield Backend("postgres", Config(db_url=scoped), raw_url=scoped)


@contextmanager
def fresh_schema(url: str, prefix: str = "eecp_test") -> Iterator[str]:
    """A new, empty schema on the server ``url`` names, for the block: yields ``url`` with the
    schema on its ``search_path``; the schema and everything in it are dropped at the end."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 missing (pip install .[postgres])")
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{schema}"')
        yield _with_search_path(url, schema)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    return Backend("sqlite", Config(db_path=tmp_path / "cp.db"))



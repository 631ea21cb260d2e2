"""The database under the store: selection, connections, error mapping, units of work.

Database selection (``EE_DB_URL``):

* ``postgresql://user:password@host:port/dbname?sslmode=require`` (or ``postgres://``): PostgreSQL
  through psycopg2 (the ``postgres`` extra). Query parameters are passed to libpq as connection
  keywords; ``connect_timeout`` defaults to 10 seconds.
* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: SQLite at that path.
* unset (or ``sqlite:///`` with no path): SQLite at ``EE_DB_PATH`` (``data/control-plane.db``).

SQLite runs in WAL mode (readers never wait for the writer) with ``synchronous=normal`` (a power
cut can lose the last commits, never corrupt the file), ``foreign_keys=1`` and a 5 s busy timeout
(writers from several worker threads queue instead of failing with "database is locked").

A **unit of work** (:func:`unit_of_work`) is one transaction that decides something: SQLite takes
the write lock up front (``BEGIN IMMEDIATE``: whole transactions are serialised, so a decision
read inside one holds until it commits); PostgreSQL runs READ COMMITTED and the transaction
locks the rows it decides on (``SELECT ... FOR UPDATE``, see :mod:`eecp.store.store` for the
order every transaction takes them in). A deadlock or serialization failure rolls the
transaction back and it is run again, at most :data:`UNIT_ATTEMPTS` times in all.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import peewee
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase, PooledSqliteDatabase

from eecp.core.blocking import Workers
from eecp.core.config import Config
from eecp.core.errors import ConfigError, StoreError

T = TypeVar("T")

# peewee 4 ships type stubs (playhouse does not). Model classes bound per store are built with
# type() at run time, so code that uses them sees ``Any``.
Database = peewee.Database

# Errors that mean "the database did not answer or refused". peewee wraps driver exceptions
# raised while connecting or executing, but a few paths (closing, the pool running dry, creating
# the SQLite parent directory) raise their own, so they are listed too. Programming errors
# (TypeError, ...) are deliberately *not* here: they must stay loud, not read as an outage.
DB_ERRORS: tuple[type[Exception], ...] = (
    peewee.PeeweeException,
    MaxConnectionsExceeded,
    sqlite3.Error,
    OSError,
)
# The postgres extra is optional (and psycopg2 has no type stubs, hence importlib).
with contextlib.suppress(ImportError):
    DB_ERRORS = (*DB_ERRORS, importlib.import_module("psycopg2").Error)

# Set on every new SQLite connection (these settings belong to the connection).
_SQLITE_PRAGMAS: list[tuple[str, object]] = [
    ("busy_timeout", 5000),
    ("foreign_keys", 1),
    ("synchronous", "normal"),
]
# journal_mode=wal is instead set once, when the store opens (``_enable_wal``): it is stored in
# the file, so every later connection is in WAL mode anyway, and switching a fresh file to WAL
# needs an exclusive lock for which SQLite returns "database is locked" at once, without
# consulting busy_timeout, when another connection is opening it at the same moment.
_WAL_ATTEMPT_SECONDS = 5.0

# Seconds a pooled PostgreSQL connection is used before it is replaced: bounds the life of a
# server backend and of any state a connection accumulates.
_PG_STALE_TIMEOUT = 300
# Seconds libpq waits for a TCP connection when the URL does not say (its default is forever,
# and a worker thread cannot be abandoned, so a black-holed server would pin every worker).
_PG_CONNECT_TIMEOUT = 10


#: How many times a unit of work is run when PostgreSQL rolls it back for a deadlock or a
#: serialization failure (each retry after a short random pause, so two retrying peers part).
UNIT_ATTEMPTS = 4
# SQLSTATEs that mean "run the transaction again": serialization_failure, deadlock_detected
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, maybe wrapped by peewee) asks for the transaction to be
    run again rather than reported as an outage."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "pgcode", None) in _RETRY_SQLSTATES:
            return True
        seen = seen.__cause__ or seen.__context__ if seen.__cause__ is not seen else None
    return False


def unit_of_work(db: Database, fn: Callable[[], T]) -> T:
    """Run ``fn`` in one transaction on ``db`` (a connection checked out by the caller),
    again on a deadlock or serialization failure (see the module docstring). Sync: call it from
    a store worker thread."""
    for attempt in range(1, UNIT_ATTEMPTS + 1):
        try:
            with begin(db):
                return fn()
        except DB_ERRORS as exc:
            if attempt == UNIT_ATTEMPTS or not is_retryable(exc):
                raise
            time.sleep(random.uniform(0.005, 0.05) * attempt)  # a worker thread, not the loop
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def begin(db: Database) -> Iterator[None]:
    """One transaction: ``BEGIN IMMEDIATE`` on SQLite, a plain one on PostgreSQL."""
    if isinstance(db, peewee.SqliteDatabase):
        with db.atomic("IMMEDIATE"):
            yield
    else:
        with db.atomic():
            yield


def read_snapshot(db: Database, fn: Callable[[], T]) -> T:
    """Run ``fn`` in one read-only transaction that sees a single state of ``db``: SQLite's
    deferred ``BEGIN`` (in WAL mode a reader's snapshot starts at its first read and never
    blocks the writer), PostgreSQL's REPEATABLE READ READ ONLY."""
    untyped: Any = db
    if isinstance(db, peewee.SqliteDatabase):
        with untyped.atomic("DEFERRED"):
            return fn()
    with untyped.atomic(isolation_level="REPEATABLE READ READ ONLY"):
        return fn()


def is_postgres(db: Database) -> bool:
    """True for PostgreSQL (row locks matter), False for SQLite (the whole file is locked)."""
    return isinstance(db, peewee.PostgresqlDatabase)


def enable_wal(db: Any) -> None:
    deadline = time.monotonic() + _WAL_ATTEMPT_SECONDS
    while True:
        try:
            mode = db.execute_sql("PRAGMA journal_mode = wal").fetchone()[0]
        except peewee.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # a worker thread: sleeping here does not block the trio loop
            continue
        if str(mode).lower() != "wal":
            raise StoreError("store_unavailable", f"SQLite refused WAL mode (journal_mode={mode})")
        return


def sqlite_path(config: Config) -> Path:
    url = config.db_url
    if url is None or not url.startswith("sqlite:///"):
        return config.db_path
    rest = url[len("sqlite:///") :]  # sqlite:///rel/path -> rel/path, sqlite:////abs -> /abs
    if not rest:
        return config.db_path
    if rest == ":memory:" or rest.startswith("file:") or "?" in rest:
        # Every worker thread has its own connection: an in-memory database would be a
        # different, empty database in each of them.
        raise ConfigError("EE_DB_URL", "must name a SQLite file (sqlite:///path/to/file.db)")
    return Path(rest)


def describe_postgres(url: str) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    # Neither the password nor the query string (which may hold password=...) is shown.
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


def open_database(config: Config, workers: Workers) -> tuple[Any, str, Path | None]:
    """Build (without connecting) the peewee database for ``config``.

    Threads: peewee keeps connection state per thread, and eecp runs every query in a trio
    worker thread that may differ from call to call. Every blocking call therefore wraps its
    work in ``connection_context()``, which checks a connection out of a pool for that thread
    and returns it at the end of the call. Pooling (rather than connecting per call) avoids a
    TCP/TLS handshake per query on PostgreSQL and, on SQLite, avoids the WAL checkpoint and
    -wal/-shm file churn that happen every time the last connection to a file closes; and it
    lets :meth:`Store.aclose` close every connection deterministically (``close_all``). A pooled
    SQLite connection is handed from thread to thread, so it is opened with
    ``check_same_thread=False``; that is safe because the pool gives a connection to one thread
    at a time and SQLite itself is built thread-safe (serialized).
    """
    tokens = workers.store.total_tokens
    max_connections = None if tokens == math.inf else max(1, int(tokens))
    url = config.db_url
    if url is not None and url.startswith(("postgresql://", "postgres://")):
        params: dict[str, Any] = parse_db_url(url, unquote_password=True, unquote_user=True)
        name = params.pop("database", "")
        if not name:
            raise ConfigError("EE_DB_URL", "names no database (postgresql://host/dbname)")
        params.setdefault("connect_timeout", _PG_CONNECT_TIMEOUT)
        db = PooledPostgresqlDatabase(
            name,
            max_connections=max_connections,
            stale_timeout=_PG_STALE_TIMEOUT,
            timeout=30,  # wait for a free connection rather than fail at once
            autoconnect=False,  # a query outside connection_context() is a bug: make it loud
            **params,
        )
        return db, describe_postgres(url), None
    path = sqlite_path(config)
    db = PooledSqliteDatabase(
        str(path),
        pragmas=_SQLITE_PRAGMAS,
        max_connections=None,  # bounded by the worker threads anyway
        timeout=5,
        check_same_thread=False,
        autoconnect=False,
    )
    return db, f"sqlite:{path}", path

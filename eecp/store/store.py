"""Persistence: apps, agents, the audit log and cached collateral, in SQLite or PostgreSQL.

This is the only module in eecp that imports peewee. Everything above it talks to :class:`Store`,
an async facade whose methods take and return the plain records of :mod:`eecp.store.records`; each
method runs its peewee work in a worker thread through ``run_blocking(workers.store, ...)`` so the
trio loop never blocks on the database, and every database failure surfaces as
``StoreError("store_unavailable", ...)`` (a peewee or driver exception never escapes).

Open it with :func:`open_store`, which migrates the schema on entry and closes every connection
on exit::

    async with open_store(config, workers) as store:
        await store.save_app(record)

Database selection (``EE_DB_URL``):

* ``postgresql://user:password@host:port/dbname?sslmode=require`` (or ``postgres://``): PostgreSQL
  through psycopg2 (the ``postgres`` extra). Query parameters are passed to libpq as connection
  keywords; ``connect_timeout`` defaults to 10 seconds.
* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: SQLite at that path.
* unset (or ``sqlite:///`` with no path): SQLite at ``EE_DB_PATH`` (``data/control-plane.db``).

SQLite runs in WAL mode (readers never wait for the writer) with ``synchronous=normal`` (a power
cut can lose the last commits, never corrupt the file), ``foreign_keys=1`` and a 5 s busy timeout
(writers from several worker threads queue instead of failing with "database is locked").

Schema changes are versioned from day one: :data:`MIGRATIONS` is an ordered list of
``(version, function)``; :func:`migrate` applies the pending ones, each in its own transaction
together with the row in ``schema_version`` that records it, and refuses to run against a
database whose version is newer than this code knows (``StoreError("schema_too_new")``), because
an older eecp writing into a newer schema could silently corrupt it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import peewee
import trio
from playhouse import migrate as playhouse_migrate
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase, PooledSqliteDatabase

from eecp.core.blocking import Workers, run_blocking
from eecp.core.clock import Clock, SystemClock
from eecp.core.config import Config
from eecp.core.errors import ConfigError, StoreError
from eecp.store.records import AgentRecord, AppRecord, AuditEntry

T = TypeVar("T")

# peewee 4 ships type stubs (playhouse does not). Model classes bound per store are built with
# type() at run time, so code that uses them sees ``Any``.
Database = peewee.Database

#: The number of RTMR columns in the audit log (rtmr0..rtmr3).
RTMR_COUNT = 4

# Errors that mean "the database did not answer or refused". peewee wraps driver exceptions
# raised while connecting or executing, but a few paths (closing, the pool running dry, creating
# the SQLite parent directory) raise their own, so they are listed too. Programming errors
# (TypeError, ...) are deliberately *not* here: they must stay loud, not read as an outage.
_DB_ERRORS: tuple[type[Exception], ...] = (
    peewee.PeeweeException,
    MaxConnectionsExceeded,
    sqlite3.Error,
    OSError,
)
# The postgres extra is optional (and psycopg2 has no type stubs, hence importlib).
with contextlib.suppress(ImportError):
    _DB_ERRORS = (*_DB_ERRORS, importlib.import_module("psycopg2").Error)

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


# --- Models ---------------------------------------------------------------------------------
#
# The classes below declare the *shape* of the tables and are bound to no database. Each open
# store binds its own subclasses (see ``_bind``), so two stores in one process (tests, or a
# migration tool next to a server) never share or swap a global binding.
#
# Times are DoubleField on purpose: peewee's FloatField is REAL, which PostgreSQL stores in four
# bytes (about two minutes of resolution for a Unix time); DOUBLE PRECISION / SQLite REAL are
# eight. Strings are TextField because PostgreSQL enforces VARCHAR(255) and a reason or a repo
# name must never be cut or refused for length.


class _Base(peewee.Model):
    class Meta:
        database = None


class SchemaVersion(_Base):
    """One row per applied migration; the schema's version is the largest ``version``."""

    version = peewee.IntegerField(primary_key=True)
    applied_at = peewee.DoubleField()

    class Meta:
        table_name = "schema_version"


class App(_Base):
    """A registration (:class:`eecp.store.records.AppRecord`)."""

    name = peewee.TextField(primary_key=True)
    repo = peewee.TextField()
    release_tag = peewee.TextField()
    network = peewee.TextField()
    registered_at = peewee.DoubleField()
    expires_at = peewee.DoubleField()
    last_attested_at = peewee.DoubleField(null=True)
    last_verdict = peewee.TextField(null=True)
    last_reason = peewee.TextField(null=True)

    class Meta:
        table_name = "app"


class Agent(_Base):
    """One agent (:class:`eecp.store.records.AgentRecord`). No foreign key to ``app``: an
    agent's row is history (first/last seen, last verdict) that stays meaningful after its app
    is deleted.

    The row is also the agent_id's binding: its ``app_name`` and ``repo`` are set when the row
    is first written (:meth:`Store.bind_agent`) and never changed by a later write, so an
    agent_id serves the app and repo it was first admitted for until an operator deletes the
    row (:meth:`Store.release_agent`)."""

    agent_id = peewee.TextField(primary_key=True)
    app_name = peewee.TextField(index=True)  # list_agents(app_name)
    repo = peewee.TextField()
    release_tag = peewee.TextField()
    network = peewee.TextField()
    sealed = peewee.BooleanField(null=True)
    first_seen = peewee.DoubleField()
    last_seen = peewee.DoubleField()
    last_attested_at = peewee.DoubleField(null=True)
    last_verdict = peewee.TextField(null=True)
    last_reason = peewee.TextField(null=True)

    class Meta:
        table_name = "agent"


class AuditLog(_Base):
    """One attestation decision (:class:`eecp.store.records.AuditEntry`); rows are only ever
    inserted.

    ``id`` orders the log: it is assigned by the database at insert, so it is strictly increasing
    even when two decisions carry the same (or a skewed) ``at``.
    """

    id = peewee.BigAutoField()
    at = peewee.DoubleField()
    app_name = peewee.TextField()
    agent_id = peewee.TextField()
    repo = peewee.TextField()
    release_tag = peewee.TextField()
    network = peewee.TextField()
    trigger = peewee.TextField()
    verdict = peewee.TextField()
    reason = peewee.TextField()
    tcb_status = peewee.TextField(null=True)
    advisory_ids = peewee.TextField(default="[]")  # JSON list of strings: portable, no JSON type
    fmspc = peewee.TextField(null=True)
    mrtd = peewee.TextField(null=True)
    rtmr0 = peewee.TextField(null=True)
    rtmr1 = peewee.TextField(null=True)
    rtmr2 = peewee.TextField(null=True)
    rtmr3 = peewee.TextField(null=True)
    sealed = peewee.BooleanField(null=True)
    platform_id = peewee.TextField(null=True)  # since schema version 2

    class Meta:
        table_name = "audit_log"
        # recent_audit(app_name): WHERE app_name = ? ORDER BY id DESC LIMIT n walks this index.
        indexes = ((("app_name", "id"), False),)


class Collateral(_Base):
    """A cached PCCS collateral document, keyed by what it is for (e.g. an FMSPC)."""

    key = peewee.TextField(primary_key=True)
    document = peewee.TextField()
    next_update = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "collateral"


_MODELS: tuple[Any, ...] = (SchemaVersion, App, Agent, AuditLog, Collateral)


class _Bound:
    """The model classes bound to one database."""

    def __init__(self, db: Database) -> None:
        bound = {model.__name__: _bind_model(model, db) for model in _MODELS}
        self.SchemaVersion: Any = bound["SchemaVersion"]
        self.App: Any = bound["App"]
        self.Agent: Any = bound["Agent"]
        self.AuditLog: Any = bound["AuditLog"]
        self.Collateral: Any = bound["Collateral"]


def _bind_model(model: Any, db: Database) -> Any:
    # A subclass inherits fields, primary key and indexes (peewee copies them); only the
    # database and the table name (which peewee would derive from the subclass name) are set.
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    return type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})


# --- Migrations -----------------------------------------------------------------------------


class _AuditLogV1(_Base):
    """``audit_log`` as schema version 1 created it (frozen: version 2 added a column)."""

    id = peewee.BigAutoField()
    at = peewee.DoubleField()
    app_name = peewee.TextField()
    agent_id = peewee.TextField()
    repo = peewee.TextField()
    release_tag = peewee.TextField()
    network = peewee.TextField()
    trigger = peewee.TextField()
    verdict = peewee.TextField()
    reason = peewee.TextField()
    tcb_status = peewee.TextField(null=True)
    advisory_ids = peewee.TextField(default="[]")
    fmspc = peewee.TextField(null=True)
    mrtd = peewee.TextField(null=True)
    rtmr0 = peewee.TextField(null=True)
    rtmr1 = peewee.TextField(null=True)
    rtmr2 = peewee.TextField(null=True)
    rtmr3 = peewee.TextField(null=True)
    sealed = peewee.BooleanField(null=True)

    class Meta:
        table_name = "audit_log"
        indexes = ((("app_name", "id"), False),)


def _migration_1(db: Database) -> None:
    # The initial schema. The live App, Agent and Collateral classes are still the version-1
    # shape (a migration that changes one of them must freeze a copy here first, as
    # _AuditLogV1 is), so that a fresh database replays history instead of jumping straight to
    # the newest shape.
    m = _Bound(db)
    db.create_tables([m.App, m.Agent, _bind_model(_AuditLogV1, db), m.Collateral], safe=False)


def _migration_2(db: Database) -> None:
    # audit_log.platform_id: the PPID of a verified quote's platform (NULL in older rows).
    # Agent rows need no change: an existing row already is its agent_id's binding.
    migrator = playhouse_migrate.SchemaMigrator.from_database(db)
    playhouse_migrate.migrate(
        migrator.add_column("audit_log", "platform_id", peewee.TextField(null=True)))


#: Every schema change, in order. Append only; never edit or renumber an entry once released.
MIGRATIONS: list[tuple[int, Callable[[Database], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
]

#: The newest schema version this code knows.
LATEST_SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(db: Database, now: float) -> int:
    """Apply every pending migration to ``db`` (sync; call it from a worker thread with a
    connection open) and return the resulting schema version.

    Each migration runs in its own transaction that also records its version, so a failure
    leaves the database at the last fully applied version. The version is re-read under a lock
    before each step (SQLite ``BEGIN IMMEDIATE``; a PostgreSQL transaction-level advisory lock),
    so two processes starting at once apply each migration exactly once. Raises
    ``StoreError("schema_too_new")`` when the database is newer than :data:`MIGRATIONS`.
    """
    versions = [version for version, _ in MIGRATIONS]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"MIGRATIONS must be numbered 1..n in order, got {versions}")
    m = _Bound(db)
    while True:
        with _migration_transaction(db):
            m.SchemaVersion.create_table(safe=True)
            current = _current_version(m)
            if current > LATEST_SCHEMA_VERSION:
                raise StoreError(
                    "schema_too_new",
                    f"the database is at schema version {current}; this eecp knows up to "
                    f"{LATEST_SCHEMA_VERSION} (downgrading is not supported)",
                )
            if current == LATEST_SCHEMA_VERSION:
                return current
            version, step = MIGRATIONS[current]  # versions are 1..n, so index current is next
            step(db)
            m.SchemaVersion.insert(version=version, applied_at=now).execute()


@contextlib.contextmanager
def _migration_transaction(db: Database) -> Iterator[None]:
    if isinstance(db, peewee.SqliteDatabase):
        # IMMEDIATE takes the write lock up front: a second process waits (busy_timeout) and
        # then sees the version this one recorded, instead of both reading "0".
        with db.atomic("IMMEDIATE"):
            yield
    else:
        with db.atomic():
            # Released at commit/rollback. The key is arbitrary but fixed ("eecp" in ASCII).
            untyped: Any = db  # execute_sql is unannotated in peewee's stubs
            untyped.execute_sql("SELECT pg_advisory_xact_lock(%s)", (0x65656370,))
            yield


def _current_version(m: _Bound) -> int:
    value = m.SchemaVersion.select(peewee.fn.MAX(m.SchemaVersion.version)).scalar()
    return int(value) if value is not None else 0


# --- Database selection ---------------------------------------------------------------------


def _enable_wal(db: Any) -> None:
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


def _sqlite_path(config: Config) -> Path:
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


def _describe_postgres(url: str) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    # Neither the password nor the query string (which may hold password=...) is shown.
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


def _open_database(config: Config, workers: Workers) -> tuple[Any, str, Path | None]:
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
        return db, _describe_postgres(url), None
    path = _sqlite_path(config)
    db = PooledSqliteDatabase(
        str(path),
        pragmas=_SQLITE_PRAGMAS,
        max_connections=None,  # bounded by the worker threads anyway
        timeout=5,
        check_same_thread=False,
        autoconnect=False,
    )
    return db, f"sqlite:{path}", path


# --- The store ------------------------------------------------------------------------------


class Store:
    """Async access to the control plane's database. Build it with :func:`open_store`.

    Constructing a ``Store`` does not touch the database; :meth:`migrate` and every other
    method run in worker threads under ``workers.store``. Methods raise
    ``StoreError("store_unavailable")`` when the database fails (and after :meth:`aclose`).
    """

    def __init__(self, config: Config, workers: Workers, clock: Clock | None = None) -> None:
        self._workers = workers
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._db, self._description, self._sqlite_path = _open_database(config, workers)
        self._m = _Bound(self._db)
        self._closed = False
        self._agent_locks: dict[str, trio.Lock] = {}  # agent_id -> its writes, in order

    def describe(self) -> str:
        """Where the data lives, for logs: ``sqlite:data/control-plane.db`` or
        ``postgresql://eecp@db.internal:5432/eecp`` (never a password)."""
        return self._description

    @property
    def is_postgres(self) -> bool:
        """True when the store is PostgreSQL (else SQLite)."""
        return isinstance(self._db, peewee.PostgresqlDatabase)

    # -- plumbing --

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a store worker thread with a pooled connection checked out."""
        return await self._run_unconnected(self._connected, fn, *args)

    async def _run_unconnected(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a store worker thread, database errors become StoreError."""
        if self._closed:
            raise StoreError("store_unavailable", "the store is closed")
        call = functools.partial(self._guarded, fn, *args)
        return await run_blocking(self._workers.store, call)

    def _connected(self, fn: Callable[..., T], *args: object) -> T:
        # One pooled connection for the duration of the call (see _open_database).
        with self._db.connection_context():
            return fn(*args)

    @staticmethod
    def _guarded(fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except _DB_ERRORS as exc:
            raise StoreError("store_unavailable", f"{type(exc).__name__}: {exc}") from exc

    # -- lifecycle --

    async def migrate(self) -> int:
        """Create the database if needed (SQLite: its parent directory too), apply pending
        migrations and return the schema version. ``StoreError("schema_too_new")`` when the
        database is newer than this code."""
        return await self._run_unconnected(self._migrate_sync, self._clock.now())

    def _migrate_sync(self, now: float) -> int:
        if self._sqlite_path is not None:
            # Before connecting: SQLite creates the file but not its directory.
            self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            self._connected(_enable_wal, self._db)
        return self._connected(migrate, self._db, now)

    async def aclose(self) -> None:
        """Close every pooled connection. Later calls raise ``store_unavailable``; idempotent."""
        if self._closed:
            return
        self._closed = True
        # Shielded: closing must complete even when the enclosing scope is being cancelled,
        # or connections (and SQLite's WAL checkpoint) would be left to the garbage collector.
        with trio.CancelScope(shield=True):
            await run_blocking(self._workers.store, self._db.close_all)

    # -- health --

    async def ping(self) -> bool:
        """True when the database answers ``SELECT 1``; False on any database failure or after
        :meth:`aclose`. Never raises (except cancellation)."""
        try:
            return await self._run(self._ping_sync)
        except StoreError:
            return False

    def _ping_sync(self) -> bool:
        row = self._db.execute_sql("SELECT 1").fetchone()
        return row is not None and row[0] == 1

    async def schema_version(self) -> int:
        """The schema version recorded in the database (0 when never migrated)."""
        return await self._run(self._schema_version_sync)

    def _schema_version_sync(self) -> int:
        if not self._m.SchemaVersion.table_exists():
            return 0
        return _current_version(self._m)

    # -- apps --

    async def get_app(self, name: str) -> AppRecord | None:
        """The registration called ``name``, or None."""
        return await self._run(self._get_app_sync, name)

    def _get_app_sync(self, name: str) -> AppRecord | None:
        App = self._m.App
        row = App.select().where(App.name == name).dicts().first()
        return AppRecord(**row) if row is not None else None

    async def list_apps(self) -> list[AppRecord]:
        """Every registration, ordered by name."""
        return await self._run(self._list_apps_sync)

    def _list_apps_sync(self) -> list[AppRecord]:
        App = self._m.App
        return [AppRecord(**row) for row in App.select().order_by(App.name).dicts()]

    async def save_app(self, record: AppRecord) -> None:
        """Insert ``record``, or replace every field of the app with the same name."""
        await self._run(self._upsert, self._m.App, self._m.App.name, dataclasses.asdict(record))

    async def delete_app(self, name: str) -> bool:
        """Delete the registration called ``name``; True when there was one. Its agents' rows
        and its audit history are kept."""
        return await self._run(self._delete_app_sync, name)

    def _delete_app_sync(self, name: str) -> bool:
        App = self._m.App
        return bool(App.delete().where(App.name == name).execute())

    # -- agents --

    async def bind_agent(self, record: AgentRecord) -> tuple[str, str] | None:
        """Bind ``record.agent_id`` to ``record``'s app and repo unless it is bound already:
        insert ``record`` as the agent's row when it has none. None when the id is (now)
        bound to this app and repo; else the ``(app_name, repo)`` it is bound to, and nothing
        is written.

        One conditional write, decided by the database: two sessions (or two eecp processes on
        one PostgreSQL) claiming one id for different apps cannot both win, and the binding
        outlives restarts."""
        return await self._run(self.bind_agent_sync, record)

    def bind_agent_sync(self, record: AgentRecord) -> tuple[str, str] | None:
        """:meth:`bind_agent` for a store worker thread with a connection checked out (to be
        composed with other writes in one transaction)."""
        Agent = self._m.Agent
        with self._db.atomic():
            # ON CONFLICT DO NOTHING (SQLite: INSERT OR IGNORE): the first claim wins
            Agent.insert(**dataclasses.asdict(record)).on_conflict_ignore().execute()
            row = (Agent.select(Agent.app_name, Agent.repo)
                   .where(Agent.agent_id == record.agent_id).tuples().first())
        # (no row: an operator released it between the two statements; the next save_agent
        # writes it again for this app)
        if row is None or (row[0], row[1]) == (record.app_name, record.repo):
            return None
        return str(row[0]), str(row[1])

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        """The agent ``agent_id``'s row, or None."""
        return await self._run(self._get_agent_sync, agent_id)

    def _get_agent_sync(self, agent_id: str) -> AgentRecord | None:
        Agent = self._m.Agent
        row = Agent.select().where(Agent.agent_id == agent_id).dicts().first()
        return AgentRecord(**row) if row is not None else None

    async def release_agent(self, agent_id: str) -> bool:
        """Delete the agent ``agent_id``'s row, and with it its binding (an operator's act:
        the id may then be admitted for any app). True when there was one; its audit history
        is kept."""
        return await self._run(self._release_agent_sync, agent_id)

    def _release_agent_sync(self, agent_id: str) -> bool:
        Agent = self._m.Agent
        return bool(Agent.delete().where(Agent.agent_id == agent_id).execute())

    async def save_agent(self, record: AgentRecord) -> None:
        """Insert ``record``, or replace every field of the agent with the same ``agent_id``
        (the caller carries ``first_seen`` over) when that row is bound to the same app and
        repo; a row bound to another app and repo is left as it is (see :meth:`bind_agent`).

        Writes of one agent land in the order they were made, even with several store workers:
        a superseded session's last write, made before its successor's, cannot land after it
        and undo it (trio's locks are first come, first served)."""
        lock = self._agent_locks.setdefault(record.agent_id, trio.Lock())
        try:
            async with lock:
                await self._run(self._save_agent_sync, dataclasses.asdict(record))
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._agent_locks.pop(record.agent_id, None)  # (one lock per agent writing)

    def _save_agent_sync(self, data: dict[str, Any]) -> None:
        # INSERT ... ON CONFLICT (agent_id) DO UPDATE SET ... WHERE the row's app and repo are
        # the record's: one statement, and no write can move an agent_id to another app
        Agent = self._m.Agent
        others = [field for name, field in Agent._meta.fields.items() if name != "agent_id"]
        same_binding = ((Agent.app_name == peewee.EXCLUDED.app_name)
                        & (Agent.repo == peewee.EXCLUDED.repo))
        Agent.insert(**data).on_conflict(conflict_target=[Agent.agent_id], preserve=others,
                                         where=same_binding).execute()

    async def list_agents(self, app_name: str | None = None) -> list[AgentRecord]:
        """Every agent, or those of ``app_name``; ordered by app name, then agent id."""
        return await self._run(self._list_agents_sync, app_name)

    def _list_agents_sync(self, app_name: str | None) -> list[AgentRecord]:
        Agent = self._m.Agent
        query = Agent.select()
        if app_name is not None:
            query = query.where(Agent.app_name == app_name)
        query = query.order_by(Agent.app_name, Agent.agent_id)
        return [AgentRecord(**row) for row in query.dicts()]

    def _upsert(self, model: Any, key: Any, data: dict[str, Any]) -> None:
        # INSERT ... ON CONFLICT (key) DO UPDATE SET col = EXCLUDED.col: one portable statement
        # (SQLite >= 3.24, PostgreSQL >= 9.5), atomic without an explicit transaction.
        others = [field for name, field in model._meta.fields.items() if name != key.name]
        model.insert(**data).on_conflict(conflict_target=[key], preserve=others).execute()

    # -- audit log --

    async def append_audit(self, entry: AuditEntry) -> int:
        """Append ``entry`` (its ``id`` is ignored) and return the id the database gave it."""
        if len(entry.rtmrs) > RTMR_COUNT:
            raise ValueError(f"an audit entry has at most {RTMR_COUNT} RTMRs")
        return await self._run(self._append_audit_sync, entry)

    def _append_audit_sync(self, entry: AuditEntry) -> int:
        row: dict[str, Any] = {
            f.name: getattr(entry, f.name)
            for f in dataclasses.fields(entry)
            if f.name not in ("id", "rtmrs", "advisory_ids")
        }
        row["advisory_ids"] = json.dumps(list(entry.advisory_ids))
        rtmrs = list(entry.rtmrs) + [None] * (RTMR_COUNT - len(entry.rtmrs))
        for index, value in enumerate(rtmrs):
            row[f"rtmr{index}"] = value
        # SQLite answers with lastrowid, PostgreSQL with INSERT ... RETURNING id.
        return int(self._m.AuditLog.insert(**row).execute())

    async def recent_audit(self, app_name: str | None = None, limit: int = 50,
                           verdict: str | None = None) -> list[AuditEntry]:
        """The newest ``limit`` audit entries (of ``app_name``, and with ``verdict``, when
        given), newest first."""
        if limit <= 0:
            return []
        return await self._run(self._recent_audit_sync, app_name, limit, verdict)

    def _recent_audit_sync(self, app_name: str | None, limit: int, verdict: str | None
                           ) -> list[AuditEntry]:
        AuditLog = self._m.AuditLog
        query = AuditLog.select()
        if app_name is not None:
            query = query.where(AuditLog.app_name == app_name)
        if verdict is not None:
            query = query.where(AuditLog.verdict == verdict)
        query = query.order_by(AuditLog.id.desc()).limit(limit)
        return [_audit_entry(row) for row in query.dicts()]

    # -- collateral --

    async def load_collateral(self, key: str) -> str | None:
        """The cached collateral document stored under ``key``, or None."""
        return await self._run(self._load_collateral_sync, key)

    def _load_collateral_sync(self, key: str) -> str | None:
        Collateral = self._m.Collateral
        row = Collateral.select(Collateral.document).where(Collateral.key == key).tuples().first()
        return str(row[0]) if row is not None else None

    async def save_collateral(self, key: str, document: str, next_update: float) -> None:
        """Store (or replace) the collateral document for ``key``; ``next_update`` is when the
        issuer says it should be refreshed (Unix seconds)."""
        row = {
            "key": key,
            "document": document,
            "next_update": next_update,
            "updated_at": self._clock.now(),  # read here: a TrioClock only works on the loop
        }
        await self._run(self._upsert, self._m.Collateral, self._m.Collateral.key, row)


def _audit_entry(row: dict[str, Any]) -> AuditEntry:
    rtmrs = tuple(row.pop(f"rtmr{i}") for i in range(RTMR_COUNT))
    advisory_ids = tuple(str(item) for item in json.loads(row.pop("advisory_ids") or "[]"))
    return AuditEntry(
        **row,
        advisory_ids=advisory_ids,
        rtmrs=tuple(value for value in rtmrs if value is not None),
    )


@asynccontextmanager
async def open_store(
    config: Config, workers: Workers, clock: Clock | None = None
) -> AsyncIterator[Store]:
    """Open the store ``config`` selects, migrate it, yield it, and close it on exit.

    Raises ``StoreError("store_unavailable")`` when the database cannot be opened or migrated,
    ``StoreError("schema_too_new")`` when it is newer than this code, and ``ConfigError`` for an
    unusable ``EE_DB_URL``. ``clock`` stamps migrations and collateral (default: system clock).
    """
    store = Store(config, workers, clock)
    try:
        await store.migrate()
        yield store
    finally:
        await store.aclose()

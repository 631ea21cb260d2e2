"""The store: the control plane's database as an async facade over plain records.

This package is the only part of eecp that imports peewee. Everything above it talks to
:class:`Store`, whose methods take and return the plain records of :mod:`eecp.store.records`;
each method runs its peewee work in a worker thread through ``run_blocking(workers.store, ...)``
so the trio loop never blocks on the database, and every database failure surfaces as
``StoreError("store_unavailable", ...)`` (a peewee or driver exception never escapes).

Open it with :func:`open_store`, which migrates the schema on entry and closes every connection
on exit::

    async with open_store(config, workers) as store:
        await store.save_collateral(key, document, next_update)

Decisions that must hold across restarts and processes are taken in **units of work**:
:meth:`Store.atomic` runs a sync function in a worker thread inside one transaction
(:func:`eecp.store.db.unit_of_work`), handing it a :class:`Tx` whose operations are the only
way to read-for-update and write rows. On PostgreSQL a transaction locks the rows it decides on,
always in this order, so that two transactions never wait for each other in a circle:

1. the ``app`` row (by name), 2. the ``agent`` row (by agent_id), 3. the ledger's rows
   (``tx.ledger``, :mod:`eecp.store.ledger_repo`; ``tx.nodes``, :mod:`eecp.store.node_repo`):

   a. the ``idempotency`` claim (``INSERT ... ON CONFLICT DO NOTHING``, which waits for a
      concurrent claimer of the same key: always a transaction's first ledger statement, so
      it is never taken while other ledger rows are held),
   b. the ``node`` row: taken by every unit that touches the node's stake or settles or
      measures its periods (register, usage, settlement, the measurement chain, unstake and
      its release, status, fraud signals, the fraud ban), so a node's stake operations and
      slash checks are serialized; its ``stake_op`` rows have no lock of their own and are
      read and written only under it (and ``audit_log`` rows, never changed, are read without
      one), c. the ``abuse_report`` row,
   d. ``node_period`` rows, oldest first (spec §0 item 10: before any account; a ban locks
      every unsettled one of the node before any account),
   e. ``ledger_account`` rows, sorted by id, in one ``SELECT ... ORDER BY id FOR UPDATE``
      (an account a transfer may create is inserted just before, so its insert takes the same
      place in the order). A unit moving money for several reasons at once (a settlement's
      posts and the period's slash; a ban's voids and its confiscation) moves them in one
      statement, so it never takes account locks in two batches out of order.

   Rows nobody updates concurrently (transfers, events, usage, terms, platforms) are written
   without a lock; the natural keys' unique indexes (``usage``, ``pending_id``,
   ``node_platform``) make a concurrent duplicate fail or wait instead of doubling.

:meth:`Store.snapshot` runs a read-only function against one consistent state (SQLite: a read
transaction; PostgreSQL: REPEATABLE READ READ ONLY), for checks that sum many rows.

An agent's row carries an ``epoch``: each admission of the agent (a session's first accepted
attestation) takes the next one, and every later write of that session is conditional on it
(``WHERE epoch = :mine``). A session superseded by a newer one — in this process or another on
the same database — therefore changes nothing any more: the order of an agent's writes comes from
the database, not from locks in one process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any, TypeVar, cast

import trio

from eecp.core.blocking import Workers, run_blocking
from eecp.core.clock import Clock, SystemClock
from eecp.core.config import Config
from eecp.core.errors import StoreError
from eecp.store import db as dbmod
from eecp.store.db import DB_ERRORS, open_database, read_snapshot, unit_of_work
from eecp.store.ledger_repo import LedgerTx
from eecp.store.ledger_tables import LedgerBound
from eecp.store.migrations import current_version, migrate
from eecp.store.node_repo import NodeTx
from eecp.store.records import AgentRecord, AppRecord, AuditEntry
from eecp.store.tables import Bound

T = TypeVar("T")

#: The number of RTMR columns in the audit log (rtmr0..rtmr3).
RTMR_COUNT = 4


class Tx:
    """The operations of one unit of work (:meth:`Store.atomic`): sync, run in its worker
    thread inside its transaction. Reads ``lock=True`` take the row's lock on PostgreSQL (on
    SQLite the whole transaction holds the write lock already); take them in the order the
    module docstring gives."""

    def __init__(self, db: Any, m: Bound, lm: LedgerBound) -> None:
        self._db = db
        self._m = m
        self._locks = dbmod.is_postgres(db)
        #: the ledger's accounts, transfers, keys, usage, node-periods, abuse, leases
        self.ledger = LedgerTx(db, lm, self._locks)
        #: the ledger's nodes, terms, platforms, availability events, observers
        self.nodes = NodeTx(db, lm, self._locks)

    def _read(self, query: Any, lock: bool) -> Any:
        return query.for_update() if lock and self._locks else query

    def savepoint(self) -> AbstractContextManager[Any]:
        """A nested transaction: an exception inside rolls back what it wrote (and goes on),
        while the unit of work carries on with what came before it."""
        return cast(AbstractContextManager[Any], self._db.atomic())

    # -- apps --

    def app(self, name: str, *, lock: bool = False) -> AppRecord | None:
        """The registration called ``name`` (locked for this transaction with ``lock``)."""
        App = self._m.App
        row = self._read(App.select().where(App.name == name), lock).dicts().first()
        return AppRecord(**row) if row is not None else None

    def insert_app(self, record: AppRecord) -> bool:
        """Insert ``record`` unless an app of that name exists; False when one does (another
        transaction may have created it since this one looked: read it again, locked)."""
        return self._insert_if_absent(self._m.App, dataclasses.asdict(record))

    def update_app(self, record: AppRecord) -> None:
        """Replace every field of the app ``record.name`` (read it locked first)."""
        App = self._m.App
        data = dataclasses.asdict(record)
        del data["name"]
        App.update(**data).where(App.name == record.name).execute()

    # -- agents --

    def agent(self, agent_id: str, *, lock: bool = False) -> AgentRecord | None:
        """The agent ``agent_id``'s row (locked for this transaction with ``lock``)."""
        Agent = self._m.Agent
        row = self._read(Agent.select().where(Agent.agent_id == agent_id), lock).dicts().first()
        return AgentRecord(**row) if row is not None else None

    def insert_agent(self, record: AgentRecord) -> bool:
        """Insert ``record`` unless the agent has a row; False when it has one."""
        return self._insert_if_absent(self._m.Agent, dataclasses.asdict(record))

    def write_agent(self, record: AgentRecord, *, epoch: int | None = None) -> bool:
        """Replace the agent's row with ``record`` if the row is still bound to the record's
        app and repo and still at ``epoch`` (default: ``record.epoch``): a write fenced by the
        admission it belongs to. False (nothing written) otherwise."""
        Agent = self._m.Agent
        data = dataclasses.asdict(record)
        del data["agent_id"]
        expected = record.epoch if epoch is None else epoch
        changed = Agent.update(**data).where(
            (Agent.agent_id == record.agent_id) & (Agent.app_name == record.app_name)
            & (Agent.repo == record.repo) & (Agent.epoch == expected)).execute()
        return bool(changed)

    # -- audit log --

    def append_audit(self, entry: AuditEntry) -> int:
        """Append ``entry`` (its ``id`` is ignored); the id the database gave it."""
        return int(self._m.AuditLog.insert(**_audit_row(entry)).execute())

    def audit_entries(self, ids: Iterable[int]) -> dict[int, AuditEntry]:
        """The audit entries among ``ids`` that exist (rows are never changed: no lock)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        Audit = self._m.AuditLog
        query = Audit.select().where(Audit.id.in_(wanted))
        return {int(row["id"]): _audit_entry(row) for row in query.dicts()}

    def _insert_if_absent(self, model: Any, data: dict[str, Any]) -> bool:
        # INSERT OR IGNORE (SQLite) / INSERT ... ON CONFLICT DO NOTHING (PostgreSQL, where a
        # concurrent insert of the same key waits for the other transaction, then does
        # nothing): the cursor's row count says whether this statement made the row.
        cursor = self._db.execute(model.insert(**data).on_conflict_ignore())
        return bool(cursor.rowcount == 1)


class Store:
    """Async access to the control plane's database. Build it with :func:`open_store`.

    Constructing a ``Store`` does not touch the database; :meth:`migrate` and every other
    method run in worker threads under ``workers.store``. Methods raise
    ``StoreError("store_unavailable")`` when the database fails (and after :meth:`aclose`).
    """

    def __init__(self, config: Config, workers: Workers, clock: Clock | None = None) -> None:
        self._workers = workers
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._db, self._description, self._sqlite_path = open_database(config, workers)
        self._m = Bound(self._db)
        self._lm = LedgerBound(self._db)
        self._closed = False

    def describe(self) -> str:
        """Where the data lives, for logs: ``sqlite:data/control-plane.db`` or
        ``postgresql://eecp@db.internal:5432/eecp`` (never a password)."""
        return self._description

    @property
    def is_postgres(self) -> bool:
        """True when the store is PostgreSQL (else SQLite)."""
        return dbmod.is_postgres(self._db)

    # -- units of work --

    async def atomic(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` in a store worker thread inside one transaction (see the module
        docstring): everything it writes commits together or not at all; on PostgreSQL it is
        run again (at most :data:`eecp.store.db.UNIT_ATTEMPTS` times in all) when the database
        rolls it back for a deadlock or serialization failure, so ``fn`` must not act outside
        the database. An exception ``fn`` raises rolls the transaction back and reaches the
        caller as itself (database failures as ``StoreError("store_unavailable")``)."""
        tx = Tx(self._db, self._m, self._lm)
        return await self._run(unit_of_work, self._db, functools.partial(fn, tx))

    async def snapshot(self, fn: Callable[[Tx], T]) -> T:
        """Run the read-only ``fn(tx)`` in a store worker thread against one consistent state
        of the database (every statement sees the same commits), never retried. Writing in it
        is an error on PostgreSQL."""
        tx = Tx(self._db, self._m, self._lm)
        return await self._run(read_snapshot, self._db, functools.partial(fn, tx))

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
        # One pooled connection for the duration of the call (see eecp.store.db).
        with self._db.connection_context():
            return fn(*args)

    @staticmethod
    def _guarded(fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except DB_ERRORS as exc:
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
            directory = self._sqlite_path.parent
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError("store_unavailable",
                                 f"cannot create {directory}: {exc.strerror or exc}") from exc
            self._connected(dbmod.enable_wal, self._db)
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
        return current_version(self._m)

    # -- apps --

    async def get_app(self, name: str) -> AppRecord | None:
        """The registration called ``name``, or None."""
        return await self.atomic(lambda tx: tx.app(name))

    async def list_apps(self) -> list[AppRecord]:
        """Every registration, ordered by name."""
        return await self._run(self._list_apps_sync)

    def _list_apps_sync(self) -> list[AppRecord]:
        App = self._m.App
        return [AppRecord(**row) for row in App.select().order_by(App.name).dicts()]

    async def save_app(self, record: AppRecord) -> None:
        """Insert ``record``, or replace every field of the app with the same name (an
        operator's or a test's write: sessions decide registrations in a unit of work)."""
        await self._run(self._upsert, self._m.App, self._m.App.name, dataclasses.asdict(record))

    async def delete_app(self, name: str) -> bool:
        """Delete the registration called ``name``; True when there was one. Its agents' rows
        and its audit history are kept."""
        return await self._run(self._delete_app_sync, name)

    def _delete_app_sync(self, name: str) -> bool:
        App = self._m.App
        return bool(App.delete().where(App.name == name).execute())

    # -- agents --

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        """The agent ``agent_id``'s row, or None."""
        return await self.atomic(lambda tx: tx.agent(agent_id))

    async def release_agent(self, agent_id: str) -> bool:
        """Delete the agent ``agent_id``'s row, and with it its binding (an operator's act:
        the id may then be admitted for any app). True when there was one; its audit history
        is kept."""
        return await self._run(self._release_agent_sync, agent_id)

    def _release_agent_sync(self, agent_id: str) -> bool:
        Agent = self._m.Agent
        return bool(Agent.delete().where(Agent.agent_id == agent_id).execute())

    async def write_agent(self, record: AgentRecord) -> bool:
        """Write ``record`` over the agent's row if that row is still bound to the record's
        app and repo and at ``record.epoch`` (:meth:`Tx.write_agent`), or insert it when the
        agent has no row; False when nothing was written (a newer admission holds the row, or
        another app does)."""
        return await self.atomic(lambda tx: tx.write_agent(record) or tx.insert_agent(record))

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
        return await self.atomic(lambda tx: tx.append_audit(entry))

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


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    if len(entry.rtmrs) > RTMR_COUNT:
        raise ValueError(f"an audit entry has at most {RTMR_COUNT} RTMRs")
    row: dict[str, Any] = {
        f.name: getattr(entry, f.name)
        for f in dataclasses.fields(entry)
        if f.name not in ("id", "rtmrs", "advisory_ids")
    }
    row["advisory_ids"] = json.dumps(list(entry.advisory_ids))
    rtmrs = list(entry.rtmrs) + [None] * (RTMR_COUNT - len(entry.rtmrs))
    for index, value in enumerate(rtmrs):
        row[f"rtmr{index}"] = value
    return row


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
        try:
            await store.migrate()
        except StoreError as exc:
            raise _not_opened(store, config, exc) from exc
        yield store
    finally:
        await store.aclose()


def _not_opened(store: Store, config: Config, exc: StoreError) -> StoreError:
    """The error of a store that could not be opened, as one line naming the database and the
    variable that chose it (what ``eecp serve`` prints): a driver's message may span lines."""
    variable = "EE_DB_URL" if config.db_url else "EE_DB_PATH"
    detail = " ".join(exc.detail.split())
    return StoreError(exc.reason,
                      f"cannot open the store {store.describe()} ({variable}): {detail}")

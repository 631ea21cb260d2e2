"""Schema changes, versioned from day one.

:data:`MIGRATIONS` is an ordered list of ``(version, function)``; :func:`migrate` applies the
pending ones, each in its own transaction together with the row in ``schema_version`` that
records it, and refuses to run against a database whose version is newer than this code knows
(``StoreError("schema_too_new")``), because an older eecp writing into a newer schema could
silently corrupt it. A migration that changes a table freezes a copy of its earlier shape here
first, so that a fresh database replays history instead of jumping to the newest shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import peewee
from playhouse import migrate as playhouse_migrate

from eecp.core.errors import StoreError
from eecp.store.ledger_tables import create_ledger_schema
from eecp.store.tables import Bound, Database, _Base, bind_model


class _AgentV1(_Base):
    """``agent`` as schema version 1 created it (frozen: version 3 added ``epoch``)."""

    agent_id = peewee.TextField(primary_key=True)
    app_name = peewee.TextField(index=True)
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
    # The initial schema. The live App and Collateral classes are still the version-1 shape
    # (a migration that changes one of them must freeze a copy here first, as _AgentV1 and
    # _AuditLogV1 are), so that a fresh database replays history instead of jumping straight
    # to the newest shape.
    m = Bound(db)
    db.create_tables([m.App, bind_model(_AgentV1, db), bind_model(_AuditLogV1, db),
                      m.Collateral], safe=False)


def _migration_2(db: Database) -> None:
    # audit_log.platform_id: the PPID of a verified quote's platform (NULL in older rows).
    # Agent rows need no change: an existing row already is its agent_id's binding.
    migrator = playhouse_migrate.SchemaMigrator.from_database(db)
    playhouse_migrate.migrate(
        migrator.add_column("audit_log", "platform_id", peewee.TextField(null=True)))


def _migration_3(db: Database) -> None:
    # agent.epoch: the admission generation that fences a session's writes (0 in older rows:
    # the next admission of each agent takes 1).
    migrator = playhouse_migrate.SchemaMigrator.from_database(db)
    playhouse_migrate.migrate(
        migrator.add_column("agent", "epoch", peewee.BigIntegerField(default=0)))


def _migration_4(db: Database) -> None:
    # The ledger (issue 15): new tables only, so nothing is frozen; their triggers and the
    # system accounts (mint:usd, fee:platform, slash:platform) come with them.
    create_ledger_schema(db)


#: Every schema change, in order. Append only; never edit or renumber an entry once released.
MIGRATIONS: list[tuple[int, Callable[[Database], None]]] = [
    (1, _migration_1),
    (2, _migration_2),
    (3, _migration_3),
    (4, _migration_4),
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
    m = Bound(db)
    while True:
        with _migration_transaction(db):
            m.SchemaVersion.create_table(safe=True)
            current = current_version(m)
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


def current_version(m: Bound) -> int:
    value = m.SchemaVersion.select(peewee.fn.MAX(m.SchemaVersion.version)).scalar()
    return int(value) if value is not None else 0



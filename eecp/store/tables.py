"""The tables, as peewee models bound to no database (each open store binds its own).

The classes below declare the *shape* of the tables. Each open store binds its own subclasses
(:class:`Bound`), so two stores in one process (tests, or a migration tool next to a server)
never share or swap a global binding.

Times are DoubleField on purpose: peewee's FloatField is REAL, which PostgreSQL stores in four
bytes (about two minutes of resolution for a Unix time); DOUBLE PRECISION / SQLite REAL are
eight. Strings are TextField because PostgreSQL enforces VARCHAR(255) and a reason or a repo
name must never be cut or refused for length. A table whose shape a migration changes keeps a
frozen copy of its earlier shape in :mod:`eecp.store.migrations`.
"""

from __future__ import annotations

from typing import Any

import peewee

Database = peewee.Database


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
    #: the admission this row's latest writer belongs to (since schema version 3): each
    #: admission takes the next, and a session writes only while the row still has its own
    epoch = peewee.BigIntegerField(default=0)

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


MODELS: tuple[Any, ...] = (SchemaVersion, App, Agent, AuditLog, Collateral)


class Bound:
    """The model classes bound to one database."""

    def __init__(self, db: Database) -> None:
        bound = {model.__name__: bind_model(model, db) for model in MODELS}
        self.SchemaVersion: Any = bound["SchemaVersion"]
        self.App: Any = bound["App"]
        self.Agent: Any = bound["Agent"]
        self.AuditLog: Any = bound["AuditLog"]
        self.Collateral: Any = bound["Collateral"]


def bind_model(model: Any, db: Database) -> Any:
    # A subclass inherits fields, primary key and indexes (peewee copies them); only the
    # database and the table name (which peewee would derive from the subclass name) are set.
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    return type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})



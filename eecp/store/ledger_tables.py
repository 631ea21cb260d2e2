"""The ledger's tables (spec §14.2–14.3), as peewee models bound to no database.

The rules of the ledger live in :mod:`eecp.ledger`; these tables only keep its state, and back
the rules that can be written as constraints up, so that a bug (or a hand-written ``UPDATE``)
cannot break them silently:

* money is ``BIGINT`` micros everywhere (never ``REAL``/``DECIMAL``: SQLite would store a
  decimal as a float); times are ``DOUBLE`` Unix seconds, period bounds ``BIGINT`` seconds;
* ``ledger_account``: the four counters are never negative, and an account with
  ``no_overdraft`` never has ``debits_posted + debits_pending > credits_posted`` (CHECKs);
* ``ledger_transfer``: ``amount > 0``, two different accounts, a known ``phase``, and a
  ``pending_id`` exactly on posts and voids (CHECKs); ``UNIQUE(pending_id)``, so a hold is
  resolved at most once; a purchase's ``external_ref`` is unique (a partial index); rows are
  never updated or deleted (triggers raising ``append_only``);
* ``availability_event`` is append-only the same way.

Deviations from the spec's table, each for a reason:

* ``ledger_transfer.phase`` (``single``/``pending``/``post``/``void``) replaces the spec's
  ``pending`` boolean: the journal sums of ``GET /v1/ledger/check`` must tell a post (which
  moves money to the posted counters) from a void (which does not) in SQL, without the ledger's
  list of codes;
* ``node_period`` keeps the whole measurement (``apps``, ``gaps`` next to ``misses`` and
  ``carry_out``), so a held node-period decided days later is judged on what was measured
  once, and ``result``, the rendered answer, so a replayed finalize is byte-identical;
* ``abuse_report.decision_answer`` keeps the rendered decision for the same reason;
* the agent's node is not a column of ``agent`` (whose writes belong to admission): it is the
  ``node_id`` of the agent's latest ``availability_event``, derived from the quote's PPID when
  the event is written.
"""

from __future__ import annotations

from typing import Any

import peewee
from peewee import SQL

from eecp.store.tables import Database, _Base, bind_model

_MONEY = "BIGINT"


def _money() -> peewee.BigIntegerField:
    return peewee.BigIntegerField(default=0)


class LedgerAccount(_Base):
    id = peewee.TextField(primary_key=True)
    kind = peewee.TextField()
    owner_node = peewee.TextField(null=True)
    no_overdraft = peewee.BooleanField()
    debits_pending = _money()
    debits_posted = _money()
    credits_pending = _money()
    credits_posted = _money()
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "ledger_account"
        constraints = (
            SQL("CHECK (debits_pending >= 0 AND debits_posted >= 0 AND credits_pending >= 0 "
                "AND credits_posted >= 0)"),
            SQL("CHECK (NOT no_overdraft OR debits_posted + debits_pending <= credits_posted)"),
        )


class LedgerTransfer(_Base):
    id = peewee.BigAutoField()
    transfer_id = peewee.TextField(unique=True)
    debit_account = peewee.TextField()
    credit_account = peewee.TextField()
    amount = peewee.BigIntegerField()
    code = peewee.TextField()
    phase = peewee.TextField()
    pending_id = peewee.BigIntegerField(null=True, unique=True)
    ref_type = peewee.TextField(null=True)
    ref_id = peewee.TextField(null=True)
    idempotency_id = peewee.BigIntegerField(null=True)  # no FK: keys are pruned
    note = peewee.TextField(null=True)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "ledger_transfer"
        constraints = (
            SQL("FOREIGN KEY (debit_account) REFERENCES ledger_account (id)"),
            SQL("FOREIGN KEY (credit_account) REFERENCES ledger_account (id)"),
            SQL("FOREIGN KEY (pending_id) REFERENCES ledger_transfer (id)"),
            SQL("CHECK (amount > 0)"),
            SQL("CHECK (debit_account <> credit_account)"),
            SQL("CHECK (phase IN ('single', 'pending', 'post', 'void'))"),
            SQL("CHECK ((phase IN ('post', 'void')) = (pending_id IS NOT NULL))"),
        )
        indexes = (
            (("debit_account", "id"), False),
            (("credit_account", "id"), False),
            (("ref_type", "ref_id"), False),
        )


class Idempotency(_Base):
    id = peewee.BigAutoField()
    principal = peewee.TextField()
    key = peewee.TextField()
    route = peewee.TextField()
    request_hash = peewee.TextField()
    status_code = peewee.IntegerField(null=True)
    response = peewee.TextField(null=True)
    created_at = peewee.DoubleField(index=True)

    class Meta:
        table_name = "idempotency"
        indexes = ((("principal", "key"), True),)


class Node(_Base):
    node_id = peewee.TextField(primary_key=True)
    status = peewee.TextField()
    status_reason = peewee.TextField(null=True)
    token_sha256 = peewee.TextField(index=True)
    token_alg = peewee.TextField()
    trust_ppm = peewee.IntegerField(default=1_000_000)
    effective_price_micros = peewee.BigIntegerField(null=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()
    banned_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "node"
        constraints = (SQL("CHECK (status IN ('active', 'suspended', 'retired', 'banned'))"),)


class NodeTerms(_Base):
    id = peewee.BigAutoField()
    node_id = peewee.TextField()
    effective_from = peewee.BigIntegerField()
    price_micros_per_vcpu_hour = peewee.BigIntegerField()
    capacity_vcpus = peewee.IntegerField()
    tier = peewee.TextField()
    created_at = peewee.DoubleField()
    created_by = peewee.TextField()

    class Meta:
        table_name = "node_terms"
        constraints = (
            SQL("FOREIGN KEY (node_id) REFERENCES node (node_id)"),
            SQL("CHECK (price_micros_per_vcpu_hour > 0)"),
            SQL("CHECK (capacity_vcpus BETWEEN 1 AND 4096)"),
            SQL("CHECK (tier IN ('premium', 'standard', 'economy'))"),
        )
        indexes = ((("node_id", "effective_from"), True),)


class NodePlatform(_Base):
    ppid = peewee.TextField(primary_key=True)
    node_id = peewee.TextField(index=True)
    confirmed_at = peewee.DoubleField()
    confirmed_by = peewee.TextField()

    class Meta:
        table_name = "node_platform"
        constraints = (SQL("FOREIGN KEY (node_id) REFERENCES node (node_id)"),)


class PlatformClaim(_Base):
    ppid = peewee.TextField()
    node_id = peewee.TextField()
    agent_id = peewee.TextField()
    audit_id = peewee.BigIntegerField(null=True)
    first_seen = peewee.DoubleField()
    last_seen = peewee.DoubleField()

    class Meta:
        table_name = "platform_claim"
        primary_key = peewee.CompositeKey("ppid", "node_id")


class Usage(_Base):
    usage_id = peewee.TextField(primary_key=True)
    account_id = peewee.TextField()
    node_id = peewee.TextField()
    app_key = peewee.TextField(default="")
    period_start = peewee.BigIntegerField()
    period_end = peewee.BigIntegerField()
    vcpu_micro_hours = peewee.BigIntegerField()
    price_micros_per_vcpu_hour = peewee.BigIntegerField()
    amount_micros = peewee.BigIntegerField()
    hold_id = peewee.BigIntegerField(unique=True)
    status = peewee.TextField()
    reported_at = peewee.DoubleField()
    reported_by = peewee.TextField()

    class Meta:
        table_name = "usage"
        constraints = (
            SQL("FOREIGN KEY (account_id) REFERENCES ledger_account (id)"),
            SQL("FOREIGN KEY (node_id) REFERENCES node (node_id)"),
            SQL("FOREIGN KEY (hold_id) REFERENCES ledger_transfer (id)"),
            SQL("CHECK (amount_micros > 0 AND vcpu_micro_hours > 0)"),
            SQL("CHECK (status IN ('held', 'posted', 'voided'))"),
        )
        indexes = (
            (("account_id", "node_id", "app_key", "period_start"), True),
            (("node_id", "period_start", "status"), False),
        )


class NodePeriod(_Base):
    node_id = peewee.TextField()
    period_start = peewee.BigIntegerField()
    period_end = peewee.BigIntegerField()
    measured_at = peewee.DoubleField(null=True)
    down_seconds = peewee.DoubleField(null=True)
    gap_seconds = peewee.DoubleField(null=True)
    observed_up = peewee.BooleanField(null=True)
    misses = peewee.TextField(null=True)  # JSON
    apps = peewee.TextField(null=True)  # JSON
    gaps = peewee.TextField(null=True)  # JSON
    carry_out = peewee.TextField(null=True)  # JSON
    status = peewee.TextField(default="open")
    held_reason = peewee.TextField(null=True)
    outcome = peewee.TextField(null=True)
    reasons = peewee.TextField(null=True)  # JSON
    holds = peewee.IntegerField(default=0)
    posted_micros = _money()
    fee_micros = _money()
    voided_micros = _money()
    policy = peewee.TextField(null=True)  # JSON
    result = peewee.TextField(null=True)  # the rendered answer (held or settled)
    settled_at = peewee.DoubleField(null=True)
    settled_by = peewee.TextField(null=True)

    class Meta:
        table_name = "node_period"
        primary_key = peewee.CompositeKey("node_id", "period_start")
        constraints = (
            SQL("FOREIGN KEY (node_id) REFERENCES node (node_id)"),
            SQL("CHECK (status IN ('open', 'held', 'settled'))"),
            SQL("CHECK (period_start < period_end)"),
        )
        indexes = ((("status", "period_start"), False),)


class AvailabilityEvent(_Base):
    id = peewee.BigAutoField()
    at = peewee.DoubleField()
    agent_id = peewee.TextField()
    node_id = peewee.TextField(null=True)
    app_name = peewee.TextField()
    session_id = peewee.TextField()
    instance_id = peewee.TextField()
    kind = peewee.TextField()
    reason = peewee.TextField()
    #: the platform of the session's latest accepted quote (what ``node_id`` was derived from)
    ppid = peewee.TextField(null=True)

    class Meta:
        table_name = "availability_event"
        constraints = (SQL("CHECK (kind IN ('up', 'down', 'release'))"),)
        indexes = ((("node_id", "at"), False), (("agent_id", "at"), False))


class Observer(_Base):
    instance_id = peewee.TextField(primary_key=True)
    started_at = peewee.DoubleField()
    last_beat_at = peewee.DoubleField(index=True)
    stopped_at = peewee.DoubleField(null=True)
    version = peewee.TextField()

    class Meta:
        table_name = "observer"


class AbuseReport(_Base):
    report_id = peewee.TextField(primary_key=True)
    node_id = peewee.TextField()
    period_start = peewee.BigIntegerField()
    period_end = peewee.BigIntegerField()
    reason = peewee.TextField(null=True)
    reported_by = peewee.TextField(null=True)
    filed_by = peewee.TextField()
    status = peewee.TextField()
    decided_by = peewee.TextField(null=True)
    decided_at = peewee.DoubleField(null=True)
    decision_note = peewee.TextField(null=True)
    decision_answer = peewee.TextField(null=True)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "abuse_report"
        constraints = (
            SQL("FOREIGN KEY (node_id) REFERENCES node (node_id)"),
            SQL("CHECK (status IN ('pending', 'authorized', 'denied'))"),
            SQL("CHECK (period_start < period_end)"),
        )
        indexes = ((("node_id", "status"), False),)


class StakeOp(_Base):
    op_id = peewee.TextField(primary_key=True)
    node_id = peewee.TextField()
    kind = peewee.TextField()
    amount_micros = peewee.BigIntegerField()
    status = peewee.TextField()
    release_at = peewee.DoubleField(null=True)
    transfer_id = peewee.TextField(null=True)
    resolution_transfer_id = peewee.TextField(null=True)
    detail = peewee.TextField(default="{}")  # JSON
    created_at = peewee.DoubleField()
    created_by = peewee.TextField()

    class Meta:
        table_name = "stake_op"
        constraints = (
            SQL("FOREIGN KEY (node_id) REFERENCES node (node_id)"),
            SQL("CHECK (kind IN ('deposit', 'unstake', 'slash_availability', 'slash_fraud'))"),
            SQL("CHECK (status IN ('pending', 'released', 'voided', 'done', 'skipped'))"),
            SQL("CHECK (amount_micros >= 0)"),
        )
        indexes = ((("status", "release_at"), False), (("node_id", "created_at"), False))


class JobLease(_Base):
    name = peewee.TextField(primary_key=True)
    holder = peewee.TextField()
    expires_at = peewee.DoubleField()

    class Meta:
        table_name = "job_lease"


LEDGER_MODELS: tuple[Any, ...] = (
    LedgerAccount, LedgerTransfer, Idempotency, Node, NodeTerms, NodePlatform, PlatformClaim,
    Usage, NodePeriod, AvailabilityEvent, Observer, AbuseReport, StakeOp, JobLease,
)

#: tables whose rows are never updated or deleted (spec §3.3 item 6)
APPEND_ONLY = ("ledger_transfer", "availability_event")

#: the system accounts migration 4 creates: (id, kind, no_overdraft)
SYSTEM_ACCOUNTS = (("mint:usd", "mint", False), ("fee:platform", "fee", True),
                   ("slash:platform", "slash", True))


class LedgerBound:
    """The ledger's model classes bound to one database."""

    def __init__(self, db: Database) -> None:
        bound = {model.__name__: bind_model(model, db) for model in LEDGER_MODELS}
        self.Account: Any = bound["LedgerAccount"]
        self.Transfer: Any = bound["LedgerTransfer"]
        self.Idempotency: Any = bound["Idempotency"]
        self.Node: Any = bound["Node"]
        self.NodeTerms: Any = bound["NodeTerms"]
        self.NodePlatform: Any = bound["NodePlatform"]
        self.PlatformClaim: Any = bound["PlatformClaim"]
        self.Usage: Any = bound["Usage"]
        self.NodePeriod: Any = bound["NodePeriod"]
        self.Event: Any = bound["AvailabilityEvent"]
        self.Observer: Any = bound["Observer"]
        self.AbuseReport: Any = bound["AbuseReport"]
        self.StakeOp: Any = bound["StakeOp"]
        self.JobLease: Any = bound["JobLease"]
        self.all: tuple[Any, ...] = tuple(bound[m.__name__] for m in LEDGER_MODELS)


def create_ledger_schema(db: Database) -> None:
    """Migration 4: the tables, the partial unique index on purchases' external references,
    the append-only triggers and the system accounts (``created_at`` 0: they predate
    everything)."""
    m = LedgerBound(db)
    # one by one, in LEDGER_MODELS' order: the foreign keys are SQL constraints, which
    # peewee's own ordering of create_tables does not see
    for model in m.all:
        model.create_table(safe=False)
    untyped: Any = db  # execute_sql is unannotated in peewee's stubs
    untyped.execute_sql(
        "CREATE UNIQUE INDEX ledger_transfer_external_ref ON ledger_transfer (ref_id) "
        "WHERE ref_type = 'external_ref'")
    for statement in _append_only_ddl(db):
        untyped.execute_sql(statement)
    for account_id, kind, no_overdraft in SYSTEM_ACCOUNTS:
        m.Account.insert(id=account_id, kind=kind, no_overdraft=no_overdraft,
                         created_at=0.0).execute()


def _append_only_ddl(db: Database) -> list[str]:
    if isinstance(db, peewee.SqliteDatabase):
        return [
            f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, 'append_only'); END"
            for table in APPEND_ONLY for op in ("UPDATE", "DELETE")
        ]
    # '%%': execute_sql hands the text to psycopg2 with a parameter tuple, which reads '%'
    function = (
        "CREATE OR REPLACE FUNCTION eecp_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'append_only: %% on %%', TG_OP, TG_TABLE_NAME; END $$")
    return [function] + [
        f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION eecp_append_only()"
        for table in APPEND_ONLY
    ]

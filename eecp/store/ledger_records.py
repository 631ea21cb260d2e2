"""The ledger's rows as plain records (no peewee here, and no ledger rules: the store does not
import :mod:`eecp.ledger`, which gives these fields their meaning).

Each record's fields are its table's columns (:mod:`eecp.store.ledger_tables`), so a row reads
as ``Record(**row)``. Money is int micros, times float Unix seconds, period bounds int seconds;
JSON columns stay text, parsed by the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccountRow:
    id: str
    kind: str
    no_overdraft: bool
    created_at: float
    owner_node: str | None = None
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0


@dataclass(frozen=True)
class TransferRow:
    transfer_id: str
    debit_account: str
    credit_account: str
    amount: int
    code: str
    phase: str  # single | pending | post | void
    created_at: float
    pending_id: int | None = None
    ref_type: str | None = None
    ref_id: str | None = None
    idempotency_id: int | None = None
    note: str | None = None
    id: int | None = None  # given by the database


@dataclass(frozen=True)
class KeyRow:
    """A claimed idempotency key and the answer stored with it."""

    id: int
    principal: str
    key: str
    route: str
    request_hash: str
    created_at: float
    status_code: int | None = None
    response: str | None = None


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    status: str
    token_sha256: str
    token_alg: str
    created_at: float
    updated_at: float
    status_reason: str | None = None
    trust_ppm: int = 1_000_000
    effective_price_micros: int | None = None
    banned_at: float | None = None


@dataclass(frozen=True)
class TermsRow:
    node_id: str
    effective_from: int
    price_micros_per_vcpu_hour: int
    capacity_vcpus: int
    tier: str
    created_at: float
    created_by: str


@dataclass(frozen=True)
class PlatformRow:
    ppid: str
    node_id: str
    confirmed_at: float
    confirmed_by: str


@dataclass(frozen=True)
class ClaimRow:
    ppid: str
    node_id: str
    agent_id: str
    first_seen: float
    last_seen: float
    audit_id: int | None = None


@dataclass(frozen=True)
class UsageRow:
    usage_id: str
    account_id: str
    node_id: str
    app_key: str
    period_start: int
    period_end: int
    vcpu_micro_hours: int
    price_micros_per_vcpu_hour: int
    amount_micros: int
    hold_id: int
    status: str  # held | posted | voided
    reported_at: float
    reported_by: str


@dataclass(frozen=True)
class NodePeriodRow:
    node_id: str
    period_start: int
    period_end: int
    measured_at: float | None = None
    down_seconds: float | None = None
    gap_seconds: float | None = None
    observed_up: bool | None = None
    misses: str | None = None
    apps: str | None = None
    gaps: str | None = None
    carry_out: str | None = None
    status: str = "open"  # open | held | settled
    held_reason: str | None = None
    outcome: str | None = None
    reasons: str | None = None
    holds: int = 0
    posted_micros: int = 0
    fee_micros: int = 0
    voided_micros: int = 0
    policy: str | None = None
    result: str | None = None
    settled_at: float | None = None
    settled_by: str | None = None


@dataclass(frozen=True)
class EventRow:
    at: float
    agent_id: str
    app_name: str
    session_id: str
    instance_id: str
    kind: str  # up | down | release
    reason: str
    node_id: str | None = None
    ppid: str | None = None
    id: int | None = None


@dataclass(frozen=True)
class ObserverRow:
    instance_id: str
    started_at: float
    last_beat_at: float
    version: str
    stopped_at: float | None = None


@dataclass(frozen=True)
class AbuseRow:
    report_id: str
    node_id: str
    period_start: int
    period_end: int
    filed_by: str
    status: str  # pending | authorized | denied
    created_at: float
    reason: str | None = None
    reported_by: str | None = None
    decided_by: str | None = None
    decided_at: float | None = None
    decision_note: str | None = None
    decision_answer: str | None = None


@dataclass(frozen=True)
class StakeOpRow:
    op_id: str
    node_id: str
    kind: str
    amount_micros: int
    status: str
    created_at: float
    created_by: str
    release_at: float | None = None
    transfer_id: str | None = None
    resolution_transfer_id: str | None = None
    detail: str = "{}"


@dataclass(frozen=True)
class JournalSums:
    """What ``GET /v1/ledger/check`` compares, read in one snapshot: the accounts' counters
    and, per account, the same four sums recomputed from the journal."""

    accounts: dict[str, tuple[int, int, int, int]]  # id -> (dp, dpo, cp, cpo), stored
    journal: dict[str, tuple[int, int, int, int]]  # id -> the same, from ledger_transfer
    bad_resolutions: list[int]  # pending_ids that name no hold, or a later row
    held_in_settled: int
    settlement_mismatches: list[str]  # "node_id@period_start" whose totals disagree


@dataclass(frozen=True)
class LedgerTallies:
    """What the ledger's metrics show, counted in one snapshot: journal rows by code,
    settled node-periods by outcome, held node-periods by reason."""

    transfers_by_code: dict[str, int]
    settled_by_outcome: dict[str, int]
    held_by_reason: dict[str, int]

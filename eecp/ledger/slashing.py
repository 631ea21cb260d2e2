"""Slashing and the trust cache, applied to the store where node-periods are measured (spec §10.2,
§10.4, §12).

**Where the availability check runs.** Every node-period is measured exactly once, and a node's
periods are measured in order (each from its predecessor's carry-out); the slash check of the
window ending at P runs in the very unit of work that measures P (:func:`availability_check`),
after P is judged. For the settler that is the unit that settles P (§9.3 step 5: one
transaction); when a finalize catches up on a chain of earlier periods, it is the unit that
measures them. So each period is checked once, in period order, whatever order node-periods are
*settled* in (a held one may be decided days later): the slashes are a function of the measured
record alone, and two settlers cannot slash twice, because the check runs under the node's row
lock.

**What a slash writes** (:class:`PlannedSlash`): the pending unstakes it voids (newest first,
``unstake_void``), the slash itself (``stake:N → slash:platform``), a ``stake_op`` row with the
window, its downtime and the allowance in ``detail`` (``skipped`` with ``reason: no_stake``
when nothing was staked), and each voided unstake's row marked ``voided``. Its legs can join
other legs in one :func:`~eecp.ledger.units.move`, so a transaction locks all its accounts in
one id-ordered statement (the settlement's posts with the slash; the fraud's usage voids with
the confiscation).

**The trust cache** (:func:`refresh_trust`): after a measurement the node row gets the
history factor (``trust_ppm``) of its last 168 measured periods and authorized abuse, and the
effective price it gives under the terms in force; readers compute the effective price from
``trust_ppm`` and the current terms (:func:`eecp.ledger.trust.effective_price`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Literal

from eecp.core.errors import LedgerError
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.journal import SLASH_ACCOUNT, Code, Transfer, node_account, stake_account
from eecp.ledger.nodes import terms_at
from eecp.ledger.periods import period_id, period_of
from eecp.ledger.stake import (
    WINDOW_SEC,
    MeasuredPeriod,
    PendingUnstake,
    SlashPlan,
    penalty,
    plan_availability_slash,
    tier_rule,
    window_down,
    window_start,
)
from eecp.ledger.trust import HISTORY_PERIODS, effective_price, history_of
from eecp.ledger.units import Leg, balances, move, new_id
from eecp.store.ledger_records import NodePeriodRow, NodeRow, StakeOpRow, TransferRow
from eecp.store.store import Tx

SlashKind = Literal["slash_availability", "slash_fraud"]
#: the journal rows' reference type for stake operations (the op's id is the reference)
STAKE_OP = "stake_op"


@dataclass(frozen=True)
class PlannedSlash:
    """A slash decided inside a unit of work, not yet written (see the module docstring)."""

    node_id: str
    op_id: str
    kind: SlashKind
    plan: SlashPlan
    detail: dict[str, object]
    created_by: str

    def legs(self) -> list[Leg]:
        stake, node = stake_account(self.node_id), node_account(self.node_id)
        legs = [Leg(Transfer(0, Code.UNSTAKE_VOID, stake, node, u.amount, u.hold_id),
                    STAKE_OP, u.op_id) for u in self.plan.void]
        if self.plan.amount:
            legs.append(Leg(Transfer(0, Code(self.kind), stake, SLASH_ACCOUNT, self.plan.amount),
                            STAKE_OP, self.op_id))
        return legs


def record(tx: Tx, slash: PlannedSlash, written: Sequence[TransferRow],
           now: float) -> StakeOpRow:
    """Write what ``slash``'s legs (moved as ``written``, in :meth:`PlannedSlash.legs`' order)
    mean: the voided unstakes' rows and the slash's own."""
    if len(written) != len(slash.legs()):
        raise LedgerError("slash_legs_mismatch", slash.op_id)
    for unstake, row in zip(slash.plan.void, written, strict=False):
        op = tx.ledger.stake_op(unstake.op_id)
        if op is None or op.status != "pending":
            raise LedgerError("unstake_not_pending", unstake.op_id)
        tx.ledger.write_stake_op(replace(op, status="voided",
                                         resolution_transfer_id=row.transfer_id))
    transfer_id = written[-1].transfer_id if slash.plan.amount else None
    op = StakeOpRow(slash.op_id, slash.node_id, slash.kind, slash.plan.amount,
                    "skipped" if slash.plan.skipped else "done", now, slash.created_by,
                    transfer_id=transfer_id, detail=json.dumps(slash.detail))
    tx.ledger.insert_stake_op(op)
    return op


def execute(tx: Tx, slash: PlannedSlash, now: float) -> StakeOpRow:
    """Move ``slash``'s money and record it."""
    legs = slash.legs()
    return record(tx, slash, move(tx, legs, now) if legs else [], now)


def pending_unstakes(tx: Tx, node_id: str) -> list[PendingUnstake]:
    """The node's unstakes not yet released or voided, with their holds' ids."""
    ops = tx.ledger.stake_ops(node_id, kinds=["unstake"], statuses=["pending"])
    holds = tx.ledger.transfers_by_public_id(o.transfer_id for o in ops if o.transfer_id)
    out = []
    for op in ops:
        hold = holds.get(op.transfer_id or "")
        if hold is None or hold.id is None:
            raise LedgerError("unstake_without_hold", op.op_id)
        out.append(PendingUnstake(op.op_id, hold.id, op.amount_micros, op.created_at))
    return out


# --- the availability window (§10.2) ---------------------------------------------------------

def last_slash_end(tx: Tx, node_id: str) -> int | None:
    """The end of the period of the node's latest availability slash (skipped ones too)."""
    ends = [int(json.loads(o.detail)["period_end"]) for o in tx.ledger.stake_ops(
        node_id, kinds=["slash_availability"])]
    return max(ends, default=None)


@dataclass(frozen=True)
class Window:
    """The slash window ending at ``end``: where it starts and its counted downtime."""

    start: float
    end: int
    down_seconds: Fraction


def window_of(tx: Tx, settings: LedgerSettings, node: NodeRow, end: int) -> Window:
    start = window_start(end, first_period_start=period_of(node.created_at, settings.period).start,
                         last_slash_end=last_slash_end(tx, node.node_id),
                         interval_sec=settings.slash_min_interval_sec)
    rows = tx.ledger.node_periods(node_id=node.node_id, since=start, measured=True,
                                  until=end - settings.period.seconds)
    periods = [MeasuredPeriod(r.period_start, r.period_end, r.down_seconds or 0.0) for r in rows]
    return Window(start, end, window_down(periods, start, end))


def availability_check(tx: Tx, settings: LedgerSettings, node: NodeRow, row: NodePeriodRow,
                       created_by: str) -> PlannedSlash | None:
    """The availability slash the window ending with the measured ``row`` calls for, if any
    (the node's row is locked: nothing else slashes it meanwhile). A banned node has nothing
    left to slash; a suspended or retired one is still slashable."""
    if node.status == "banned" or row.measured_at is None:
        return None
    terms = terms_at(tx.nodes.terms(node.node_id), row.period_start)
    if terms is None:
        return None
    window = window_of(tx, settings, node, row.period_end)
    stake = balances(tx.ledger.accounts([stake_account(node.node_id)]).get(
        stake_account(node.node_id)))
    owed = penalty(terms.price_micros_per_vcpu_hour, terms.capacity_vcpus, terms.tier)
    pending = pending_unstakes(tx, node.node_id)
    plan = plan_availability_slash(terms.tier, window.down_seconds, owed, stake.available,
                                   pending)
    if plan is None:
        return None
    detail: dict[str, object] = {
        "reason": "no_stake" if plan.skipped else "over_allowance",
        "period": period_id(row.period_start, settings.period),
        "period_start": row.period_start, "period_end": row.period_end,
        "window_start": int(window.start), "down_seconds": float(window.down_seconds),
        "allowed_seconds": float(tier_rule(terms.tier).allowed_down_sec), "tier": terms.tier,
        "penalty_micros": owed, "voided_unstakes": [u.op_id for u in plan.void]}
    return PlannedSlash(node.node_id, new_id("so"), "slash_availability", plan, detail,
                        created_by)


# --- the trust cache (§12) -------------------------------------------------------------------

def refresh_trust(tx: Tx, settings: LedgerSettings, node: NodeRow, at: int) -> NodeRow:
    """Cache the node's history factor and effective price as of the measured period ending at
    ``at`` (its last :data:`HISTORY_PERIODS` measured periods; authorized abuse overlapping the
    30 days before ``at``). The node row must be locked; it is written only when it changes."""
    rows = tx.ledger.node_periods(node_id=node.node_id, measured=True, newest=HISTORY_PERIODS)
    abuse = any(r.status == "authorized" for r in tx.ledger.reports(
        node.node_id, at - WINDOW_SEC, at))
    trust = history_of([r.down_seconds or 0.0 for r in rows], abuse)
    terms = terms_at(tx.nodes.terms(node.node_id), period_of(at, settings.period).start)
    effective = None if terms is None else effective_price(
        terms.price_micros_per_vcpu_hour, terms.tier, trust)
    new = replace(node, trust_ppm=trust, effective_price_micros=effective)
    if new != node:
        tx.nodes.write_node(new)
    return new

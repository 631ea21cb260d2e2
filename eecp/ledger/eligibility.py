"""Eligibility of a node-period: pass, fail or held, with every reason (spec §9.2, §21.12).

Computed at settlement from stored records only: the node's status and stake, the abuse
reports' effect (:func:`eecp.ledger.settlement.abuse_effect`), and the period's
:class:`~eecp.ledger.availability.Measurement`. Zero tolerance by default: any counted downtime
fails the period (``downtime_grace_sec`` is an escape hatch, not the default).

Precedence, as §21.12 decides it, with two facts first:

1. no such node → ``fail`` ``[node_not_found]``; a banned node → ``fail`` ``[node_inactive]``
   (a ban voids everything open, whatever else is true);
2. otherwise a node-period is **held** (``observer_gap`` under ``EE_SETTLEMENT_GAP_POLICY=hold``,
   ``abuse_pending``, ``node_suspended``) before it is judged: no money moves until the owner
   decides or the cause clears;
3. once judged, any miss fails it, and ``reasons`` lists every one, in the table's order.

A hold naming an app is judged on that app's agents plus the node-level facts; a hold naming
none (upstream clients) on all the node's agents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from eecp.ledger.availability import Measurement, Policy

NodeStatus = Literal["active", "suspended", "retired", "banned"]
Outcome = Literal["pass", "fail", "held"]

#: every reason, in the order ``reasons[]`` lists them (the spec's table)
REASONS: Final = (
    "node_not_found", "node_inactive", "stake_missing", "stake_below_minimum", "attest_miss",
    "health_miss", "app_health_fail", "abuse_authorized", "not_observed", "observer_gap",
    "abuse_pending", "node_suspended",
)
HELD_REASONS: Final = frozenset({"observer_gap", "abuse_pending", "node_suspended"})
_ORDER: Final = {reason: i for i, reason in enumerate(REASONS)}


@dataclass(frozen=True)
class NodeFacts:
    """What the store knows about the node at settlement.

    ``status`` None: no such node. ``stake_minimum`` None: stake is not enforced (the spec's
    phase 1 runs without stake). ``abuse_authorized`` / ``abuse_pending``: from
    :func:`eecp.ledger.settlement.abuse_effect` for this period."""

    status: NodeStatus | None
    stake_available: int = 0
    stake_minimum: int | None = None
    abuse_authorized: bool = False
    abuse_pending: bool = False


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reasons: tuple[str, ...] = ()

    @property
    def eligible(self) -> bool:
        return self.outcome == "pass"


def judge(facts: NodeFacts, measurement: Measurement, policy: Policy,
          app: str | None = None) -> Verdict:
    """The verdict for the holds of ``app`` (None: holds naming no app) in this node-period."""
    if facts.status is None:
        return Verdict("fail", ("node_not_found",))
    if facts.status == "banned":
        return Verdict("fail", ("node_inactive",))
    long_gap = measurement.gap_seconds > policy.gap_tolerance_sec
    held: list[str] = []
    if long_gap and policy.gap_policy == "hold":
        held.append("observer_gap")
    if facts.abuse_pending:
        held.append("abuse_pending")
    if facts.status == "suspended":
        held.append("node_suspended")
    if held:
        return Verdict("held", tuple(held))
    view = measurement.view(app)
    failed: set[str] = set()
    if facts.stake_minimum is not None:
        if facts.stake_available <= 0:
            failed.add("stake_missing")
        elif facts.stake_available < facts.stake_minimum:
            failed.add("stake_below_minimum")
    if view.down_seconds > policy.downtime_grace_sec:
        failed.update(miss.reason for miss in view.misses)
    if facts.abuse_authorized:
        failed.add("abuse_authorized")
    if not view.observed_up:
        failed.add("not_observed")
    if long_gap and policy.gap_policy == "refund":
        failed.add("observer_gap")
    if failed:
        return Verdict("fail", tuple(sorted(failed, key=_ORDER.__getitem__)))
    return Verdict("pass")

"""What the ledger shows about nodes: a node's record, the placement list, the proxy's node views
and the stake figures for metrics (spec §7.4, §12, §15). Reads only, each in one snapshot.

- :func:`node_view` is ``GET /v1/nodes/{node_id}``: the register answer's node, its payout
  balance, unconfirmed claims, bound agents, the current slash window (its start, counted
  downtime and the tier's allowance), the last 24 node-periods, its slashes and unstakes, the
  cached history factor and the effective price under the terms in force.
- :func:`list_nodes` is ``GET /v1/nodes``: :func:`eecp.ledger.trust.place` over every node's
  :class:`~eecp.ledger.trust.Offer`.
- :func:`node_views` is what the proxy's pick reads (:func:`eecp.ledger.routing.rank`): the
  status and effective price of the node each confirmed platform (PPID) belongs to, banned
  nodes' platforms included (the pick drops them).
- :func:`stake_stats` is the figures behind ``eecp_slashes_total{kind}`` and the stake gauges.
  They are counted from the database, not in memory: every replica reports the same values,
  which survive restarts (aggregate them across replicas with ``max``, not ``sum``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from eecp.core.clock import isoformat
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.eligibility import NodeStatus
from eecp.ledger.journal import node_account, stake_account
from eecp.ledger.money import format_usd
from eecp.ledger.nodes import minimum_for, node_doc, terms_at
from eecp.ledger.observe import bound_agents
from eecp.ledger.periods import period_id, period_of
from eecp.ledger.routing import NodeView
from eecp.ledger.slashing import window_of
from eecp.ledger.stake import WINDOW_SEC, MeasuredPeriod, Tier, tier_rule
from eecp.ledger.staking import unstake_doc
from eecp.ledger.trust import (
    Offer,
    PlacementQuery,
    availability_of,
    effective_price,
    offer_doc,
    place,
    ppm_text,
)
from eecp.ledger.units import balances
from eecp.store.ledger_records import NodeRow, StakeOpRow, TermsRow
from eecp.store.store import Tx

#: how many node-periods ``GET /v1/nodes/{id}`` lists
RECENT_PERIODS = 24


def _slash_doc(op: StakeOpRow) -> dict[str, object]:
    detail = {k: v for k, v in json.loads(op.detail).items() if k != "answer"}
    return {"op_id": op.op_id, "kind": op.kind, "status": op.status,
            "amount_micros": op.amount_micros, "amount_usd": format_usd(op.amount_micros),
            "created_at": isoformat(op.created_at), "detail": detail}


def node_view(tx: Tx, node: NodeRow, settings: LedgerSettings, now: float,
              agents: list[dict[str, object]]) -> dict[str, object]:
    """``GET /v1/nodes/{node_id}`` (§7.4)."""
    doc = node_doc(tx, node, settings, now)
    current = period_of(now, settings.period)
    terms = terms_at(tx.nodes.terms(node.node_id), current.start)
    payout = balances(tx.ledger.accounts([node_account(node.node_id)]).get(
        node_account(node.node_id)))
    window = window_of(tx, settings, node, current.start)  # the periods ended so far
    recent = tx.ledger.node_periods(node_id=node.node_id, newest=RECENT_PERIODS)
    ops = tx.ledger.stake_ops(node.node_id)
    tier = terms.tier if terms is not None else "economy"
    effective = effective_price(terms.price_micros_per_vcpu_hour, tier, node.trust_ppm) \
        if terms is not None else None
    return {
        **doc,
        "balances": {"payout_micros": payout.available},
        "claims": [{"ppid": c.ppid, "agent_id": c.agent_id, "first_seen": isoformat(c.first_seen),
                    "last_seen": isoformat(c.last_seen)} for c in tx.nodes.claims(node.node_id)
                   if tx.nodes.platform(c.ppid) is None],
        "agents": agents,
        "availability": {"window_start": isoformat(window.start),
                         "down_seconds": float(window.down_seconds),
                         "allowed_seconds": float(tier_rule(tier).allowed_down_sec),
                         "tier": tier},
        "recent_periods": [{"period": period_id(p.period_start, settings.period),
                            "status": p.status, "outcome": p.outcome,
                            "reasons": json.loads(p.reasons) if p.reasons else [],
                            "down_seconds": p.down_seconds} for p in recent],
        "slashes": [_slash_doc(o) for o in ops if o.kind.startswith("slash")],
        "unstakes": [{**unstake_doc(o), "created_at": isoformat(o.created_at)}
                     for o in ops if o.kind == "unstake"],
        "trust_factor": ppm_text(node.trust_ppm),
        "effective_price_usd_per_vcpu_hour":
            format_usd(effective) if effective is not None else None,
    }


def _offer(tx: Tx, settings: LedgerSettings, node: NodeRow, terms: TermsRow,
           reported: int, now: float) -> Offer:
    stake = balances(tx.ledger.accounts([stake_account(node.node_id)]).get(
        stake_account(node.node_id)))
    stake_ok = not settings.require_stake or stake.available >= minimum_for(terms, settings)
    up = sum(1 for a in bound_agents(tx, node.node_id) if a["up"])
    measured = tx.ledger.node_periods(node_id=node.node_id, since=now - WINDOW_SEC,
                                      measured=True)
    return Offer(node.node_id, cast(NodeStatus, node.status), cast(Tier, terms.tier),
                 terms.price_micros_per_vcpu_hour, terms.capacity_vcpus, node.trust_ppm,
                 stake_ok, up, reported, availability_of(
                     MeasuredPeriod(p.period_start, p.period_end, p.down_seconds or 0.0)
                     for p in measured))


def list_nodes(tx: Tx, settings: LedgerSettings, query: PlacementQuery,
               now: float) -> dict[str, object]:
    """``GET /v1/nodes`` (§12): ``{"nodes": [...]}``."""
    current = period_of(now, settings.period)
    schedules = tx.nodes.all_terms()
    reported = tx.ledger.usage_totals(current.previous().start)
    offers = []
    for node in tx.nodes.nodes():
        terms = terms_at(schedules.get(node.node_id, []), current.start)
        if terms is not None and (query.include_ineligible or node.status == "active"):
            offers.append(_offer(tx, settings, node, terms, reported.get(node.node_id, 0), now))
    return {"nodes": [offer_doc(o) for o in place(offers, query)]}


def node_views(tx: Tx, settings: LedgerSettings, now: float) -> dict[str, NodeView]:
    """Each confirmed platform's node view, by PPID (see the module docstring)."""
    start = period_of(now, settings.period).start
    schedules = tx.nodes.all_terms()
    nodes = {n.node_id: n for n in tx.nodes.nodes()}
    views = {}
    for platform in tx.nodes.all_platforms():
        node = nodes.get(platform.node_id)
        terms = terms_at(schedules.get(platform.node_id, []), start)
        if node is None or terms is None:
            continue
        views[platform.ppid] = NodeView(node.node_id, cast(NodeStatus, node.status),
                                        effective_price(terms.price_micros_per_vcpu_hour,
                                                        terms.tier, node.trust_ppm))
    return views


@dataclass(frozen=True)
class StakeStats:
    """The stake figures (§15), named as the metrics are:

    - ``slashes_total``: ``eecp_slashes_total{kind}``, kind ``availability`` or ``fraud``,
      slashes that moved money;
    - ``slashes_skipped_total``: ``eecp_slashes_skipped_total``, availability slashes due with
      nothing staked;
    - ``stake_posted_micros``: ``eecp_stake_posted_micros``, Σ posted stake (pending unstakes
      included: they are still slashable);
    - ``unstake_pending_micros``: ``eecp_unstake_pending_micros``;
    - ``nodes_by_status``: ``eecp_nodes{status}``;
    - ``nodes_below_minimum``: ``eecp_nodes_below_minimum_stake``, active nodes whose available
      stake does not cover the minimum under the terms in force (their periods fail)."""

    slashes_total: dict[str, int] = field(default_factory=dict)
    slashes_skipped_total: int = 0
    stake_posted_micros: int = 0
    unstake_pending_micros: int = 0
    nodes_by_status: dict[str, int] = field(default_factory=dict)
    nodes_below_minimum: int = 0


def _count(counts: dict[tuple[str, str], int], kinds: Iterable[str], status: str) -> int:
    return sum(n for (kind, s), n in counts.items() if kind in kinds and s == status)


def stake_stats(tx: Tx, settings: LedgerSettings, now: float) -> StakeStats:
    counts = tx.ledger.stake_op_counts()
    nodes = tx.nodes.nodes()
    stakes = tx.ledger.accounts([stake_account(n.node_id) for n in nodes])
    schedules = tx.nodes.all_terms()
    start = period_of(now, settings.period).start
    below = 0
    for node in nodes:
        terms = terms_at(schedules.get(node.node_id, []), start)
        available = balances(stakes.get(stake_account(node.node_id))).available
        if node.status == "active" and terms is not None \
                and available < minimum_for(terms, settings):
            below += 1
    posted = [balances(row) for row in stakes.values()]
    return StakeStats(
        slashes_total={"availability": _count(counts, ["slash_availability"], "done"),
                       "fraud": _count(counts, ["slash_fraud"], "done")},
        slashes_skipped_total=_count(counts, ["slash_availability", "slash_fraud"], "skipped"),
        stake_posted_micros=sum(b.posted for b in posted),
        unstake_pending_micros=sum(b.debits_pending for b in posted),
        nodes_by_status=dict(Counter(n.status for n in nodes)),
        nodes_below_minimum=below)

"""Measuring and settling node-periods (spec §8.3, §9.2, §9.3, §15).

One node-period is settled in **one** unit of work (:func:`settle_one`): lock its row; a
settled one returns its stored answer (re-runnable and idempotent); measure it if it is not
measured yet; judge every hold (per app, and node-wide); plan; write the posts, fees and voids
with the usage rows' new states and the row's outcome and answer. A crash anywhere rolls the
whole node-period back: either every hold of it moved and the row says settled, or nothing
moved. ``UNIQUE(pending_id)`` and the states make a second post impossible, and the row's lock
serializes a concurrent usage report (§9.1).

A period is measured from its predecessor's carry-out, so a node's measured periods form a chain
from its first period (the one it was created in, which starts empty). Before settling P the
service measures the chain up to P−1 (:func:`measure_chain`, in batches of units of work that
lock the rows oldest first); a measurement is final, so a held node-period decided later is
judged on what was measured once. Measurements happen only for periods past their
``settleable_at``, when late reports, buffered events and heartbeats have landed.

The settler's pass (:func:`due_work`) takes, oldest first, every node-period that is due and not
yet measured or settled, then re-judges held ones whose cause can clear by itself (a pending
abuse report past its deadline or decided, a suspension lifted); a period held for an observer
gap waits for the owner's decision.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import cast

from eecp.core.clock import isoformat
from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError, LedgerNotFoundError
from eecp.ledger import idempotency, slashing
from eecp.ledger.answers import LedgerSettings, render
from eecp.ledger.availability import (
    Carry,
    Event,
    EventKind,
    Measurement,
    Miss,
    Observer,
    View,
    measure,
)
from eecp.ledger.credits import text_field
from eecp.ledger.eligibility import NodeFacts, NodeStatus, judge
from eecp.ledger.journal import parse_node_id, stake_account
from eecp.ledger.money import parse_json_body, reject_unknown_fields
from eecp.ledger.nodes import minimum_for, terms_at
from eecp.ledger.periods import (
    Period,
    check_settleable,
    parse_period_id,
    period_at,
    period_from_fields,
    period_of,
    settleable_at,
)
from eecp.ledger.settlement import (
    AbuseReport,
    Decision,
    Hold,
    NodePeriodStatus,
    ReportStatus,
    SettlementPlan,
    abuse_effect,
    parse_decision,
    plan_settlement,
)
from eecp.ledger.units import Leg, Request, balances, move
from eecp.store.ledger_records import NodePeriodRow, NodeRow, UsageRow
from eecp.store.store import Tx

FINALIZE = "/v1/settlements/{period}/finalize"
#: held causes that can clear without the owner (so the settler looks at them again)
_SELF_CLEARING = ("abuse_pending", "node_suspended")


# --- measurement ----------------------------------------------------------------------------

def _with_measurement(row: NodePeriodRow, m: Measurement, now: float) -> NodePeriodRow:
    return replace(
        row, measured_at=now, down_seconds=m.node.down_seconds, gap_seconds=m.gap_seconds,
        observed_up=m.node.observed_up,
        misses=json.dumps([{"agent_id": x.agent_id, "app": x.app, "cause": x.cause,
                            "start": x.start, "end": x.end} for x in m.node.misses]),
        apps=json.dumps({app: {"down_seconds": v.down_seconds, "observed_up": v.observed_up}
                         for app, v in sorted(m.apps.items())}),
        gaps=json.dumps([list(g) for g in m.gaps]),
        carry_out=json.dumps(m.carry_out.to_json()))


def measurement_of(row: NodePeriodRow) -> Measurement:
    """The measurement stored on a measured row (JSON floats round-trip exactly)."""
    if row.measured_at is None or row.misses is None or row.apps is None or row.gaps is None \
            or row.carry_out is None or row.down_seconds is None:
        raise LedgerError("period_unmeasured", f"{row.node_id}@{row.period_start}")
    misses = tuple(Miss(**doc) for doc in json.loads(row.misses))
    apps = {app: View(doc["down_seconds"], doc["observed_up"],
                      tuple(x for x in misses if x.app == app))
            for app, doc in json.loads(row.apps).items()}
    return Measurement(row.period_start, row.period_end,
                       View(row.down_seconds, bool(row.observed_up), misses),
                       MappingProxyType(apps), tuple((a, b) for a, b in json.loads(row.gaps)),
                       Carry.from_json(json.loads(row.carry_out)))


def measurement_or_none(row: NodePeriodRow) -> Measurement:
    """The stored measurement, or an empty one for a row never measured (a node-period a ban
    settles before its time)."""
    if row.measured_at is None:
        return Measurement(row.period_start, row.period_end, View(), MappingProxyType({}), (),
                           Carry(float(row.period_start)))
    return measurement_of(row)


def _measure(tx: Tx, settings: LedgerSettings, node: NodeRow, row: NodePeriodRow,
             now: float) -> NodePeriodRow:
    """Measure ``row`` (locked) from its predecessor's carry-out and write it."""
    length = settings.period.seconds
    if row.period_start <= period_of(node.created_at, settings.period).start:
        carry = Carry(float(row.period_start))  # the node's first period starts empty
    else:
        prev = tx.ledger.node_period(node.node_id, row.period_start - length)
        if prev is None or prev.carry_out is None:
            raise LedgerError("predecessor_unmeasured", f"{node.node_id}@{row.period_start}")
        carry = Carry.from_json(json.loads(prev.carry_out))
    events = [Event(e.at, e.agent_id, e.app_name, e.session_id, e.instance_id,
                    cast(EventKind, e.kind), e.reason)
              for e in tx.nodes.events(node.node_id, row.period_start, row.period_end)]
    observers = [Observer(o.instance_id, o.started_at, o.last_beat_at, o.stopped_at)
                 for o in tx.nodes.observers(row.period_start, row.period_end,
                                             settings.policy.beat_sec)]
    m = measure(row.period_start, row.period_end, carry, events, observers, settings.policy)
    measured = _with_measurement(row, m, now)
    tx.ledger.write_node_period(measured)
    return measured


def measure_chain(tx: Tx, settings: LedgerSettings, node_id: str, upto: Period,
                  now: float) -> bool:
    """Measure the node's unmeasured periods up to ``upto`` (at most ``measure_batch`` of them
    in this unit of work, rows locked oldest first); True when the chain reaches ``upto``."""
    # the node's row first (the store's lock order): the slash checks below read and write
    # its stake operations
    node = tx.nodes.node(node_id, lock=True)
    length = settings.period.seconds
    if node is None or upto.start <= period_of(node.created_at, settings.period).start:
        return True
    last = tx.ledger.last_measured(node_id, upto.start + length)
    begin = last.period_start + length if last is not None else period_of(
        node.created_at, settings.period).start
    if begin > upto.start:
        return True
    stop = min(upto.start, begin + (settings.measure_batch - 1) * length)
    starts = range(begin, stop + length, length)
    for start in starts:
        tx.ledger.ensure_node_period(node_id, start, start + length)
    measured = None
    for row in tx.ledger.lock_node_periods(node_id, starts).values():
        if row.measured_at is None:  # (else measured meanwhile by another transaction)
            measured = _measure(tx, settings, node, row, now)
            slash = slashing.availability_check(tx, settings, node, measured, "settler")
            if slash is not None:
                slashing.execute(tx, slash, now)
    if measured is not None:
        slashing.refresh_trust(tx, settings, node, measured.period_end)
    return stop == upto.start


# --- settlement -----------------------------------------------------------------------------

def _facts(tx: Tx, settings: LedgerSettings, node: NodeRow, period: Period,
           now: float) -> NodeFacts:
    stake = balances(tx.ledger.accounts([stake_account(node.node_id)]).get(
        stake_account(node.node_id)))
    terms = terms_at(tx.nodes.terms(node.node_id), period.start)
    reports = [AbuseReport(r.report_id, r.period_start, r.period_end,
                           cast(ReportStatus, r.status), r.created_at)
               for r in tx.ledger.reports(node.node_id, period.start, period.end)]
    effect = abuse_effect(reports, period, now, settings.abuse_deadline_sec)
    return NodeFacts(cast(NodeStatus, node.status), stake.available,
                     minimum_for(terms, settings) if settings.require_stake else None,
                     bool(effect.authorized), bool(effect.pending))


def settle_one(tx: Tx, settings: LedgerSettings, node_id: str, period: Period, *,
               decision: Decision | None, note: str | None, settled_by: str,
               now: float) -> str:
    """Settle (or hold) one node-period, or return its stored answer; the answer's text. When
    this unit measures the period, it also runs the period's slash check (after judging it,
    with the settlement's legs in one move) and refreshes the node's trust cache."""
    node = tx.nodes.node(node_id, lock=True)  # the node's row before the node-period's
    if node is None:
        raise LedgerNotFoundError("node_not_found")
    tx.ledger.ensure_node_period(node_id, period.start, period.end)
    row = tx.ledger.node_period(node_id, period.start, lock=True)
    assert row is not None
    if row.status == "settled":
        if decision is not None:
            raise LedgerConflictError("period_finalized")
        assert row.result is not None
        return row.result
    measured_here = row.measured_at is None
    if measured_here:
        row = _measure(tx, settings, node, row, now)
    m = measurement_of(row)
    usages = [u for u in tx.ledger.usages(node_id, period.start) if u.status == "held"]
    holds = [Hold(u.hold_id, u.usage_id, u.account_id, node_id, u.app_key or None,
                  u.amount_micros) for u in usages]
    facts = _facts(tx, settings, node, period, now)
    verdicts = {app: judge(facts, m, settings.policy, app) for app in
                {h.app for h in holds} | {None}}
    plan = plan_settlement(holds, verdicts, settings.fee_bps, decision=decision,
                           status=cast(NodePeriodStatus, row.status),
                           settled_by=settled_by)
    result = render(result_doc(node_id, period, plan, m, len(holds), note, now)).decode("ascii")
    # judged on the stake as it was; the slash (if the window calls for one) comes after
    slash = slashing.availability_check(tx, settings, node, row, settled_by) \
        if measured_here else None
    if plan.status == "held":
        held = replace(row, status="held", held_reason=",".join(plan.reasons),
                       reasons=json.dumps(list(plan.reasons)), holds=len(holds), result=result)
        if _changed(held, row):
            tx.ledger.write_node_period(held)
        _after_measurement(tx, settings, node, row, slash, measured_here, now)
        return result
    legs = usage_legs(plan, usages)
    slash_legs = slash.legs() if slash is not None else []
    # one move: every account of the unit locked in one id-ordered statement
    written = move(tx, legs + slash_legs, now) if legs or slash_legs else []
    for leg in plan.legs:
        tx.ledger.set_usage_status(leg.hold.usage_id, "posted" if leg.action == "post"
                                   else "voided")
    tx.ledger.write_node_period(settled_row(row, plan, len(holds), result, settings, now))
    if slash is not None:
        slashing.record(tx, slash, written[len(legs):], now)
    _after_measurement(tx, settings, node, row, None, measured_here, now)
    return result


def settled_row(row: NodePeriodRow, plan: SettlementPlan, holds: int, result: str,
                settings: LedgerSettings, now: float) -> NodePeriodRow:
    """``row`` settled by ``plan``, with the knobs it was judged under."""
    policy = {**settings.policy.snapshot(), "fee_bps": settings.fee_bps,
              "settlement_delay_sec": settings.settlement_delay_sec,
              "require_stake": settings.require_stake}
    return replace(
        row, status="settled", held_reason=None, outcome=plan.outcome,
        reasons=json.dumps(list(plan.reasons)), holds=holds,
        posted_micros=plan.posted_micros, fee_micros=plan.fee_micros,
        voided_micros=plan.voided_micros, policy=json.dumps(policy, sort_keys=True),
        result=result, settled_at=now, settled_by=plan.settled_by)


def usage_legs(plan: SettlementPlan, usages: Sequence[UsageRow]) -> list[Leg]:
    """``plan``'s transfers as legs, each referring to the usage it settles."""
    usage_of = {u.hold_id: u.usage_id for u in usages}
    legs, current = [], ""
    for transfer in plan.transfers(itertools.count(1)):
        current = usage_of[transfer.pending_id] if transfer.pending_id is not None else current
        legs.append(Leg(transfer, "usage", current))
    return legs


def _after_measurement(tx: Tx, settings: LedgerSettings, node: NodeRow, row: NodePeriodRow,
                       slash: slashing.PlannedSlash | None, measured_here: bool,
                       now: float) -> None:
    if slash is not None:
        slashing.execute(tx, slash, now)
    if measured_here:
        slashing.refresh_trust(tx, settings, node, row.period_end)


def _changed(new: NodePeriodRow, old: NodePeriodRow) -> bool:
    # a held row judged again the same way is not rewritten (the settler looks often)
    return (new.status, new.reasons, new.holds) != (old.status, old.reasons, old.holds)


def _seconds(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 3)


def result_doc(node_id: str, period: Period, plan: SettlementPlan, m: Measurement, holds: int,
               note: str | None, now: float) -> dict[str, object]:
    """§9.3's answer for one node-period (upstream's fields first)."""
    settled = plan.status == "settled"
    doc: dict[str, object] = {
        "node_id": node_id, "period": period.id, "period_start": period.start_iso,
        "period_end": period.end_iso, "status": plan.status, "eligible": plan.eligible,
        "reasons": list(plan.reasons),
        "misses": [{"agent_id": x.agent_id, "app": x.app, "cause": x.cause,
                    "from": isoformat(x.start), "to": isoformat(x.end)} for x in m.node.misses],
        "down_seconds": _seconds(m.node.down_seconds), "holds": holds,
        "settled": plan.settled, "failed": plan.failed, "posted_micros": plan.posted_micros,
        "fee_micros": plan.fee_micros, "voided_micros": plan.voided_micros,
        "settled_at": isoformat(now) if settled else None,
        "settled_by": plan.settled_by if settled else None,
    }
    if note is not None:
        doc["note"] = note
    return doc


def open_doc(node_id: str, period: Period, holds: int) -> dict[str, object]:
    """``GET /v1/settlements/{period}`` for a node-period nobody judged yet."""
    return {"node_id": node_id, "period": period.id, "period_start": period.start_iso,
            "period_end": period.end_iso, "status": "open", "holds": holds}


def all_nodes_text(period: Period, results: Sequence[str]) -> str:
    """The answer without ``node_id``: built from the stored texts, so it replays exactly."""
    return f'{{"period":{json.dumps(period.id)},"results":[{",".join(results)}]}}'


# --- finalize -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finalize:
    """A parsed ``POST /v1/settlements/{period}/finalize``."""

    period: Period
    node_id: str | None
    decision: Decision | None
    note: str | None
    request: Request


def parse_finalize(settings: LedgerSettings, principal: str, period_text: str, raw: bytes,
                   keys: Sequence[str]) -> Finalize:
    period = parse_period_id(period_text, settings.period)
    body = parse_json_body(raw) if raw.strip() else {}
    reject_unknown_fields(body, frozenset({"node_id", "period_start", "period_end", "decision",
                                           "note"}))
    if body.get("period_start") is not None or body.get("period_end") is not None:
        period_from_fields(period_text, body.get("period_start"), body.get("period_end"),
                           settings.period)  # upstream's bounds must name the same period
    node_id = parse_node_id(body["node_id"]) if body.get("node_id") is not None else None
    decision = parse_decision(body.get("decision"))
    if decision is not None and node_id is None:
        raise LedgerInputError("missing_fields", "a decision is for one node-period",
                               field="node_id")
    note = text_field(body, "note", 1000)
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, FINALIZE,
                      idempotency.fingerprint("POST", FINALIZE, {"period": period.id}, {
                          "node_id": node_id, "decision": decision, "note": note}))
    return Finalize(period, node_id, decision, note, request)


def check_due(settings: LedgerSettings, period: Period, now: float) -> None:
    check_settleable(period, now, settings.settlement_delay_sec)


def last_due(settings: LedgerSettings, now: float) -> Period:
    """The newest period that may be settled at ``now``."""
    period = period_of(now - settings.settlement_delay_sec - settings.period.seconds,
                       settings.period)
    while settleable_at(period, settings.settlement_delay_sec) > now:
        period = period.previous()
    return period


def due_work(tx: Tx, settings: LedgerSettings, now: float, limit: int
             ) -> list[tuple[str, int]]:
    """What the settler does next, ``(node_id, period_start)``, at most ``limit``: the due
    node-periods not yet judged, oldest first (across nodes, so no node starves another),
    then held ones that may have cleared."""
    newest = last_due(settings, now).start
    length = settings.period.seconds
    frontier = tx.ledger.measured_frontier()
    begin = {}
    for node in tx.nodes.nodes():
        if node.status != "banned":
            first = period_of(node.created_at, settings.period).start
            begin[node.node_id] = frontier[node.node_id] + length \
                if node.node_id in frontier else first
    fresh: set[tuple[int, str]] = {(r.period_start, r.node_id) for r in tx.ledger.node_periods(
        statuses=["open"], until=newest)}
    start = min(begin.values(), default=newest + length)
    while start <= newest and len(fresh) < limit:
        fresh.update((start, n) for n, b in begin.items() if b <= start)
        start += length
    todo = sorted(fresh)[:limit]
    held = [(r.period_start, r.node_id) for r in tx.ledger.node_periods(
        statuses=["held"], until=newest)
        if any(cause in (r.held_reason or "") for cause in _SELF_CLEARING)]
    todo += held[:max(0, limit - len(todo))]
    return [(node_id, s) for s, node_id in todo]


def period_for(settings: LedgerSettings, start: int) -> Period:
    return period_at(start, settings.period)

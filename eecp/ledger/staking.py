"""Stake operations over the store: unstake and its release, a node's status, fraud signals and
the fraud ban (spec §10.3, §10.4, §13).

Each is one unit of work that locks the node's row first (the store's lock order), so a node's
stake operations are serialized with its settlements (which slash) and with each other: an
unstake cannot race the slash that would void it, a release cannot post an unstake a ban is
voiding.

- **Unstake** (``Idempotency-Key`` required, 202): a pending ``unstake_hold`` ``stake:N →
  node:N`` and a ``stake_op`` row with its ``release_at``. The stake left available must cover
  the minimum under the terms in force *and* under any change already scheduled (so a node
  cannot announce an upgrade and then withdraw the stake that allowed it), unless retired.
- **Release** (:func:`release_one`, the stake releaser's unit per matured unstake): posted for
  an active or retired node, left waiting for a suspended one, voided and confiscated for a
  banned one.
- **Status** (natural key: setting the status a node has replays it): active, suspended,
  retired; ``banned`` only comes from ``/fraud`` and no endpoint leaves it.
- **Fraud signal** (:func:`fraud_signal`, called by the session after it audited a refusal):
  suspends an active or retired node whose platform produced the refusal. It never moves money:
  an automatic slash would turn a verifier's bug into a confiscation.
- **Fraud** (admin; natural key: a banned node replays its ban): with evidence (audit entries of
  fraud signals from the node's own platforms) or ``force`` and a note, in one transaction:
  every pending unstake voided, the whole stake slashed (``slash_fraud``), the node banned, and
  every hold of its unsettled node-periods voided, those node-periods settled ``fail:
  node_inactive``. The answer is kept on the fraud's ``stake_op`` row, so a replay is
  byte-identical. The payout already earned stays (no clawback, §21.5).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Final, cast

from eecp.core.clock import isoformat
from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError, LedgerNotFoundError
from eecp.ledger import idempotency, settle, slashing
from eecp.ledger.answers import Answer, LedgerSettings, check_node_principal, ok, render
from eecp.ledger.credits import text_field
from eecp.ledger.eligibility import Verdict
from eecp.ledger.journal import Code, Transfer, node_account, parse_node_id, stake_account
from eecp.ledger.money import (
    JsonNumber,
    format_usd,
    parse_json_body,
    parse_usd,
    reject_unknown_fields,
)
from eecp.ledger.nodes import minimum_for, terms_at
from eecp.ledger.periods import period_at, period_id, period_of
from eecp.ledger.settlement import Hold, NodePeriodStatus, plan_settlement
from eecp.ledger.stake import (
    FRAUD_SIGNALS,
    AuditFact,
    PendingUnstake,
    check_evidence,
    check_unstake,
    is_fraud_signal,
    parse_status,
    plan_fraud_slash,
    release_action,
    suspends,
    suspension_reason,
)
from eecp.ledger.units import Leg, Request, Work, balances, move, new_id
from eecp.store.ledger_records import NodeRow, StakeOpRow
from eecp.store.store import Tx

log = logging.getLogger("eecp.ledger")

UNSTAKE = "/v1/nodes/{node_id}/unstake"
STATUS = "/v1/nodes/{node_id}/status"
FRAUD = "/v1/nodes/{node_id}/fraud"
#: the most audit entries one fraud request may name
MAX_AUDIT_IDS: Final = 100
NOTE_MAX_CHARS: Final = 1000
_MAX_ID: Final = 2**63 - 1
_INT = re.compile(r"[1-9][0-9]{0,18}")


def _locked_node(tx: Tx, node_id: str) -> NodeRow:
    node = tx.nodes.node(node_id, lock=True)
    if node is None:
        raise LedgerNotFoundError("node_not_found")
    return node


def _stake(tx: Tx, node_id: str) -> tuple[int, int]:
    """The stake's (posted, available) micros."""
    b = balances(tx.ledger.accounts([stake_account(node_id)]).get(stake_account(node_id)))
    return b.posted, b.available


# --- unstake (§10.3) -------------------------------------------------------------------------

def required_stake(tx: Tx, settings: LedgerSettings, node_id: str, now: float) -> int:
    """The minimum stake under the terms in force now and every change already scheduled."""
    rows = tx.nodes.terms(node_id)
    current = terms_at(rows, period_of(now, settings.period).start)
    scheduled = [r for r in rows if r.effective_from > now]
    return max(minimum_for(r, settings) for r in [current, *scheduled])


def unstake_doc(op: StakeOpRow) -> dict[str, object]:
    return {"op_id": op.op_id, "node_id": op.node_id, "status": op.status,
            "amount_micros": op.amount_micros, "amount_usd": format_usd(op.amount_micros),
            "release_at": isoformat(op.release_at) if op.release_at is not None else None,
            "transfer_id": op.transfer_id}


def unstake(settings: LedgerSettings, principal: str, node_id: str, raw: bytes,
            keys: Sequence[str], now: float) -> tuple[Request, Work]:
    """``POST /v1/nodes/{node_id}/unstake`` ``{"amount_usd"}`` (the node, admin; key
    required): 202 with the pending operation."""
    node_id = parse_node_id(node_id)
    check_node_principal(principal, node_id)
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"amount_usd"}))
    amount = parse_usd(body.get("amount_usd"), "amount_usd",
                       cap_micros=settings.max_amount_micros)
    key = idempotency.parse_key(keys, required=True)
    request = Request(idempotency.check_principal(principal), key, UNSTAKE,
                      idempotency.fingerprint("POST", UNSTAKE, {"node_id": node_id},
                                              {"amount_micros": amount}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        node = _locked_node(tx, node_id)
        _, available = _stake(tx, node_id)
        minimum = required_stake(tx, settings, node_id, now) if settings.require_stake else 0
        check_unstake(amount, available, minimum, node.status)
        op_id = new_id("so")
        (hold,) = move(tx, [Leg(Transfer(0, Code.UNSTAKE_HOLD, stake_account(node_id),
                                         node_account(node_id), amount),
                                slashing.STAKE_OP, op_id, None, key_id)], now)
        op = StakeOpRow(op_id, node_id, "unstake", amount, "pending", now, principal,
                        release_at=now + settings.unstake_cooldown_sec,
                        transfer_id=hold.transfer_id)
        tx.ledger.insert_stake_op(op)
        return ok(unstake_doc(op), 202)

    return request, work


def release_one(tx: Tx, op_id: str, now: float) -> str:
    """Release one matured unstake (the stake releaser's unit): ``released``, ``waiting``
    (suspended node), ``confiscated`` (banned node), or ``none`` (not pending, not matured)."""
    first = tx.ledger.stake_op(op_id)
    if first is None:
        return "none"
    node = _locked_node(tx, first.node_id)
    op = tx.ledger.stake_op(op_id)  # again, under the node's lock
    if op is None or op.kind != "unstake" or op.status != "pending" \
            or op.release_at is None or op.release_at > now:
        return "none"
    action = release_action(node.status)
    if action == "wait":
        return "waiting"
    hold = tx.ledger.transfers_by_public_id([op.transfer_id or ""]).get(op.transfer_id or "")
    if hold is None or hold.id is None:
        raise LedgerError("unstake_without_hold", op.op_id)
    if action == "void":
        # a ban voids every unstake it sees; one left pending is confiscated the same way
        _, available = _stake(tx, node.node_id)
        pending = [PendingUnstake(op.op_id, hold.id, op.amount_micros, op.created_at)]
        slashing.execute(tx, slashing.PlannedSlash(
            node.node_id, new_id("so"), "slash_fraud", plan_fraud_slash(available, pending),
            {"reason": "banned_unstake", "unstake": op.op_id}, "releaser"), now)
        return "confiscated"
    (post,) = move(tx, [Leg(Transfer(0, Code.UNSTAKE_POST, hold.debit_account,
                                     hold.credit_account, hold.amount, hold.id),
                            slashing.STAKE_OP, op.op_id)], now)
    tx.ledger.write_stake_op(replace(op, status="released",
                                     resolution_transfer_id=post.transfer_id))
    return "released"


# --- status (§10.4, §13) ---------------------------------------------------------------------

def status_doc(node: NodeRow) -> dict[str, object]:
    return {"node_id": node.node_id, "status": node.status,
            "status_reason": node.status_reason, "updated_at": isoformat(node.updated_at)}


def set_status(principal: str, node_id: str, raw: bytes, keys: Sequence[str],
               now: float) -> tuple[Request, Work]:
    """``POST /v1/nodes/{node_id}/status`` ``{"status", "reason"?}`` (admin; natural key)."""
    node_id = parse_node_id(node_id)
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"status", "reason"}))
    status = parse_status(body.get("status"))
    reason = text_field(body, "reason", NOTE_MAX_CHARS)
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, STATUS,
                      idempotency.fingerprint("POST", STATUS, {"node_id": node_id},
                                              {"status": status, "reason": reason}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        node = _locked_node(tx, node_id)
        if node.status == "banned":
            raise LedgerConflictError("node_inactive")
        if node.status == status and reason in (None, node.status_reason):
            answer = ok(status_doc(node))
            return Answer(answer.status, answer.body, replayed=True)
        node = replace(node, status=status, status_reason=reason, updated_at=now)
        tx.nodes.write_node(node)
        return ok(status_doc(node))

    return request, work


def fraud_signal(tx: Tx, ppid: str, audit_id: int, reason: str, now: float) -> str | None:
    """A refusal with ``reason`` was audited as ``audit_id`` for a quote from ``ppid``: suspend
    the node that platform is confirmed for (``fraud_suspected:<audit_id>``). The node's id
    when this suspended it; None when the reason is no fraud signal, the platform is nobody's,
    the node is suspended or banned already, or the audit entry does not say so."""
    if reason not in FRAUD_SIGNALS:
        return None
    platform = tx.nodes.platform(ppid.lower())
    if platform is None:
        return None
    entry = tx.audit_entries([audit_id]).get(audit_id)
    if entry is None or not is_fraud_signal(entry.verdict, entry.reason) \
            or entry.reason != reason or (entry.platform_id or "").lower() != ppid.lower():
        # the caller's bug: /fraud could never use this entry as evidence
        log.warning("fraud signal %s for %s without its audit entry %s", reason, ppid, audit_id)
        return None
    node = _locked_node(tx, platform.node_id)
    if not suspends(node.status):
        return None
    tx.nodes.write_node(replace(node, status="suspended",
                                status_reason=suspension_reason(audit_id), updated_at=now))
    log.warning("node %s suspended: %s on platform %s (audit %s)", node.node_id, reason, ppid,
                audit_id)
    return node.node_id


# --- fraud (§10.4) ---------------------------------------------------------------------------

def _audit_ids(value: object) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_AUDIT_IDS:
        raise LedgerInputError("invalid_audit_ids", field="audit_ids")
    ids = []
    for item in value:
        # a JSON number arrives as its text (JsonNumber): whole, positive, in BIGINT's range
        if not isinstance(item, JsonNumber) or not _INT.fullmatch(item) or int(item) > _MAX_ID:
            raise LedgerInputError("invalid_audit_ids", field="audit_ids")
        ids.append(int(item))
    if len(set(ids)) != len(ids):
        raise LedgerInputError("invalid_audit_ids", "repeated", field="audit_ids")
    return ids


def fraud(settings: LedgerSettings, principal: str, node_id: str, raw: bytes,
          keys: Sequence[str], now: float) -> tuple[Request, Work]:
    """``POST /v1/nodes/{node_id}/fraud`` ``{"audit_ids", "note", "force"?}`` (admin)."""
    node_id = parse_node_id(node_id)
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"audit_ids", "note", "force"}))
    audit_ids = _audit_ids(body.get("audit_ids"))
    note = text_field(body, "note", NOTE_MAX_CHARS)
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise LedgerInputError("invalid_force", field="force")
    if force and note is None:
        raise LedgerInputError("missing_fields", "force needs a note", field="note")
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, FRAUD,
                      idempotency.fingerprint("POST", FRAUD, {"node_id": node_id}, {
                          "audit_ids": list(audit_ids), "note": note, "force": force}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        node = _locked_node(tx, node_id)
        if node.status == "banned":
            return _fraud_replay(tx, node_id)
        if node.status == "retired":
            raise LedgerConflictError("node_inactive")
        if not force:
            facts = {i: AuditFact(i, e.verdict, e.reason, e.platform_id)
                     for i, e in tx.audit_entries(audit_ids).items()}
            check_evidence(audit_ids, facts, [p.ppid for p in tx.nodes.platforms(node_id)])
        return _ban(tx, settings, node, audit_ids, note, force, principal, now)

    return request, work


def _fraud_replay(tx: Tx, node_id: str) -> Answer:
    for op in tx.ledger.stake_ops(node_id, kinds=["slash_fraud"]):
        detail = json.loads(op.detail)
        if "answer" in detail:
            return Answer(200, render(detail["answer"]), replayed=True)
    raise LedgerError("ban_without_answer", node_id)


def _ban(tx: Tx, settings: LedgerSettings, node: NodeRow, audit_ids: list[int],
         note: str | None, force: bool, principal: str, now: float) -> Answer:
    node_id = node.node_id
    # every unsettled node-period locked (oldest first) before any account
    starts = [r.period_start for r in tx.ledger.node_periods(node_id=node_id,
                                                             statuses=["open", "held"])]
    rows = [r for r in tx.ledger.lock_node_periods(node_id, starts).values()
            if r.status != "settled"]
    failing, usage_legs = [], []
    for row in rows:
        usages = [u for u in tx.ledger.usages(node_id, row.period_start) if u.status == "held"]
        holds = [Hold(u.hold_id, u.usage_id, u.account_id, node_id, u.app_key or None,
                      u.amount_micros) for u in usages]
        verdicts = {app: Verdict("fail", ("node_inactive",))
                    for app in {h.app for h in holds} | {None}}
        plan = plan_settlement(holds, verdicts, settings.fee_bps,
                               status=cast(NodePeriodStatus, row.status), settled_by=principal)
        failing.append((row, plan, usages))
        usage_legs += settle.usage_legs(plan, usages)
    _, available = _stake(tx, node_id)
    pending = slashing.pending_unstakes(tx, node_id)
    confiscation = plan_fraud_slash(available, pending)
    doc: dict[str, object] = {
        "node_id": node_id, "status": "banned", "slashed_micros": confiscation.amount,
        "voided_holds": sum(p.failed for _, p, _ in failing),
        "voided_micros": sum(p.voided_micros for _, p, _ in failing),
        "voided_unstakes": len(confiscation.void),
        "periods_failed": [period_id(r.period_start, settings.period) for r, _, _ in failing],
        "audit_ids": audit_ids, "forced": force, "banned_at": isoformat(now)}
    slash = slashing.PlannedSlash(node_id, new_id("so"), "slash_fraud", confiscation, {
        "reason": "fraud", "audit_ids": audit_ids, "forced": force, "note": note,
        "voided_unstakes": [u.op_id for u in confiscation.void], "answer": doc}, principal)
    written = move(tx, usage_legs + slash.legs(), now) if usage_legs or slash.legs() else []
    for row, plan, usages in failing:
        for usage in usages:
            tx.ledger.set_usage_status(usage.usage_id, "voided")
        period = period_at(row.period_start, settings.period)
        result = render(settle.result_doc(node_id, period, plan, settle.measurement_or_none(row),
                                          len(usages), note, now)).decode("ascii")
        tx.ledger.write_node_period(settle.settled_row(row, plan, len(usages), result,
                                                       settings, now))
    slashing.record(tx, slash, written[len(usage_legs):], now)
    tx.nodes.write_node(replace(node, status="banned", status_reason="fraud", banned_at=now,
                                updated_at=now))
    log.warning("node %s banned for fraud by %s: %s slashed, %d holds voided", node_id,
                principal, format_usd(confiscation.amount), doc["voided_holds"])
    return Answer(200, render(doc))

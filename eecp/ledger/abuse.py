"""Abuse reports: filed by the launcher or the admin, decided once by the admin (spec §11).

A pending report holds the node-periods it overlaps (``abuse_pending``) until it is decided or
``EE_ABUSE_DECISION_DEADLINE_SEC`` after it was filed; an authorized one fails them
(``abuse_authorized``), a denied one does nothing (:func:`eecp.ledger.settlement.abuse_effect`).
The decision's answer lists the overlapped periods already settled before it (a late
authorization claws nothing back) and is stored with the report, so deciding the same way
again replays it byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import cast

from eecp.core.clock import isoformat
from eecp.core.errors import LedgerInputError, LedgerNotFoundError
from eecp.ledger import idempotency
from eecp.ledger.answers import Answer, LedgerSettings, ok, render
from eecp.ledger.credits import text_field
from eecp.ledger.journal import parse_node_id
from eecp.ledger.money import parse_json_body, reject_unknown_fields
from eecp.ledger.periods import period_id
from eecp.ledger.settlement import ReportStatus, abuse_span, decide_report, parse_action
from eecp.ledger.units import Request, Work, new_id
from eecp.store.ledger_records import AbuseRow
from eecp.store.store import Tx

REPORTS = "/v1/abuse/reports"
AUTHORIZE = "/v1/abuse/reports/{report_id}/authorize"
REASON_MAX_CHARS = 1000
NAME_MAX_CHARS = 255
_REPORT_ID = re.compile(r"ab_[0-9a-f]{32}")


def file(settings: LedgerSettings, principal: str, raw: bytes, keys: Sequence[str],
         now: float) -> tuple[Request, Work]:
    """``POST /v1/abuse/reports`` (launcher, admin; key required)."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"node_id", "period_start", "period_end", "reason",
                                           "reported_by"}))
    if body.get("node_id") is None:
        raise LedgerInputError("missing_fields", field="node_id")
    node_id = parse_node_id(body["node_id"])
    start, end = abuse_span(body.get("period_start"), body.get("period_end"), now,
                            settings.period, settings.abuse_max_span_sec)
    reason = text_field(body, "reason", REASON_MAX_CHARS)
    reported_by = text_field(body, "reported_by", NAME_MAX_CHARS)
    key = idempotency.parse_key(keys, required=True)
    request = Request(idempotency.check_principal(principal), key, REPORTS,
                      idempotency.fingerprint("POST", REPORTS, {}, {
                          # an absent bound is null, not the current period it means now: a
                          # retry an hour later is the same request
                          "node_id": node_id,
                          "period_start": start if body.get("period_start") is not None else None,
                          "period_end": end if body.get("period_end") is not None else None,
                          "reason": reason, "reported_by": reported_by}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        if tx.nodes.node(node_id) is None:
            raise LedgerNotFoundError("node_not_found")
        row = AbuseRow(new_id("ab"), node_id, start, end, principal, "pending", now, reason,
                       reported_by)
        tx.ledger.insert_report(row)
        return ok({"report_id": row.report_id, "status": row.status,
                   "node_id": node_id, "period_start": isoformat(start),
                   "period_end": isoformat(end)})

    return request, work


def decide(settings: LedgerSettings, principal: str, report_id: str, raw: bytes,
           keys: Sequence[str], now: float) -> tuple[Request, Work]:
    """``POST /v1/abuse/reports/{id}/authorize`` ``{"action": "authorize"|"deny"}`` (admin;
    natural key: the report)."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"action", "authorized_by", "note"}))
    decided = parse_action(body.get("action"))
    decided_by = text_field(body, "authorized_by", NAME_MAX_CHARS) or principal
    note = text_field(body, "note", REASON_MAX_CHARS)
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, AUTHORIZE,
                      idempotency.fingerprint("POST", AUTHORIZE, {"report_id": report_id}, {
                          "action": decided, "authorized_by": decided_by, "note": note}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        row = tx.ledger.report(report_id, lock=True) if _REPORT_ID.fullmatch(report_id) else None
        if row is None:
            raise LedgerNotFoundError("report_not_found")
        if decide_report(cast(ReportStatus, row.status), decided) == "replay":
            assert row.decision_answer is not None
            return Answer(200, row.decision_answer.encode("ascii"), replayed=True)
        settled = [p.period_start for p in tx.ledger.node_periods(
            node_id=row.node_id, statuses=["settled"])
            if row.period_start <= p.period_start < row.period_end]
        doc = {"report_id": row.report_id, "status": decided, "decided_at": isoformat(now),
               "periods_already_settled": [period_id(s, settings.period) for s in settled]}
        answer = render(doc)
        tx.ledger.write_report(replace(row, status=decided, decided_by=decided_by,
                                       decided_at=now, decision_note=note,
                                       decision_answer=answer.decode("ascii")))
        return Answer(200, answer)

    return request, work

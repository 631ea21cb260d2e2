"""Usage reports: a pending hold at the price in force for the period (spec §9.1).

The natural key is ``(account, node, app or "", period)``; an ``Idempotency-Key`` is honoured
on top of it. In one transaction, after parsing: the node must exist; the ``node_period`` row
is locked (created when missing) so that a report and the period's finalize are serialized
(the report lands before and is settled with the rest, or gets 409 ``period_finalized``); the
same report again replays it (rendered from the stored row, so byte-identical), a different
one is 409 ``usage_conflict``; then the node's status, the terms of *that period* (prices are
posted: a change never alters a period already started), the node-period's capacity, and the
hold itself (``account → node:N``, locked in id order), with the ``usage`` row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from eecp.core.errors import LedgerConflictError, LedgerInputError, LedgerNotFoundError
from eecp.ledger import idempotency
from eecp.ledger.answers import Answer, LedgerSettings, ok
from eecp.ledger.journal import (
    AccountKind,
    Code,
    Transfer,
    node_account,
    parse_account_id,
    parse_node_id,
)
from eecp.ledger.money import (
    balance_cents,
    parse_json_body,
    parse_usd,
    reject_unknown_fields,
    usage_amount,
)
from eecp.ledger.nodes import terms_at
from eecp.ledger.periods import Period, check_reportable, period_at, period_from_fields
from eecp.ledger.settlement import check_capacity
from eecp.ledger.units import Leg, Request, Work, move, new_id
from eecp.store.ledger_records import UsageRow
from eecp.store.store import Tx

USAGE = "/v1/usage/report"
_APP = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # an app name is a DNS label
_FIELDS = frozenset({"account_id", "node_id", "period_start", "period_end", "period",
                     "vcpu_hours", "app_name"})


def report(settings: LedgerSettings, principal: str, raw: bytes, keys: Sequence[str],
           now: float) -> tuple[Request, Work]:
    """``POST /v1/usage/report`` (uptime, admin)."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, _FIELDS)
    for name in ("account_id", "node_id"):
        if body.get(name) is None:
            raise LedgerInputError("missing_fields", field=name)
    account = parse_account_id(body["account_id"])
    if account.kind is not AccountKind.USER:
        raise LedgerInputError("invalid_account_id", "not_a_user", field="account_id")
    node_id = parse_node_id(body["node_id"])
    period = period_from_fields(body.get("period"), body.get("period_start"),
                                body.get("period_end"), settings.period)
    check_reportable(period, now, settings.usage_max_age_sec)
    vcpu = parse_usd(body.get("vcpu_hours"), "vcpu_hours", cap_micros=None)
    app = body.get("app_name")
    if app is not None and (type(app) is not str or not _APP.fullmatch(app)):
        raise LedgerInputError("invalid_app_name", field="app_name")
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, USAGE, idempotency.fingerprint(
        "POST", USAGE, {}, {"account_id": account.id, "node_id": node_id,
                            "period_start": period.start, "vcpu_micro_hours": vcpu,
                            "app_name": app}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        # the node's row first (lock order): a ban settles every node-period of the node it
        # can see, so a report must not create one behind it
        node = tx.nodes.node(node_id, lock=True)
        if node is None:
            raise LedgerNotFoundError("node_not_found")
        tx.ledger.ensure_node_period(node_id, period.start, period.end)
        np = tx.ledger.node_period(node_id, period.start, lock=True)
        if np is None or np.status == "settled":
            raise LedgerConflictError("period_finalized")
        existing = tx.ledger.usage(account.id, node_id, app or "", period.start)
        if existing is not None:
            if existing.vcpu_micro_hours != vcpu:
                raise LedgerConflictError("usage_conflict", extra={"usage_id": existing.usage_id})
            return _replay(tx, existing, period)
        if node.status not in ("active", "suspended"):
            raise LedgerConflictError("node_inactive")
        terms = terms_at(tx.nodes.terms(node_id), period.start)
        if terms is None:
            raise LedgerConflictError("node_price_missing")
        reported = sum(u.vcpu_micro_hours for u in tx.ledger.usages(node_id, period.start))
        check_capacity(reported, vcpu, terms.capacity_vcpus, period)
        amount = usage_amount(vcpu, terms.price_micros_per_vcpu_hour)
        usage_id = new_id("us")
        (hold,) = move(tx, [Leg(Transfer(0, Code.USAGE_HOLD, account.id, node_account(node_id),
                                         amount), "usage", usage_id, None, key_id)], now)
        assert hold.id is not None
        row = UsageRow(usage_id, account.id, node_id, app or "", period.start, period.end, vcpu,
                       terms.price_micros_per_vcpu_hour, amount, hold.id, "held", now,
                       principal)
        tx.ledger.insert_usage(row)
        return usage_answer(row, hold.transfer_id, period)

    return request, work


def _replay(tx: Tx, row: UsageRow, period: Period) -> Answer:
    hold = tx.ledger.transfers([row.hold_id])[row.hold_id]
    answer = usage_answer(row, hold.transfer_id, period)
    return Answer(answer.status, answer.body, replayed=True)


def usage_answer(row: UsageRow, lock_id: str, period: Period) -> Answer:
    """§9.1's answer, upstream's fields first; rendered from the row alone."""
    period = period_at(row.period_start, period.length)
    return ok({"usage_id": row.usage_id, "lock_id": lock_id,
               "amount_cents": balance_cents(row.amount_micros),
               "amount_micros": row.amount_micros,
               "price_micros_per_vcpu_hour": row.price_micros_per_vcpu_hour,
               "period": period.id, "period_start": period.start_iso,
               "period_end": period.end_iso, "status": row.status})

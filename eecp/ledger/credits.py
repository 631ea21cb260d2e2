"""Credits: purchase, transfer, redeem, balances and the ledger check (spec §3, §13, §21.6).

Each mutating endpoint is parsed here (every 400 is decided before any transaction, so it is
never stored) into a :class:`~eecp.ledger.units.Request` and the :data:`~eecp.ledger.units.Work`
its unit of work runs: one :func:`~eecp.ledger.units.move` and the rendered answer. The accounts'
own rules (which kinds may be funded, debited, redeemed; overdrafts; overflows) are the
journal's, applied inside the transaction on the locked rows, so their 404/409 refusals are
stored with the key like any answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from eecp.core.errors import LedgerConflictError, LedgerInputError
from eecp.ledger import idempotency
from eecp.ledger.answers import Answer, Forbidden, LedgerSettings, check_node_principal, ok
from eecp.ledger.journal import (
    MINT_ACCOUNT,
    AccountId,
    AccountKind,
    Balances,
    Code,
    Transfer,
    check_invariants,
    parse_account_id,
)
from eecp.ledger.money import (
    JsonObject,
    balance_cents,
    format_usd,
    parse_amount_fields,
    parse_json_body,
    reject_unknown_fields,
)
from eecp.ledger.units import EXTERNAL_REF, Leg, Request, Work, balances, move
from eecp.store.ledger_records import JournalSums
from eecp.store.store import Tx

PURCHASE = "/v1/credits/purchase"
TRANSFER = "/v1/credits/transfer"
REDEEM = "/v1/credits/redeem"
NOTE_MAX_CHARS = 1000
REF_MAX_CHARS = 255
_PAYABLE = frozenset({AccountKind.USER, AccountKind.NODE})


def text_field(body: JsonObject, name: str, limit: int) -> str | None:
    """An optional free-text field: absent/null, or a string of 1..``limit`` characters
    without NUL (PostgreSQL TEXT refuses it); else 400 ``invalid_<name>``."""
    value = body.get(name)
    if value is None:
        return None
    # type(...) is str: a JSON number arrives as JsonNumber, a str subclass
    if type(value) is not str or not 0 < len(value) <= limit or "\0" in value:
        raise LedgerInputError(f"invalid_{name}", field=name)
    return value


def account_field(body: JsonObject, name: str, missing: str) -> AccountId:
    value = body.get(name)
    if value is None:
        raise LedgerInputError(missing, field=name)
    return parse_account_id(value, name)


def _request(principal: str, keys: Sequence[str], route: str,
             normalized: Mapping[str, idempotency.Canonical]) -> Request:
    key = idempotency.parse_key(keys, required=True)
    digest = idempotency.fingerprint("POST", route, {}, normalized)
    return Request(idempotency.check_principal(principal), key, route, digest)


def _balance_doc(account_id: str, b: Balances) -> dict[str, object]:
    return {"account_id": account_id, "balance_cents": balance_cents(b.available),
            "balance_micros": b.available}


def _balances_after(tx: Tx, account_id: str) -> Balances:
    return balances(tx.ledger.accounts([account_id]).get(account_id))


def purchase(settings: LedgerSettings, principal: str, raw: bytes, keys: Sequence[str],
             now: float) -> tuple[Request, Work]:
    """``POST /v1/credits/purchase``: ``mint:usd`` → a user or ``node:<id>``."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"account_id", "amount_usd", "amount", "note",
                                           "external_ref"}))
    account = account_field(body, "account_id", "missing_account_id")
    amount = parse_amount_fields(body, cap_micros=settings.max_amount_micros)
    note = text_field(body, "note", NOTE_MAX_CHARS)
    ref = text_field(body, "external_ref", REF_MAX_CHARS)
    request = _request(principal, keys, PURCHASE, {
        "account_id": account.id, "amount_micros": amount, "note": note, "external_ref": ref})

    def work(tx: Tx, key_id: int | None) -> Answer:
        if ref is not None:
            earlier = _purchase_with_ref(tx, ref, request.request_hash)
            if earlier is not None:
                return earlier
        (row,) = move(tx, [Leg(Transfer(0, Code.PURCHASE, MINT_ACCOUNT, account.id, amount),
                               EXTERNAL_REF if ref is not None else None, ref, note, key_id)],
                      now)
        doc = _balance_doc(account.id, _balances_after(tx, account.id))
        return ok({**doc, "amount_micros": amount, "transfer_id": row.transfer_id})

    return request, work


def _purchase_with_ref(tx: Tx, ref: str, request_hash: str) -> Answer | None:
    """An ``external_ref`` is used once: the same purchase again (under another key) replays
    the first one's answer; any other request with it is 409 ``external_ref_used``."""
    earlier = tx.ledger.transfer_by_ref(EXTERNAL_REF, ref)
    if earlier is None:
        return None
    key = tx.ledger.key_by_id(earlier.idempotency_id) if earlier.idempotency_id else None
    if (key is not None and key.status_code is not None and key.response is not None
            and idempotency.decide_natural(key.request_hash, request_hash, LedgerConflictError(
                "external_ref_used", field="external_ref")) == "replay"):
        return Answer(key.status_code, key.response.encode("ascii"), replayed=True)
    raise LedgerConflictError("external_ref_used", field="external_ref")


def transfer(settings: LedgerSettings, principal: str, raw: bytes, keys: Sequence[str],
             now: float) -> tuple[Request, Work]:
    """``POST /v1/credits/transfer``: between users and ``node:`` accounts."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"from_account", "to_account", "amount_usd",
                                           "amount", "note"}))
    source = account_field(body, "from_account", "missing_account")
    target = account_field(body, "to_account", "missing_account")
    amount = parse_amount_fields(body, cap_micros=settings.max_amount_micros)
    note = text_field(body, "note", NOTE_MAX_CHARS)
    if source.id == target.id:
        raise LedgerInputError("accounts_must_be_different")
    if source.kind not in _PAYABLE or target.kind not in _PAYABLE:
        raise LedgerInputError("account_not_transferable")
    request = _request(principal, keys, TRANSFER, {
        "from_account": source.id, "to_account": target.id, "amount_micros": amount,
        "note": note})

    def work(tx: Tx, key_id: int | None) -> Answer:
        (row,) = move(tx, [Leg(Transfer(0, Code.TRANSFER, source.id, target.id, amount),
                               note=note, idempotency_id=key_id)], now)
        return ok({"transfer_id": row.transfer_id, "from_account": source.id,
                   "to_account": target.id, "amount_micros": amount,
                   "from_balance_micros": _balances_after(tx, source.id).available,
                   "to_balance_micros": _balances_after(tx, target.id).available})

    return request, work


def redeem(settings: LedgerSettings, principal: str, raw: bytes, keys: Sequence[str],
           now: float) -> tuple[Request, Work]:
    """``POST /v1/credits/redeem`` (§21.6): a user's or ``node:``'s available credits back to
    ``mint:usd``, the way out that purchase is the way in."""
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"account_id", "amount_usd", "amount", "note"}))
    account = account_field(body, "account_id", "missing_account_id")
    amount = parse_amount_fields(body, cap_micros=settings.max_amount_micros)
    note = text_field(body, "note", NOTE_MAX_CHARS)
    if account.kind not in _PAYABLE:
        raise LedgerInputError("account_not_redeemable", field="account_id")
    request = _request(principal, keys, REDEEM, {
        "account_id": account.id, "amount_micros": amount, "note": note})

    def work(tx: Tx, key_id: int | None) -> Answer:
        (row,) = move(tx, [Leg(Transfer(0, Code.REDEEM, account.id, MINT_ACCOUNT, amount),
                               note=note, idempotency_id=key_id)], now)
        doc = _balance_doc(account.id, _balances_after(tx, account.id))
        return ok({**doc, "amount_micros": amount, "transfer_id": row.transfer_id})

    return request, work


def balance(principal: str, account_text: str) -> AccountId:
    """Parse ``GET /v1/balances/{account}``: a node sees its own ``node:`` and ``stake:``
    accounts only."""
    account = parse_account_id(account_text)
    if account.node_id is not None:
        check_node_principal(principal, account.node_id)
    elif principal.startswith("node:"):
        raise Forbidden()
    return account


def balance_answer(account_id: str, row_exists: bool, b: Balances) -> Answer:
    return ok({"account_id": account_id, "exists": row_exists,
               "balance_cents": balance_cents(b.available), "balance_micros": b.available,
               "posted_micros": b.posted, "pending_debits_micros": b.debits_pending,
               "pending_credits_micros": b.credits_pending,
               "balance_usd": format_usd(b.available)})


def check_answer(sums: JournalSums) -> Answer:
    """``GET /v1/ledger/check``: the sums of §3.3 item 1, the counters recomputed from the
    journal (item 4), the no-overdraft and range rules (items 2, 3), each hold resolved at most
    once by a row matching it (item 5), settlement conservation (item 7) and no held usage in a
    settled node-period (item 8)."""
    accounts = {a: Balances(*c) for a, c in sums.accounts.items()}
    journal = {a: Balances(*c) for a, c in sums.journal.items()}
    mismatches = sorted(a for a in set(accounts) | set(journal)
                        if accounts.get(a, Balances()) != journal.get(a, Balances()))
    problems = check_invariants(accounts)
    ok_ = not (problems or mismatches or sums.bad_resolutions or sums.held_in_settled
               or sums.settlement_mismatches)
    return ok({
        "ok": ok_,
        "debits_posted": sum(b.debits_posted for b in accounts.values()),
        "credits_posted": sum(b.credits_posted for b in accounts.values()),
        "debits_pending": sum(b.debits_pending for b in accounts.values()),
        "credits_pending": sum(b.credits_pending for b in accounts.values()),
        "journal_mismatches": mismatches,
        "held_in_settled": sums.held_in_settled,
        "invariant_failures": problems,
        "resolution_violations": sums.bad_resolutions,
        "settlement_mismatches": sums.settlement_mismatches,
    })

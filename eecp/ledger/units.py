"""The two things every ledger unit of work does: claim the idempotency key with its effect,
and move money by the journal's rules over locked rows.

Both are sync and run in the store's worker thread inside :meth:`Store.atomic` (they take the
unit of work's :class:`~eecp.store.store.Tx`), and both may run again when PostgreSQL retries
the transaction: they act on nothing but the database.

:func:`run` is spec §4.2's loop body. The key is claimed first (``INSERT ... ON CONFLICT DO
NOTHING``, which on PostgreSQL makes a concurrent duplicate wait for the first to commit); a
key already claimed replays its stored answer, or is 409 ``idempotency_key_reused`` when the
request's fingerprint differs. The work runs in a savepoint: a business rejection (404, 409)
undoes what it wrote and becomes the answer, stored with the key like a success, so a retry
never turns a refusal into a surprise success. A malformed request found only inside (400) and
any other exception roll the whole transaction back, the claim included.

:func:`move` applies one or more transfers as one linked unit: the accounts are locked in id
order (an account a transfer may create, a user's on its first credit, is inserted first so it
is locked in its place), :func:`eecp.ledger.journal.apply_linked` decides on their current
counters, and the new counters are written as absolute values with the journal rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerNotFoundError
from eecp.ledger import idempotency
from eecp.ledger.answers import Answer, error_answer
from eecp.ledger.journal import (
    AccountKind,
    Balances,
    Code,
    Transfer,
    apply_linked,
    parse_account_id,
)
from eecp.store.ledger_records import AccountRow, TransferRow
from eecp.store.store import Tx


@dataclass(frozen=True)
class Request:
    """A parsed mutating request: who asks (the key's scope), the key (None: the natural key
    alone), the route template and the request's fingerprint."""

    principal: str
    key: str | None
    route: str
    request_hash: str


#: the reference type of a purchase's ``external_ref`` (unique among transfers)
EXTERNAL_REF = "external_ref"

#: a unit's work: given the transaction and the claimed key's id (None without a key)
Work = Callable[[Tx, int | None], Answer]


def new_id(prefix: str) -> str:
    """A public id: ``tr_``/``us_``/``ab_``/``so_`` and 32 random hex digits."""
    return f"{prefix}_{secrets.token_hex(16)}"


def run(tx: Tx, request: Request | None, now: float, work: Work) -> Answer:
    """Claim ``request``'s key (if it has one), do ``work``, keep its answer with the key."""
    key_id: int | None = None
    if request is not None and request.key is not None:
        key_id = tx.ledger.claim_key(request.principal, request.key, request.route,
                                     request.request_hash, now)
        if key_id is None:
            return replay(tx, request)
    try:
        with tx.savepoint():
            answer = work(tx, key_id)
    except (LedgerNotFoundError, LedgerConflictError) as exc:
        answer = error_answer(exc)
    if key_id is not None:
        if not idempotency.should_store(answer.status):
            # the work answered something that must not be kept (a bug in the work):
            # roll everything back rather than commit a claim without its answer
            raise LedgerError("answer_not_storable", str(answer.status))
        stored = answer.stored if answer.stored is not None else answer.body
        tx.ledger.answer_key(key_id, answer.status, stored.decode("ascii"))
    return answer


def replay(tx: Tx, request: Request) -> Answer:
    """The answer stored under ``request``'s claimed key, or 409 ``idempotency_key_reused``."""
    assert request.key is not None
    row = tx.ledger.key(request.principal, request.key)
    if row is None or row.status_code is None or row.response is None:
        raise LedgerError("key_without_answer", f"{request.principal}/{request.route}")
    stored = idempotency.StoredAnswer(row.request_hash, row.status_code, row.response)
    decision = idempotency.decide(stored, request.request_hash)
    assert isinstance(decision, idempotency.Replay)
    return Answer(decision.status, decision.body.encode("ascii"), replayed=True)


@dataclass(frozen=True)
class Leg:
    """One transfer to write (its ``id`` is ignored: the database gives one) and what the
    journal row records about it."""

    transfer: Transfer
    ref_type: str | None = None
    ref_id: str | None = None
    note: str | None = None
    idempotency_id: int | None = None


def move(tx: Tx, legs: Sequence[Leg], now: float) -> list[TransferRow]:
    """Apply ``legs`` as one linked unit (see the module docstring): the journal rows written,
    with their ids, in order; or the first leg's ``LedgerError`` and nothing written."""
    ids = {a for leg in legs for a in (leg.transfer.debit, leg.transfer.credit)}
    for account_id in sorted({leg.transfer.credit for leg in legs}):
        if parse_account_id(account_id).kind is AccountKind.USER:
            tx.ledger.insert_account(AccountRow(account_id, "user", True, now))
    accounts = {a: balances(r) for a, r in tx.ledger.accounts(ids, lock=True).items()}
    pids = {leg.transfer.pending_id for leg in legs if leg.transfer.pending_id is not None}
    holds = {i: to_transfer(t) for i, t in tx.ledger.transfers(pids).items()}
    resolved = {i: to_transfer(t) for i, t in tx.ledger.resolutions(pids).items()}
    # provisional ids below zero never meet a stored hold's id
    provisional = [Transfer(-1 - i, leg.transfer.code, leg.transfer.debit, leg.transfer.credit,
                            leg.transfer.amount, leg.transfer.pending_id)
                   for i, leg in enumerate(legs)]
    changed = apply_linked(accounts, provisional, pending=holds, resolved=resolved)
    for account_id, b in sorted(changed.items()):
        tx.ledger.write_counters(account_id, b.debits_pending, b.debits_posted,
                                 b.credits_pending, b.credits_posted)
    written: list[TransferRow] = []
    for leg, transfer in zip(legs, provisional, strict=True):
        row = TransferRow(new_id("tr"), transfer.debit, transfer.credit, transfer.amount,
                          transfer.code.value, transfer.phase.value, now, transfer.pending_id,
                          leg.ref_type, leg.ref_id, leg.idempotency_id, leg.note)
        if leg.ref_type == EXTERNAL_REF:
            # unique: a concurrent purchase committed the same reference meanwhile (the
            # check before found none); its retry replays it, or is refused the same way
            transfer_id = tx.ledger.insert_unique_ref(row)
            if transfer_id is None:
                raise LedgerConflictError("external_ref_used", field="external_ref")
        else:
            transfer_id = tx.ledger.insert_transfer(row)
        written.append(replace(row, id=transfer_id))
    return written


def to_transfer(row: TransferRow) -> Transfer:
    if row.id is None:
        raise LedgerError("transfer_without_id", row.transfer_id)
    return Transfer(row.id, Code(row.code), row.debit_account, row.credit_account, row.amount,
                    row.pending_id)


def balances(row: AccountRow | None) -> Balances:
    """An account's counters (all zero for an account that does not exist)."""
    if row is None:
        return Balances()
    return Balances(row.debits_pending, row.debits_posted, row.credits_pending,
                    row.credits_posted)


def peek(tx: Tx, request: Request) -> Answer | None:
    """The answer a keyed request would replay (or 409 ``idempotency_key_reused``), without
    claiming anything; None when its key is free. For calls whose effects span several units
    of work (each idempotent by its natural key), so a replay does not redo them."""
    if request.key is None or tx.ledger.key(request.principal, request.key) is None:
        return None
    return replay(tx, request)

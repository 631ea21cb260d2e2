"""The double-entry rules: accounts, transfers, two-phase holds, invariants (spec §3).

TigerBeetle's model on plain values. An account has four counters (``debits_pending``,
``debits_posted``, ``credits_pending``, ``credits_posted``); a transfer is one immutable record
with one debit account, one credit account and one positive amount. A *pending* transfer (a
usage hold, an unstake) adds to the two pending counters; its *post* moves the amount to the
posted counters and its *void* removes it; each pending transfer is resolved at most once, and
always for its full amount (a partial post is a TigerBeetle extension the spec does not need
yet). Only ``mint:usd``, the outside world, may go negative; every other account obeys
``debits_posted + debits_pending <= credits_posted`` (TigerBeetle's
``debits_must_not_exceed_credits``), checked pessimistically when a hold is created so that
posting or voiding can never break it.

:func:`apply` is the whole rule for one transfer: given the current balances of the accounts
it touches (and, for a post or void, the pending transfer and whatever already resolved it), it
returns the new balances or raises a ``LedgerError`` with the spec's reason. It holds no state
and does no I/O, so ``store/ledger_repo.py`` calls it inside its transaction on the rows it has
locked (accounts in id order) and writes the absolute values it returns, never
``SET x = x + ?``; the CHECK constraints and the ``UNIQUE(pending_id)`` index back the same
rules up. :class:`Journal` is the in-memory form (the tests' reference model), and
:func:`check_invariants`, :func:`recompute` and :func:`resolution_violations` are the sums of
§3.3 that ``GET /v1/ledger/check`` reports.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from eecp.core.errors import (
    LedgerConflictError,
    LedgerError,
    LedgerInputError,
    LedgerNotFoundError,
)
from eecp.ledger.money import MAX_COUNTER, checked_counter

MINT_ACCOUNT: Final = "mint:usd"
FEE_ACCOUNT: Final = "fee:platform"
SLASH_ACCOUNT: Final = "slash:platform"
#: accounts the migration creates; every other account is created with its user or node
SYSTEM_ACCOUNTS: Final = (MINT_ACCOUNT, FEE_ACCOUNT, SLASH_ACCOUNT)

_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NODE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class AccountKind(StrEnum):
    MINT = "mint"
    USER = "user"
    NODE = "node"  # a node's payout account, node:<id>
    STAKE = "stake"  # a node's stake escrow, stake:<id>
    FEE = "fee"
    SLASH = "slash"


@dataclass(frozen=True)
class AccountId:
    """A parsed account id. ``node_id`` is set for ``node:`` and ``stake:`` accounts."""

    id: str
    kind: AccountKind
    node_id: str | None = None


def parse_node_id(text: object, field: str = "node_id") -> str:
    """A node id (``^[a-z0-9][a-z0-9-]{0,62}$``), else 400 ``invalid_node_id``."""
    if not isinstance(text, str) or not _NODE_ID.fullmatch(text):
        raise LedgerInputError("invalid_node_id", field=field)
    return text


def parse_account_id(text: object, field: str = "account_id") -> AccountId:
    """Any account id: a user id (no ``:``), ``node:<id>``, ``stake:<id>`` or one of the
    :data:`SYSTEM_ACCOUNTS`; else 400 ``invalid_account_id``. Ids with a ``:`` are reserved for
    the system, so a user can never be called ``mint:usd``."""
    if isinstance(text, str):
        if _USER_ID.fullmatch(text):
            return AccountId(text, AccountKind.USER)
        system = {MINT_ACCOUNT: AccountKind.MINT, FEE_ACCOUNT: AccountKind.FEE,
                  SLASH_ACCOUNT: AccountKind.SLASH}.get(text)
        if system is not None:
            return AccountId(text, system)
        prefix, _, node_id = text.partition(":")
        if prefix in ("node", "stake") and _NODE_ID.fullmatch(node_id):
            kind = AccountKind.NODE if prefix == "node" else AccountKind.STAKE
            return AccountId(text, kind, node_id)
    raise LedgerInputError("invalid_account_id", field=field)


def node_account(node_id: str) -> str:
    return f"node:{parse_node_id(node_id)}"


def stake_account(node_id: str) -> str:
    return f"stake:{parse_node_id(node_id)}"


def may_go_negative(account_id: str) -> bool:
    """Only the mint: its balance is minus the credits in circulation."""
    return account_id == MINT_ACCOUNT


@dataclass(frozen=True)
class Balances:
    """An account's four counters, each a non-negative int of micros."""

    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0

    @property
    def posted(self) -> int:
        """Credit-normal posted balance (what the journal says the account holds)."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """What can be spent or held now: the API's ``balance_micros``."""
        return self.credits_posted - self.debits_posted - self.debits_pending


ZERO: Final = Balances()


class Phase(StrEnum):
    SINGLE = "single"
    PENDING = "pending"
    POST = "post"
    VOID = "void"


class Code(StrEnum):
    """Why a transfer exists (TigerBeetle's ``code``), spec §3.2 and §21.6."""

    PURCHASE = "purchase"
    TRANSFER = "transfer"
    REDEEM = "redeem"
    USAGE_HOLD = "usage_hold"
    USAGE_POST = "usage_post"
    USAGE_VOID = "usage_void"
    FEE = "fee"
    STAKE_DEPOSIT = "stake_deposit"
    UNSTAKE_HOLD = "unstake_hold"
    UNSTAKE_POST = "unstake_post"
    UNSTAKE_VOID = "unstake_void"
    SLASH_AVAILABILITY = "slash_availability"
    SLASH_FRAUD = "slash_fraud"


PHASES: Final[Mapping[Code, Phase]] = MappingProxyType({
    Code.USAGE_HOLD: Phase.PENDING, Code.UNSTAKE_HOLD: Phase.PENDING,
    Code.USAGE_POST: Phase.POST, Code.UNSTAKE_POST: Phase.POST,
    Code.USAGE_VOID: Phase.VOID, Code.UNSTAKE_VOID: Phase.VOID,
})
#: the pending code each post/void code resolves
RESOLVES: Final[Mapping[Code, Code]] = MappingProxyType({
    Code.USAGE_POST: Code.USAGE_HOLD, Code.USAGE_VOID: Code.USAGE_HOLD,
    Code.UNSTAKE_POST: Code.UNSTAKE_HOLD, Code.UNSTAKE_VOID: Code.UNSTAKE_HOLD,
})

_K = AccountKind
_PAYABLE = frozenset({_K.USER, _K.NODE})


@dataclass(frozen=True)
class _Route:
    debit: frozenset[AccountKind]
    credit: frozenset[AccountKind]
    same_node: bool  # stake:N and node:N of one node
    refusal: LedgerError  # what a request naming other accounts gets


def _bug(code: Code) -> LedgerError:
    return LedgerError("transfer_accounts_invalid", code.value)


# single-phase and pending codes; posts and voids take their accounts from the hold
_ROUTES: Final[Mapping[Code, _Route]] = MappingProxyType({
    Code.PURCHASE: _Route(frozenset({_K.MINT}), _PAYABLE, False,
                          LedgerConflictError("account_not_fundable", field="account_id")),
    Code.TRANSFER: _Route(_PAYABLE, _PAYABLE, False,
                          LedgerInputError("account_not_transferable")),
    Code.REDEEM: _Route(_PAYABLE, frozenset({_K.MINT}), False,
                        LedgerInputError("account_not_redeemable", field="account_id")),
    Code.USAGE_HOLD: _Route(frozenset({_K.USER}), frozenset({_K.NODE}), False,
                            _bug(Code.USAGE_HOLD)),
    Code.FEE: _Route(frozenset({_K.NODE}), frozenset({_K.FEE}), False, _bug(Code.FEE)),
    Code.STAKE_DEPOSIT: _Route(frozenset({_K.NODE}), frozenset({_K.STAKE}), True,
                               _bug(Code.STAKE_DEPOSIT)),
    Code.UNSTAKE_HOLD: _Route(frozenset({_K.STAKE}), frozenset({_K.NODE}), True,
                              _bug(Code.UNSTAKE_HOLD)),
    Code.SLASH_AVAILABILITY: _Route(frozenset({_K.STAKE}), frozenset({_K.SLASH}), False,
                                    _bug(Code.SLASH_AVAILABILITY)),
    Code.SLASH_FRAUD: _Route(frozenset({_K.STAKE}), frozenset({_K.SLASH}), False,
                             _bug(Code.SLASH_FRAUD)),
})


@dataclass(frozen=True)
class Transfer:
    """One immutable journal record. ``id`` orders the journal (the store's autoincrement);
    ``pending_id`` is the hold a post or void resolves."""

    id: int
    code: Code
    debit: str
    credit: str
    amount: int
    pending_id: int | None = None

    @property
    def phase(self) -> Phase:
        return PHASES.get(self.code, Phase.SINGLE)


def resolution_of(hold: Transfer, transfer_id: int, *, post: bool) -> Transfer:
    """The post (``post=True``) or void of ``hold``: same accounts, the full amount."""
    if hold.phase is not Phase.PENDING:
        raise LedgerConflictError("pending_transfer_not_pending")
    prefix = "usage" if hold.code is Code.USAGE_HOLD else "unstake"
    code = Code(f"{prefix}_{'post' if post else 'void'}")
    return Transfer(transfer_id, code, hold.debit, hold.credit, hold.amount, hold.id)


# --- the rule -------------------------------------------------------------------------------

def apply(accounts: Mapping[str, Balances], transfer: Transfer, *,
          pending: Transfer | None = None,
          resolved_by: Transfer | None = None) -> dict[str, Balances]:
    """The new balances of the two accounts ``transfer`` touches, or a ``LedgerError``.

    ``accounts`` holds the current balances of (at least) those accounts that exist; a user
    account that does not exist yet is created by its first credit, any other missing account
    is 404. For a post or void, ``pending`` is the hold named by ``pending_id`` (None: not
    found) and ``resolved_by`` the transfer that already resolved it, if any.

    Checked in this order: amount > 0; ``accounts_must_be_different``; the accounts the code
    allows (``account_not_fundable``, ``account_not_transferable``, ...); for a post/void, the
    hold (``pending_transfer_*``); that the accounts exist; the counters' range
    (``overflows_*``); the debit account's limit (``insufficient_funds``).
    """
    _check_shape(transfer)
    if transfer.phase in (Phase.POST, Phase.VOID):
        _check_resolution(transfer, pending, resolved_by)
    elif transfer.pending_id is not None:
        raise LedgerError("pending_id_unexpected", transfer.code.value)
    else:
        _check_route(transfer)
    debit = _existing(accounts, transfer.debit, credit=False)
    credit = _existing(accounts, transfer.credit, credit=True)
    amount = transfer.amount
    if transfer.phase is Phase.SINGLE:
        debit = replace(debit, debits_posted=debit.debits_posted + amount)
        credit = replace(credit, credits_posted=credit.credits_posted + amount)
    elif transfer.phase is Phase.PENDING:
        debit = replace(debit, debits_pending=debit.debits_pending + amount)
        credit = replace(credit, credits_pending=credit.credits_pending + amount)
    elif transfer.phase is Phase.POST:
        debit = replace(debit, debits_pending=debit.debits_pending - amount,
                        debits_posted=debit.debits_posted + amount)
        credit = replace(credit, credits_pending=credit.credits_pending - amount,
                         credits_posted=credit.credits_posted + amount)
    else:
        debit = replace(debit, debits_pending=debit.debits_pending - amount)
        credit = replace(credit, credits_pending=credit.credits_pending - amount)
    checked_counter(debit.debits_pending + debit.debits_posted, "overflows_debits")
    checked_counter(credit.credits_pending + credit.credits_posted, "overflows_credits")
    if (transfer.phase in (Phase.SINGLE, Phase.PENDING) and not may_go_negative(transfer.debit)
            and debit.debits_posted + debit.debits_pending > debit.credits_posted):
        raise LedgerConflictError("insufficient_funds", extra={"account_id": transfer.debit})
    if min(debit.debits_pending, credit.credits_pending) < 0:
        raise LedgerError("pending_counter_negative", str(transfer.id))  # a bug, never a user's
    return {transfer.debit: debit, transfer.credit: credit}


def apply_linked(accounts: Mapping[str, Balances], transfers: Iterable[Transfer], *,
                 pending: Mapping[int, Transfer] | None = None,
                 resolved: Mapping[int, Transfer] | None = None) -> dict[str, Balances]:
    """Several transfers as one unit (TigerBeetle's linked events; a post and its fee): the
    balances after all of them, or the first one's error and no effect at all.

    ``pending`` maps hold ids to holds and ``resolved`` hold ids to the transfer that resolved
    them before the batch; holds and resolutions made inside the batch are added as it goes."""
    current = dict(accounts)
    changed: dict[str, Balances] = {}
    holds = dict(pending or {})
    done = dict(resolved or {})
    for transfer in transfers:
        pid = transfer.pending_id
        hold = holds.get(pid) if pid is not None else None
        earlier = done.get(pid) if pid is not None else None
        new = apply(current, transfer, pending=hold, resolved_by=earlier)
        current.update(new)
        changed.update(new)
        if transfer.phase is Phase.PENDING:
            holds[transfer.id] = transfer
        elif pid is not None:
            done[pid] = transfer
    return changed


def _check_shape(transfer: Transfer) -> None:
    if type(transfer.amount) is not int:
        raise TypeError("a transfer amount is int micros")
    if transfer.amount <= 0:
        detail = "zero" if transfer.amount == 0 else "negative"
        raise LedgerInputError("invalid_amount", detail, field="amount")
    if transfer.amount > MAX_COUNTER:
        raise LedgerInputError("invalid_amount", "too_large", field="amount")
    if transfer.debit == transfer.credit:
        raise LedgerInputError("accounts_must_be_different")


def _check_route(transfer: Transfer) -> None:
    route = _ROUTES[transfer.code]
    debit = parse_account_id(transfer.debit, "from_account")
    credit = parse_account_id(transfer.credit, "to_account")
    if (debit.kind not in route.debit or credit.kind not in route.credit
            or (route.same_node and debit.node_id != credit.node_id)):
        raise route.refusal


def _check_resolution(transfer: Transfer, pending: Transfer | None,
                      resolved_by: Transfer | None) -> None:
    if pending is None or transfer.pending_id is None or pending.id != transfer.pending_id:
        raise LedgerNotFoundError("pending_transfer_not_found")
    if pending.phase is not Phase.PENDING:
        raise LedgerConflictError("pending_transfer_not_pending")
    if RESOLVES[transfer.code] is not pending.code:
        raise LedgerConflictError("pending_transfer_has_different_code")
    if resolved_by is not None:
        way = "posted" if resolved_by.phase is Phase.POST else "voided"
        raise LedgerConflictError(f"pending_transfer_already_{way}")
    if (transfer.debit, transfer.credit) != (pending.debit, pending.credit):
        raise LedgerConflictError("pending_transfer_has_different_accounts")
    if transfer.amount != pending.amount:
        raise LedgerConflictError("pending_transfer_has_different_amount")


def _existing(accounts: Mapping[str, Balances], account_id: str, *, credit: bool) -> Balances:
    found = accounts.get(account_id)
    if found is not None:
        return found
    kind = parse_account_id(account_id).kind
    if credit and kind is AccountKind.USER:
        return ZERO  # a user account exists from its first credit
    if credit and kind in (AccountKind.NODE, AccountKind.STAKE):
        raise LedgerNotFoundError("node_not_found", extra={"account_id": account_id})
    raise LedgerNotFoundError("account_not_found", extra={"account_id": account_id})


# --- invariants (§3.3) ----------------------------------------------------------------------

def check_invariants(accounts: Mapping[str, Balances]) -> list[str]:
    """Every broken sum or limit, as stable strings (empty: all hold):
    ``debits_posted_ne_credits_posted``, ``debits_pending_ne_credits_pending`` (invariant 1;
    together they make Σ posted balances = 0), ``negative_counter:<id>``,
    ``counter_overflow:<id>`` (3), ``overdraft:<id>`` (2)."""
    problems: list[str] = []
    if sum(b.debits_posted for b in accounts.values()) != sum(
            b.credits_posted for b in accounts.values()):
        problems.append("debits_posted_ne_credits_posted")
    if sum(b.debits_pending for b in accounts.values()) != sum(
            b.credits_pending for b in accounts.values()):
        problems.append("debits_pending_ne_credits_pending")
    for account_id, b in sorted(accounts.items()):
        counters = (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
        if min(counters) < 0:
            problems.append(f"negative_counter:{account_id}")
        if max(counters) > MAX_COUNTER:
            problems.append(f"counter_overflow:{account_id}")
        if (not may_go_negative(account_id)
                and b.debits_posted + b.debits_pending > b.credits_posted):
            problems.append(f"overdraft:{account_id}")
    return problems


def recompute(transfers: Iterable[Transfer]) -> dict[str, Balances]:
    """The counters as the journal alone defines them (invariant 4): posted counters sum the
    single-phase and post rows, pending counters the holds no post or void references."""
    rows = list(transfers)
    resolved = {t.pending_id for t in rows if t.pending_id is not None}
    sums: dict[str, list[int]] = {}
    for t in rows:
        debit = sums.setdefault(t.debit, [0, 0, 0, 0])
        credit = sums.setdefault(t.credit, [0, 0, 0, 0])
        if t.phase in (Phase.SINGLE, Phase.POST):
            debit[1] += t.amount
            credit[3] += t.amount
        elif t.phase is Phase.PENDING and t.id not in resolved:
            debit[0] += t.amount
            credit[2] += t.amount
    return {account_id: Balances(*counters) for account_id, counters in sums.items()}


def journal_mismatches(accounts: Mapping[str, Balances],
                       transfers: Iterable[Transfer]) -> list[str]:
    """Accounts whose counters differ from :func:`recompute` (an account the journal never
    touched must be all zero)."""
    expected = recompute(transfers)
    return sorted(a for a in set(accounts) | set(expected)
                  if accounts.get(a, ZERO) != expected.get(a, ZERO))


def resolution_violations(transfers: Iterable[Transfer]) -> list[int]:
    """Hold ids resolved more than once, or resolutions of something that is not a hold of
    the right code (invariant 5: a pending transfer resolves at most once)."""
    rows = list(transfers)
    by_id = {t.id: t for t in rows}
    seen: dict[int, int] = {}
    bad: set[int] = set()
    for t in rows:
        if t.pending_id is None:
            continue
        seen[t.pending_id] = seen.get(t.pending_id, 0) + 1
        hold = by_id.get(t.pending_id)
        if (hold is None or hold.phase is not Phase.PENDING or hold.id > t.id
                or RESOLVES.get(t.code) is not hold.code):
            bad.add(t.pending_id)
    return sorted(bad | {pid for pid, n in seen.items() if n > 1})


# --- the in-memory journal ------------------------------------------------------------------

def _frozen(mapping: Mapping[str, Balances]) -> Mapping[str, Balances]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Journal:
    """The ledger as one immutable value: balances, every transfer, and which holds are
    resolved. :meth:`apply` returns a new journal (or raises, leaving this one as it was). It
    is the reference model the store's results are compared with."""

    accounts: Mapping[str, Balances] = field(
        default_factory=lambda: _frozen(dict.fromkeys(SYSTEM_ACCOUNTS, ZERO)))
    transfers: tuple[Transfer, ...] = ()
    resolved: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def next_id(self) -> int:
        return self.transfers[-1].id + 1 if self.transfers else 1

    def transfer(self, transfer_id: int) -> Transfer | None:
        # ids increase along the journal (apply refuses anything else)
        index = bisect.bisect_left(self.transfers, transfer_id, key=lambda t: t.id)
        if index < len(self.transfers) and self.transfers[index].id == transfer_id:
            return self.transfers[index]
        return None

    def open_holds(self) -> list[Transfer]:
        return [t for t in self.transfers if t.phase is Phase.PENDING and t.id not in
                self.resolved]

    def with_account(self, account_id: str) -> Journal:
        """The journal with ``account_id`` created at zero (a node's accounts, at register)."""
        parse_account_id(account_id)
        if account_id in self.accounts:
            return self
        return replace(self, accounts=_frozen({**self.accounts, account_id: ZERO}))

    def apply(self, *transfers: Transfer) -> Journal:
        """The journal after ``transfers`` as one linked unit. Ids must keep increasing, as
        the store's autoincrement does."""
        last = self.next_id - 1
        for t in transfers:
            if t.id <= last:
                raise LedgerError("transfer_id_reused", str(t.id))
            last = t.id
        pids = {t.pending_id for t in transfers if t.pending_id is not None}
        holds = {pid: hold for pid in pids if (hold := self.transfer(pid)) is not None}
        earlier = {pid: res for pid in pids if pid in self.resolved
                   if (res := self.transfer(self.resolved[pid])) is not None}
        changed = apply_linked(self.accounts, transfers, pending=holds, resolved=earlier)
        resolved = dict(self.resolved)
        resolved.update({t.pending_id: t.id for t in transfers if t.pending_id is not None})
        return Journal(_frozen({**self.accounts, **changed}), self.transfers + transfers,
                       MappingProxyType(resolved))

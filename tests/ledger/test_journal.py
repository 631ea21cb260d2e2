"""eecp.ledger.journal (spec §3): account ids, the transfer rule, two-phase holds, the
invariants, and a stateful hypothesis model that checks them after every step."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from eecp.core.errors import (
    LedgerConflictError,
    LedgerError,
    LedgerInputError,
    LedgerNotFoundError,
)
from eecp.ledger.journal import (
    FEE_ACCOUNT,
    MINT_ACCOUNT,
    SLASH_ACCOUNT,
    ZERO,
    AccountId,
    AccountKind,
    Balances,
    Code,
    Journal,
    Phase,
    Transfer,
    apply,
    apply_linked,
    check_invariants,
    journal_mismatches,
    may_go_negative,
    node_account,
    parse_account_id,
    parse_node_id,
    recompute,
    resolution_of,
    resolution_violations,
    stake_account,
)
from eecp.ledger.money import MAX_COUNTER

N = "node:acme-1"
K = "stake:acme-1"


def journal(*accounts: str) -> Journal:
    j = Journal()
    for a in (N, K, *accounts):
        j = j.with_account(a)
    return j


def t(code: Code, debit: str, credit: str, amount: int, pending_id: int | None = None,
      tid: int = 0) -> Transfer:
    return Transfer(tid, code, debit, credit, amount, pending_id)


def funded(amount: int = 100) -> Journal:
    """alice holds ``amount``; transfer 1 is the purchase."""
    j = journal()
    return j.apply(Transfer(1, Code.PURCHASE, MINT_ACCOUNT, "alice", amount))


def refused(j: Journal, *transfers: Transfer) -> LedgerError:
    with pytest.raises(LedgerError) as info:
        j.apply(*transfers)
    return info.value


# --- ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "parsed"), [
    ("alice", AccountId("alice", AccountKind.USER)),
    ("A.b_c-9", AccountId("A.b_c-9", AccountKind.USER)),
    ("a" * 128, AccountId("a" * 128, AccountKind.USER)),
    ("mint:usd", AccountId("mint:usd", AccountKind.MINT)),
    ("fee:platform", AccountId("fee:platform", AccountKind.FEE)),
    ("slash:platform", AccountId("slash:platform", AccountKind.SLASH)),
    ("node:acme-1", AccountId("node:acme-1", AccountKind.NODE, "acme-1")),
    ("stake:acme-1", AccountId("stake:acme-1", AccountKind.STAKE, "acme-1")),
])
def test_account_ids(text: str, parsed: AccountId) -> None:
    assert parse_account_id(text) == parsed


@pytest.mark.parametrize("text", [
    "", "a" * 129, "-alice", ".a", "al ice", "alice:x", "user:alice", "mint:eur", "node:",
    "node:Acme", "node:-a", "node:a:b", "stake:" + "a" * 64, "fee:node", "alicé", 7, None])
def test_account_ids_refused(text: object) -> None:
    with pytest.raises(LedgerInputError) as info:
        parse_account_id(text, "to_account")
    assert info.value.body() == {"error": "invalid_account_id", "field": "to_account"}


def test_node_ids() -> None:
    assert parse_node_id("acme-fra-1") == "acme-fra-1"
    assert (node_account("x"), stake_account("x")) == ("node:x", "stake:x")
    for bad in ("Acme", "-a", "a" * 64, "a_b", "", None):
        with pytest.raises(LedgerInputError, match="invalid_node_id"):
            parse_node_id(bad)
    assert may_go_negative(MINT_ACCOUNT) and not may_go_negative(FEE_ACCOUNT)


def test_balances() -> None:
    b = Balances(debits_pending=30, debits_posted=20, credits_pending=5, credits_posted=100)
    assert (b.posted, b.available) == (80, 50)


# --- single-phase ---------------------------------------------------------------------------

def test_a_purchase_mints_and_the_mint_goes_negative() -> None:
    j = funded(100)
    assert j.accounts["alice"] == Balances(credits_posted=100)
    assert j.accounts[MINT_ACCOUNT].posted == -100
    assert check_invariants(j.accounts) == []


def test_a_user_account_is_created_by_its_first_credit() -> None:
    j = funded(100).apply(t(Code.TRANSFER, "alice", "bob", 40, tid=2))
    assert (j.accounts["alice"].available, j.accounts["bob"].available) == (60, 40)


def test_an_unknown_sender_is_not_found_and_never_created() -> None:
    err = refused(journal(), t(Code.TRANSFER, "carol", "alice", 1, tid=1))
    assert (type(err), err.reason, err.extra) == (LedgerNotFoundError, "account_not_found",
                                                  {"account_id": "carol"})
    err = refused(journal(), t(Code.PURCHASE, MINT_ACCOUNT, "node:ghost", 1, tid=1))
    assert (err.reason, err.http_status) == ("node_not_found", 404)


def test_insufficient_funds() -> None:
    err = refused(funded(100), t(Code.TRANSFER, "alice", "bob", 101, tid=2))
    assert (type(err), err.reason) == (LedgerConflictError, "insufficient_funds")
    assert funded(100).apply(t(Code.TRANSFER, "alice", "bob", 100, tid=2))


@pytest.mark.parametrize(("transfer", "reason", "status"), [
    (t(Code.TRANSFER, "alice", "alice", 1, tid=2), "accounts_must_be_different", 400),
    (t(Code.TRANSFER, "alice", "bob", 0, tid=2), "invalid_amount", 400),
    (t(Code.TRANSFER, "alice", "bob", -5, tid=2), "invalid_amount", 400),
    (t(Code.TRANSFER, MINT_ACCOUNT, "bob", 1, tid=2), "account_not_transferable", 400),
    (t(Code.TRANSFER, "alice", FEE_ACCOUNT, 1, tid=2), "account_not_transferable", 400),
    (t(Code.TRANSFER, "alice", K, 1, tid=2), "account_not_transferable", 400),
    (t(Code.TRANSFER, SLASH_ACCOUNT, "alice", 1, tid=2), "account_not_transferable", 400),
    (t(Code.PURCHASE, MINT_ACCOUNT, FEE_ACCOUNT, 1, tid=2), "account_not_fundable", 409),
    (t(Code.PURCHASE, MINT_ACCOUNT, K, 1, tid=2), "account_not_fundable", 409),
    (t(Code.PURCHASE, "alice", "bob", 1, tid=2), "account_not_fundable", 409),
    (t(Code.REDEEM, K, MINT_ACCOUNT, 1, tid=2), "account_not_redeemable", 400),
    (t(Code.REDEEM, "alice", "bob", 1, tid=2), "account_not_redeemable", 400),
    (t(Code.STAKE_DEPOSIT, N, "stake:other", 1, tid=2), "transfer_accounts_invalid", 500),
    (t(Code.FEE, "alice", FEE_ACCOUNT, 1, tid=2), "transfer_accounts_invalid", 500),
    (t(Code.USAGE_HOLD, N, "alice", 1, tid=2), "transfer_accounts_invalid", 500),
    (t(Code.TRANSFER, "alice", "bob", 1, pending_id=1, tid=2), "pending_id_unexpected", 500),
    (t(Code.TRANSFER, "alice", "bob", MAX_COUNTER + 1, tid=2), "invalid_amount", 400),
])
def test_refused_transfers(transfer: Transfer, reason: str, status: int) -> None:
    err = refused(funded(), transfer)
    assert (err.reason, err.http_status) == (reason, status)


def test_redeem_returns_credits_to_the_mint() -> None:
    j = funded(100).apply(t(Code.REDEEM, "alice", MINT_ACCOUNT, 60, tid=2))
    assert (j.accounts["alice"].available, j.accounts[MINT_ACCOUNT].posted) == (40, -40)
    assert refused(j, t(Code.REDEEM, "alice", MINT_ACCOUNT, 41, tid=3)).reason == (
        "insufficient_funds")


def test_counters_never_overflow() -> None:
    full = Balances(credits_posted=MAX_COUNTER)
    with pytest.raises(LedgerConflictError, match="overflows_credits"):
        apply({MINT_ACCOUNT: ZERO, "alice": full},
              Transfer(1, Code.PURCHASE, MINT_ACCOUNT, "alice", 1))
    with pytest.raises(LedgerConflictError, match="overflows_debits"):
        apply({MINT_ACCOUNT: Balances(debits_posted=MAX_COUNTER)},
              Transfer(1, Code.PURCHASE, MINT_ACCOUNT, "bob", 1))
    # debits_posted + debits_pending is what the CHECK adds up, so it must fit too
    with pytest.raises(LedgerConflictError, match="overflows_debits"):
        apply({MINT_ACCOUNT: Balances(debits_pending=MAX_COUNTER - 1, debits_posted=1)},
              Transfer(1, Code.PURCHASE, MINT_ACCOUNT, "bob", 1))


# --- two-phase ------------------------------------------------------------------------------

def held(amount: int = 30) -> Journal:
    """alice funded 100, hold 2 of ``amount`` to node:acme-1."""
    return funded(100).apply(Transfer(2, Code.USAGE_HOLD, "alice", N, amount))


def test_a_hold_is_spent_for_both_sides_until_resolved() -> None:
    j = held(30)
    assert j.accounts["alice"] == Balances(debits_pending=30, credits_posted=100)
    assert (j.accounts["alice"].available, j.accounts[N].available) == (70, 0)
    assert j.accounts[N].credits_pending == 30
    # pessimistic: the hold already counts against what alice can move
    assert refused(j, t(Code.TRANSFER, "alice", "bob", 71, tid=3)).reason == "insufficient_funds"
    assert refused(j, Transfer(3, Code.USAGE_HOLD, "alice", N, 71)).reason == (
        "insufficient_funds")


def test_post_moves_the_hold_to_posted() -> None:
    j = held(30)
    j = j.apply(resolution_of(j.transfer(2), 3, post=True))  # type: ignore[arg-type]
    assert j.accounts["alice"] == Balances(debits_posted=30, credits_posted=100)
    assert j.accounts[N] == Balances(credits_posted=30)
    assert j.open_holds() == [] and j.resolved == {2: 3}


def test_void_gives_the_hold_back() -> None:
    j = held(30)
    j = j.apply(resolution_of(j.transfer(2), 3, post=False))  # type: ignore[arg-type]
    assert j.accounts["alice"] == Balances(credits_posted=100)
    assert j.accounts[N] == ZERO


@pytest.mark.parametrize(("first", "second", "reason"), [
    (True, True, "pending_transfer_already_posted"),
    (True, False, "pending_transfer_already_posted"),
    (False, True, "pending_transfer_already_voided"),
    (False, False, "pending_transfer_already_voided"),
])
def test_a_hold_resolves_at_most_once(first: bool, second: bool, reason: str) -> None:
    j = held()
    hold = j.transfer(2)
    assert hold is not None
    j = j.apply(resolution_of(hold, 3, post=first))
    err = refused(j, resolution_of(hold, 4, post=second))
    assert (err.reason, err.http_status) == (reason, 409)
    # and inside one linked batch too
    err = refused(held(), resolution_of(hold, 3, post=first), resolution_of(hold, 4, post=second))
    assert err.reason == reason


@pytest.mark.parametrize(("transfer", "reason"), [
    (Transfer(3, Code.USAGE_POST, "alice", N, 30, 99), "pending_transfer_not_found"),
    (Transfer(3, Code.USAGE_POST, MINT_ACCOUNT, "alice", 100, 1),
     "pending_transfer_not_pending"),
    (Transfer(3, Code.UNSTAKE_POST, "alice", N, 30, 2), "pending_transfer_has_different_code"),
    (Transfer(3, Code.USAGE_POST, "bob", N, 30, 2), "pending_transfer_has_different_accounts"),
    (Transfer(3, Code.USAGE_VOID, "alice", N, 29, 2), "pending_transfer_has_different_amount"),
    (Transfer(3, Code.USAGE_POST, "alice", N, 31, 2), "pending_transfer_has_different_amount"),
    (Transfer(3, Code.USAGE_POST, "alice", N, 30, None), "pending_transfer_not_found"),
])
def test_resolutions_must_match_their_hold(transfer: Transfer, reason: str) -> None:
    assert refused(held(30), transfer).reason == reason


def test_resolution_of_refuses_a_single_phase_transfer() -> None:
    with pytest.raises(LedgerConflictError, match="not_pending"):
        resolution_of(Transfer(1, Code.PURCHASE, MINT_ACCOUNT, "alice", 1), 2, post=True)


def test_unstake_is_a_hold_from_the_stake() -> None:
    j = journal().apply(Transfer(1, Code.PURCHASE, MINT_ACCOUNT, N, 50),
                        Transfer(2, Code.STAKE_DEPOSIT, N, K, 40),
                        Transfer(3, Code.UNSTAKE_HOLD, K, N, 15))
    assert (j.accounts[K].available, j.accounts[N].available) == (25, 10)
    j = j.apply(Transfer(4, Code.SLASH_AVAILABILITY, K, SLASH_ACCOUNT, 25))
    assert refused(j, Transfer(5, Code.SLASH_FRAUD, K, SLASH_ACCOUNT, 1)).reason == (
        "insufficient_funds")
    j = j.apply(resolution_of(j.transfer(3), 5, post=False),  # type: ignore[arg-type]
                Transfer(6, Code.SLASH_FRAUD, K, SLASH_ACCOUNT, 15))
    assert (j.accounts[K].posted, j.accounts[SLASH_ACCOUNT].posted) == (0, 40)


def test_a_linked_batch_is_all_or_nothing() -> None:
    j = held(30)
    hold = j.transfer(2)
    assert hold is not None
    ok = j.apply(resolution_of(hold, 3, post=True), Transfer(4, Code.FEE, N, FEE_ACCOUNT, 3))
    assert (ok.accounts[N].posted, ok.accounts[FEE_ACCOUNT].posted) == (27, 3)
    err = refused(j, resolution_of(hold, 3, post=True), Transfer(4, Code.FEE, N, FEE_ACCOUNT, 31))
    assert err.reason == "insufficient_funds"
    assert j.accounts == held(30).accounts  # values: the failed batch changed nothing
    changed = apply_linked(j.accounts, [Transfer(3, Code.USAGE_HOLD, "alice", N, 10),
                                        Transfer(4, Code.USAGE_VOID, "alice", N, 10, 3)])
    assert changed["alice"] == j.accounts["alice"]


def test_journal_ids_increase() -> None:
    j = funded()
    for tid in (1, 0):
        assert refused(j, Transfer(tid, Code.PURCHASE, MINT_ACCOUNT, "a", 1)).reason == (
            "transfer_id_reused")
    assert j.next_id == 2 and j.transfer(1) is not None and j.transfer(7) is None
    assert j.with_account(N) is j


# --- invariants -----------------------------------------------------------------------------

def test_check_invariants_names_every_broken_rule() -> None:
    assert check_invariants({}) == []
    bad = {"alice": Balances(debits_posted=5, credits_posted=3),
           "bob": Balances(credits_posted=2, credits_pending=1),
           "carol": Balances(debits_pending=-1),
           "dave": Balances(credits_posted=MAX_COUNTER + 1)}
    assert check_invariants(bad) == [
        "debits_posted_ne_credits_posted", "debits_pending_ne_credits_pending",
        "overdraft:alice", "negative_counter:carol", "counter_overflow:dave"]
    assert check_invariants({MINT_ACCOUNT: Balances(debits_posted=5),
                             "a": Balances(credits_posted=5)}) == []


def test_recompute_from_the_journal() -> None:
    j = held(30).apply(Transfer(3, Code.USAGE_HOLD, "alice", N, 10))
    j = j.apply(resolution_of(j.transfer(2), 4, post=True))  # type: ignore[arg-type]
    assert recompute(j.transfers) == {k: v for k, v in j.accounts.items() if v != ZERO}
    assert journal_mismatches(j.accounts, j.transfers) == []
    tampered = {**j.accounts, "alice": Balances(credits_posted=100)}
    assert journal_mismatches(tampered, j.transfers) == ["alice"]
    assert journal_mismatches({**j.accounts, "zed": Balances(credits_posted=1)},
                              j.transfers) == ["zed"]


def test_resolution_violations() -> None:
    hold = Transfer(2, Code.USAGE_HOLD, "alice", N, 5)
    single = Transfer(1, Code.PURCHASE, MINT_ACCOUNT, "alice", 5)
    assert resolution_violations([single, hold, resolution_of(hold, 3, post=True)]) == []
    assert resolution_violations([single, hold, resolution_of(hold, 3, post=True),
                                  resolution_of(hold, 4, post=False)]) == [2]
    assert resolution_violations([single, Transfer(3, Code.USAGE_POST, MINT_ACCOUNT, "alice",
                                                   5, 1)]) == [1]
    assert resolution_violations([Transfer(1, Code.USAGE_VOID, "alice", N, 5, 2), hold]) == [2]
    assert resolution_violations([Transfer(3, Code.UNSTAKE_POST, "alice", N, 5, 2), hold]) == [2]
    assert resolution_violations([Transfer(3, Code.USAGE_POST, "alice", N, 5, 9)]) == [9]


# --- the stateful model ---------------------------------------------------------------------

USERS = ["alice", "bob", "carol"]
NODES = ["n1", "n2"]
PAYERS = USERS + [f"node:{n}" for n in NODES]


@dataclass
class Model:
    """A plain-dict reference: posted balance and outstanding holds per account."""

    posted: dict[str, int] = field(default_factory=dict)
    holding: dict[str, int] = field(default_factory=dict)  # pending debits
    incoming: dict[str, int] = field(default_factory=dict)  # pending credits
    holds: dict[int, tuple[str, str, int, Code]] = field(default_factory=dict)
    resolved: dict[int, bool] = field(default_factory=dict)  # hold -> posted?
    exists: set[str] = field(default_factory=set)

    def available(self, a: str) -> int:
        return self.posted.get(a, 0) - self.holding.get(a, 0)

    def move(self, debit: str, credit: str, amount: int) -> None:
        self.posted[debit] = self.posted.get(debit, 0) - amount
        self.posted[credit] = self.posted.get(credit, 0) + amount
        self.exists |= {debit, credit}


class LedgerMachine(RuleBasedStateMachine):
    """Random purchases, transfers, redemptions, holds, posts, voids, stake moves and
    slashes; each is either applied or refused with the reason the model predicts, and the
    invariants of §3.3 hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.journal = Journal()
        for n in NODES:
            self.journal = self.journal.with_account(f"node:{n}").with_account(f"stake:{n}")
        self.model = Model(exists={*self.journal.accounts})

    def attempt(self, expected: str | None, *transfers: Transfer) -> bool:
        before = self.journal
        try:
            self.journal = self.journal.apply(*transfers)
        except LedgerError as exc:
            assert exc.reason == expected, (exc.reason, expected)
            assert self.journal is before
            return False
        assert expected is None, f"accepted, but the model expected {expected}"
        return True

    def expect_spend(self, debit: str, amount: int) -> str | None:
        if debit not in self.model.exists:
            return "account_not_found"
        return "insufficient_funds" if self.model.available(debit) < amount else None

    @rule(to=st.sampled_from(PAYERS), amount=st.integers(1, 1000))
    def purchase(self, to: str, amount: int) -> None:
        if self.attempt(None, Transfer(self.journal.next_id, Code.PURCHASE, MINT_ACCOUNT, to,
                                       amount)):
            self.model.move(MINT_ACCOUNT, to, amount)

    @rule(debit=st.sampled_from(PAYERS), credit=st.sampled_from(PAYERS),
          amount=st.integers(1, 600))
    def transfer(self, debit: str, credit: str, amount: int) -> None:
        expected = ("accounts_must_be_different" if debit == credit
                    else self.expect_spend(debit, amount))
        if self.attempt(expected, Transfer(self.journal.next_id, Code.TRANSFER, debit, credit,
                                           amount)):
            self.model.move(debit, credit, amount)

    @rule(debit=st.sampled_from(PAYERS), amount=st.integers(1, 600))
    def redeem(self, debit: str, amount: int) -> None:
        expected = self.expect_spend(debit, amount)
        if self.attempt(expected, Transfer(self.journal.next_id, Code.REDEEM, debit,
                                           MINT_ACCOUNT, amount)):
            self.model.move(debit, MINT_ACCOUNT, amount)

    @rule(user=st.sampled_from(USERS), node=st.sampled_from(NODES), amount=st.integers(1, 400))
    def usage_hold(self, user: str, node: str, amount: int) -> None:
        self.hold(Code.USAGE_HOLD, user, f"node:{node}", amount)

    @rule(node=st.sampled_from(NODES), amount=st.integers(1, 400))
    def stake_and_unstake(self, node: str, amount: int) -> None:
        n, k = f"node:{node}", f"stake:{node}"
        if self.attempt(self.expect_spend(n, amount),
                        Transfer(self.journal.next_id, Code.STAKE_DEPOSIT, n, k, amount)):
            self.model.move(n, k, amount)
        self.hold(Code.UNSTAKE_HOLD, k, n, max(1, amount // 2))

    @rule(node=st.sampled_from(NODES), amount=st.integers(1, 400))
    def slash(self, node: str, amount: int) -> None:
        k = f"stake:{node}"
        if self.attempt(self.expect_spend(k, amount), Transfer(
                self.journal.next_id, Code.SLASH_AVAILABILITY, k, SLASH_ACCOUNT, amount)):
            self.model.move(k, SLASH_ACCOUNT, amount)

    def hold(self, code: Code, debit: str, credit: str, amount: int) -> None:
        tid = self.journal.next_id
        if self.attempt(self.expect_spend(debit, amount),
                        Transfer(tid, code, debit, credit, amount)):
            m = self.model
            m.holding[debit] = m.holding.get(debit, 0) + amount
            m.incoming[credit] = m.incoming.get(credit, 0) + amount
            m.holds[tid] = (debit, credit, amount, code)

    @rule(data=st.data(), post=st.booleans(), fee=st.integers(0, 50))
    def resolve(self, data: st.DataObject, post: bool, fee: int) -> None:
        m = self.model
        if not m.holds:
            return
        hold_id = data.draw(st.sampled_from(sorted(m.holds)))
        debit, credit, amount, code = m.holds[hold_id]
        hold = self.journal.transfer(hold_id)
        assert hold is not None
        legs = [resolution_of(hold, self.journal.next_id, post=post)]
        fee = min(fee, amount) if code is Code.USAGE_HOLD and post else 0
        if fee:
            legs.append(Transfer(legs[0].id + 1, Code.FEE, credit, FEE_ACCOUNT, fee))
        expected = None
        if hold_id in m.resolved:
            expected = "pending_transfer_already_" + ("posted" if m.resolved[hold_id]
                                                      else "voided")
        if self.attempt(expected, *legs):
            m.resolved[hold_id] = post
            m.holding[debit] -= amount
            m.incoming[credit] -= amount
            if post:
                m.move(debit, credit, amount)
                if fee:
                    m.move(credit, FEE_ACCOUNT, fee)

    @invariant()
    def sums_balance_and_nothing_overdraws(self) -> None:
        accounts = self.journal.accounts
        assert check_invariants(accounts) == []
        assert sum(b.posted for b in accounts.values()) == 0
        assert all(b.available >= 0 for a, b in accounts.items() if a != MINT_ACCOUNT)

    @invariant()
    def counters_equal_the_journal(self) -> None:
        assert journal_mismatches(self.journal.accounts, self.journal.transfers) == []
        assert resolution_violations(self.journal.transfers) == []
        resolutions = [t.pending_id for t in self.journal.transfers if t.phase in (
            Phase.POST, Phase.VOID)]
        assert len(resolutions) == len(set(resolutions))  # each hold resolved at most once

    @invariant()
    def balances_equal_the_model(self) -> None:
        for account, b in self.journal.accounts.items():
            assert b.posted == self.model.posted.get(account, 0), account
            assert b.debits_pending == self.model.holding.get(account, 0), account
            assert b.credits_pending == self.model.incoming.get(account, 0), account
        open_ids = {t.id for t in self.journal.open_holds()}
        assert open_ids == set(self.model.holds) - set(self.model.resolved)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)

"""eecp.ledger.settlement (spec §9.1 capacity, §9.3, §10.1, §11): the plan, its totals and its
transfers, conservation of money as a property, the abuse rule and decisions."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError
from eecp.ledger.eligibility import Verdict
from eecp.ledger.journal import (
    FEE_ACCOUNT,
    MINT_ACCOUNT,
    Code,
    Journal,
    Transfer,
    check_invariants,
    journal_mismatches,
)
from eecp.ledger.periods import HOUR, Period, PeriodLength
from eecp.ledger.settlement import (
    AbuseEffect,
    AbuseReport,
    Hold,
    abuse_effect,
    abuse_span,
    check_capacity,
    decide_report,
    minimum_stake,
    overlaps,
    parse_action,
    parse_decision,
    plan_settlement,
    report_periods,
)

PASS, FAIL = Verdict("pass"), Verdict("fail", ("health_miss",))
HELD = Verdict("held", ("observer_gap",))
T13 = int(datetime(2026, 7, 1, 13, tzinfo=UTC).timestamp())
P = Period(T13, HOUR)


def hold(hold_id: int, amount: int, app: str | None = None, account: str = "alice",
         node: str = "acme-1") -> Hold:
    return Hold(hold_id, f"us_{hold_id}", account, node, app, amount)


HOLDS = [hold(2, 33_600, "x"), hold(3, 10_001, "y"), hold(4, 5, None)]


def test_a_passing_period_posts_every_hold_with_its_fee() -> None:
    plan = plan_settlement(HOLDS, {"x": PASS, "y": PASS, None: PASS}, 250)
    assert (plan.status, plan.outcome, plan.reasons, plan.settled_by) == (
        "settled", "pass", (), "settler")
    assert [(leg.action, leg.fee) for leg in plan.legs] == [("post", 840), ("post", 250),
                                                            ("post", 0)]
    assert (plan.held_micros, plan.posted_micros, plan.fee_micros, plan.voided_micros) == (
        43_606, 43_606, 1_090, 0)
    assert (plan.net_micros, plan.settled, plan.failed, plan.eligible) == (42_516, 3, 0, True)
    assert plan.transfers(itertools.count(10)) == [
        Transfer(10, Code.USAGE_POST, "alice", "node:acme-1", 33_600, 2),
        Transfer(11, Code.FEE, "node:acme-1", FEE_ACCOUNT, 840),
        Transfer(12, Code.USAGE_POST, "alice", "node:acme-1", 10_001, 3),
        Transfer(13, Code.FEE, "node:acme-1", FEE_ACCOUNT, 250),
        Transfer(14, Code.USAGE_POST, "alice", "node:acme-1", 5, 4)]


def test_a_failing_period_voids_every_hold() -> None:
    plan = plan_settlement(HOLDS, {"x": FAIL, "y": FAIL, None: FAIL}, 250)
    assert (plan.outcome, plan.reasons, plan.eligible) == ("fail", ("health_miss",), False)
    assert {leg.action for leg in plan.legs} == {"void"}
    assert (plan.posted_micros, plan.fee_micros, plan.voided_micros, plan.failed) == (
        0, 0, 43_606, 3)
    assert [t.code for t in plan.transfers(itertools.count(1))] == [Code.USAGE_VOID] * 3


def test_holds_are_judged_per_app() -> None:
    plan = plan_settlement(HOLDS, {"x": FAIL, "y": PASS, None: PASS}, 0)
    assert plan.outcome == "mixed"
    assert [leg.action for leg in plan.legs] == ["void", "post", "post"]
    assert plan.reasons == ("health_miss",)


def test_a_held_period_moves_nothing_until_decided() -> None:
    verdicts = {"x": HELD, "y": HELD, None: HELD}
    plan = plan_settlement(HOLDS, verdicts, 250)
    assert (plan.status, plan.outcome, plan.reasons, plan.settled_by) == (
        "held", None, ("observer_gap",), None)
    assert plan.transfers(itertools.count(1)) == [] and plan.fee_micros == 0
    paid = plan_settlement(HOLDS, verdicts, 250, decision="pay", status="held")
    assert (paid.status, paid.outcome, paid.settled_by, paid.posted_micros) == (
        "settled", "pass", "admin", 43_606)
    refunded = plan_settlement(HOLDS, verdicts, 250, decision="refund")
    assert (refunded.outcome, refunded.voided_micros, refunded.settled_by) == (
        "fail", 43_606, "admin")


def test_decisions_only_for_held_periods() -> None:
    with pytest.raises(LedgerConflictError, match="period_not_held"):
        plan_settlement(HOLDS, {"x": PASS, "y": PASS, None: PASS}, 0, decision="pay")
    for decision in (None, "pay"):
        with pytest.raises(LedgerConflictError, match="period_finalized"):
            plan_settlement(HOLDS, {"x": HELD, "y": HELD, None: HELD}, 0,
                            decision=decision, status="settled")


def test_no_holds_takes_the_node_s_verdict() -> None:
    assert plan_settlement([], {None: PASS}, 0).outcome == "pass"
    empty = plan_settlement([], {None: FAIL}, 0)
    assert (empty.outcome, empty.reasons, empty.legs) == ("fail", ("health_miss",), ())


def test_the_planner_refuses_incomplete_input() -> None:
    with pytest.raises(LedgerError, match="verdict_missing"):
        plan_settlement(HOLDS, {"x": PASS}, 0)
    with pytest.raises(LedgerError, match="verdicts_inconsistent"):
        plan_settlement(HOLDS, {"x": PASS, "y": HELD, None: PASS}, 0)


def test_parse_decision() -> None:
    assert [parse_decision(v) for v in (None, "pay", "refund")] == [None, "pay", "refund"]
    for bad in ("PAY", "", 1, True):
        with pytest.raises(LedgerInputError, match="invalid_decision"):
            parse_decision(bad)


# --- conservation, through the journal ------------------------------------------------------

@given(st.lists(st.tuples(st.integers(1, 10**9), st.sampled_from(["x", "y", None]),
                          st.sampled_from(["alice", "bob"])), max_size=8),
       st.sampled_from(["pass", "fail", "held"]), st.sampled_from(["pass", "fail"]),
       st.integers(0, 10_000), st.sampled_from([None, "pay", "refund"]))
def test_settlement_conserves_money(rows: list[tuple[int, str | None, str]], x: str, y: str,
                                    fee_bps: int, decision: str | None) -> None:
    journal = Journal().with_account("node:acme-1")
    holds = []
    for amount, app, account in rows:
        tid = journal.next_id
        journal = journal.apply(Transfer(tid, Code.PURCHASE, MINT_ACCOUNT, account, amount),
                                Transfer(tid + 1, Code.USAGE_HOLD, account, "node:acme-1",
                                         amount))
        holds.append(hold(tid + 1, amount, app, account))
    if x == "held":
        verdicts = dict.fromkeys(("x", "y", None), Verdict("held", ("abuse_pending",)))
    else:
        verdicts = {"x": Verdict(x), "y": Verdict(y), None: Verdict(x)}  # type: ignore[arg-type]
    try:
        plan = plan_settlement(holds, verdicts, fee_bps, decision=decision)  # type: ignore[arg-type]
    except LedgerConflictError as exc:
        assert exc.reason == "period_not_held" and decision is not None and x != "held"
        return
    if plan.status == "settled":
        assert plan.posted_micros + plan.voided_micros == plan.held_micros
    else:
        assert plan.posted_micros == plan.voided_micros == 0
    assert plan.fee_micros <= plan.posted_micros
    assert plan.net_micros + plan.fee_micros + plan.voided_micros == (
        plan.held_micros if plan.status == "settled" else 0)
    before = journal
    after = journal.apply(*plan.transfers(itertools.count(journal.next_id)))
    assert check_invariants(after.accounts) == []
    assert journal_mismatches(after.accounts, after.transfers) == []
    node_gain = after.accounts["node:acme-1"].posted - before.accounts["node:acme-1"].posted
    assert node_gain == plan.net_micros
    assert after.accounts.get(FEE_ACCOUNT).posted == plan.fee_micros  # type: ignore[union-attr]
    if plan.status == "settled":
        assert after.open_holds() == []
        assert sum(after.accounts[a].posted for a in ("alice", "bob") if a in after.accounts
                   ) == plan.voided_micros
    else:
        assert len(after.open_holds()) == len(holds)


# --- capacity and stake ---------------------------------------------------------------------

def test_capacity_of_a_node_period() -> None:
    check_capacity(60_000_000, 4_000_000, 64, P)  # 64 vCPU-hours exactly
    with pytest.raises(LedgerConflictError, match="usage_exceeds_capacity"):
        check_capacity(60_000_000, 4_000_001, 64, P)
    minute = Period(T13, PeriodLength(60, "seconds"))  # 1 vCPU for 1/60 h = 16,666.6 µh
    check_capacity(0, 16_666, 1, minute)
    with pytest.raises(LedgerConflictError):
        check_capacity(0, 16_667, 1, minute)


def test_minimum_stake_follows_the_spec_s_example() -> None:
    # $0.04 × 16 vCPU = $0.64/h: penalties $0.64 / $15.36 / $460.80, floor $1
    price, capacity, floor = 40_000, 16, 1_000_000
    assert minimum_stake(price, capacity, "economy", floor) == 1_000_000
    assert minimum_stake(price, capacity, "standard", floor) == 15_360_000
    assert minimum_stake(price, capacity, "premium", floor) == 460_800_000


# --- abuse ----------------------------------------------------------------------------------

def report(status: str, start: int = T13, end: int = T13 + 7200,
           created_at: float = T13) -> AbuseReport:
    return AbuseReport("ab_1", start, end, status, created_at)  # type: ignore[arg-type]


def test_overlap_and_covered_periods() -> None:
    r = report("authorized")
    assert [p.id for p in report_periods(r, HOUR)] == ["2026-07-01T13Z", "2026-07-01T14Z"]
    assert overlaps(r, P) and overlaps(r, P.next())
    assert not overlaps(r, P.previous()) and not overlaps(r, P.next().next())


def test_the_effect_of_reports() -> None:
    deadline = 259_200
    now = T13 + 10_000
    assert abuse_effect([report("authorized")], P, now, deadline) == AbuseEffect(("ab_1",), ())
    assert abuse_effect([report("pending")], P, now, deadline) == AbuseEffect((), ("ab_1",))
    assert abuse_effect([report("denied")], P, now, deadline) == AbuseEffect()
    assert abuse_effect([report("authorized")], P.previous(), now, deadline) == AbuseEffect()
    # a pending report holds until its deadline, then it is ignored
    assert abuse_effect([report("pending")], P, T13 + deadline - 1, deadline).pending
    assert abuse_effect([report("pending")], P, T13 + deadline, deadline) == AbuseEffect()
    assert abuse_effect([report("authorized")], P, T13 + 10 * deadline, deadline).authorized
    two = [AbuseReport("ab_2", T13, T13 + 3600, "pending", T13),
           AbuseReport("ab_1", T13, T13 + 3600, "pending", T13)]
    assert abuse_effect(two, P, now, deadline).pending == ("ab_1", "ab_2")


def test_abuse_spans() -> None:
    now = T13 + 1234
    assert abuse_span(None, None, now, HOUR, 604_800) == (T13, T13 + 3600)
    assert abuse_span("2026-07-01T10:00:00Z", None, now, HOUR, 604_800) == (
        T13 - 3 * 3600, T13 + 3600)
    assert abuse_span(None, "2026-07-01T16:00:00+02:00", now, HOUR, 604_800) == (T13, T13 + 3600)
    assert abuse_span("2026-06-24T14:00:00Z", None, now, HOUR, 604_800) == (
        T13 + 3600 - 604_800, T13 + 3600)  # exactly the longest span


@pytest.mark.parametrize(("start", "end", "expected"), [
    ("2026-07-01T13:30:00Z", None, ("invalid_period", "unaligned", "period_start")),
    (None, "2026-07-01T15:00:01Z", ("invalid_period", "unaligned", "period_end")),
    (None, "tomorrow", ("invalid_period", "format", "period_end")),
    (None, "2026-07-01T15:00:00.5Z", ("invalid_period", "unaligned", "period_end")),
    ("2026-07-01T14:00:00Z", "2026-07-01T14:00:00Z", ("invalid_period", "order",
                                                       "period_start")),
    ("2026-07-01T13:00:00", None, ("invalid_period", "timezone", "period_start")),
    ("2026-06-24T13:00:00Z", None, ("abuse_span_too_long", "", "period_end")),
])
def test_abuse_spans_refused(start: str | None, end: str | None,
                             expected: tuple[str, str, str]) -> None:
    with pytest.raises(LedgerInputError) as info:
        abuse_span(start, end, T13 + 1234, HOUR, 604_800)
    assert (info.value.reason, info.value.detail, info.value.field) == expected


def test_a_decision_is_taken_once() -> None:
    assert (parse_action("authorize"), parse_action("deny")) == ("authorized", "denied")
    for bad in (None, "Authorize", "approve", 1):
        with pytest.raises(LedgerInputError, match="invalid_action"):
            parse_action(bad)
    assert decide_report("pending", "authorized") == "apply"
    assert decide_report("authorized", "authorized") == "replay"
    assert decide_report("denied", "denied") == "replay"
    with pytest.raises(LedgerConflictError) as info:
        decide_report("denied", "authorized")
    assert info.value.body() == {"error": "report_already_decided", "status": "denied"}
    with pytest.raises(ValueError, match="authorized or denied"):
        decide_report("pending", "pending")

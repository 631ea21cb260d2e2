"""The stake rules (spec §10), pure: the tiers' exact allowances and penalties, the slash window at
each tier's boundary (just under, equal, just over), the window's restart and its interval, the
slash amount and which unstakes it voids, unstake's limits, the releaser's choice, fraud signals,
evidence and statuses."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import LedgerConflictError, LedgerError, LedgerInputError
from eecp.ledger.settlement import minimum_stake
from eecp.ledger.stake import (
    FRAUD_SIGNALS,
    TIER_ORDER,
    TIERS,
    WINDOW_SEC,
    AuditFact,
    MeasuredPeriod,
    PendingUnstake,
    check_evidence,
    check_unstake,
    is_fraud_signal,
    over_allowance,
    parse_status,
    parse_tier,
    penalty,
    plan_availability_slash,
    plan_fraud_slash,
    plan_slash,
    release_action,
    suspends,
    suspension_reason,
    tier_rank,
    window_down,
    window_start,
)

H = 3600
DAY = 86_400
MICRO = Fraction(1, 1_000_000)
ALLOWED = {"premium": Fraction(2592, 100), "standard": Fraction(2592, 10),
           "economy": Fraction(2592)}


def test_the_tiers_are_the_spec_s_table() -> None:
    assert {t: r.allowed_down_sec for t, r in TIERS.items()} == ALLOWED
    assert {t: r.penalty_hours for t, r in TIERS.items()} == {
        "premium": 720, "standard": 24, "economy": 1}
    assert {t: r.factor_permille for t, r in TIERS.items()} == {
        "premium": 900, "standard": 1000, "economy": 1100}
    # per year, as the table says: 5.26 min, 52.6 min, 8.76 h
    per_year = {t: float(365 * DAY * (1 - r.target)) for t, r in TIERS.items()}
    assert round(per_year["premium"] / 60, 2) == 5.26
    assert round(per_year["standard"] / 60, 1) == 52.6
    assert round(per_year["economy"] / 3600, 2) == 8.76
    assert TIER_ORDER == ("economy", "standard", "premium")
    assert [tier_rank(t) for t in TIER_ORDER] == [0, 1, 2]


def test_penalty_and_minimum_follow_the_spec_s_example() -> None:
    # $0.04 x 16 vCPU = $0.64/h: penalties $0.64 / $15.36 / $460.80, minimums $1 (the floor) up
    assert [penalty(40_000, 16, t) for t in TIER_ORDER] == [640_000, 15_360_000, 460_800_000]
    assert [minimum_stake(40_000, 16, t, 1_000_000) for t in TIER_ORDER] == [
        1_000_000, 15_360_000, 460_800_000]


def test_tier_parsing() -> None:
    assert [parse_tier(t) for t in TIER_ORDER] == list(TIER_ORDER)
    for bad in ("Premium", "gold", 1, None, ""):
        with pytest.raises(LedgerInputError) as info:
            parse_tier(bad)
        assert (info.value.reason, info.value.field) == ("invalid_stake_tier", "stake_tier")


@pytest.mark.parametrize("tier", TIER_ORDER)
def test_the_allowance_at_each_tier_s_boundary(tier: str) -> None:
    allowed = ALLOWED[tier]
    assert not over_allowance(allowed - MICRO, tier)  # just under
    assert not over_allowance(allowed, tier)  # equal: the promise is kept
    assert over_allowance(allowed + MICRO, tier)  # just over
    assert not over_allowance(0, tier)


@pytest.mark.parametrize("tier", TIER_ORDER)
def test_the_window_s_float_downtime_is_compared_at_its_exact_value(tier: str) -> None:
    """The measurement stores downtime as float seconds; a window sums them exactly and
    compares the exact sum, so the float nearest the allowance from below never slashes and
    the next float up always does, however the downtime is spread over periods."""
    allowed = ALLOWED[tier]
    nearest = float(allowed)
    below = nearest if Fraction(nearest) <= allowed else math.nextafter(nearest, 0)
    above = math.nextafter(below, math.inf)
    assert Fraction(below) <= allowed < Fraction(above)
    for total, over in ((math.nextafter(below, 0), False), (below, False), (above, True)):
        for parts in ([total], [total / 2, total / 2], [total / 4] * 4):
            assert sum(Fraction(p) for p in parts) == Fraction(total)  # halving is exact
            periods = [MeasuredPeriod(i * H, (i + 1) * H, d) for i, d in enumerate(parts)]
            down = window_down(periods, 0, len(parts) * H)
            assert over_allowance(down, tier) is over, (tier, total, parts)


def test_the_window_starts_30_days_back_at_the_node_s_first_period_or_after_the_interval(
        ) -> None:
    end = 100 * DAY
    assert window_start(end, first_period_start=0, last_slash_end=None,
                        interval_sec=DAY) == end - WINDOW_SEC
    assert window_start(end, first_period_start=95 * DAY, last_slash_end=None,
                        interval_sec=DAY) == 95 * DAY
    # after a slash, the window restarts an interval after the slashed period's end
    assert window_start(end, first_period_start=0, last_slash_end=90 * DAY,
                        interval_sec=DAY) == 91 * DAY
    assert window_start(end, first_period_start=0, last_slash_end=90 * DAY,
                        interval_sec=0) == 90 * DAY
    # a slash older than 30 days no longer matters
    assert window_start(end, first_period_start=0, last_slash_end=10 * DAY,
                        interval_sec=DAY) == end - WINDOW_SEC


def test_the_window_counts_exactly_the_periods_inside_it() -> None:
    periods = [MeasuredPeriod(i * H, (i + 1) * H, 1.0) for i in range(10)]
    assert window_down(periods, 3 * H, 8 * H) == 5  # periods 3..7
    assert window_down(periods, 3 * H + 1, 8 * H) == 4  # period 3 starts before the window
    assert window_down(periods, 0, 0) == 0


def slashes(downs: list[float], tier: str, interval: float, first: int = 0) -> list[int]:
    """The slashed periods' indexes when hourly periods with ``downs`` are checked in order."""
    periods = [MeasuredPeriod(first + i * H, first + (i + 1) * H, d) for i, d in enumerate(downs)]
    out: list[int] = []
    last: int | None = None
    for i, p in enumerate(periods):
        start = window_start(p.end, first_period_start=first, last_slash_end=last,
                             interval_sec=interval)
        if over_allowance(window_down(periods[: i + 1], start, p.end), tier):
            out.append(i)
            last = p.end
    return out


def test_one_outage_is_slashed_once_even_across_a_period_boundary() -> None:
    # a premium node down 30 s at the end of hour 0 and 30 s at the start of hour 1
    assert slashes([30.0, 30.0] + [0.0] * 60, "premium", DAY) == [0]
    # the same 60 s in one period: one slash, nothing after
    assert slashes([60.0] + [0.0] * 60, "premium", DAY) == [0]
    # under the allowance twice, over it once the two add up
    assert slashes([20.0, 0.0, 20.0] + [0.0] * 5, "premium", DAY) == [2]


def test_a_continuing_outage_is_slashed_once_per_interval() -> None:
    assert slashes([3600.0] * 72, "premium", DAY) == [0, 25, 50]
    assert slashes([3600.0] * 5, "premium", 0) == [0, 1, 2, 3, 4]


def test_old_downtime_leaves_the_window_after_30_days() -> None:
    # 20 s a day apart never adds up past 25.92 s... until two fall in one 30-day window
    downs = [0.0] * (60 * 24)
    downs[0] = downs[31 * 24] = 20.0
    assert slashes(downs, "premium", DAY) == []
    downs[29 * 24] = 20.0
    assert slashes(downs, "premium", DAY) == [29 * 24]


@given(downs=st.lists(st.sampled_from([0.0, 0.0, 0.0, 5.0, 30.0, 300.0, 3600.0]),
                      max_size=120),
       tier=st.sampled_from(TIER_ORDER), interval=st.sampled_from([0, H, 6 * H, DAY]))
def test_slashes_are_over_the_allowance_and_an_interval_apart(downs: list[float], tier: str,
                                                              interval: int) -> None:
    found = slashes(downs, tier, interval)
    for a, b in itertools.pairwise(found):
        assert (b - a) * H >= interval + H if interval else b > a
    for i in found:
        # the slashed window holds more than the allowance, and no earlier unslashed one did
        assert sum(Fraction(d) for d in downs[max(0, i - 719): i + 1]) > ALLOWED[tier]
    if sum(Fraction(d) for d in downs) <= ALLOWED[tier]:
        assert found == []


def unstake(op: str, amount: int, at: float, hold: int = 0) -> PendingUnstake:
    return PendingUnstake(op, hold, amount, at)


def test_a_slash_takes_the_available_stake_first_then_voids_unstakes_newest_first() -> None:
    old, mid, new = unstake("so_a", 3, 1.0), unstake("so_b", 4, 2.0), unstake("so_c", 5, 3.0)
    assert plan_slash(10, 20, [old, mid, new]) == plan_slash(10, 20, [])
    assert plan_slash(10, 20, []).amount == 10
    plan = plan_slash(10, 2, [old, mid, new])
    assert (plan.amount, plan.void) == (10, (new, mid))  # 2 + 5 < 10 <= 2 + 5 + 4
    # the penalty exceeds everything: all of it, every unstake voided
    plan = plan_slash(100, 2, [old, mid, new])
    assert (plan.amount, plan.void) == (14, (new, mid, old))
    # nothing staked: a slash of 0, recorded as skipped
    assert plan_slash(10, 0, []).skipped and not plan_slash(10, 1, []).skipped
    with pytest.raises(LedgerError):
        plan_slash(-1, 0, [])


@given(wanted=st.integers(0, 100), available=st.integers(0, 50),
       amounts=st.lists(st.integers(1, 30), max_size=6))
def test_a_slash_voids_the_fewest_newest_unstakes_that_cover_it(
        wanted: int, available: int, amounts: list[int]) -> None:
    pending = [unstake(f"so_{i}", a, float(i)) for i, a in enumerate(amounts)]
    plan = plan_slash(wanted, available, pending)
    assert plan.amount == min(wanted, available + sum(amounts))
    freed = available + sum(u.amount for u in plan.void)
    assert freed >= plan.amount
    if plan.void:
        assert freed - plan.void[-1].amount < plan.amount  # one fewer would not do
    newest = sorted(pending, key=lambda u: u.created_at, reverse=True)
    assert list(plan.void) == newest[:len(plan.void)]


def test_availability_and_fraud_slashes() -> None:
    pending = [unstake("so_a", 3, 1.0), unstake("so_b", 4, 2.0)]
    assert plan_availability_slash("premium", ALLOWED["premium"], 10, 20, pending) is None
    plan = plan_availability_slash("premium", ALLOWED["premium"] + MICRO, 10, 20, pending)
    assert plan is not None and (plan.amount, plan.void) == (10, ())
    fraud = plan_fraud_slash(20, pending)
    assert (fraud.amount, [u.op_id for u in fraud.void]) == (27, ["so_b", "so_a"])
    assert plan_fraud_slash(0, []).skipped


def test_unstake_keeps_the_minimum_unless_retired() -> None:
    check_unstake(5, 20, 15, "active")  # leaves exactly the minimum
    check_unstake(5, 20, 15, "suspended")
    for status, amount, reason in (("active", 6, "stake_below_minimum"),
                                   ("active", 21, "insufficient_funds"),
                                   ("retired", 21, "insufficient_funds"),
                                   ("banned", 1, "node_inactive")):
        with pytest.raises(LedgerConflictError) as info:
            check_unstake(amount, 20, 15, status)
        assert info.value.reason == reason, status
    check_unstake(20, 20, 15, "retired")  # a retired node may take everything out


def test_the_releaser_posts_waits_or_voids() -> None:
    assert [release_action(s) for s in ("active", "retired", "suspended", "banned")] == [
        "post", "post", "wait", "void"]


def test_fraud_signals_are_exactly_the_spec_s() -> None:
    assert {"report_data_mismatch", "measurements_binding_mismatch",
                             "pck_revoked", "debug_td"} == FRAUD_SIGNALS
    assert is_fraud_signal("refused", "debug_td")
    assert not is_fraud_signal("accepted", "debug_td")
    assert not is_fraud_signal("refused", "nonce_mismatch")  # a slow honest agent makes it
    assert suspension_reason(42) == "fraud_suspected:42"
    assert [suspends(s) for s in ("active", "retired", "suspended", "banned")] == [
        True, True, False, False]


def test_evidence_must_be_fraud_signals_from_the_node_s_own_platforms() -> None:
    ours, theirs = "a" * 32, "b" * 32
    facts = {1: AuditFact(1, "refused", "debug_td", ours),
             2: AuditFact(2, "refused", "pck_revoked", ours.upper()),
             3: AuditFact(3, "refused", "nonce_mismatch", ours),
             4: AuditFact(4, "refused", "debug_td", theirs),
             5: AuditFact(5, "accepted", "ok", ours),
             6: AuditFact(6, "refused", "debug_td", None)}
    check_evidence([1, 2], facts, [ours])
    for ids, bad in (([1, 3], 3), ([4], 4), ([5], 5), ([6], 6), ([1, 99], 99)):
        with pytest.raises(LedgerConflictError) as info:
            check_evidence(ids, facts, [ours])
        assert (info.value.reason, info.value.extra) == ("not_fraud_evidence",
                                                         {"audit_id": bad})
    with pytest.raises(LedgerConflictError):
        check_evidence([], facts, [ours])


def test_statuses_the_admin_may_set() -> None:
    assert [parse_status(s) for s in ("active", "suspended", "retired")] == [
        "active", "suspended", "retired"]
    for bad in ("banned", "ACTIVE", None, 1):
        with pytest.raises(LedgerInputError) as info:
            parse_status(bad)
        assert info.value.reason == "invalid_status"

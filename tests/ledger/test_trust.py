"""Price and trust (spec §12), pure: the history factor, the effective price, availability, the
placement query's parsing and the placement list's filter and order."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import LedgerError, LedgerInputError
from eecp.ledger.stake import MeasuredPeriod
from eecp.ledger.trust import (
    HISTORY_PERIODS,
    Offer,
    PlacementQuery,
    availability_of,
    effective_price,
    history_of,
    history_ppm,
    offer_doc,
    parse_placement_query,
    place,
    ppm_text,
)


def test_the_history_factor() -> None:
    assert history_ppm(0, 0, False) == 1_000_000  # no history: neutral
    assert history_ppm(0, 168, False) == 1_000_000
    assert history_ppm(1, 3, False) == 1_333_333  # rounded half up
    assert history_ppm(2, 3, False) == 1_666_667
    assert history_ppm(168, 168, False) == 2_000_000
    assert history_ppm(168, 168, True) == 2_500_000  # the range's top
    assert history_ppm(0, 0, True) == 1_500_000
    for missed, measured in ((1, 0), (-1, 3), (4, 3)):
        with pytest.raises(LedgerError):
            history_ppm(missed, measured, False)


def test_the_history_looks_back_over_the_last_168_measured_periods() -> None:
    assert HISTORY_PERIODS == 168
    downs = [5.0] + [0.0] * 168  # the miss is the 169th period back: forgotten
    assert history_of(downs, False) == 1_000_000
    downs = [0.0] * 167 + [0.5]
    assert history_of(downs, False) == 1_000_000 + round(1_000_000 / 168)
    assert history_of([], False) == 1_000_000


def test_the_effective_price_is_price_times_tier_times_history_rounded_half_up() -> None:
    assert effective_price(40_000, "standard", 1_000_000) == 40_000
    assert effective_price(40_000, "premium", 1_000_000) == 36_000
    assert effective_price(40_000, "economy", 1_000_000) == 44_000
    assert effective_price(40_000, "standard", 1_500_000) == 60_000
    assert effective_price(40_000, "economy", 2_500_000) == 110_000
    assert effective_price(5, "economy", 1_000_000) == 6  # 5.5 rounds up
    assert effective_price(1, "premium", 1_000_000) == 1  # 0.9 rounds up
    assert effective_price(1, "premium", 1_111_111) == 1  # 0.99999999
    assert effective_price(8400, "standard", 1_333_333) == 11_200  # 11199.997


@given(price=st.integers(1, 10**12), tier=st.sampled_from(["premium", "standard", "economy"]),
       trust=st.integers(1_000_000, 2_500_000))
def test_the_effective_price_is_the_exact_product_rounded_half_up(price: int, tier: str,
                                                                  trust: int) -> None:
    factor = {"premium": Fraction(9, 10), "standard": Fraction(1), "economy": Fraction(11, 10)}
    exact = price * factor[tier] * Fraction(trust, 1_000_000)
    assert abs(effective_price(price, tier, trust) - exact) <= Fraction(1, 2)
    assert effective_price(price, tier, trust) <= effective_price(price + 1, tier, trust)
    assert effective_price(price, tier, trust) <= effective_price(price, tier, trust + 1)


def test_availability_over_measured_time() -> None:
    hour = 3600
    assert availability_of([]) is None
    periods = [MeasuredPeriod(0, hour, 36.0), MeasuredPeriod(hour, 2 * hour, 0.0)]
    assert availability_of(periods) == 0.995
    assert ppm_text(1_333_333) == 1.333333


def test_the_placement_query() -> None:
    assert parse_placement_query([]) == PlacementQuery()
    assert parse_placement_query([("tier", "premium"), ("min_capacity_vcpus", "16"),
                                  ("include_ineligible", "true")]) == PlacementQuery(
        "premium", 16, True)
    assert parse_placement_query([("include_ineligible", "false")]) == PlacementQuery()
    for pairs, name in (
            ([("tier", "gold")], "tier"), ([("tier", "")], "tier"),
            ([("min_capacity_vcpus", "0")], "min_capacity_vcpus"),
            ([("min_capacity_vcpus", "016")], "min_capacity_vcpus"),
            ([("min_capacity_vcpus", "4097")], "min_capacity_vcpus"),
            ([("min_capacity_vcpus", "-1")], "min_capacity_vcpus"),
            ([("min_capacity_vcpus", "١٢")], "min_capacity_vcpus"),  # non-ASCII digits
            ([("include_ineligible", "yes")], "include_ineligible"),
            ([("tier", "premium"), ("tier", "economy")], "tier"),  # repeated
            ([("sort", "price")], "sort"), ([("x" * 100, "1")], "name")):
        with pytest.raises(LedgerInputError) as info:
            parse_placement_query(pairs)
        assert (info.value.reason, info.value.field) == (f"invalid_query:{name}", name), pairs


def offer(node_id: str, price: int = 10_000, *, tier: str = "standard", trust: int = 1_000_000,
          status: str = "active", stake_ok: bool = True, up: int = 1,
          capacity: int = 8) -> Offer:
    return Offer(node_id, status, tier, price, capacity, trust, stake_ok, up)  # type: ignore[arg-type]


def test_placement_lists_eligible_nodes_by_effective_price_then_id() -> None:
    offers = [
        offer("e-cheap", 9000, tier="economy"),  # 9,900
        offer("p-dear", 11_000, tier="premium"),  # 9,900: ties go by node id
        offer("s", 10_000),  # 10,000
        offer("s-flaky", 8000, trust=1_500_000),  # 12,000: cheap but unreliable
        offer("a-below-minimum", 1, stake_ok=False),
        offer("b-suspended", 1, status="suspended"),
        offer("c-retired", 1, status="retired"),
        offer("d-nobody-up", 1, up=0),
    ]
    listed = place(offers, PlacementQuery())
    assert [o.node_id for o in listed] == ["e-cheap", "p-dear", "s", "s-flaky"]
    assert [o.effective_micros for o in listed] == [9900, 9900, 10_000, 12_000]
    everything = place(offers, PlacementQuery(include_ineligible=True))
    assert [o.node_id for o in everything][4:] == [
        "a-below-minimum", "b-suspended", "c-retired", "d-nobody-up"]
    assert [o.node_id for o in place(offers, PlacementQuery(tier="premium"))] == ["p-dear"]
    big = [offer("small", capacity=4), offer("big", capacity=64)]
    assert [o.node_id for o in place(big, PlacementQuery(min_capacity_vcpus=8))] == ["big"]
    assert [o.node_id for o in place(big, PlacementQuery(min_capacity_vcpus=4))] == [
        "big", "small"]


def test_an_entry_carries_the_spec_s_fields() -> None:
    doc = offer_doc(Offer("n1", "active", "premium", 40_000, 16, 1_250_000, True, 2, 3_500_000,
                          0.999))
    assert doc == {
        "node_id": "n1", "tier": "premium", "price_usd_per_vcpu_hour": "0.040000",
        "effective_price_usd_per_vcpu_hour": "0.045000",
        "effective_price_micros_per_vcpu_hour": 45_000, "trust_factor": 1.25,
        "capacity_vcpus": 16, "reported_vcpu_hours_last_period": "3.500000",
        "availability_30d": 0.999, "status": "active", "stake_ok": True, "agents_up": 2,
        "eligible": True}

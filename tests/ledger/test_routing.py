"""The proxy's pick (spec §12), pure: with no candidate bound it is exactly today's order (least
in flight first, ties in the registry's order); banned and suspended nodes leave it; bound agents
within the band of the cheapest effective price come first, least loaded first, then the other
bound ones, then the unbound."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.ledger.routing import Candidate, NodeView, rank
from eecp.ledger.trust import effective_price, history_ppm


def ids(agents: list[Candidate]) -> list[str]:
    return [a.agent_id for a in agents]


def today(candidates: list[Candidate]) -> list[Candidate]:
    """The registry's pick before the ledger: ``sorted(agents, key=in_flight)``."""
    return sorted(candidates, key=lambda a: a.in_flight)


candidates_st = st.lists(st.builds(Candidate, agent_id=st.uuids().map(str),
                                   in_flight=st.integers(0, 5),
                                   ppid=st.sampled_from([None, "p1", "p2", "p3", "p4"])),
                         max_size=12)
views_st = st.dictionaries(st.sampled_from(["p1", "p2", "p3", "p4"]), st.builds(
    NodeView, node_id=st.sampled_from(["n1", "n2", "n3"]),
    status=st.sampled_from(["active", "suspended", "retired", "banned"]),
    effective_micros=st.integers(1, 300)))


@given(candidates=candidates_st)
def test_with_the_ledger_off_the_pick_is_exactly_today_s(candidates: list[Candidate]) -> None:
    assert rank(candidates, {}, 10) == today(candidates)
    # views for platforms no candidate runs on change nothing either
    other = {"zz": NodeView("n9", "banned", 1)}
    unbound = [Candidate(c.agent_id, c.in_flight, None) for c in candidates]
    assert rank(unbound, other, 10) == today(unbound)


def test_banned_and_suspended_nodes_leave_routing() -> None:
    views = {"p1": NodeView("n1", "banned", 1), "p2": NodeView("n2", "suspended", 1),
             "p3": NodeView("n3", "retired", 100), "p4": NodeView("n4", "active", 100)}
    agents = [Candidate(f"a{i}", 0, f"p{i}") for i in (1, 2, 3, 4)] + [Candidate("u", 0)]
    assert ids(rank(agents, views, 10)) == ["a3", "a4", "u"]
    # an app whose every agent is on a suspended node is not routable (until it is cleared)
    assert rank([Candidate("a2", 0, "p2")], views, 10) == []


def test_the_band_then_load_then_the_rest_then_unbound() -> None:
    views = {"cheap": NodeView("n1", "active", 100), "edge": NodeView("n2", "active", 110),
             "over": NodeView("n3", "active", 111)}
    agents = [Candidate("unbound-idle", 0), Candidate("over-idle", 0, "over"),
              Candidate("cheap-busy", 5, "cheap"), Candidate("edge-idle", 1, "edge"),
              Candidate("cheap-idle", 1, "cheap"), Candidate("over-busy", 3, "over")]
    # 110 x 100 <= 100 x 110: in the band; 111 is not
    assert ids(rank(agents, views, 10)) == [
        "edge-idle", "cheap-idle", "cheap-busy",  # preferred, by load (ties: as given)
        "over-idle", "over-busy",  # the other bound agents, by load
        "unbound-idle"]
    assert ids(rank(agents, views, 0)) == [
        "cheap-idle", "cheap-busy", "over-idle", "edge-idle", "over-busy", "unbound-idle"]
    assert ids(rank(agents, views, 11))[:4] == [
        "over-idle", "edge-idle", "cheap-idle", "over-busy"]
    with pytest.raises(ValueError):
        rank(agents, views, -1)


def test_the_pick_under_prices_tiers_and_history() -> None:
    """Three nodes at one list price: premium with a clean record is the cheapest effectively
    (0.90), standard (1.00) lies just outside its 10 % band (0.99), economy with downtime in
    half its periods (1.10 x 1.5) far outside."""
    price = 10_000
    premium = effective_price(price, "premium", history_ppm(0, 168, False))  # 9,000
    standard = effective_price(price, "standard", history_ppm(0, 168, False))  # 10,000
    flaky = effective_price(price, "economy", history_ppm(84, 168, False))  # 16,500
    assert (premium, standard, flaky) == (9000, 10_000, 16_500)
    views = {"pp": NodeView("prem", "active", premium), "ps": NodeView("std", "active", standard),
             "pe": NodeView("eco", "active", flaky)}
    agents = [Candidate("eco", 0, "pe"), Candidate("std", 2, "ps"), Candidate("prem", 3, "pp")]
    # 10,000 x 100 > 9,000 x 110: standard is outside premium's band, with economy
    assert ids(rank(agents, views, 10)) == ["prem", "eco", "std"]  # the rest: by load
    # with a 12 % band the standard node joins, and the less loaded one goes first
    assert ids(rank(agents, views, 12)) == ["std", "prem", "eco"]
    # an authorized abuse report (+0.5) sends the premium node out of its own band
    views["pp"] = NodeView("prem", "active",
                           effective_price(price, "premium", history_ppm(0, 168, True)))
    assert ids(rank(agents, views, 10)) == ["std", "eco", "prem"]


@given(candidates=candidates_st, views=views_st, band=st.integers(0, 50))
def test_the_pick_keeps_every_routable_agent_in_its_group(
        candidates: list[Candidate], views: dict[str, NodeView], band: int) -> None:
    out = rank(candidates, views, band)
    kept = [c for c in candidates if c.ppid not in views
            or views[c.ppid].status not in ("banned", "suspended")]
    assert sorted(map(id, out)) == sorted(map(id, kept))
    bound = [c for c in kept if c.ppid in views]
    if not bound:
        assert out == today(kept)
        return
    best = min(views[c.ppid].effective_micros for c in bound if c.ppid)

    def group(c: Candidate) -> int:
        if c.ppid not in views:
            return 2
        return 0 if views[c.ppid].effective_micros * 100 <= best * (100 + band) else 1

    keys = [(group(c), c.in_flight) for c in out]
    assert keys == sorted(keys)
    # within a group and a load, the registry's order is kept
    for a, b in itertools.pairwise(out):
        if (group(a), a.in_flight) == (group(b), b.in_flight):
            assert candidates.index(a) < candidates.index(b)

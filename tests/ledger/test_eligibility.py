"""eecp.ledger.eligibility (spec §9.2, §21.12): every reason, zero tolerance, and the
precedence of facts, held and judged."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from eecp.ledger.availability import Carry, Measurement, Miss, Policy, View
from eecp.ledger.eligibility import REASONS, NodeFacts, NodeStatus, Verdict, judge

S, E = 0.0, 3600.0
ACTIVE = NodeFacts("active")


def miss(cause: str, start: float = 100, end: float = 130, app: str = "x",
         agent: str = "ag1") -> Miss:
    return Miss(agent, app, cause, start, end)


def m(*misses: Miss, up: bool = True, gap: float = 0,
      apps: Mapping[str, View] | None = None) -> Measurement:
    node = View(sum(x.seconds for x in misses), up, misses)
    gaps = ((1000.0, 1000.0 + gap),) if gap else ()
    return Measurement(S, E, node, apps if apps is not None else {"x": node}, gaps, Carry(E))


def verdict(measurement: Measurement, facts: NodeFacts = ACTIVE, policy: Policy | None = None,
            app: str | None = None) -> tuple[str, tuple[str, ...]]:
    v = judge(facts, measurement, policy or Policy(), app)
    return v.outcome, v.reasons


def test_a_clean_period_passes() -> None:
    v = judge(ACTIVE, m(), Policy())
    assert v == Verdict("pass") and v.eligible


@pytest.mark.parametrize(("cause", "reason"), [
    ("attestation_refused:nonce_mismatch", "attest_miss"),
    ("attestation_timeout", "attest_miss"),
    ("health_timeout", "health_miss"),
    ("disconnected:peer_closed", "health_miss"),
    ("superseded", "health_miss"),  # its grace ran out, or it would not be a miss
    ("health_fail", "app_health_fail"),
])
def test_any_counted_downtime_fails(cause: str, reason: str) -> None:
    assert verdict(m(miss(cause, 10, 11))) == ("fail", (reason,))


def test_every_reason_is_listed_in_order() -> None:
    facts = NodeFacts("retired", stake_available=5, stake_minimum=10, abuse_authorized=True)
    got = verdict(m(miss("health_timeout"), miss("attestation_timeout", 200, 210),
                    miss("health_fail", 300, 301), up=False),
                  facts, Policy(gap_policy="refund"))
    assert got == ("fail", ("stake_below_minimum", "attest_miss", "health_miss",
                            "app_health_fail", "abuse_authorized", "not_observed"))
    gap = verdict(m(gap=61), facts, Policy(gap_policy="refund"))
    assert gap == ("fail", ("stake_below_minimum", "abuse_authorized", "observer_gap"))


def test_the_downtime_grace_is_an_escape_hatch() -> None:
    thirty = m(miss("health_timeout", 100, 130))
    assert verdict(thirty, policy=Policy(downtime_grace_sec=30)) == ("pass", ())
    assert verdict(thirty, policy=Policy(downtime_grace_sec=29.9)) == ("fail", ("health_miss",))
    # the grace excuses downtime only: other reasons still fail
    assert verdict(m(miss("health_timeout"), up=False),
                   policy=Policy(downtime_grace_sec=60)) == ("fail", ("not_observed",))


def test_stake() -> None:
    assert verdict(m(), NodeFacts("active", 0, None)) == ("pass", ())  # not enforced
    assert verdict(m(), NodeFacts("active", 0, 10)) == ("fail", ("stake_missing",))
    assert verdict(m(), NodeFacts("active", 9, 10)) == ("fail", ("stake_below_minimum",))
    assert verdict(m(), NodeFacts("active", 10, 10)) == ("pass", ())


def test_never_observed_fails() -> None:
    assert verdict(m(up=False)) == ("fail", ("not_observed",))


@pytest.mark.parametrize(("gap", "policy", "expected"), [
    (60, Policy(), ("pass", ())),  # at the tolerance: a quick restart, just not counted
    (61, Policy(), ("held", ("observer_gap",))),
    (61, Policy(gap_policy="pay"), ("pass", ())),
    (61, Policy(gap_policy="refund"), ("fail", ("observer_gap",))),
    (10, Policy(gap_tolerance_sec=5), ("held", ("observer_gap",))),
])
def test_observer_gaps(gap: float, policy: Policy, expected: tuple[str, tuple[str, ...]]) -> None:
    assert verdict(m(gap=gap), policy=policy) == expected


def test_held_comes_before_judged() -> None:
    # §21.12: an unobserved gap or a pending report holds the period even if it would fail
    failing = m(miss("health_timeout"), up=False, gap=300)
    facts = NodeFacts("suspended", 0, 10, abuse_authorized=True, abuse_pending=True)
    assert verdict(failing, facts) == ("held", ("observer_gap", "abuse_pending",
                                                "node_suspended"))
    assert verdict(m(miss("health_timeout")), NodeFacts("active", abuse_pending=True)) == (
        "held", ("abuse_pending",))
    assert verdict(m(), NodeFacts("suspended")) == ("held", ("node_suspended",))


@pytest.mark.parametrize(("status", "reasons"), [(None, ("node_not_found",)),
                                                  ("banned", ("node_inactive",))])
def test_facts_come_first(status: NodeStatus | None, reasons: tuple[str, ...]) -> None:
    facts = NodeFacts(status, abuse_pending=True)
    assert verdict(m(gap=500), facts) == ("fail", reasons)


def test_a_retired_node_settles_normally() -> None:
    assert verdict(m(), NodeFacts("retired")) == ("pass", ())


def test_abuse_authorized_fails() -> None:
    assert verdict(m(), NodeFacts("active", abuse_authorized=True)) == (
        "fail", ("abuse_authorized",))


def test_holds_naming_an_app_are_judged_on_that_app() -> None:
    x_miss = miss("disconnected:peer_closed", app="x")
    measurement = m(x_miss, apps={"x": View(30, True, (x_miss,)), "y": View(0, True, ())})
    assert verdict(measurement, app="y") == ("pass", ())
    assert verdict(measurement, app="x") == ("fail", ("health_miss",))
    assert verdict(measurement) == ("fail", ("health_miss",))  # no app named: the whole node
    assert verdict(measurement, app="z") == ("fail", ("not_observed",))
    # node-level facts apply to every app
    assert verdict(measurement, NodeFacts("active", abuse_authorized=True), app="y") == (
        "fail", ("abuse_authorized",))


def test_the_reason_list_is_the_spec_s() -> None:
    assert REASONS == (
        "node_not_found", "node_inactive", "stake_missing", "stake_below_minimum",
        "attest_miss", "health_miss", "app_health_fail", "abuse_authorized", "not_observed",
        "observer_gap", "abuse_pending", "node_suspended")

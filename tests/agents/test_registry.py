"""The in-memory registry: the allow decision, and the remembered decisions resolve is served
from. A remembered decision must never be stale: every change to what it reads, and every
registration-state boundary, is seen by the very next resolve."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from eecp.agents.registry import AgentView, Registry, decide
from eecp.core.config import Network
from eecp.dataplane import resolve as resolve_module
from eecp.dataplane.resolve import answer_for, resolve
from eecp.ledger.routing import NodeView
from eecp.store.records import AgentRecord, AppRecord
from eecp.wire.seed import SeedTunnel

WARN = 3 * 86400.0
EXPIRES = 1_000_000.0
NETWORKS = (Network("forge-1", True), Network("sandbox-1", False))


def make_registry(network: str = "forge-1") -> tuple[Registry, AgentView]:
    registry = Registry(NETWORKS, WARN)
    registry.put_app(AppRecord("shop", "acme/shop", "v1", network, 0.0, EXPIRES))
    agent = AgentView(AgentRecord("a1", "shop", "acme/shop", "v1", network, 0.0, 0.0,
                                  sealed=True), connected=True, attested=True, health="pass")
    registry.attach(agent)
    return registry, agent


def fresh(registry: Registry, name: str, now: float) -> tuple[bool, str, dict[str, object]]:
    """The decision computed from scratch, bypassing anything remembered."""
    d = decide(registry.apps.get(name), name, now, {n.name: n for n in NETWORKS}, WARN)
    return d.allowed, d.reason, d.document()


def seen(registry: Registry, name: str, now: float) -> tuple[bool, str, dict[str, object]]:
    d = registry.resolve(name, now)
    return d.allowed, d.reason, d.document()


def test_an_unchanged_decision_is_reused_and_load_does_not_count() -> None:
    registry, agent = make_registry()
    first = registry.resolve("shop", 10.0)
    agent.in_flight += 5  # load changes on every request: not part of the decision
    assert registry.resolve("shop", 11.0) is first
    assert resolve(registry, "shop", 12.0) is resolve(registry, "shop", 13.0)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda r, a: setattr(a, "attested", False), "not_attested"),
    (lambda r, a: setattr(a, "health", "fail"), "health_fail"),
    (lambda r, a: setattr(a, "connected", False), "not_connected"),
    (lambda r, a: r.detach(a), "not_connected"),
    (lambda r, a: r.update_agent(a, sealed=False), "sealed_required"),
    (lambda r, a: setattr(a, "record", replace(a.record, sealed=None)), "sealed_required"),
    (lambda r, a: r.put_app(replace(r.apps["shop"].record, release_tag="v2")), "not_connected"),
    (lambda r, a: r.put_app(replace(r.apps["shop"].record, expires_at=5.0)),
     "registration_expired"),
    (lambda r, a: r.apps["shop"].agents.pop("a1"), "not_connected"),
    (lambda r, a: r.apps["shop"].agents.clear(), "not_connected"),
    (lambda r, a: setattr(r.apps["shop"], "agents", {}), "not_connected"),
])
def test_every_change_is_seen_by_the_next_resolve(change, reason) -> None:  # type: ignore[no-untyped-def]
    registry, agent = make_registry()
    before = resolve(registry, "shop", 10.0)
    assert before.status == 200
    change(registry, agent)
    after = resolve(registry, "shop", 10.0)
    assert after.status == 403
    assert ("x-ee-reason", reason) in after.headers
    assert seen(registry, "shop", 10.0) == fresh(registry, "shop", 10.0)


def test_an_agent_coming_back_is_seen_at_once() -> None:
    registry, agent = make_registry()
    agent.attested = False
    assert resolve(registry, "shop", 10.0).status == 403
    agent.attested = True
    assert resolve(registry, "shop", 10.0).status == 200
    other = AgentView(replace(agent.record, agent_id="a2"), connected=True, attested=True)
    registry.detach(agent)
    assert resolve(registry, "shop", 10.0).status == 403
    registry.attach(other)
    assert resolve(registry, "shop", 10.0).status == 200


@pytest.mark.parametrize(("now", "state", "status"), [
    (EXPIRES - WARN - 0.001, "active", 200),
    (EXPIRES - WARN, "warning", 200),
    (EXPIRES - 0.001, "warning", 200),
    (EXPIRES, "expired", 403),
])
def test_registration_state_boundaries_end_a_remembered_decision(now: float, state: str,
                                                                   status: int) -> None:
    registry, _ = make_registry()
    registry.resolve("shop", 0.0)  # remembered in another state (or the same one)
    answer = resolve(registry, "shop", now)
    assert ("x-ee-registration-state", state) in answer.headers
    assert answer.status == status
    # and back again: an injected clock may be set backwards in tests and tools
    assert ("x-ee-registration-state", "active") in resolve(registry, "shop", 0.0).headers


def test_the_document_handed_out_is_a_copy() -> None:
    registry, _ = make_registry()
    doc = registry.resolve("shop", 10.0).document()
    doc["allowed"] = False
    doc["attestation"]["status"] = "tampered"  # type: ignore[index]
    again = registry.resolve("shop", 10.0).document()
    assert again["allowed"] is True and again["attestation"]["status"] == "attested"  # type: ignore[index]


def test_answers_match_a_fresh_decision_through_random_changes() -> None:
    """Any sequence of changes: what resolve serves equals the decision made from scratch."""
    rng = random.Random(7)
    registry, agent = make_registry()
    agents = [agent]
    now = 0.0
    for step in range(2000):
        target = rng.choice(agents)
        move = rng.randrange(9)
        if move == 0:
            target.attested = not target.attested
        elif move == 1:
            target.health = rng.choice(["pass", "fail", "unknown"])
        elif move == 2:
            target.connected = not target.connected
        elif move == 3:
            registry.update_agent(target, sealed=rng.choice([True, False, None]))
        elif move == 4:
            registry.put_app(replace(registry.apps["shop"].record,
                                     release_tag=rng.choice(["v1", "v2"])))
        elif move == 5:
            new = AgentView(replace(agent.record, agent_id=f"a{step}",
                                    release_tag=rng.choice(["v1", "v2"])),
                            connected=True, attested=rng.random() < 0.5)
            registry.attach(new)
            agents.append(new)
        elif move == 6:
            registry.detach(target)
        elif move == 7:
            now = rng.choice([now + rng.uniform(0, WARN), EXPIRES - WARN, EXPIRES,
                              rng.uniform(0, EXPIRES * 1.1)])
        else:
            target.in_flight = rng.randrange(10)
        assert seen(registry, "shop", now) == fresh(registry, "shop", now), step
        expected = answer_for(registry.resolve("shop", now))
        assert resolve(registry, "shop", now) == expected, step


def test_unknown_names_are_not_remembered() -> None:
    registry, _ = make_registry()
    before = len(resolve_module._ANSWERS)
    for i in range(1000):
        assert resolve(registry, f"nope{i}", 10.0).status == 403
    assert len(resolve_module._ANSWERS) == before
    assert "nope1" not in registry._decisions


def test_a_write_that_changes_nothing_keeps_the_decision() -> None:
    registry, agent = make_registry()
    first = registry.resolve("shop", 10.0)
    agent.health = "pass"  # a health report repeating itself
    agent.attested = True
    agent.record = replace(agent.record)  # an equal record
    assert registry.resolve("shop", 10.0) is first


def test_merging_into_an_apps_agents_is_a_change() -> None:
    registry, agent = make_registry()
    agent.attested = False
    assert resolve(registry, "shop", 10.0).status == 403
    other = AgentView(replace(agent.record, agent_id="a2"), connected=True, attested=True)
    registry.apps["shop"].agents |= {"a2": other}
    assert resolve(registry, "shop", 10.0).status == 200


# --- the ledger's node views (spec §12) -------------------------------------------------------

def add_agent(registry: Registry, agent_id: str, ppid: str | None, in_flight: int = 0
              ) -> AgentView:
    agent = AgentView(AgentRecord(agent_id, "shop", "acme/shop", "v1", "forge-1", 0.0, 0.0,
                                  sealed=True), connected=True, attested=True, health="pass",
                      in_flight=in_flight, ppid=ppid)
    registry.attach(agent)
    return agent


def test_without_node_views_the_pick_is_by_load_in_the_registrys_order() -> None:
    registry, first = make_registry()
    add_agent(registry, "a2", "bb" * 16, in_flight=0)
    add_agent(registry, "a3", None, in_flight=2)
    first.in_flight = 1
    assert [a.agent_id for a in registry.routable("shop", 10.0)] == ["a2", "a1", "a3"]
    registry.set_node_views({}, 10)
    assert [a.agent_id for a in registry.routable("shop", 10.0)] == ["a2", "a1", "a3"]


def test_node_views_prefer_the_band_and_drop_suspended_nodes_agents() -> None:
    registry, _unbound = make_registry()
    cheap, near, dear = "aa" * 16, "bb" * 16, "cc" * 16
    add_agent(registry, "dear", dear)
    add_agent(registry, "near", near, in_flight=3)
    add_agent(registry, "cheap", cheap, in_flight=1)
    views = {cheap: NodeView("n1", "active", 1000), near: NodeView("n2", "active", 1100),
             dear: NodeView("n3", "active", 1101)}
    registry.set_node_views(views, 10)
    # within 10 % of the cheapest by load, then the other bound ones, then the unbound
    assert [a.agent_id for a in registry.routable("shop", 10.0)] == [
        "cheap", "near", "dear", "a1"]
    assert resolve(registry, "shop", 10.0).status == 200
    registry.set_node_views({**views, cheap: NodeView("n1", "suspended", 1000)}, 10)
    # the cheapest left is 1,100: 1,101 is in its band now, and the less loaded
    assert [a.agent_id for a in registry.routable("shop", 10.0)] == ["dear", "near", "a1"]


def test_binary_protocol_agents_go_before_seed_protocol_ones_each_in_ranks_order() -> None:
    async def send(_: str) -> None:
        raise AssertionError("not sent")
    registry, unbound = make_registry()
    cheap, dear = "aa" * 16, "bb" * 16
    seed_cheap = add_agent(registry, "seed-cheap", cheap)
    seed_idle = add_agent(registry, "seed-idle", None)
    for agent in (seed_cheap, seed_idle):
        agent.seed = SeedTunnel(send, max_streams=4, max_body=10)
    add_agent(registry, "dear", dear, in_flight=2)
    add_agent(registry, "idle", None)
    unbound.in_flight = 1
    registry.set_node_views({cheap: NodeView("n1", "active", 1000),
                             dear: NodeView("n2", "active", 5000)}, 10)
    # rank alone: seed-cheap, dear, seed-idle, idle, a1; the JSON agents then go last
    assert [a.agent_id for a in registry.routable("shop", 10.0)] == [
        "dear", "idle", "a1", "seed-cheap", "seed-idle"]


def test_an_app_served_only_from_suspended_or_banned_nodes_is_refused_node_suspended() -> None:
    registry, agent = make_registry()
    agent.ppid = "aa" * 16
    before = resolve(registry, "shop", 10.0)
    assert before.status == 200
    registry.set_node_views({agent.ppid: NodeView("n1", "banned", 1000)}, 10)
    after = resolve(registry, "shop", 10.0)  # the remembered decision is not reused
    assert after.status == 403 and ("x-ee-reason", "node_suspended") in after.headers
    assert registry.routable("shop", 10.0) == []
    registry.set_node_views({agent.ppid: NodeView("n1", "active", 1000)}, 10)
    assert resolve(registry, "shop", 10.0).status == 200
    # an agent's platform changing is a change too
    registry.set_node_views({"bb" * 16: NodeView("n2", "suspended", 1000)}, 10)
    assert resolve(registry, "shop", 10.0).status == 200
    agent.ppid = "bb" * 16
    assert ("x-ee-reason", "node_suspended") in resolve(registry, "shop", 10.0).headers


def test_gauges_count_registrations_by_state_and_age_attestations_by_the_best_agent() -> None:
    registry, agent = make_registry()
    agent.record = replace(agent.record, last_attested_at=EXPIRES - WARN - 500)
    registry.put_app(AppRecord("blog", "acme/blog", "v1", "forge-1", 0.0, EXPIRES + WARN))
    registry.put_app(AppRecord("old", "acme/old", "v1", "forge-1", 0.0, EXPIRES - WARN - 1))
    # an agent of an older release does not speak for the app, attested or not
    registry.attach(AgentView(AgentRecord("b1", "blog", "acme/blog", "v0", "forge-1", 0.0,
                                          0.0, last_attested_at=EXPIRES - WARN - 10),
                              connected=True, attested=True))
    gauges = registry.gauges(EXPIRES - WARN + 100)  # shop has entered its warning
    assert dict(gauges.registrations_by_state) == {"warning": 1, "active": 1, "expired": 1}
    assert gauges.attestation_age_by_app == {"shop": 600.0, "blog": math.inf, "old": math.inf}

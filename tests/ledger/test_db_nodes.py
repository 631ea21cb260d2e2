"""Nodes through the ledger service on SQLite and PostgreSQL (spec §7): register with PATCH
semantics, the terms schedule (never mid-period; increases after notice and only with the
stake to cover them), the stake target moving money, tokens, and hardware binding (a claim
by a TD plus the operator's confirmation; moved and released agents)."""

from __future__ import annotations

from eecp.core.clock import FixedClock
from eecp.ledger.observe import SessionEvent
from eecp.ledger.service import Ledger
from eecp.store.records import AppRecord
from tests.databases import Backend
from tests.ledger.dbkit import HOUR, T0, body, error, ok, open_ledger, ppid_of, setup_node


async def test_register_creates_once_updates_with_leave_and_keeps_the_token_secret(
        backend: Backend) -> None:
    async with open_ledger(backend, FixedClock(T0 + 60)) as (ledger, _):
        assert error(await ledger.register_node("admin", body(node_id="n1"))) == (
            400, "missing_fields")
        created = await ledger.register_node("admin", body(
            node_id="n1", price_usd_per_vcpu_hour="0.0084", capacity_vcpus=64), ["reg-1"])
        doc = ok(created)
        token = doc["node_token"]
        assert token.startswith("eecpn_") and len(token) == 49 and doc["token_returned"]
        assert doc["node"]["terms"] == {
            "price_usd_per_vcpu_hour": "0.008400", "price_micros_per_vcpu_hour": 8400,
            "capacity_vcpus": 64, "tier": "economy", "effective_from": "2026-01-01T00Z"}
        # a replay under the key never shows the token again
        replay = ok(await ledger.register_node("admin", body(
            node_id="n1", price_usd_per_vcpu_hour="0.0084", capacity_vcpus=64), ["reg-1"]))
        assert (replay["node_token"], replay["token_returned"]) == (None, False)
        assert error(await ledger.register_node("admin", body(node_id="n1"))) == (
            409, "node_exists")
        assert await ledger.node_for_token(token) == "n1"
        assert await ledger.node_for_token(token[:-1] + ("A" if token[-1] != "A" else "B")) \
            is None
        # the node updates itself with its token's principal, never another node
        ok(await ledger.register_node("node:n1", body(node_id="n1", capacity_vcpus=32)))
        denied = await ledger.register_node("node:n1", body(node_id="n2", capacity_vcpus=1))
        assert denied.status == 403
        rotated = ok(await ledger.register_node("node:n1", body(node_id="n1",
                                                                rotate_token=True)))
        assert rotated["token_returned"] and await ledger.node_for_token(token) is None
        assert await ledger.node_for_token(rotated["node_token"]) == "n1"
        assert error(await ledger.register_node("admin", body(
            node_id="n1", capacity_vcpus=5000, allow_update=True))) == (400, "invalid_capacity")
        assert error(await ledger.register_node("admin", body(
            node_id="N!", capacity_vcpus=1))) == (400, "invalid_node_id")


async def test_terms_change_at_a_boundary_and_increases_wait_and_need_stake(
        backend: Backend) -> None:
    clock = FixedClock(T0 + 600)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, price="1", capacity=2, stake=None, agent=None)

        async def update(**fields: object) -> dict[str, object]:
            return ok(await ledger.register_node("admin", body(
                node_id="n1", allow_update=True, **fields)))["node"]

        cheaper = await update(price_usd_per_vcpu_hour="0.5")
        assert cheaper["terms"]["price_micros_per_vcpu_hour"] == 1_000_000  # this period: old
        assert cheaper["terms_next"]["price_micros_per_vcpu_hour"] == 500_000
        assert cheaper["terms_next"]["effective_from"] == "2026-01-01T01Z"
        # an increase needs the minimum stake under the new terms (economy: 1 h of revenue)
        assert error(await ledger.register_node("admin", body(
            node_id="n1", allow_update=True, price_usd="3"))) == (409, "stake_below_minimum")
        ok(await ledger.purchase("admin", body(account_id="node:n1", amount_usd="10"), ["f"]))
        dearer = await update(price_usd="3", stake_amount_usd="6")
        # it replaced the pending decrease and waits for the notice (24 h)
        assert dearer["terms_next"]["price_micros_per_vcpu_hour"] == 3_000_000
        assert dearer["terms_next"]["effective_from"] == "2026-01-02T01Z"
        assert dearer["stake"]["posted_micros"] == 6_000_000
        assert ok(await ledger.balance("admin", "node:n1"))["balance_micros"] == 4_000_000
        # the same fields again change nothing; a lower stake target needs an unstake
        assert (await update(price_usd="3", stake_amount_usd="6")) == dearer
        assert error(await ledger.register_node("admin", body(
            node_id="n1", allow_update=True, stake_amount_usd="1"))) == (
            409, "stake_decrease_requires_unstake")
        # going back to the terms in force withdraws the pending change
        assert (await update(price_usd="1"))["terms_next"] is None
        clock.advance(HOUR)
        assert (await update(capacity_vcpus=3))["terms_next"]["effective_from"] == \
            "2026-01-01T02Z"


async def test_hardware_binds_to_a_node_only_with_a_claim_and_a_confirmation(
        backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    p1, p2 = ppid_of(1), ppid_of(2)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, "n1", stake=None, agent=None)
        await setup_node(ledger, "n2", stake=None, agent=None)
        assert not await ledger.claim_platform(p1, "ghost", "agent-1", None)  # no such node
        assert not await ledger.claim_platform("pck-" + p1, "n1", "agent-1", None)  # no PPID
        assert error(await ledger.confirm_platform("admin", "n1", body(ppid=p1))) == (
            409, "platform_not_claimed")
        assert await ledger.claim_platform(p1, "n1", "agent-1", 7)
        assert await ledger.claim_platform(p1, "n2", "agent-x", None)
        first = await ledger.confirm_platform("node:n1", "n1", body(ppid=p1.upper()))
        assert ok(first)["ppid"] == p1
        again = await ledger.confirm_platform("admin", "n1", body(ppid=p1))
        assert (again.status, again.body) == (200, first.body)
        assert error(await ledger.confirm_platform("admin", "n2", body(ppid=p1))) == (
            409, "platform_taken")
        assert (await ledger.confirm_platform("node:n2", "n1", body(ppid=p1))).status == 403
        assert error(await ledger.confirm_platform("admin", "n1", body(ppid="zz"))) == (
            400, "invalid_ppid")
        assert not await ledger.claim_platform(p1, "n2", "agent-y", None)  # confirmed already
        # the agent's events land on the node its platform is confirmed for
        await ledger.record_availability([SessionEvent(T0 + 70, "agent-1", "app", "s1", "up",
                                                       "attested", p1)])
        view = ok(await ledger.get_node("admin", "n1"))
        assert view["platforms"] == [p1]
        assert [(a["agent_id"], a["up"]) for a in view["agents"]] == [("agent-1", True)]
        # it moves to hardware of another node: released from the first
        assert await ledger.claim_platform(p2, "n2", "agent-1", None)
        ok(await ledger.confirm_platform("admin", "n2", body(ppid=p2)))
        await ledger.record_availability([SessionEvent(T0 + 80, "agent-1", "app", "s2", "up",
                                                       "attested", p2)])
        assert ok(await ledger.get_node("admin", "n1"))["agents"] == []
        assert [a["agent_id"] for a in ok(await ledger.get_node("admin", "n2"))["agents"]] == [
            "agent-1"]
        # removing the platform releases the agents on it
        clock.advance(60)
        assert ok(await ledger.delete_platform("admin", "n2", p2))["ppid"] == p2
        assert ok(await ledger.get_node("admin", "n2"))["agents"] == []
        assert error(await ledger.delete_platform("admin", "n2", p2)) == (
            404, "platform_not_found")
    kinds = backend.raw("SELECT node_id, kind, reason FROM availability_event ORDER BY id")
    assert kinds == [("n1", "up", "attested"), ("n1", "release", "moved"),
                     ("n2", "up", "attested"), ("n2", "release", "moved")]


async def test_the_launcher_releases_an_agent_once(backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, stake=None)
        assert error(await ledger.release_agent("launcher", "n1", "agent-9")) == (
            404, "agent_not_bound")
        released = await ledger.release_agent("launcher", "n1", "agent-1")
        assert ok(released)["released_at"] == "2026-01-01T00:01:00Z"
        clock.advance(30)
        again = await ledger.release_agent("admin", "n1", "agent-1")
        assert (again.status, again.body) == (200, released.body)
        assert ok(await ledger.get_node("admin", "n1"))["agents"] == []
        assert error(await ledger.get_node("admin", "ghost")) == (404, "node_not_found")
        assert (await ledger.get_node("node:other", "n1")).status == 403


async def test_stale_agents_and_agents_of_gone_apps_are_released(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, store):
        await store.atomic(lambda tx: tx.insert_app(AppRecord("app", "acme/app", "v1", "n",
                                                              T0, T0 + 30 * 86400)))
        await store.atomic(lambda tx: tx.insert_app(AppRecord("brief", "acme/brief", "v1", "n",
                                                              T0, T0 + 2 * 86400)))
        await setup_node(ledger, stake=None, agent="down-long")
        platform = ppid_of(abs(hash("n1")) % 10**12)
        events = [SessionEvent(T0, a, app, f"s-{a}", "up", "attested", platform)
                  for a, app in (("up-long", "app"), ("down-short", "app"), ("brief-1", "brief"))]
        await ledger.record_availability(events)
        await ledger.record_availability([
            SessionEvent(T0 + 10, "down-long", "app", "s-down-long", "down",
                         "disconnected:peer_closed", platform)])
        clock.advance(86400 + 15)  # down-long has been down a day; brief's app not expired yet
        await ledger.record_availability([
            SessionEvent(clock.now() - 1, "down-short", "app", "s-down-short", "down",
                         "health_timeout", platform)])
        assert await ledger.release_stale() == {"stale": 1}
        other = Ledger(store, ledger.settings, clock, instance_id="i-2")
        assert await other.release_stale() is None  # the lease is the first instance's
        bound = {a["agent_id"] for a in ok(await ledger.get_node("admin", "n1"))["agents"]}
        assert bound == {"up-long", "down-short", "brief-1"}
        clock.advance(86400)  # brief's registration expired; down-short is stale now
        assert await ledger.release_stale(use_lease=False) == {"app_gone": 1, "stale": 1}
        assert await ledger.release_stale(use_lease=False) == {}  # once
        bound = {a["agent_id"] for a in ok(await ledger.get_node("admin", "n1"))["agents"]}
        assert bound == {"up-long"}

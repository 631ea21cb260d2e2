"""Stake through the ledger service on SQLite and PostgreSQL (spec §10): unstake and its release,
availability slashing in the unit that measures a period (once per outage, once per interval,
never for eecp's own outage, unstakes voided newest first when the stake alone does not cover
it, once even with two settlers), fraud signals suspending a node, the fraud ban, statuses."""

from __future__ import annotations

import functools
import json
from typing import Any

import trio

from eecp.core.clock import FixedClock
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.observe import SessionEvent
from eecp.ledger.service import Ledger
from eecp.store.records import AuditEntry
from eecp.store.store import Store
from tests.databases import Backend
from tests.ledger.dbkit import HOUR, P0, T0, body, error, ok, open_ledger, period_id, setup_node

PPID = f"{1:032x}"
DAY = 86_400


async def balance(ledger: Ledger, account: str) -> dict[str, Any]:
    return dict(ok(await ledger.balance("admin", account)))


async def stake_ops(store: Store, node_id: str = "n1", kind: str | None = None) -> list[Any]:
    ops = await store.snapshot(lambda tx: tx.ledger.stake_ops(node_id))
    return [o for o in ops if kind is None or o.kind == kind]


class Tunnel:
    """An agent's tunnel as the sessions report it (its first session is ``setup_node``'s)."""

    def __init__(self, agent: str = "agent-1", ppid: str = PPID) -> None:
        self.agent, self.ppid, self.session, self.n = agent, ppid, f"s-{agent}", 0

    async def cut(self, ledger: Ledger, at: float, seconds: float) -> None:
        """The tunnel drops at ``at`` and the agent is back ``seconds`` later."""
        self.n += 1
        new = f"s-{self.agent}-{self.n}"
        await ledger.record_availability([
            SessionEvent(at, self.agent, "app", self.session, "down",
                         "disconnected:peer_closed", self.ppid),
            SessionEvent(at + seconds, self.agent, "app", new, "up", "attested", self.ppid)])
        self.session = new


async def settle_until(ledger: Ledger, clock: FixedClock, t: float) -> None:
    """Time passes to ``t`` with eecp watching, and the settler runs."""
    clock.advance(t - clock.now())
    await ledger.observer_heartbeat()
    done = await ledger.settle_due()
    assert done.ran and done.errors == 0, done


async def refusal(store: Store, reason: str, ppid: str | None = PPID, at: float = T0) -> int:
    return await store.append_audit(AuditEntry(
        at, "app", "agent-1", "acme/app", "v1", "mainnet", "register", "refused", reason,
        platform_id=ppid))


# --- unstake ---------------------------------------------------------------------------------

async def test_unstake_is_a_pending_hold_keeping_the_minimum_released_after_the_cooldown(
        backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    settings = LedgerSettings(unstake_cooldown_sec=7 * DAY)
    async with open_ledger(backend, clock, settings) as (ledger, store):
        # economy: 1 h of 8 vCPU at $0.50 = $4 minimum; $10 staked
        await setup_node(ledger, stake="10")
        ask = body(amount_usd="6")
        assert error(await ledger.unstake("admin", "n1", ask)) == (
            400, "missing_idempotency_key")
        assert error(await ledger.unstake("admin", "n1", body(amount_usd="6.0000001"),
                                          ["k0"])) == (400, "invalid_amount")
        assert (await ledger.unstake("node:n2", "n1", ask, ["k0"])).status == 403
        assert error(await ledger.unstake("admin", "n1", body(amount_usd="6.000001"),
                                          ["k1"])) == (409, "stake_below_minimum")
        assert error(await ledger.unstake("admin", "n1", body(amount_usd="11"),
                                          ["k2"])) == (409, "insufficient_funds")
        first = await ledger.unstake("node:n1", "n1", ask, ["k3"])  # leaves exactly $4
        doc = ok(first, 202)
        assert (doc["status"], doc["amount_micros"], doc["release_at"]) == (
            "pending", 6_000_000, "2026-01-08T00:01:00Z")
        replay = await ledger.unstake("node:n1", "n1", ask, ["k3"])
        assert (replay.status, replay.body, replay.replayed) == (202, first.body, True)
        assert error(await ledger.unstake("node:n1", "n1", body(amount_usd="1"), ["k3"])) == (
            409, "idempotency_key_reused")
        stake = await balance(ledger, "stake:n1")
        assert (stake["posted_micros"], stake["balance_micros"]) == (10_000_000, 4_000_000)
        assert error(await ledger.unstake("admin", "n1", body(amount_usd="0.000001"),
                                          ["k4"])) == (409, "stake_below_minimum")
        # not yet matured: nothing moves
        clock.advance(7 * DAY - 1)
        assert (await ledger.release_unstakes()).outcomes == {}
        clock.advance(1)
        assert (await ledger.release_unstakes()).outcomes == {"released": 1}
        assert (await ledger.release_unstakes()).outcomes == {}
        stake = await balance(ledger, "stake:n1")
        assert (stake["posted_micros"], stake["balance_micros"]) == (4_000_000, 4_000_000)
        assert (await balance(ledger, "node:n1"))["balance_micros"] == 6_000_000  # was 0
        (op,) = await stake_ops(store, kind="unstake")
        assert op.status == "released" and op.resolution_transfer_id is not None
        # retired, a node needs no minimum: everything may leave
        ok(await ledger.set_status("admin", "n1", body(status="retired")))
        ok(await ledger.unstake("admin", "n1", body(amount_usd="4"), ["k5"]), 202)
        assert ok(await ledger.check())["ok"] is True


async def test_a_scheduled_upgrade_keeps_its_stake_and_a_suspended_node_s_unstake_waits(
        backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    async with open_ledger(backend, clock, LedgerSettings(unstake_cooldown_sec=60)) as (
            ledger, _):
        await setup_node(ledger, stake="100", agent=None)
        # standard (24 h of $4/h = $96) from tomorrow: the $100 stake allowed it
        ok(await ledger.register_node("admin", body(node_id="n1", stake_tier="standard",
                                                    allow_update=True)))
        assert error(await ledger.unstake("admin", "n1", body(amount_usd="5"), ["k1"])) == (
            409, "stake_below_minimum")
        ok(await ledger.unstake("admin", "n1", body(amount_usd="4"), ["k2"]), 202)
        ok(await ledger.set_status("admin", "n1", body(status="suspended", reason="checking")))
        clock.advance(120)
        assert (await ledger.release_unstakes()).outcomes == {"waiting": 1}
        ok(await ledger.set_status("admin", "n1", body(status="active")))
        assert (await ledger.release_unstakes()).outcomes == {"released": 1}


async def test_the_releaser_s_lease(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock, instance_id="a") as (a, store):
        b = Ledger(store, None, clock, instance_id="b")
        assert (await a.release_unstakes()).ran
        assert not (await b.release_unstakes()).ran
        assert (await b.release_unstakes(use_lease=False)).ran


# --- availability slashing -------------------------------------------------------------------

# premium, 1 vCPU at $0.002: penalty 720 h x $0.002 = $1.44 = the minimum stake
PREMIUM = {"tier": "premium", "price": "0.002", "capacity": 1}
PENALTY = 1_440_000


async def test_an_outage_over_the_allowance_is_slashed_once_and_the_window_restarts(
        backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake="5", ppid=PPID, **PREMIUM)  # type: ignore[arg-type]
        tunnel = Tunnel()
        await setup_node(ledger, "e1", stake=None, ppid=f"{2:032x}", agent="agent-2")
        # 26 s in P0: over premium's 25.92 s; the same on the economy node is nothing
        await tunnel.cut(ledger, T0 + 1000, 26)
        await Tunnel("agent-2", f"{2:032x}").cut(ledger, T0 + 1000, 26)
        await settle_until(ledger, clock, T0 + HOUR + 600)
        (slash,) = await stake_ops(store, kind="slash_availability")
        assert (slash.status, slash.amount_micros) == ("done", PENALTY)
        assert json.loads(slash.detail) == {
            "reason": "over_allowance", "period": P0, "period_start": T0,
            "period_end": T0 + HOUR, "window_start": T0, "down_seconds": 26.0,
            "allowed_seconds": 25.92, "tier": "premium", "penalty_micros": PENALTY,
            "voided_unstakes": []}
        assert await stake_ops(store, "e1", "slash_availability") == []
        assert (await balance(ledger, "slash:platform"))["balance_micros"] == PENALTY
        assert (await balance(ledger, "stake:n1"))["balance_micros"] == 5_000_000 - PENALTY
        # the outage goes on in P1 and P2: within a day of the slash, never again
        await tunnel.cut(ledger, T0 + HOUR + 900, 600)
        await tunnel.cut(ledger, T0 + 2 * HOUR + 900, 600)
        await settle_until(ledger, clock, T0 + 3 * HOUR + 600)
        assert len(await stake_ops(store, kind="slash_availability")) == 1
        # nor for the downtime of that day once it is over: one outage, one slash
        await settle_until(ledger, clock, T0 + 30 * HOUR + 600)
        assert len(await stake_ops(store, kind="slash_availability")) == 1
        view = ok(await ledger.get_node("admin", "n1"))
        assert view["availability"] == {"window_start": "2026-01-02T01:00:00Z",
                                        "down_seconds": 0.0, "allowed_seconds": 25.92,
                                        "tier": "premium"}
        assert [s["amount_micros"] for s in view["slashes"]] == [PENALTY]
        # a new outage a day after the slash is a new slash
        await tunnel.cut(ledger, T0 + 30 * HOUR + 700, 30)
        await settle_until(ledger, clock, T0 + 31 * HOUR + 600)
        second = (await stake_ops(store, kind="slash_availability"))[1]
        assert json.loads(second.detail)["window_start"] == T0 + HOUR + DAY
        # the history factor took the missed periods in: the effective price rose
        view = ok(await ledger.get_node("admin", "n1"))
        assert view["trust_factor"] > 1
        assert float(view["effective_price_usd_per_vcpu_hour"]) > 0.0018  # 0.002 x 0.90
        stats = await ledger.stake_stats()
        assert (stats.slashes_total, stats.slashes_skipped_total) == (
            {"availability": 2, "fraud": 0}, 0)
        assert ok(await ledger.check())["ok"] is True


async def test_an_outage_across_a_period_boundary_is_slashed_once(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake="5", ppid=PPID, **PREMIUM)  # type: ignore[arg-type]
        tunnel = Tunnel()
        await tunnel.cut(ledger, T0 + HOUR - 15, 30)  # 15 s in P0, 15 s in P1
        await settle_until(ledger, clock, T0 + 2 * HOUR + 600)
        (slash,) = await stake_ops(store, kind="slash_availability")
        assert json.loads(slash.detail)["period"] == period_id(1)
        await settle_until(ledger, clock, T0 + 40 * HOUR)
        assert len(await stake_ops(store, kind="slash_availability")) == 1


async def test_eecp_s_own_outage_never_slashes(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock, instance_id="i-1") as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake="5", ppid=PPID, **PREMIUM)  # type: ignore[arg-type]
        # eecp stops at T0 + 1000 (its sessions end with it) and is back 10 min later
        clock.advance(1000)
        await ledger.record_availability([SessionEvent(
            T0 + 1000, "agent-1", "app", "s-agent-1", "down", "observer_shutdown", PPID)])
        await ledger.observer_stop()
        back = Ledger(store, None, clock, instance_id="i-2")
        clock.advance(600)
        await back.observer_heartbeat()
        await back.record_availability([SessionEvent(
            T0 + 1630, "agent-1", "app", "s-2", "up", "attested", PPID)])
        await settle_until(back, clock, T0 + HOUR + 600)
        row = ok(await back.settlements(P0, "n1"))
        assert (row["status"], row["reasons"]) == ("held", ["observer_gap"])
        assert await stake_ops(store, kind="slash_availability") == []


async def test_a_slash_voids_unstakes_newest_first_when_the_stake_alone_does_not_cover_it(
        backend: Backend) -> None:
    clock = FixedClock(T0)
    settings = LedgerSettings(slash_min_interval_sec=HOUR)
    async with open_ledger(backend, clock, settings) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake="4", ppid=PPID, **PREMIUM)  # type: ignore[arg-type]
        tunnel = Tunnel()
        old = ok(await ledger.unstake("admin", "n1", body(amount_usd="1"), ["u1"]), 202)
        clock.advance(1)
        new = ok(await ledger.unstake("admin", "n1", body(amount_usd="1.5"), ["u2"]), 202)
        # available 1.5 >= 1.44; the first slash takes it from the available stake
        await tunnel.cut(ledger, T0 + 1000, 30)
        await settle_until(ledger, clock, T0 + HOUR + 600)
        assert (await balance(ledger, "stake:n1"))["balance_micros"] == 60_000
        # P1 is in the interval; P2's slash needs 1.38 more: the newest unstake is voided
        await tunnel.cut(ledger, T0 + 2 * HOUR + 1000, 30)
        await settle_until(ledger, clock, T0 + 3 * HOUR + 600)
        slashes = await stake_ops(store, kind="slash_availability")
        assert [s.amount_micros for s in slashes] == [PENALTY, PENALTY]
        assert json.loads(slashes[1].detail)["voided_unstakes"] == [new["op_id"]]
        ops = {o.op_id: o.status for o in await stake_ops(store, kind="unstake")}
        assert ops == {old["op_id"]: "pending", new["op_id"]: "voided"}
        stake = await balance(ledger, "stake:n1")
        # 4 - 1.44 - 1.44 = 1.12 posted, of which 1 is still leaving
        assert (stake["posted_micros"], stake["balance_micros"]) == (1_120_000, 120_000)
        assert ok(await ledger.check())["ok"] is True


async def test_nothing_staked_is_a_skipped_slash_and_the_period_fails_below_the_minimum(
        backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake=None, ppid=PPID, **PREMIUM)  # type: ignore[arg-type]
        tunnel = Tunnel()
        await tunnel.cut(ledger, T0 + 1000, 30)
        await settle_until(ledger, clock, T0 + HOUR + 600)
        (slash,) = await stake_ops(store, kind="slash_availability")
        assert (slash.status, slash.amount_micros, json.loads(slash.detail)["reason"]) == (
            "skipped", 0, "no_stake")
        row = ok(await ledger.settlements(P0, "n1"))
        assert row["reasons"] == ["stake_missing", "health_miss"]
        assert (await ledger.stake_stats()).slashes_skipped_total == 1


async def test_two_settlers_slash_once(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (a, store), \
            open_ledger(backend, clock, instance_id="i-2") as (b, _):
        await a.observer_heartbeat()
        await setup_node(a, stake="5", ppid=PPID, **PREMIUM)  # type: ignore[arg-type]
        tunnel = Tunnel()
        for hour in range(6):
            await tunnel.cut(a, T0 + hour * HOUR + 1000, 30)
        clock.advance(6 * HOUR + 600)
        await a.observer_heartbeat()
        async with trio.open_nursery() as nursery:
            for ledger in (a, b, a, b):
                nursery.start_soon(functools.partial(ledger.settle_due, use_lease=False))
        assert len(await stake_ops(store, kind="slash_availability")) == 1
        assert ok(await a.check())["ok"] is True


# --- fraud signals, statuses, the ban --------------------------------------------------------

async def test_a_fraud_signal_suspends_the_node_and_holds_its_periods(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, ppid=PPID)
        changes: list[int] = []
        ledger.add_node_listener(lambda: changes.append(1))
        views = await ledger.node_views()
        assert (views[PPID].node_id, views[PPID].status) == ("n1", "active")
        honest = await refusal(store, "nonce_mismatch")
        assert await ledger.fraud_signal(PPID, honest, "nonce_mismatch") is None
        wrong = await refusal(store, "debug_td", f"{9:032x}")
        assert await ledger.fraud_signal(PPID, wrong, "debug_td") is None  # not its platform
        nobody = await refusal(store, "debug_td", f"{9:032x}")
        assert await ledger.fraud_signal(f"{9:032x}", nobody, "debug_td") is None
        assert changes == []
        signal = await refusal(store, "debug_td")
        assert await ledger.fraud_signal(PPID, signal, "debug_td") == "n1"
        assert changes == [1]
        again = await refusal(store, "pck_revoked")
        assert await ledger.fraud_signal(PPID, again, "pck_revoked") is None  # suspended
        node = ok(await ledger.get_node("admin", "n1"))
        assert (node["status"], node["status_reason"]) == ("suspended",
                                                            f"fraud_suspected:{signal}")
        assert (await ledger.node_views())[PPID].status == "suspended"
        await settle_until(ledger, clock, T0 + HOUR + 600)
        row = ok(await ledger.settlements(P0, "n1"))
        assert (row["status"], row["reasons"]) == ("held", ["node_suspended"])
        # the admin clears it: the held period is judged again by the settler
        cleared = ok(await ledger.set_status("admin", "n1", body(status="active",
                                                                 reason="verifier bug")))
        assert (cleared["status"], cleared["status_reason"]) == ("active", "verifier bug")
        assert changes == [1, 1]
        same = await ledger.set_status("admin", "n1", body(status="active"))
        assert same.replayed and same.json()["status_reason"] == "verifier bug"
        assert changes == [1, 1]
        await settle_until(ledger, clock, T0 + HOUR + 700)
        assert ok(await ledger.settlements(P0, "n1"))["status"] == "settled"
        assert error(await ledger.set_status("admin", "n1", body(status="banned"))) == (
            400, "invalid_status")
        assert error(await ledger.set_status("admin", "n9", body(status="active"))) == (
            404, "node_not_found")


async def test_fraud_slashes_everything_voids_the_open_holds_and_bans_the_hardware(
        backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    async with open_ledger(backend, clock) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake="10", ppid=PPID)
        await setup_node(ledger, "n2", stake=None, ppid=f"{2:032x}", agent="agent-2")
        ok(await ledger.purchase("admin", body(account_id="alice", amount_usd="50"), ["a"]))
        for period in (P0, period_id(1)):
            if period != P0:
                clock.advance(HOUR)
            ok(await ledger.report_usage("uptime", body(
                account_id="alice", node_id="n1", period=period, vcpu_hours="2",
                app_name="app")))
        unstake = ok(await ledger.unstake("admin", "n1", body(amount_usd="3"), ["u"]), 202)
        not_evidence = await refusal(store, "nonce_mismatch")
        other = await refusal(store, "debug_td", f"{2:032x}")
        evidence = await refusal(store, "report_data_mismatch")
        assert error(await ledger.fraud("admin", "n1", body(audit_ids=[evidence,
                                                                       not_evidence]))) == (
            409, "not_fraud_evidence")
        assert error(await ledger.fraud("admin", "n1", body(audit_ids=[other]))) == (
            409, "not_fraud_evidence")
        assert error(await ledger.fraud("admin", "n1", body(audit_ids=[]))) == (
            409, "not_fraud_evidence")
        assert error(await ledger.fraud("admin", "n1", body(force=True))) == (
            400, "missing_fields")
        assert error(await ledger.fraud("admin", "n1", body(audit_ids=["1"]))) == (
            400, "invalid_audit_ids")
        banned = await ledger.fraud("admin", "n1", body(audit_ids=[evidence], note="caught"))
        doc = ok(banned)
        assert doc == {"node_id": "n1", "status": "banned", "slashed_micros": 10_000_000,
                       "voided_holds": 2, "voided_micros": 2_000_000, "voided_unstakes": 1,
                       "periods_failed": [P0, period_id(1)], "audit_ids": [evidence],
                       "forced": False, "banned_at": "2026-01-01T01:01:00Z"}
        again = await ledger.fraud("admin", "n1", body(force=True, note="twice"))
        assert (again.status, again.body, again.replayed) == (200, banned.body, True)
        assert (await balance(ledger, "alice"))["balance_micros"] == 50_000_000
        assert (await balance(ledger, "stake:n1"))["posted_micros"] == 0
        assert (await balance(ledger, "slash:platform"))["balance_micros"] == 10_000_000
        ops = {o.op_id: o.status for o in await stake_ops(store, kind="unstake")}
        assert ops == {unstake["op_id"]: "voided"}
        for period in (P0, period_id(1)):
            row = ok(await ledger.settlements(period, "n1"))
            assert (row["status"], row["reasons"], row["failed"]) == (
                "settled", ["node_inactive"], 1)
        # banned: nothing more for it, and its hardware is refused under any node id
        assert error(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period=period_id(1), vcpu_hours="1"))) == (
            409, "period_finalized")
        clock.advance(HOUR)
        assert error(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period=period_id(2), vcpu_hours="1"))) == (
            409, "node_inactive")
        assert await ledger.platform_banned(PPID)
        assert not await ledger.platform_banned(f"{2:032x}")
        assert not await ledger.claim_platform(PPID, "n2", "agent-1", None)
        for call in (ledger.unstake("admin", "n1", body(amount_usd="1"), ["u2"]),
                     ledger.set_status("admin", "n1", body(status="active")),
                     ledger.register_node("admin", body(node_id="n1", allow_update=True,
                                                        capacity_vcpus=2))):
            assert error(await call) == (409, "node_inactive")
        assert (await ledger.node_views())[PPID].status == "banned"
        stats = await ledger.stake_stats()
        assert (stats.slashes_total["fraud"], stats.nodes_by_status) == (
            1, {"banned": 1, "active": 1})
        await settle_until(ledger, clock, T0 + 5 * HOUR)  # the settler leaves it alone
        assert ok(await ledger.check())["ok"] is True


async def test_fraud_on_a_retired_node_and_by_force(backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, stake=None, agent=None)
        ok(await ledger.set_status("admin", "n1", body(status="retired")))
        assert error(await ledger.fraud("admin", "n1", body(force=True, note="x"))) == (
            409, "node_inactive")
        ok(await ledger.set_status("admin", "n1", body(status="active")))
        doc = ok(await ledger.fraud("admin", "n1", body(force=True, note="seen in the logs")))
        assert (doc["slashed_micros"], doc["forced"], doc["voided_holds"]) == (0, True, 0)
        assert error(await ledger.fraud("admin", "n9", body(force=True, note="x"))) == (
            404, "node_not_found")


# --- placement and views ----------------------------------------------------------------------

async def test_placement_lists_eligible_nodes_by_effective_price(backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, "dear", price="2", capacity=4, stake="20",
                         ppid=f"{1:032x}", agent="a1")
        await setup_node(ledger, "cheap", price="1", capacity=4, stake="20",
                         ppid=f"{2:032x}", agent="a2", tier="premium")  # min $2,880: below
        await setup_node(ledger, "std", price="1", capacity=16, stake=None,
                         ppid=f"{3:032x}", agent="a3")  # no stake
        await setup_node(ledger, "idle", price="0.5", capacity=4, stake="2", agent=None)
        listed = ok(await ledger.list_nodes())["nodes"]
        assert [n["node_id"] for n in listed] == ["dear"]
        everything = ok(await ledger.list_nodes([("include_ineligible", "true")]))["nodes"]
        # the eligible first; then the others, also by effective price
        assert [(n["node_id"], n["eligible"], n["stake_ok"], n["agents_up"],
                 n["effective_price_usd_per_vcpu_hour"]) for n in everything] == [
            ("dear", True, True, 1, "2.200000"), ("idle", False, True, 0, "0.550000"),
            ("cheap", False, False, 1, "0.900000"), ("std", False, False, 1, "1.100000")]
        assert error(await ledger.list_nodes([("tier", "gold")])) == (
            400, "invalid_query:tier")
        assert ok(await ledger.list_nodes([("tier", "premium")]))["nodes"] == []
        views = await ledger.node_views()
        assert {p: (v.node_id, v.effective_micros) for p, v in views.items()} == {
            f"{1:032x}": ("dear", 2_200_000), f"{2:032x}": ("cheap", 900_000),
            f"{3:032x}": ("std", 1_100_000)}

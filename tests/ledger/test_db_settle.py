"""Usage, settlement and abuse through the ledger service on SQLite and PostgreSQL (spec §9,
§11, §15): a hold at the period's posted price, deduplicated by its natural key; a node-period
paid, refunded or held from eecp's own records; finalize re-runnable and byte-identical; the
settler's pass over every due node-period, its chain of measurements and its lease."""

from __future__ import annotations

from dataclasses import replace

from eecp.core.clock import FixedClock
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.observe import SessionEvent
from eecp.ledger.service import Ledger
from tests.databases import Backend
from tests.ledger.dbkit import HOUR, P0, T0, body, error, ok, open_ledger, period_id, setup_node

SETTLED_AT = T0 + HOUR + 600  # the first instant P0 may be finalized


async def fund(ledger: Ledger, account: str = "alice", usd: str = "100") -> None:
    ok(await ledger.purchase("admin", body(account_id=account, amount_usd=usd),
                             [f"fund-{account}-{usd}"]))


async def use(ledger: Ledger, vcpu: str = "2", period: str = P0, account: str = "alice",
              node: str = "n1", app: str | None = "app") -> dict[str, object]:
    fields: dict[str, object] = {"account_id": account, "node_id": node, "period": period,
                                 "vcpu_hours": vcpu}
    if app is not None:
        fields["app_name"] = app
    return ok(await ledger.report_usage("uptime", body(**fields)))


async def test_usage_holds_the_posted_price_once_per_natural_key(backend: Backend) -> None:
    clock = FixedClock(T0 + 60)
    async with open_ledger(backend, clock) as (ledger, _):
        await setup_node(ledger, price="0.5", capacity=4)
        ok(await ledger.register_node("admin", body(node_id="n1", allow_update=True,
                                                    price_usd="0.25")))  # from the next hour
        await fund(ledger, usd="1.5")
        report = body(account_id="alice", node_id="n1", period_start="2026-01-01T00:00:00Z",
                      period_end="2026-01-01T01:00:00+00:00", vcpu_hours="2", app_name="app")
        first = await ledger.report_usage("uptime", report)
        assert ok(first)["amount_micros"] == 1_000_000  # this period's price, not the next's
        again = await ledger.report_usage("uptime", report)
        assert (again.status, again.body, again.replayed) == (200, first.body, True)
        conflict = await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period=P0, vcpu_hours="3", app_name="app"))
        assert conflict.status == 409 and conflict.json() == {
            "error": "usage_conflict", "usage_id": first.json()["usage_id"]}
        assert error(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period=P0, vcpu_hours="3"))) == (
            409, "usage_exceeds_capacity")  # 2 + 3 > 4 vCPU x 1 h
        assert error(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period=period_id(1), vcpu_hours="1"))) == (
            400, "period_in_future")
        assert error(await ledger.report_usage("uptime", body(
            account_id="ghost", node_id="n1", period=P0, vcpu_hours="1"))) == (
            404, "account_not_found")
        assert error(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n9", period=P0, vcpu_hours="1"))) == (
            404, "node_not_found")
        # without a key a refused report claims nothing: it may succeed after a top-up
        big = body(account_id="alice", node_id="n1", period=P0, vcpu_hours="2")
        assert error(await ledger.report_usage("uptime", big)) == (409, "insufficient_funds")
        await fund(ledger, usd="5")
        assert ok(await ledger.report_usage("uptime", big))["status"] == "held"
        clock.advance(HOUR)
        cheaper = await use(ledger, "2", period_id(1))
        assert cheaper["amount_micros"] == 500_000
        balance = ok(await ledger.balance("admin", "alice"))
        assert (balance["balance_micros"], balance["pending_debits_micros"]) == (
            6_500_000 - 2_500_000, 2_500_000)
        assert ok(await ledger.check())["ok"] is True


async def test_a_period_watched_and_served_is_paid_and_finalize_replays(
        backend: Backend) -> None:
    clock = FixedClock(T0)
    settings = LedgerSettings(fee_bps=1000)
    async with open_ledger(backend, clock, settings) as (ledger, _):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake="4")  # the economy minimum: 1 h of 8 vCPU at $0.50
        await fund(ledger)
        await use(ledger, "2")
        clock.advance(HOUR + 599)
        await ledger.observer_heartbeat()
        early = await ledger.finalize("admin", P0, body(node_id="n1"))
        assert early.status == 409 and early.json() == {
            "error": "period_not_ended", "settleable_at": "2026-01-01T01:10:00Z"}
        clock.advance(1)
        done = await ledger.finalize("admin", P0, body(node_id="n1"))
        assert ok(done) | {"settled_at": None} == {
            "node_id": "n1", "period": P0, "period_start": "2026-01-01T00:00:00Z",
            "period_end": "2026-01-01T01:00:00Z", "status": "settled", "eligible": True,
            "reasons": [], "misses": [], "down_seconds": 0, "holds": 1, "settled": 1,
            "failed": 0, "posted_micros": 1_000_000, "fee_micros": 100_000, "voided_micros": 0,
            "settled_at": None, "settled_by": "admin"}
        clock.advance(HOUR)
        again = await ledger.finalize("admin", P0, body(node_id="n1"))
        assert (again.status, again.body) == (200, done.body)
        assert error(await ledger.finalize("admin", P0, body(node_id="n1", decision="pay"))) \
            == (409, "period_finalized")
        assert error(await ledger.report_usage("uptime", body(
            account_id="alice", node_id="n1", period=P0, vcpu_hours="1"))) == (
            409, "period_finalized")
        assert ok(await ledger.balance("admin", "node:n1"))["balance_micros"] == 900_000
        assert ok(await ledger.balance("admin", "stake:n1"))["balance_micros"] == 4_000_000
        assert ok(await ledger.balance("admin", "fee:platform"))["balance_micros"] == 100_000
        stored = await ledger.settlements(P0, "n1")
        assert stored.body == done.body
        assert ok(await ledger.check())["ok"] is True


async def test_downtime_and_silence_refund_the_users(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, _):
        await ledger.observer_heartbeat()
        await setup_node(ledger, "n1", ppid=f"{1:032x}")
        await setup_node(ledger, "n2", ppid=f"{2:032x}", agent=None)  # never seen up
        await fund(ledger)
        await use(ledger, "1", node="n1")
        await use(ledger, "1", node="n2", app=None)
        await ledger.record_availability([
            SessionEvent(T0 + 1000, "agent-1", "app", "s-agent-1", "down",
                         "disconnected:peer_closed", f"{1:032x}"),
            SessionEvent(T0 + 1030, "agent-1", "app", "s-b", "up", "attested", f"{1:032x}")])
        clock.advance(HOUR + 600)
        await ledger.observer_heartbeat()
        everything = ok(await ledger.finalize("admin", P0))
        (n1, n2) = everything["results"]
        assert (n1["status"], n1["eligible"], n1["reasons"], n1["down_seconds"]) == (
            "settled", False, ["health_miss"], 30)
        assert n1["misses"] == [{"agent_id": "agent-1", "app": "app",
                                 "cause": "disconnected:peer_closed",
                                 "from": "2026-01-01T00:16:40Z", "to": "2026-01-01T00:17:10Z"}]
        assert (n2["reasons"], n2["failed"], n2["voided_micros"]) == (["not_observed"], 1,
                                                                       500_000)
        assert ok(await ledger.balance("admin", "alice"))["balance_micros"] == 100_000_000
        assert ok(await ledger.check())["ok"] is True


async def test_an_unwatched_period_is_held_until_the_owner_decides(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, _):
        await ledger.observer_heartbeat()
        await setup_node(ledger)
        await fund(ledger)
        await use(ledger, "2")
        clock.advance(1800)  # eecp is gone for half an hour, then back
        await ledger.observer_stop()
        back = Ledger(ledger._store, ledger.settings, clock, instance_id="i-2")
        clock.advance(1800)
        await back.observer_heartbeat()
        clock.advance(600)
        await back.observer_heartbeat()
        held = ok(await back.finalize("admin", P0, body(node_id="n1")))
        assert (held["status"], held["reasons"], held["settled_at"]) == (
            "held", ["observer_gap"], None)
        assert ok(await back.settlements(P0, "n1")) == held
        assert error(await back.finalize("admin", period_id(1), body(
            node_id="n1", decision="pay"))) == (409, "period_not_ended")
        paid = ok(await back.finalize("admin", P0, body(node_id="n1", decision="pay",
                                                        note="checked the logs")))
        assert (paid["status"], paid["settled_by"], paid["posted_micros"], paid["note"]) == (
            "settled", "admin", 1_000_000, "checked the logs")
        assert ok(await back.check())["ok"] is True


async def test_abuse_holds_then_fails_the_periods_it_names(backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, _):
        await ledger.observer_heartbeat()
        await setup_node(ledger)
        await fund(ledger)
        await use(ledger, "2")
        filed = ok(await ledger.file_abuse("launcher", body(node_id="n1", reason="spam"),
                                           ["ab-1"]))
        assert filed["status"] == "pending"
        assert error(await ledger.file_abuse("launcher", body(node_id="n9"), ["ab-2"])) == (
            404, "node_not_found")
        clock.advance(HOUR + 600)
        await ledger.observer_heartbeat()
        held = ok(await ledger.finalize("admin", P0, body(node_id="n1")))
        assert (held["status"], held["reasons"]) == ("held", ["abuse_pending"])
        report = filed["report_id"]
        decided = await ledger.decide_abuse("admin", report, body(action="authorize"))
        assert ok(decided)["periods_already_settled"] == []
        again = await ledger.decide_abuse("admin", report, body(action="authorize"))
        assert (again.status, again.body, again.replayed) == (200, decided.body, True)
        assert error(await ledger.decide_abuse("admin", report, body(action="deny"))) == (
            409, "report_already_decided")
        assert error(await ledger.decide_abuse("admin", report, body())) == (
            400, "invalid_action")
        assert error(await ledger.decide_abuse("admin", "ab_" + "0" * 32,
                                               body(action="deny"))) == (
            404, "report_not_found")
        # the settler looks at periods held for abuse again
        assert (await ledger.settle_due()).outcomes == {"settled": 1}
        failed = ok(await ledger.settlements(P0, "n1"))
        assert (failed["status"], failed["reasons"], failed["settled_by"]) == (
            "settled", ["abuse_authorized"], "settler")
        assert ok(await ledger.check())["ok"] is True


async def test_the_settler_settles_every_due_period_of_every_node_once(
        backend: Backend) -> None:
    clock = FixedClock(T0)
    async with open_ledger(backend, clock) as (ledger, store):
        await ledger.observer_heartbeat()
        await setup_node(ledger, "n1", ppid=f"{1:032x}")
        await setup_node(ledger, "n2", ppid=f"{2:032x}", stake=None, agent="agent-2")
        await fund(ledger)
        for hour in range(3):
            await use(ledger, "1", node="n1")
            await use(ledger, "1", node="n2", app=None)
            clock.advance(HOUR)
            await ledger.observer_heartbeat()
            if hour < 2:
                await use(ledger, "1", period=period_id(hour + 1), account="alice", node="n1",
                          app="other")
        clock.advance(600)
        await ledger.observer_heartbeat()
        other = Ledger(store, ledger.settings, clock, instance_id="i-2")
        first = await ledger.settle_due()
        assert first.ran and first.errors == 0
        assert first.outcomes == {"settled": 6}  # three hours of two nodes
        assert not (await other.settle_due()).ran  # the lease is i-1's
        assert (await ledger.settle_due()).outcomes == {}  # nothing left
        rows = {(r["node_id"], r["period"]): r for h in range(3)
                for r in ok(await ledger.settlements(period_id(h)))["results"]}
        # n1 carried its agent's session across the hours: paid where the app was up; the
        # app "other" never ran there; n2 has no stake
        assert rows[("n1", P0)]["reasons"] == []
        assert rows[("n1", period_id(1))]["reasons"] == ["not_observed"]
        assert (rows[("n1", period_id(1))]["settled"], rows[("n1", period_id(1))]["failed"]) \
            == (0, 1)
        assert all(rows[("n2", period_id(h))]["reasons"] == ["stake_missing"]
                   for h in range(3))
        assert ok(await ledger.check())["ok"] is True


async def test_without_stake_rules_a_node_is_paid_for_service_alone(backend: Backend) -> None:
    clock = FixedClock(T0)
    settings = replace(LedgerSettings(), require_stake=False)
    async with open_ledger(backend, clock, settings) as (ledger, _):
        await ledger.observer_heartbeat()
        await setup_node(ledger, stake=None)
        await fund(ledger)
        await use(ledger, "1")
        clock.advance(HOUR + 600)
        await ledger.observer_heartbeat()
        assert ok(await ledger.finalize("admin", P0, body(node_id="n1")))["eligible"] is True

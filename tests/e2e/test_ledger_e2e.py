"""The ledger end to end (issue 15's proof), on SQLite and PostgreSQL: an agent naming its node
in ``register`` leaves a claim, the node's operator confirms the platform, usage is held, and
trio's MockClock moves past the period: the settler pays it; or, with the tunnel killed in the
middle of the period, refunds it with ``health_miss``. Everything through real sockets: the
agent's tunnel, the HTTP API, the store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from eecp.dev import pki as devpki
from tests.databases import Backend
from tests.harness import FakeAgent, real_deadline, running_agent
from tests.ledgerkit import UPTIME, LedgerPlane, bearer, open_ledger_plane

NODE = "acme-1"
VCPU_HOURS = "0.02"  # at $0.50 per vCPU-hour: $0.01
AMOUNT = 10_000


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=41)


async def until(plane: LedgerPlane, path: str, done: Callable[[dict[str, Any]], bool],
                token: str | None = None) -> dict[str, Any]:
    """GET ``path`` until ``done(body)`` (real time; the clock does not move)."""
    doc: dict[str, Any] = {}
    async with real_deadline(15):
        while True:
            doc = await plane.ok("GET", path, **({"token": token} if token else {}))
            if done(doc):
                return doc
            await trio.to_thread.run_sync(time.sleep, 0.02)


async def metrics_showing(plane: LedgerPlane, line: str) -> str:
    """The metrics once they show ``line`` (the counts' pass runs its store reads in real
    time after the clock reached it)."""
    async with real_deadline(15):
        while line not in (text := (await plane.call("GET", "/metrics", None)).text):
            await trio.to_thread.run_sync(time.sleep, 0.02)
    return text


async def bound_agent(plane: LedgerPlane, agent: FakeAgent, ppid: bytes) -> None:
    """Attested, claimed, confirmed by the node's operator, bound (§7.1)."""
    await agent.wait_status("attested")
    token = plane.node_tokens[NODE]
    node = await until(plane, f"/v1/nodes/{NODE}", lambda d: bool(d["claims"]), token)
    assert [c["ppid"] for c in node["claims"]] == [ppid.hex()]
    assert node["claims"][0]["agent_id"] == agent.agent_id and node["agents"] == []
    confirmed = await plane.ok("POST", f"/v1/nodes/{NODE}/platforms", token,
                               json={"ppid": ppid.hex()})
    assert (confirmed["node_id"], confirmed["ppid"]) == (NODE, ppid.hex())
    node = await plane.ok("GET", f"/v1/nodes/{NODE}", token)
    assert node["platforms"] == [ppid.hex()] and node["claims"] == []
    assert [(a["agent_id"], a["up"]) for a in node["agents"]] == [(agent.agent_id, True)]
    app = await plane.cp.app("shop")
    assert [(a["ppid"], a["node_id"]) for a in app["agents"]] == [(ppid.hex(), NODE)]


async def report(plane: LedgerPlane, period: str, before: int = 5_000_000) -> dict[str, Any]:
    """Usage of alice on the node (``before``: her balance until then)."""
    held = await plane.ok("POST", "/v1/usage/report", UPTIME, json={
        "account_id": "alice", "node_id": NODE, "period": period, "vcpu_hours": VCPU_HOURS})
    assert (held["status"], held["amount_micros"]) == ("held", AMOUNT)
    balance = await plane.ok("GET", "/v1/balances/alice")
    assert balance["balance_micros"] == before - AMOUNT
    return held


async def settled(plane: LedgerPlane, period: str) -> dict[str, Any]:
    return await until(plane, f"/v1/settlements/{period}?node_id={NODE}",
                       lambda d: d["status"] != "open")


async def test_a_bound_agents_usage_is_settled_and_paid(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        await plane.create_node(NODE)
        await plane.fund("alice", "5")
        ppid = uuid.uuid4().bytes
        async with running_agent(plane.agent(NODE, ppid)) as agent:
            await bound_agent(plane, agent, ppid)
            start, period = plane.period()
            await report(plane, period)
            early = await plane.call("POST", f"/v1/settlements/{period}/finalize",
                                     json={"node_id": NODE})
            assert (early.status_code, early.json()["error"]) == (409, "period_not_ended")
            # past the period and the settlement delay, to the settler's next pass
            await plane.advance(start + 60 + 10 - plane.now + 15)
            result = await settled(plane, period)
            assert (result["status"], result["eligible"], result["reasons"]) == (
                "settled", True, [])
            assert (result["posted_micros"], result["voided_micros"]) == (AMOUNT, 0)
            assert (result["settled"], result["failed"], result["settled_by"]) == (
                1, 0, "settler")
            payout = await plane.ok("GET", f"/v1/balances/node:{NODE}",
                                    plane.node_tokens[NODE])
            assert payout["balance_micros"] == AMOUNT  # the stake left it, the usage came in
            assert (await plane.ok("GET", "/v1/balances/alice"))["balance_micros"] == (
                5_000_000 - AMOUNT)
            # a manual finalize now answers the stored result, byte for byte
            again = await plane.call("POST", f"/v1/settlements/{period}/finalize",
                                     json={"node_id": NODE})
            assert again.status_code == 200 and again.json() == result
            await plane.advance(60)  # the metrics' counts are refreshed every minute
            metrics = await metrics_showing(
                plane, 'eecp_ledger_transfers_total{code="usage_post"} 1.0')
            assert 'eecp_settlements_total{outcome="pass"} 1.0' in metrics
            assert "eecp_ledger_invariant_ok 1.0" in metrics


async def test_a_tunnel_killed_in_the_period_refunds_it_with_health_miss(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        await plane.create_node(NODE)
        await plane.fund("alice", "5")
        ppid = uuid.uuid4().bytes
        start, period = plane.period()
        async with running_agent(plane.agent(NODE, ppid)) as agent:
            await bound_agent(plane, agent, ppid)
            await report(plane, period)
            await plane.advance(min(10.0, start + 60 - plane.now - 5))
        # the tunnel is gone, with the period still running
        node = await until(plane, f"/v1/nodes/{NODE}",
                           lambda d: [a["up"] for a in d["agents"]] == [False],
                           plane.node_tokens[NODE])
        assert node["agents"][0]["agent_id"] == agent.agent_id
        down_at = plane.now
        await plane.advance(start + 60 + 10 - plane.now + 15)
        result = await settled(plane, period)
        assert (result["status"], result["eligible"], result["reasons"]) == (
            "settled", False, ["health_miss"])
        assert (result["posted_micros"], result["voided_micros"]) == (0, AMOUNT)
        assert (result["settled"], result["failed"]) == (0, 1)
        (miss,) = result["misses"]
        assert (miss["agent_id"], miss["app"], miss["cause"]) == (
            agent.agent_id, "shop", "disconnected:peer_closed")
        assert result["down_seconds"] == pytest.approx(start + 60 - down_at, abs=1)
        # refunded: alice has all of it again, the node nothing
        assert (await plane.ok("GET", "/v1/balances/alice"))["balance_micros"] == 5_000_000
        payout = await plane.call("GET", f"/v1/balances/node:{NODE}",
                                  headers=bearer(plane.node_tokens[NODE]), token=None)
        assert payout.json()["balance_micros"] == 0


async def test_a_quick_restart_of_eecp_is_excused_and_a_long_outage_held(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend) -> None:
    ppid = uuid.uuid4().bytes
    async with trio.open_nursery() as outlives:  # the agent outlives the first eecp
        async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
            await plane.create_node(NODE)
            await plane.fund("alice", "5")
            tokens = dict(plane.node_tokens)
            agent = plane.agent(NODE, ppid)
            await outlives.start(agent.run)
            await bound_agent(plane, agent, ppid)
            start, period = plane.period()
            await report(plane, period)
            await plane.advance(5)
        # eecp stopped (gracefully) under its connected agent; it is back 15 s later
        await agent.wait_closed()
        outlives.cancel_scope.cancel()
    mock_clock.jump(15)
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        plane.node_tokens.update(tokens)
        await plane.advance(10)  # the agent takes 10 s to dial again: within the grace
        async with running_agent(plane.agent(NODE, ppid, agent_id=agent.agent_id)) as again:
            await again.wait_status("attested")
            # (this eecp's settler passes at its start and a minute later)
            await plane.advance(start + 60 + 10 - plane.now + 35)
            result = await settled(plane, period)
            assert (result["status"], result["eligible"], result["reasons"]) == (
                "settled", True, [])  # the restart's gap and reconnect are not downtime
            assert result["misses"] == [] and result["posted_micros"] == AMOUNT
            await plane.advance(plane.period(1)[0] - plane.now + 5)  # into the next period
            _, later = plane.period()
            await report(plane, later, before=5_000_000 - AMOUNT)
    # now all of eecp is down for two minutes, from 5 s into that period: it is held (eecp did
    # not watch it), then decided by the admin
    mock_clock.jump(120)
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        held = await settled(plane, later)
        assert (held["status"], held["reasons"]) == ("held", ["observer_gap"])
        decided = await plane.ok("POST", f"/v1/settlements/{later}/finalize", json={
            "node_id": NODE, "decision": "pay", "note": "eecp's outage, not the node's"})
        assert (decided["status"], decided["settled_by"], decided["posted_micros"]) == (
            "settled", "admin", AMOUNT)

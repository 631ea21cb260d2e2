"""Stake end to end (issue 16's proof), on SQLite and PostgreSQL, through real sockets: the
agents' tunnels, the proxy listener, the HTTP API, the store.

* A premium node's agent is cut off for two minutes, across a period boundary: the node is
  slashed once (not once per period of the one outage), to ``slash:platform``.
* The proxy prefers the cheaper node's agent; a fraud signal (a TD with the DEBUG bit, minted
  on the cheaper node's platform) suspends that node, and its traffic moves to the other
  node's agent at once; with no other agent, resolve says ``node_suspended``. The owner's
  ``/fraud`` with that audit entry bans the node, and its platform's next attestation is
  refused ``platform_banned``. ``GET /v1/ledger/check`` is ok at the end of each (the plane
  checks it).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from trio.testing import MockClock

from eecp.dev import pki as devpki
from eecp.dev.mint import DEFAULT_TD_ATTRIBUTES
from tests.databases import Backend
from tests.e2e.test_ledger_e2e import metrics_showing, until
from tests.fakehttp import FakeServer, Request, Response, open_fake_http
from tests.harness import FakeAgent, resolve_until, running_agent
from tests.ledgerkit import LAUNCHER, LedgerPlane, key, open_ledger_plane

DEBUG_BIT = 1
CHEAP, DEAR = "acme-1", "bolt-2"


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=43)


@asynccontextmanager
async def open_named_backend(name: str) -> AsyncIterator[FakeServer]:
    async def handle(request: Request) -> Response:
        return Response(200, f"hello from {name}".encode())

    async with open_fake_http(handle) as server:
        yield server


async def register(plane: LedgerPlane, node_id: str, *, price: str, tier: str = "standard",
                   capacity: int = 1, stake: str = "2") -> None:
    """A node with its terms from the start, funded and staked."""
    doc = await plane.ok("POST", "/v1/nodes/register", json={
        "node_id": node_id, "price_usd_per_vcpu_hour": price, "capacity_vcpus": capacity,
        "stake_tier": tier})
    plane.node_tokens[node_id] = str(doc["node_token"])
    await plane.fund(f"node:{node_id}", stake)
    await plane.ok("POST", "/v1/nodes/register", json={
        "node_id": node_id, "stake_amount_usd": stake, "allow_update": True})


async def bind(plane: LedgerPlane, node_id: str, agent: FakeAgent, ppid: bytes) -> None:
    """The agent attested and its platform confirmed by the node's operator."""
    await agent.wait_status("attested")
    token = plane.node_tokens[node_id]
    await until(plane, f"/v1/nodes/{node_id}", lambda d: bool(d["claims"]), token)
    await plane.ok("POST", f"/v1/nodes/{node_id}/platforms", token, json={"ppid": ppid.hex()})
    await until(plane, f"/v1/nodes/{node_id}",
                lambda d: [a["agent_id"] for a in d["agents"] if a["up"]] == [agent.agent_id],
                token)


async def served_by(plane: LedgerPlane, times: int = 6) -> set[str]:
    """Which backends answered ``times`` proxied requests for the app."""
    seen = set()
    async with httpx.AsyncClient(timeout=None) as client:
        for _ in range(times):
            response = await client.get(plane.cp.proxy_url + "/hello",
                                        headers={"Host": "shop.app.example.com"})
            assert response.status_code == 200, response.text
            seen.add(response.text)
    return seen


def node_agent(plane: LedgerPlane, node_id: str, ppid: bytes, backend: FakeServer | None = None,
               **mint: Any) -> FakeAgent:
    return FakeAgent(plane.cp.ws_url, plane.cp.pki, register_extra={"node_id": node_id},
                     mint_kwargs={"ppid": ppid, **mint},
                     backend_url=backend.url if backend is not None else None)


async def fraud_moves_traffic(plane: LedgerPlane, agent_a: FakeAgent, ppid_a: bytes) -> None:
    """Both nodes' agents bound: the cheaper one's serves; a debug TD on its platform suspends
    its node and the traffic moves."""
    assert await served_by(plane) == {"hello from a"}  # the cheaper node first
    listed = await plane.ok("GET", "/v1/nodes", LAUNCHER)
    assert [n["node_id"] for n in listed["nodes"]] == [CHEAP, DEAR]

    # a TD with the DEBUG bit on the cheap node's platform: refused, and a signal
    debug = node_agent(plane, CHEAP, ppid_a,
                       td_attributes=DEFAULT_TD_ATTRIBUTES | DEBUG_BIT)
    async with running_agent(debug):
        closed = await debug.wait_closed()
    assert closed[1] is not None and "debug_td" in closed[1], closed
    node = await until(plane, f"/v1/nodes/{CHEAP}",
                       lambda d: d["status"] == "suspended")
    reason = node["status_reason"]
    assert reason.startswith("fraud_suspected:")
    audit_id = int(reason.split(":")[1])
    app = await plane.cp.app("shop")
    entry = next(e for e in app["audit"] if e["id"] == audit_id)
    assert (entry["reason"], entry["platform_id"]) == ("debug_td", ppid_a.hex())
    # its agent leaves routing at once (it stays connected: the owner decides)
    assert await served_by(plane) == {"hello from b"}
    assert agent_a.closed is None
    listed = await plane.ok("GET", "/v1/nodes", LAUNCHER)
    assert [n["node_id"] for n in listed["nodes"]] == [DEAR]


async def test_one_outage_of_a_premium_node_is_slashed_once(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane:
        # premium at $0.002 x 1 vCPU: a penalty of 720 h of list revenue, $1.44
        await register(plane, CHEAP, price="0.002", tier="premium")
        ppid = uuid.uuid4().bytes
        agent = node_agent(plane, CHEAP, ppid)
        token = plane.node_tokens[CHEAP]
        async with running_agent(agent):
            await bind(plane, CHEAP, agent, ppid)
            await plane.advance(5)  # (events at one instant are ordered down before up)
        await until(plane, f"/v1/nodes/{CHEAP}",
                    lambda d: [a["up"] for a in d["agents"]] == [False], token)
        # two minutes without the agent: at least two periods over premium's 25.92 s
        await plane.advance(120)
        back = node_agent(plane, CHEAP, ppid)
        back.agent_id = agent.agent_id
        async with running_agent(back):
            await back.wait_status("attested")
            await plane.advance(4 * 60)  # the periods of the outage and after are settled
            _, last = plane.period(-1)
            await until(plane, f"/v1/settlements/{last}?node_id={CHEAP}",
                        lambda d: d["status"] == "settled")
            node = await plane.ok("GET", f"/v1/nodes/{CHEAP}", token)
        outage = [p for p in node["recent_periods"] if p["down_seconds"] > 0]
        assert len(outage) >= 2 and all(p["outcome"] == "fail" for p in outage), (
            node["recent_periods"], node["slashes"])
        assert node["recent_periods"][-1]["down_seconds"] == 0  # after the outage: up
        assert [s["amount_micros"] for s in node["slashes"]] == [1_440_000], node["slashes"]
        stake = await plane.ok("GET", f"/v1/balances/stake:{CHEAP}", token)
        assert stake["balance_micros"] == 2_000_000 - 1_440_000
        assert (await plane.ok("GET", "/v1/balances/slash:platform"))["balance_micros"] == (
            1_440_000)
        await plane.advance(60)  # the metrics' counts, refreshed every minute
        metrics = await metrics_showing(plane, 'eecp_slashes_total{kind="availability"} 1.0')
        assert "eecp_stake_posted_micros 560000.0" in metrics


async def test_a_fraud_signal_moves_traffic_and_the_owner_bans_the_node(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, backend: Backend) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock, backend) as plane, \
            open_named_backend("a") as backend_a, open_named_backend("b") as backend_b:
        # standard: 24 h of list revenue staked, $12 and $19.20
        await register(plane, CHEAP, price="0.5", stake="12")
        await register(plane, DEAR, price="0.8", stake="20")  # 60 % dearer: out of the band
        ppid_a, ppid_b = uuid.uuid4().bytes, uuid.uuid4().bytes
        # the dearer node's agent first: the registry's order (today's pick) would try it first
        async with running_agent(node_agent(plane, DEAR, ppid_b, backend_b)) as agent_b:
            await bind(plane, DEAR, agent_b, ppid_b)
            assert await served_by(plane) == {"hello from b"}
            async with running_agent(node_agent(plane, CHEAP, ppid_a, backend_a)) as agent_a:
                await bind(plane, CHEAP, agent_a, ppid_a)
                await fraud_moves_traffic(plane, agent_a, ppid_a)
        audit_id = int((await plane.ok("GET", f"/v1/nodes/{CHEAP}"))["status_reason"].split(
            ":")[1])
        # with only the suspended node's agent left, the app is not served
        async with running_agent(node_agent(plane, CHEAP, ppid_a, backend_a)) as agent_a:
            await agent_a.wait_status("attested")
            body = await resolve_until(plane.cp, "shop",
                                       lambda b: b["reason"] == "node_suspended")
            assert body["allowed"] is False

            # the owner bans the node with the audit entry as evidence
            banned = await plane.ok("POST", f"/v1/nodes/{CHEAP}/fraud", headers=key(), json={
                "audit_ids": [audit_id], "note": "debug TD on acme-1's platform"})
            assert (banned["status"], banned["slashed_micros"]) == ("banned", 12_000_000)
            again = await plane.call("POST", f"/v1/nodes/{CHEAP}/fraud", json={
                "audit_ids": [audit_id], "note": "debug TD on acme-1's platform"})
            assert again.json() == banned  # once
            stake = await plane.ok("GET", f"/v1/balances/stake:{CHEAP}")
            assert stake["balance_micros"] == 0
        # the same hardware cannot come back, under this node id or any other
        returning = node_agent(plane, DEAR, ppid_a)
        async with running_agent(returning):
            closed = await returning.wait_closed()
        assert closed[1] is not None and "platform_banned" in closed[1], closed
        cleared = await plane.call("POST", f"/v1/nodes/{CHEAP}/status",
                                   json={"status": "active"})
        assert (cleared.status_code, cleared.json()["error"]) == (409, "node_inactive")

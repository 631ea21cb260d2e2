"""Kill eecp, start it again on the same database: registrations are there, our agents
reconnect by themselves and resolve answers 200 again with no manual step (real clock)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import trio

from agent.agent import build_provider
from agent.config import from_env as agent_env
from agent.tunnel import AgentState, run_agent
from eecp.dev import pki as devpki
from tests import harness
from tests.fakehttp import Request, Response, open_fake_http

AGENTS = ("5f0c6f2e-8c1a-4f57-9d3e-2b7a4c1d9e01", "5f0c6f2e-8c1a-4f57-9d3e-2b7a4c1d9e02")


async def backend_health(request: Request) -> Response:
    return Response.json('{"ok":true}')


async def wait_resolve(cp: harness.ControlPlane, app: str, status: int) -> dict[str, object]:
    async with harness.real_deadline(15):
        while True:
            response = await cp.resolve(app)
            if response.status_code == status:
                return dict(response.json())
            await trio.to_thread.run_sync(time.sleep, 0.02)


async def attested_in_audit(cp: harness.ControlPlane, at_least: int) -> int:
    """How many "attested" entries the app's audit shows, once it shows ``at_least`` (or after
    15 s): an agent counts an attestation when it answers, and eecp's verdict follows."""
    attested = 0
    async with harness.real_deadline(15):
        while attested < at_least:
            audit = (await cp.app("shop"))["audit"]
            attested = len([e for e in audit if e["reason"] == "attested"])
            await trio.to_thread.run_sync(time.sleep, 0.01)
    return attested


async def test_restart_keeps_registrations_and_agents_come_back(tmp_path: Path) -> None:
    pki = devpki.make_pki(seed=21)
    root = devpki.save_pki(pki, tmp_path / "pki")
    async with harness.open_upstreams(pki) as (pccs, github), \
            open_fake_http(backend_health) as backend, trio.open_nursery() as agents:
        env = harness.control_plane_env(tmp_path, pki, pccs.url, github.url,
                                        EE_DCAP_ROOT_CA=str(root))
        stop = trio.Event()
        async with harness.open_control_plane(env, pki, pccs, github) as cp:
            states: list[AgentState] = []
            for agent_id in AGENTS:
                config = agent_env({
                    "EE_CONTROL_WS": cp.ws_url, "EE_REPO": harness.REPO,
                    "EE_RELEASE_TAG": harness.TAG, "EE_APP_NAME": "shop",
                    "EE_NETWORK": "forge-1", "EE_BACKEND_URL": backend.url,
                    "EE_AGENT_ID": agent_id, "EE_QUOTE_PROVIDER": "dev",
                    "EE_DEV_PKI_DIR": str(tmp_path / "pki"), "EE_RECONNECT_MIN_SEC": "0.05",
                    "EE_RECONNECT_MAX_SEC": "0.2", "EE_TUNNEL_PING_INTERVAL_SEC": "0"})
                states.append(await agents.start(partial(
                    run_agent, config, build_provider(config), harness.MEAS, stop=stop)))
            body = await wait_resolve(cp, "shop", 200)
            assert body["agents"] in (1, 2)
            async with harness.real_deadline(15):
                for state in states:
                    await state.wait_for(lambda s: s.attestations >= 1)
            assert await attested_in_audit(cp, 2) == 2
            before = await cp.app("shop")
            port = cp.bound.control_port
        # eecp is gone; the agents keep dialling the same address
        async with harness.real_deadline(15):
            for state in states:
                await state.wait_for(lambda s: not s.connected)
        env = {**env, "EE_CONTROL_PORT": str(port)}
        async with harness.open_control_plane(env, pki, pccs, github) as cp:
            after = await cp.app("shop")  # straight from the store, before anyone reconnects
            assert (after["repo"], after["release_tag"], after["expires_at"]) == (
                before["repo"], before["release_tag"], before["expires_at"])
            assert {a["agent_id"] for a in after["agents"]} == set(AGENTS)
            assert [e["reason"] for e in after["audit"]][-2:] == ["attested", "attested"]
            body = await wait_resolve(cp, "shop", 200)
            assert body["registration_state"] == "active"
            async with harness.real_deadline(15):
                for state in states:
                    await state.wait_for(lambda s: s.connections >= 2 and s.attestations >= 2)
            assert await attested_in_audit(cp, 4) == 4  # both re-attested, once each
            stop.set()


async def test_restart_needs_no_pccs_while_stored_collateral_is_valid(tmp_path: Path) -> None:
    pki = devpki.make_pki(seed=22)
    async with harness.open_upstreams(pki) as (pccs, github):
        env = harness.control_plane_env(tmp_path, pki, pccs.url, github.url)
        async with harness.open_control_plane(env, pki, pccs, github) as cp, \
                harness.running_agent(harness.FakeAgent(cp.ws_url, pki)) as agent:
            await agent.wait_status("attested")
        fetched = pccs.total_hits
        assert fetched >= 4
        pccs.up = False  # the PCCS is down from now on
        async with harness.open_control_plane(env, pki, pccs, github) as cp, \
                harness.running_agent(harness.FakeAgent(cp.ws_url, pki)) as agent:
            await agent.wait_status("attested")
            assert (await cp.resolve("shop")).status_code == 200
        assert pccs.total_hits == fetched  # served from the store, the PCCS never answered

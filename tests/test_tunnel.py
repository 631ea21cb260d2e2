"""Agent tunnels end to end: real WebSockets into serve(), minted quotes through real dcap-qvl,
time driven by trio's MockClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from tests import quotefactory as qf
from tests.harness import (
    MEAS,
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    running_agent,
)


@dataclass
class World:
    cp: ControlPlane
    clock: MockClock
    pki: qf.TestPki

    def agent(self, **kwargs: object) -> FakeAgent:
        return FakeAgent(self.cp.ws_url, self.pki, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pki() -> qf.TestPki:
    return qf.make_pki(seed=11)


@pytest.fixture
async def world(tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock,
                request: pytest.FixtureRequest) -> AsyncIterator[World]:
    extra = getattr(request, "param", {})
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield World(cp, mock_clock, pki)


async def test_agent_registers_is_attested_and_resolves(world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        assert agent.challenges()[0]["reason"] == "register"
        assert agent.challenges()[0]["deadline_s"] == 30
        assert len(agent.challenges()[0]["nonce"]) == 64
        response = await world.cp.resolve("shop")
        body = response.json()
        assert response.status_code == 200, body
        assert body["allowed"] is True and body["reason"] == "ok"
        assert (body["app"], body["repo"], body["release_tag"], body["network"]) == (
            "shop", "acme/shop", "v1.2.0", "forge-1")
        assert body["registration_state"] == "active"
        assert body["connected"] is True and body["sealed"] is True
        assert body["attestation"]["status"] == "attested"
        assert response.headers["x-ee-allowed"] == "true"
        assert response.headers["x-ee-release-tag"] == "v1.2.0"
        assert response.headers["x-ee-registration-state"] == "active"
        detail = await world.cp.app("shop")
        assert [e["reason"] for e in detail["audit"]] == ["attested"]
        assert detail["audit"][0]["trigger"] == "register"
        assert detail["audit"][0]["rtmrs"][2] == qf.DEFAULT_RTMRS[2].hex()
        assert detail["agents"][0]["agent_id"] == agent.agent_id
    # the tunnel is gone: the app is no longer served
    response = await world.cp.resolve("shop")
    assert response.status_code == 403 and response.json()["reason"] == "not_connected"

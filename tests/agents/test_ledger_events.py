"""What agent sessions write for the ledger (spec §7.1, §8.2), through real tunnels into a
control plane with the ledger on: each event of §8.2's table with its cause, the node derived
from the confirmed platform, platform claims, a banned platform refused, and nothing at all
from a peer never admitted."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from eecp.dev import pki as devpki
from tests.harness import MEAS, eventually, running_agent
from tests.ledgerkit import LedgerPlane, open_ledger_plane

NODE = "acme-1"


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=43)


async def confirm(plane: LedgerPlane, ppid: bytes) -> None:
    await plane.ok("POST", f"/v1/nodes/{NODE}/platforms", plane.node_tokens[NODE],
                   json={"ppid": ppid.hex()})


async def test_a_sessions_life_is_recorded_on_the_node_of_its_platform(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock) as plane:
        await plane.create_node(NODE)
        ppid = uuid.uuid4().bytes
        async with running_agent(plane.agent(NODE, ppid)) as agent:
            await agent.wait_status("attested")
            # admitted on a platform no node owns yet: up, unbound; the claim waits
            assert await plane.wait_events(agent.agent_id, 1) == [("up", "attested", None)]
            # the claim follows the status the agent saw (the session writes it after)
            sql = "SELECT ppid, node_id, agent_id FROM platform_claim"
            await eventually(lambda: bool(plane.rows(sql)))
            assert plane.rows(sql) == [(ppid.hex(), NODE, agent.agent_id)]
            await confirm(plane, ppid)  # bound from now: its up is repeated on the node
            assert (await plane.wait_events(agent.agent_id, 2))[1] == (
                "up", "platform_confirmed", NODE)
            await agent.health("fail")
            await agent.wait_status("health_fail")
            await agent.health("pass")
            await agent.wait_status("health_restored")
            await plane.wait_events(agent.agent_id, 4)
        events = await plane.wait_events(agent.agent_id, 5)
        assert events[2:] == [("down", "health_fail", NODE), ("up", "health_restored", NODE),
                              ("down", "disconnected:peer_closed", NODE)]
        sessions = plane.rows("SELECT DISTINCT session_id, instance_id FROM availability_event")
        assert len(sessions) == 1  # one tunnel, watched by one instance
        app = await plane.cp.app("shop")
        assert [(a["ppid"], a["node_id"]) for a in app["agents"]] == [(ppid.hex(), NODE)]


async def test_silence_supersession_and_shutdown_are_told_apart(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    ppid = uuid.uuid4().bytes
    async with trio.open_nursery() as outlives:  # the second agent outlives eecp
        async with open_ledger_plane(tmp_path, pki, mock_clock,
                                     EE_HEALTH_TIMEOUT_SEC="20") as plane:
            await plane.create_node(NODE)
            first = plane.agent(NODE, ppid)
            async with running_agent(first):
                await first.wait_status("attested")
                await plane.wait_events(first.agent_id, 1)
                await confirm(plane, ppid)
                await plane.advance_until(
                    lambda: ("warning", "health_timeout") in first.statuses(), 60)
                assert (await plane.wait_events(first.agent_id, 3))[2] == (
                    "down", "health_timeout", NODE)
                second = plane.agent(NODE, ppid, agent_id=first.agent_id)
                await outlives.start(second.run)
                assert await first.wait_closed() == (4009, "superseded")
                await second.wait_status("attested")
                events = await plane.wait_events(first.agent_id, 5)
                assert sorted(events[3:]) == [("down", "superseded", NODE),
                                              ("up", "attested", NODE)]
                sessions = {r[0] for r in plane.rows(
                    "SELECT session_id FROM availability_event")}
                assert len(sessions) == 2
        await second.wait_closed()  # eecp stopped
        outlives.cancel_scope.cancel()
    # eecp stopped with the second session up: an excused down, then the observer's stop
    with sqlite3.connect(tmp_path / "eecp.db") as conn:
        last = conn.execute("SELECT kind, reason, node_id FROM availability_event "
                            "ORDER BY at DESC, id DESC LIMIT 1").fetchone()
        assert last == ("down", "observer_shutdown", NODE)
        (stopped,) = conn.execute("SELECT stopped_at FROM observer").fetchone()
        assert stopped is not None


async def test_a_later_refused_or_missed_attestation_is_the_sessions_last_down(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock,
                                 EE_ATTEST_INTERVAL_SEC="30") as plane:
        await plane.create_node(NODE)
        refused = plane.agent(NODE)
        async with running_agent(refused):
            await refused.wait_status("attested")
            await plane.wait_events(refused.agent_id, 1)
            refused.claimed = MEAS.__class__("f" * 64, MEAS.agent_py_sha256,
                                             MEAS.vm_image_id, MEAS.sealed)
            # the clock moves to the next challenge only: the refusal and its close handshake
            # then run in real time (a clock jumping on meanwhile expired its timeouts: 1006)
            await plane.advance_until(lambda: len(refused.challenges()) >= 2, 60)
            assert await refused.wait_closed() == (4003, "measurements_binding_mismatch")
        assert await plane.wait_events(refused.agent_id, 2) == [
            ("up", "attested", None), ("down", "attestation_refused:"
                                       "measurements_binding_mismatch", None)]
        silent = plane.agent(NODE)
        async with running_agent(silent):
            await silent.wait_status("attested")
            silent.auto = False
            await plane.advance_until(lambda: len(silent.challenges()) >= 2, 60)
            await plane.advance(35)  # past the challenge's deadline (EE_ATTEST_DEADLINE_SEC)
            assert await silent.wait_closed() == (4002, "attestation_timeout")
        assert await plane.wait_events(silent.agent_id, 2) == [
            ("up", "attested", None), ("down", "attestation_timeout", None)]
        await plane.advance(10)  # (nothing more comes: the outbox is empty)
        assert len(plane.events(refused.agent_id)) == len(plane.events(silent.agent_id)) == 2


async def test_a_peer_never_admitted_writes_nothing_and_claims_nothing(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock) as plane:
        await plane.create_node(NODE)
        stranger = plane.agent(NODE, claimed=MEAS.__class__(
            "f" * 64, MEAS.agent_py_sha256, MEAS.vm_image_id, MEAS.sealed))
        async with running_agent(stranger):
            assert await stranger.wait_closed() == (4003, "measurements_binding_mismatch")
        unknown_node = plane.agent("no-such-node")
        async with running_agent(unknown_node):
            await unknown_node.wait_status("attested")
            await plane.wait_events(unknown_node.agent_id, 1)
        await plane.advance(10)
        assert plane.events(stranger.agent_id) == []
        # a TD naming a node that does not exist leaves no claim (no rows for any name)
        assert plane.rows("SELECT COUNT(*) FROM platform_claim") == [(0,)]


async def test_a_platform_of_a_banned_node_is_refused_at_attestation(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock) as plane:
        await plane.create_node(NODE)
        ppid = uuid.uuid4().bytes
        async with running_agent(plane.agent(NODE, ppid)) as agent:
            await agent.wait_status("attested")
            await plane.wait_events(agent.agent_id, 1)
            await confirm(plane, ppid)
        await plane.wait_events(agent.agent_id, 3)
        # (a ban is the fraud endpoint's, the next issue's: set here as it will leave it)
        conn = sqlite3.connect(plane.cp.config.db_path)
        with conn:
            conn.execute("UPDATE node SET status = 'banned' WHERE node_id = ?", (NODE,))
        conn.close()
        again = plane.agent(None, ppid)  # another TD on the banned hardware, naming nothing
        async with running_agent(again):
            assert await again.wait_closed() == (4003, "platform_banned")
        app = await plane.cp.app("shop")
        assert app["audit"][0]["reason"] == "platform_banned"
        assert app["audit"][0]["platform_id"] == ppid.hex()
        assert plane.events(again.agent_id) == []


async def test_an_expired_registration_releases_the_agent_and_a_renewal_expects_it_again(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_ledger_plane(tmp_path, pki, mock_clock, EE_REGISTRATION_TTL_DAYS="0.0005",
                                 EE_REGISTRATION_WARN_DAYS="0.0001") as plane:
        await plane.create_node(NODE)
        ppid = uuid.uuid4().bytes
        async with running_agent(plane.agent(NODE, ppid)) as agent:
            await agent.wait_status("attested")
            await plane.wait_events(agent.agent_id, 1)
            await confirm(plane, ppid)
            # 43 s of registration: then the app is not served, which is not the node's doing
            await plane.advance_until(
                lambda: ("invalid", "registration_expired") in agent.statuses(), 120)
            assert (await plane.wait_events(agent.agent_id, 3))[2] == (
                "release", "app_gone", NODE)
            node = await plane.ok("GET", f"/v1/nodes/{NODE}")
            assert node["agents"] == []  # no longer expected on the node
            await agent.send(agent.register_message())  # renewed: expected again
            assert (await plane.wait_events(agent.agent_id, 4))[3] == ("up", "attested", NODE)

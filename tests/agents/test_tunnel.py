"""Agent tunnels end to end: real WebSockets into serve(), minted quotes through real dcap-qvl,
time driven by trio's MockClock."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from trio.testing import MockClock

from eecp import cli
from eecp.agents.session import AgentSession
from eecp.attestation import engine as engine_module
from eecp.core.clock import isoformat
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.store.records import AgentRecord
from eecp.store.store import Tx
from eecp.wire.measurements import Measurements
from tests.harness import (
    ASSET,
    MEAS,
    REPO,
    START,
    ControlPlane,
    FakeAgent,
    allowlist_doc,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    real_deadline,
    resolve_until,
    running_agent,
)


@dataclass
class World:
    cp: ControlPlane
    clock: MockClock
    pki: devpki.DevPki

    def agent(self, **kwargs: object) -> FakeAgent:
        return FakeAgent(self.cp.ws_url, self.pki, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=11)


@pytest.fixture
async def world(tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
                request: pytest.FixtureRequest) -> AsyncIterator[World]:
    # pytest-trio runs a test under the clock the *test* requests: every test here asks for
    # ``mock_clock``, and this makes sure none forgets
    assert trio.lowlevel.current_clock() is mock_clock, "request mock_clock in the test"
    extra = getattr(request, "param", {})
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield World(cp, mock_clock, pki)


async def test_agent_registers_is_attested_and_resolves(
        mock_clock: MockClock, world: World) -> None:
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
        assert detail["audit"][0]["rtmrs"][2] == devmint.DEFAULT_RTMRS[2].hex()
        assert detail["agents"][0]["agent_id"] == agent.agent_id
    # the tunnel is gone: the app is no longer served
    body = await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
    assert body["allowed"] is False and body["reason"] == "not_connected"


async def jump_until_closed(world: World, agent: FakeAgent, step: float) -> None:
    """Move the clock by ``step`` until the agent's socket closes (the server may not have
    armed its deadline yet when the first jump happens)."""
    async with real_deadline(10):
        while agent.closed is None:
            world.clock.jump(step)
            await trio.to_thread.run_sync(time.sleep, 0.02)


async def health_seen(world: World, app: str, at: float) -> None:
    """Wait until the server has processed a health message sent at ``at``."""
    async with real_deadline(10):
        while not any(a["health_at"] == isoformat(at)
                      for a in (await world.cp.app(app))["agents"]):
            await trio.to_thread.run_sync(time.sleep, 0.005)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"answer_nonce": bytes(32)}, "nonce_mismatch"),
    ({"mint_kwargs": {"rtmrs": (devmint.DEFAULT_RTMRS[0], bytes(48), *devmint.DEFAULT_RTMRS[2:])}},
     "quote_measurement_mismatch:rtmr1"),
    ({"measurements": replace(MEAS, agent_py_sha256="d" * 64)},
     "measurement_mismatch:agent_py_sha256"),
    ({"claimed": replace(MEAS, agent_py_sha256="d" * 64)}, "measurements_binding_mismatch"),
    ({"measurements": replace(MEAS, sealed=False)}, "sealed_required"),
    ({"mint_kwargs": {"pcesvn": devmint.OUTDATED_PCESVN}}, "tcb_status:OutOfDate"),
    ({"mint_kwargs": {"td_attributes": devmint.SEPT_VE_DISABLE_BIT | devmint.DEBUG_BIT}},
     "debug_td"),
    ({"tag": "v9.9.9"}, "allowlist_not_found"),
])
async def test_refused_attestations_close_with_their_reason(
        mock_clock: MockClock, world: World, kwargs: dict[str, object], reason: str) -> None:
    async with running_agent(world.agent()) as good:
        await good.wait_status("attested")
        async with running_agent(world.agent(**kwargs)) as bad:
            code, close_reason = await bad.wait_closed()
            assert (code, close_reason) == (4003, reason)
            assert bad.statuses()[-1] == ("invalid", reason)
        # the other agent is undisturbed and the app still served by it
        assert good.closed is None
        assert (await world.cp.resolve("shop")).status_code == 200
        audit = (await world.cp.app("shop"))["audit"]
        assert [(e["verdict"], e["reason"]) for e in audit[:2]] == [
            ("refused", reason), ("accepted", "attested")]


async def test_refused_first_agent_leaves_app_unknown(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent(answer_nonce=bytes(32))) as bad:
        assert await bad.wait_closed() == (4003, "nonce_mismatch")
    response = await world.cp.resolve("shop")
    assert response.status_code == 403 and response.json()["reason"] == "unknown_app"


async def test_unsealed_accepted_on_sandbox(mock_clock: MockClock, world: World) -> None:
    unsealed = replace(MEAS, sealed=False)
    async with running_agent(world.agent(app="lab", network="sandbox-1",
                                         measurements=unsealed)) as agent:
        await agent.wait_status("attested")
        body = (await world.cp.resolve("lab")).json()
        assert body["allowed"] is True and body["sealed"] is False
        assert body["network"] == "sandbox-1"


async def test_app_name_owned_by_another_repo(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as owner:
        await owner.wait_status("attested")
        async with running_agent(world.agent(repo="evil/shop")) as thief:
            assert await thief.wait_closed() == (4004, "app_name_taken")
            assert thief.challenges() == []  # refused before any challenge
        async with running_agent(world.agent(network="sandbox-1")) as mover:
            assert await mover.wait_closed() == (4004, "network_mismatch")
    assert (await world.cp.app("shop"))["repo"] == "acme/shop"


async def test_newer_tag_of_same_repo_takes_over(mock_clock: MockClock, world: World) -> None:
    world.cp.github.add_release("acme/shop", "v1.3.0", {
        "agent-attestation-allowlist.json": allowlist_doc()})
    async with running_agent(world.agent()) as old:
        await old.wait_status("attested")
        async with running_agent(world.agent(tag="v1.3.0")) as new:
            await new.wait_status("attested")
            body = (await world.cp.resolve("shop")).json()
            assert body["release_tag"] == "v1.3.0" and body["allowed"] is True
            detail = await world.cp.app("shop")
            assert {a["release_tag"] for a in detail["agents"]} == {"v1.2.0", "v1.3.0"}
        # only the old tag's agent is left: it no longer serves the app
        body = await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
        assert body["allowed"] is False and body["release_tag"] == "v1.3.0"
        assert old.closed is None


async def test_late_answer_fails_the_attestation(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent(auto=False)) as agent:
        await agent.wait_for(lambda a: len(a.challenges()) == 1)
        world.clock.jump(29)
        await agent.health()
        assert agent.closed is None
        await jump_until_closed(world, agent, 2)
        assert agent.closed == (4002, "attestation_timeout")
        assert ("invalid", "attestation_timeout") in agent.statuses()
    audit = await world.cp.get("/v1/apps/shop", headers=world.cp.admin_headers)
    assert audit.status_code == 404  # never registered: nothing to show


async def test_register_must_arrive_in_time(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent(), register=False) as agent:
        await jump_until_closed(world, agent, 31)
        assert agent.closed == (4001, "register_timeout")


@pytest.mark.parametrize(("payload", "status", "close"), [
    ("{not json", "invalid_json", 1007),
    ("[1, 2]", "not_an_object", 1007),
    ('{"type":"health","status":"meh"}', "invalid_field:status", 4005),
    ("x" * (1024 * 1024 + 10), "message_too_large", 1009),
    (b"\x00\x01binary", "invalid_frame:unknown_type", 4005),
])
async def test_malformed_messages_end_only_that_session(
        mock_clock: MockClock, world: World, payload: str | bytes, status: str, close: int
) -> None:
    async with running_agent(world.agent()) as good:
        await good.wait_status("attested")
        async with running_agent(world.agent(app="other")) as bad:
            await bad.wait_status("attested")
            await bad.send(payload)
            assert await bad.wait_closed() == (close, status)
            assert bad.statuses()[-1] == ("invalid", status)
        assert good.closed is None
        await good.health()
        assert (await world.cp.resolve("shop")).status_code == 200


async def test_bad_register_fields(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent(agent_id="not-a-uuid")) as agent:
        assert await agent.wait_closed() == (4005, "invalid_field:agent_id")
    async with running_agent(world.agent(repo="no-slash")) as agent:
        assert await agent.wait_closed() == (4005, "invalid_field:repo")
    async with running_agent(world.agent(app="Not_A_Label")) as agent:
        assert await agent.wait_closed() == (4005, "invalid_field:app_name")
    async with running_agent(world.agent(network="moon-1")) as agent:
        assert await agent.wait_closed() == (4004, "network_unknown")
    for bad in ("1", 0, True, 2**16):
        async with running_agent(world.agent(register_extra={"data_protocol": bad})) as agent:
            assert await agent.wait_closed() == (4005, "invalid_field:data_protocol"), bad
    for bad in ("Acme-1", "-acme", "a" * 64, "", 7, "acme_1"):
        async with running_agent(world.agent(register_extra={"node_id": bad})) as agent:
            assert await agent.wait_closed() == (4005, "invalid_field:node_id"), bad


@pytest.mark.parametrize("announced", [1, 3])
async def test_an_agent_speaking_another_data_protocol_is_refused_at_register(
        mock_clock: MockClock, world: World, announced: int | None) -> None:
    """Not on its first proxied request: frames the other side cannot read would end the
    tunnel (or lose the request) much later, and far from the cause."""
    async with running_agent(world.agent(register_extra={"data_protocol": announced})) as agent:
        assert await agent.wait_closed() == (4004, "data_protocol_unsupported")
        assert agent.statuses()[-1] == ("invalid", "data_protocol_unsupported")
    assert (await world.cp.resolve("shop")).status_code == 403


async def test_unknown_message_type_is_answered_not_fatal(
        mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        for _ in range(50):
            await agent.send('{"type":"telemetry","cpu":3}')
        await agent.health("fail")  # answered in order: every unknown one before it was read
        await agent.wait_status("health_fail")
        await agent.health("pass")
        await agent.wait_status("health_restored")
        # one answer for the lot: a peer that never reads cannot make eecp pile up writes
        assert agent.statuses().count(("warning", "unknown_type")) == 1
        assert agent.closed is None
        assert (await world.cp.resolve("shop")).status_code == 200


async def test_periodic_attestation_and_its_failure(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        world.clock.jump(3600)
        await agent.wait_for(lambda a: len(a.challenges()) == 2)
        assert agent.challenges()[1]["reason"] == "periodic"
        await agent.wait_for(lambda a: a.statuses().count(("ok", "attested")) == 2)
        await agent.health()
        assert (await world.cp.resolve("shop")).status_code == 200
        # the node changes under us: the next periodic challenge fails
        agent.mint_kwargs = {"rtmrs": (*devmint.DEFAULT_RTMRS[:3], b"\x09" * 48)}
        world.clock.jump(3600)
        assert await agent.wait_closed() == (4003, "quote_measurement_mismatch:rtmr3")
    response = await world.cp.resolve("shop")
    assert response.status_code == 403
    audit = (await world.cp.app("shop"))["audit"]
    assert [(e["trigger"], e["reason"]) for e in audit] == [
        ("periodic", "quote_measurement_mismatch:rtmr3"), ("periodic", "attested"),
        ("register", "attested")]
    for verdict, reasons in (("accepted", ["attested", "attested"]),
                             ("refused", ["quote_measurement_mismatch:rtmr3"])):
        only = await world.cp.get(f"/v1/apps/shop?verdict={verdict}",
                                  headers=world.cp.admin_headers)
        assert [e["reason"] for e in only.json()["audit"]] == reasons
    bogus = await world.cp.get("/v1/apps/shop?verdict=maybe", headers=world.cp.admin_headers)
    assert (bogus.status_code, bogus.json()["error"]) == (400, "invalid_query:verdict")
    text = (await world.cp.get("/metrics")).text
    assert 'eecp_attestations_total{reason="attested",result="accepted"} 2.0' in text
    assert ('eecp_attestations_total{reason="quote_measurement_mismatch:rtmr3",'
            'result="refused"} 1.0') in text
    assert 'eecp_apps{state="not_connected"} 1.0' in text


@pytest.mark.parametrize("world", [{"EE_AUDIT_REFUSALS_PER_MIN": "10"}], indirect=True)
async def test_refusals_of_attempts_never_admitted_are_rate_limited_in_the_audit_log(
        mock_clock: MockClock, world: World) -> None:
    # any peer can cause those rows: a flood must neither grow the log without bound nor
    # push an app's real history out of view; decisions about admitted agents always count
    forged = {"mint_kwargs": {"corrupt_signature": True}}
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        for _ in range(6):  # 10 a minute in all, 2 of them per app name
            async with running_agent(world.agent(**forged)) as bad:
                assert await bad.wait_closed() == (4003, "quote_invalid")
        audit = (await world.cp.app("shop"))["audit"]
        assert [e["reason"] for e in audit] == ["quote_invalid"] * 2 + ["attested"]
        metrics = (await world.cp.get("/metrics")).text
        assert 'eecp_audit_suppressed_total{reason="quote_invalid"} 4.0' in metrics
        # a refusal of a quote that verified is recorded all the same: it takes a genuine TD,
        # maybe a known agent reconnecting, whose failure must not hide behind a flood
        async with running_agent(world.agent(answer_nonce=bytes(32))) as bad:
            assert await bad.wait_closed() == (4003, "nonce_mismatch")
        audit = (await world.cp.app("shop"))["audit"]
        assert audit[0]["reason"] == "nonce_mismatch" and len(audit) == 4
        # the admitted agent's own refusal is recorded, though the limit is spent
        agent.mint_kwargs = {"rtmrs": (*devmint.DEFAULT_RTMRS[:3], b"\x09" * 48)}
        await agent.send(agent.register_message())  # renewal: challenged at once
        assert await agent.wait_closed() == (4003, "quote_measurement_mismatch:rtmr3")
    audit = (await world.cp.app("shop"))["audit"]
    assert [e["reason"] for e in audit[:2]] == ["quote_measurement_mismatch:rtmr3",
                                                "nonce_mismatch"]
    async with running_agent(world.agent(**forged)) as bad:
        assert await bad.wait_closed() == (4003, "quote_invalid")
    assert len((await world.cp.app("shop"))["audit"]) == 5  # still spent
    world.clock.jump(30)  # half a minute on, there is room for one more
    async with running_agent(world.agent(**forged)) as bad:
        assert await bad.wait_closed() == (4003, "quote_invalid")
    audit = (await world.cp.app("shop"))["audit"]
    assert len(audit) == 6 and audit[0]["reason"] == "quote_invalid"


FLOOD = {"EE_ALLOWLIST_FETCHES_PER_MIN": "6", "EE_ALLOWLIST_FETCHES_PER_PLATFORM_PER_MIN": "3",
         "EE_AUDIT_REFUSALS_PER_MIN": "10"}


def release_requests(world: World) -> int:
    return sum("/releases/tags/" in r.path for r in world.cp.github.requests)


@pytest.mark.parametrize("world", [FLOOD], indirect=True)
async def test_one_genuine_td_naming_made_up_releases_spends_a_bounded_github_quota(
        mock_clock: MockClock, world: World) -> None:
    # issue 13.6: quotes that verify but name random repos and tags each cost a GitHub request
    # and an audit row. Now: 3 fetches a minute per platform, 6 in all; audit rows of such
    # refusals within the platform's share of EE_AUDIT_REFUSALS_PER_MIN (2 of 10)
    platform = {"pck_key": ec.generate_private_key(ec.SECP256R1())}  # one machine
    reasons = []
    for n in range(8):
        flooder = world.agent(app=f"app{n}", repo=f"rnd{n}/x", tag=f"v{n}", mint_kwargs=platform)
        async with running_agent(flooder):
            code, reason = await flooder.wait_closed()
            assert code == 4003
            reasons.append(reason)
    assert reasons == ["allowlist_not_found"] * 3 + ["allowlist_rate_limited"] * 5
    assert release_requests(world) == 3
    again = world.agent(app="app0", repo="rnd0/x", tag="v0", mint_kwargs=platform)
    async with running_agent(again):  # a remembered miss: no second request
        assert await again.wait_closed() == (4003, "allowlist_not_found")
    assert release_requests(world) == 3
    async with running_agent(world.agent(app="app9", repo="rnd9/x", tag="v9")) as elsewhere:
        assert await elsewhere.wait_closed() == (4003, "allowlist_not_found")  # its own fetch
    assert release_requests(world) == 4
    async with running_agent(world.agent()) as good:  # the real app, from a third machine
        await good.wait_status("attested")
    rows = [row for row in audit_rows(world) if row[0] != "shop"]
    flood = [row for row in rows if row[0] != "app9"]
    assert [row[3] for row in flood] == ["allowlist_not_found"] * 2
    ppid = flood[0][4]
    assert ppid is not None and len(ppid) == 32 and {row[4] for row in flood} == {ppid}
    assert rows[-1][0] == "app9" and rows[-1][4] not in (None, ppid)
    metrics = (await world.cp.get("/metrics")).text
    assert 'eecp_audit_suppressed_total{reason="allowlist_rate_limited"} 5.0' in metrics
    assert 'eecp_audit_suppressed_total{reason="allowlist_not_found"} 2.0' in metrics
    # a known agent's refusal is recorded whatever its platform's budget: here it comes back
    # from the flooding machine with a tag that has no allowlist (and no fetch left)
    known = world.agent(agent_id=good.agent_id, tag="v9.9.9", mint_kwargs=platform)
    async with running_agent(known):
        assert await known.wait_closed() == (4003, "allowlist_rate_limited")
    assert audit_rows(world)[-1][:5] == ("shop", good.agent_id, "refused",
                                         "allowlist_rate_limited", ppid)
    assert release_requests(world) == 5


async def test_health_silence_and_recovery(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        await agent.health()
        world.clock.jump(100)
        await agent.health()  # pushes the deadline forward
        await health_seen(world, "shop", START + 100)
        world.clock.jump(100)
        assert (await world.cp.resolve("shop")).status_code == 200
        world.clock.jump(30)
        await agent.wait_status("health_timeout")
        response = await world.cp.resolve("shop")
        assert (response.status_code, response.json()["reason"]) == (403, "health_fail")
        await agent.health()
        await agent.wait_status("health_restored")
        assert (await world.cp.resolve("shop")).status_code == 200
        await agent.health("fail")
        await agent.wait_status("health_fail")
        assert (await world.cp.resolve("shop")).json()["reason"] == "health_fail"


def hold_status(monkeypatch: pytest.MonkeyPatch, pick: Callable[[str, str], bool]
                ) -> tuple[trio.Event, trio.Event]:
    """Hold the server's status messages that ``pick(state, reason)`` chooses until the second
    event is set; the first is set once one is held."""
    original = AgentSession.send_status
    holding, release = trio.Event(), trio.Event()

    async def held(self: AgentSession, state: str, reason: str, **extra: object) -> None:
        if pick(state, reason) and not release.is_set():
            holding.set()
            await release.wait()
        await original(self, state, reason, **extra)

    monkeypatch.setattr(AgentSession, "send_status", held)
    return holding, release


async def test_health_heard_while_the_timeout_warning_is_sent_restarts_the_watch(
        mock_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # the watchdog sends "health_timeout" after marking the agent failed; a "pass" that comes
    # in during that send must not be lost, or the agent is never watched again
    sending, release = hold_status(monkeypatch, lambda state, reason: reason == "health_timeout")
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        world.clock.jump(130)  # silent past EE_HEALTH_TIMEOUT_SEC (120)
        async with real_deadline(10):
            await sending.wait()
        await agent.health()  # heard while the warning is still being sent
        await health_seen(world, "shop", START + 130)
        release.set()
        await agent.wait_status("health_timeout")
        assert (await world.cp.resolve("shop")).status_code == 200  # the pass counted
        world.clock.jump(130)  # silent again: watched again
        await agent.wait_for(lambda a: a.statuses().count(("warning", "health_timeout")) == 2)
        assert (await world.cp.resolve("shop")).json()["reason"] == "health_fail"


LONG_HEALTH = {"EE_HEALTH_TIMEOUT_SEC": str(400 * 86400)}


@pytest.mark.parametrize("world", [LONG_HEALTH], indirect=True)
async def test_registration_ttl_warning_and_expiry(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        world.clock.jump(27 * 86400)
        await agent.wait_status("ttl_warning")
        body = (await world.cp.resolve("shop")).json()
        assert body["allowed"] is True and body["registration_state"] == "warning"
        world.clock.jump(3 * 86400)
        await agent.wait_status("registration_expired")
        response = await world.cp.resolve("shop")
        assert response.status_code == 403
        assert response.json()["reason"] == "registration_expired"
        assert response.headers["x-ee-registration-state"] == "expired"
        # registering again renews it for another 30 days
        await agent.send(agent.register_message())
        await agent.wait_for(lambda a: sum(
            m.get("reason") == "attested" and m.get("trigger") == "register"
            for m in a.received) == 2)
        body = (await world.cp.resolve("shop")).json()
        assert body["allowed"] is True and body["registration_state"] == "active"


@pytest.mark.parametrize("world", [LONG_HEALTH], indirect=True)
async def test_periodic_attestation_does_not_extend_ttl(
        mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        expires = (await world.cp.resolve("shop")).json()["expires_at"]
        for round_ in (2, 3):
            world.clock.jump(3600)
            await agent.wait_for(lambda a, n=round_: a.statuses().count(("ok", "attested")) == n)
        assert (await world.cp.resolve("shop")).json()["expires_at"] == expires


async def test_several_agents_serve_one_app(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as first:
        await first.wait_status("attested")
        async with running_agent(world.agent()) as second:
            await second.wait_status("attested")
            assert (await world.cp.resolve("shop")).json()["agents"] == 2
        body = await resolve_until(world.cp, "shop", lambda b: b["agents"] == 1)
        assert body["allowed"] is True
    body = await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
    assert body["reason"] == "not_connected"


async def test_reconnect_supersedes_the_old_session(mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as first:
        await first.wait_status("attested")
        async with running_agent(world.agent(agent_id=first.agent_id)) as second:
            await second.wait_status("attested")
            assert await first.wait_closed() == (4009, "superseded")
            assert (await world.cp.resolve("shop")).status_code == 200


def agent_rows(world: World | ControlPlane) -> list[tuple[Any, ...]]:
    """The store's agent rows, straight from the SQLite file."""
    cp = world.cp if isinstance(world, World) else world
    with contextlib.closing(sqlite3.connect(cp.env["EE_DB_PATH"])) as db:
        return db.execute("select agent_id, app_name, repo, last_verdict, last_attested_at "
                          "from agent order by agent_id").fetchall()


def audit_rows(world: World | ControlPlane) -> list[tuple[Any, ...]]:
    """Every audit row, oldest first, straight from the SQLite file (unregistered apps
    included, which the admin view cannot show)."""
    cp = world.cp if isinstance(world, World) else world
    with contextlib.closing(sqlite3.connect(cp.env["EE_DB_PATH"])) as db:
        return db.execute("select app_name, agent_id, verdict, reason, platform_id "
                          "from audit_log order by id").fetchall()


@pytest.mark.parametrize(("app", "repo"), [("evil", "mallory/evil"), ("shop", REPO)])
async def test_an_unattested_register_with_a_live_agent_id_changes_nothing(
        mock_clock: MockClock, world: World, app: str, repo: str) -> None:
    # agent ids are no secret: a register alone must neither supersede the live agent, hide
    # it from resolve, nor overwrite its stored row (it is admitted only once it attests)
    async with running_agent(world.agent()) as victim:
        await victim.wait_status("attested")
        before = agent_rows(world)
        attacker = world.agent(agent_id=victim.agent_id, app=app, repo=repo, auto=False)
        async with running_agent(attacker):
            await attacker.wait_for(lambda a: bool(a.challenges()))
            body = (await world.cp.resolve("shop")).json()
            assert (body["allowed"], body["agents"]) == (True, 1), body
            await jump_until_closed(world, attacker, 31)
        assert attacker.closed is not None and attacker.closed[1] == "attestation_timeout"
        assert victim.closed is None
        assert (await world.cp.resolve("shop")).json()["allowed"] is True
        assert agent_rows(world) == before and before[0][3] == "accepted"


async def test_unattested_sessions_leave_no_agents_behind(
        mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as victim:
        await victim.wait_status("attested")
        for _ in range(20):  # register, receive the challenge, hang up
            async with running_agent(world.agent(auto=False)) as passer:
                await passer.wait_for(lambda a: bool(a.challenges()))
        await resolve_until(world.cp, "shop", lambda b: True)
        assert len((await world.cp.app("shop"))["agents"]) == 1
        assert [row[0] for row in agent_rows(world)] == [victim.agent_id]


async def test_an_attested_agent_of_another_app_cannot_take_a_live_agent_id(
        mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as first:
        await first.wait_status("attested")
        async with running_agent(world.agent(agent_id=first.agent_id, app="other")) as second:
            assert await second.wait_closed() == (4004, "agent_id_in_use")
        assert first.closed is None
        assert (await world.cp.resolve("shop")).json()["allowed"] is True
    # the audit says what happened: the attestation passed, the admission was refused
    assert [row[:4] for row in audit_rows(world)] == [
        ("shop", first.agent_id, "accepted", "attested"),
        ("other", first.agent_id, "refused", "agent_id_in_use")]
    text = (await world.cp.get("/metrics")).text
    assert 'eecp_attestations_total{reason="agent_id_in_use",result="refused"} 1.0' in text
    assert 'eecp_attestations_total{reason="attested",result="accepted"} 1.0' in text


OTHER_APP = {"app": "other", "repo": "bob/other", "tag": "v1"}


async def test_an_offline_agents_id_stays_bound_to_its_app(
        mock_clock: MockClock, world: World) -> None:
    # issue 13.5: while an agent was offline, an attested agent of another app registered with
    # its agent_id, took the stored row, and the owner was refused agent_id_in_use from then on
    world.cp.github.add_release("bob/other", "v1", {ASSET: allowlist_doc()})
    async with running_agent(world.agent()) as owner:
        await owner.wait_status("attested")
    await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
    before = agent_rows(world)
    for _ in range(2):
        async with running_agent(world.agent(agent_id=owner.agent_id, **OTHER_APP)) as taker:
            assert await taker.wait_closed() == (4004, "agent_id_in_use")
            assert taker.statuses()[-1] == ("invalid", "agent_id_in_use")
    assert agent_rows(world) == before and before[0][1:3] == ("shop", REPO)
    assert (await world.cp.resolve("other")).json()["reason"] == "unknown_app"
    for _ in range(2):  # the owner comes back, as often as it likes
        async with running_agent(world.agent(agent_id=owner.agent_id)) as again:
            await again.wait_status("attested")
            assert (await world.cp.resolve("shop")).status_code == 200
    assert [row[:4] for row in audit_rows(world)] == [
        ("shop", owner.agent_id, "accepted", "attested"),
        ("other", owner.agent_id, "refused", "agent_id_in_use"),
        ("other", owner.agent_id, "refused", "agent_id_in_use"),
        ("shop", owner.agent_id, "accepted", "attested"),
        ("shop", owner.agent_id, "accepted", "attested")]
    [(_, app, repo, verdict, _)] = agent_rows(world)
    assert (app, repo, verdict) == ("shop", REPO, "accepted")


async def test_an_operator_can_release_an_offline_agents_binding(
        mock_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    world.cp.github.add_release("bob/other", "v1", {ASSET: allowlist_doc()})
    async with running_agent(world.agent()) as owner:
        await owner.wait_status("attested")
    await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
    monkeypatch.setenv("EE_DB_PATH", world.cp.env["EE_DB_PATH"])  # the running eecp's store
    monkeypatch.delenv("EE_DB_URL", raising=False)
    release = ["release-agent", owner.agent_id]
    assert await trio.to_thread.run_sync(cli.main, release) == 0
    assert f"released agent {owner.agent_id} (bound to app shop, repo {REPO})" in \
        capsys.readouterr().out
    assert await trio.to_thread.run_sync(cli.main, release) == 1  # nothing left to release
    assert "no agent" in capsys.readouterr().err
    async with running_agent(world.agent(agent_id=owner.agent_id, **OTHER_APP)) as taker:
        await taker.wait_status("attested")
    assert [row[1:4] for row in agent_rows(world)] == [("other", "bob/other", "accepted")]
    assert audit_rows(world)[0][:4] == ("shop", owner.agent_id, "accepted", "attested")


async def test_an_agent_ids_binding_outlives_a_restart(
        mock_clock: MockClock, tmp_path: Path, pki: devpki.DevPki) -> None:
    async with open_upstreams(pki) as (pccs, github):
        github.add_release("bob/other", "v1", {ASSET: allowlist_doc()})
        env = control_plane_env(tmp_path, pki, pccs.url, github.url)
        async with open_control_plane(env, pki, pccs, github) as cp:
            owner = FakeAgent(cp.ws_url, pki)
            async with running_agent(owner):
                await owner.wait_status("attested")
        mock_clock.autojump_threshold = math.inf  # (the shutdown let time run: stop it again)
        async with open_control_plane(env, pki, pccs, github) as cp:
            taker = FakeAgent(cp.ws_url, pki, agent_id=owner.agent_id, **OTHER_APP)
            async with running_agent(taker):
                assert await taker.wait_closed() == (4004, "agent_id_in_use")
            assert [row[1:3] for row in agent_rows(cp)] == [("shop", REPO)]
            async with running_agent(FakeAgent(cp.ws_url, pki, agent_id=owner.agent_id)) as back:
                await back.wait_status("attested")
            assert [row[2:4] for row in audit_rows(cp)] == [
                ("accepted", "attested"), ("refused", "agent_id_in_use"),
                ("accepted", "attested")]
        mock_clock.autojump_threshold = math.inf


_WRITE_AGENT = Tx.write_agent


def watch_agent_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[AgentRecord, bool]]:
    """Every fenced write of an agent's row from now on, with whether it changed the row."""
    writes: list[tuple[AgentRecord, bool]] = []

    def write_agent(self: Tx, record: AgentRecord, *, epoch: int | None = None) -> bool:
        changed = _WRITE_AGENT(self, record, epoch=epoch)
        writes.append((record, changed))
        return changed

    monkeypatch.setattr(Tx, "write_agent", write_agent)
    return writes


async def test_a_superseded_session_leaves_the_agents_row_to_its_successor(
        mock_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # the old session's cleanup writes its last_seen after the successor was admitted (with
    # several store workers, or another process, it may land at any later moment): fenced by
    # its older epoch, it changes nothing
    async with running_agent(world.agent()) as first:
        await first.wait_status("attested")
        [(_, _, _, _, first_attested)] = agent_rows(world)
        writes = watch_agent_writes(monkeypatch)
        world.clock.jump(5)
        async with running_agent(world.agent(agent_id=first.agent_id)) as second:
            await second.wait_status("attested")
            assert await first.wait_closed() == (4009, "superseded")  # after its cleanup
            stale = [(r.epoch, changed) for r, changed in writes if r.epoch == 1]
            assert stale == [(1, False)]  # the old session's last_seen: made, and fenced
            [(_, _, _, verdict, attested)] = agent_rows(world)
            assert (verdict, attested) == ("accepted", first_attested + 5)


async def test_an_ending_session_neither_keeps_its_agent_id_nor_writes_over_the_next(
        mock_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # a session that is ending (here: held while it tells its agent why it is refused) no
    # longer holds its agent_id against the same agent reconnecting, and once that one is
    # admitted, the ending session's last write changes nothing. Ending or not, the id stays
    # bound to its app: an attested agent of another app is refused meanwhile
    refusing, release = hold_status(monkeypatch,
                                    lambda state, reason: reason == "invalid_json")
    async with running_agent(world.agent()) as first:
        await first.wait_status("attested")
        [(_, _, _, _, first_attested)] = agent_rows(world)
        writes = watch_agent_writes(monkeypatch)
        await first.send("not json")  # refused: the session ends, its status is held
        async with real_deadline(10):
            await refusing.wait()
        async with running_agent(world.agent(agent_id=first.agent_id, app="other")) as taker:
            assert await taker.wait_closed() == (4004, "agent_id_in_use")
        world.clock.jump(5)
        async with running_agent(world.agent(agent_id=first.agent_id)) as second:
            await second.wait_status("attested")
            release.set()
            assert (await first.wait_closed())[0] == 1007  # invalid payload
            # whatever the first session wrote after the second was admitted changed nothing
            admitted_at = next(i for i, (r, _) in enumerate(writes) if r.epoch == 2)
            assert all(not changed for r, changed in writes[admitted_at:] if r.epoch == 1)
            assert second.closed is None
            assert (await world.cp.resolve("shop")).json()["allowed"] is True
            [(agent_id, app, _, verdict, attested)] = agent_rows(world)
            assert (agent_id, app, verdict, attested) == (
                first.agent_id, "shop", "accepted", first_attested + 5)


async def test_resolve_by_forwarded_host_and_unknown_apps(
        mock_clock: MockClock, world: World) -> None:
    async with running_agent(world.agent()) as agent:
        await agent.wait_status("attested")
        for header in ("X-Original-Host", "X-Forwarded-Host", "Host"):
            response = await world.cp.get("/v1/resolve",
                                          headers={header: "shop.app.example.com:443"})
            assert response.status_code == 200, header
    for path in ("/v1/resolve/nosuchapp", "/v1/resolve/Bad_Name!", "/v1/resolve"):
        response = await world.cp.get(path)
        assert response.status_code == 403, path
        assert response.json() == {"allowed": False, "reason": "unknown_app",
                                   "app": response.json()["app"]}
        assert response.headers["x-ee-allowed"] == "false"
        assert response.headers["x-ee-reason"] == "unknown_app"


async def test_admin_requires_the_token(mock_clock: MockClock, world: World) -> None:
    assert (await world.cp.get("/v1/apps")).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await world.cp.get("/v1/apps", headers=wrong)).status_code == 401
    assert (await world.cp.get("/v1/apps/shop", headers=wrong)).status_code == 401
    response = await world.cp.get("/v1/apps", headers=world.cp.admin_headers)
    assert response.status_code == 200 and response.json() == {"apps": [], "count": 0}
    assert (await world.cp.get("/v1/apps/shop", headers=world.cp.admin_headers)).status_code \
        == 404


async def test_a_superseded_sessions_late_verdict_leaves_its_successor_served(
        mock_clock: MockClock, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # the old session's periodic quote is still being verified (a worker thread, which no
    # cancellation stops) when the agent reconnects and is admitted again; the old verdict
    # then arrives: it must change nothing, in the store or in what resolve says
    real = engine_module.verify_quote
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()

    def gated(*args: Any) -> Any:
        if armed.is_set():
            armed.clear()
            entered.set()
            release.wait(20)
        return real(*args)

    monkeypatch.setattr(engine_module, "verify_quote", gated)
    async with running_agent(world.agent()) as first:
        await first.wait_status("attested")
        armed.set()
        async with real_deadline(10):
            while not entered.is_set():  # until its periodic re-attestation is under way
                world.clock.jump(400)
                await first.health()
                await trio.to_thread.run_sync(time.sleep, 0.02)
        second = world.agent(agent_id=first.agent_id)
        async with running_agent(second):
            await second.wait_status("attested")
            await second.health()
            assert (await world.cp.resolve("shop")).json()["allowed"] is True
            release.set()
            assert await first.wait_closed() == (4009, "superseded")
            await trio.to_thread.run_sync(time.sleep, 0.2)  # the late verdict, whatever it does
            body = (await world.cp.resolve("shop")).json()
            assert (body["allowed"], body["agents"], second.closed) == (True, 1, None), body


@pytest.mark.parametrize("world", [{"EE_AUDIT_REFUSALS_PER_MIN": "5"}], indirect=True)
async def test_a_genuine_td_cannot_write_audit_rows_without_bound(
        mock_clock: MockClock, world: World) -> None:
    # one machine's verified quotes, naming a real app's repo and tag (its allowlist exists)
    # with measurements that do not match it, under fresh agent ids: refusals it can ask for
    # as often as it likes, so they are budgeted by its platform
    platform = {"pck_key": ec.generate_private_key(ec.SECP256R1())}
    wrong = Measurements("d" * 64, "b" * 64, "tag=v1.2.0\nsha256=" + "c" * 64, True)
    for _ in range(12):
        async with running_agent(world.agent(measurements=wrong, mint_kwargs=platform)) as a:
            assert (await a.wait_closed())[0] == 4003
    rows = audit_rows(world)
    assert 1 <= len(rows) <= 5, rows
    assert {row[3] for row in rows} == {"measurement_mismatch:agent_dir_sha256"}
    metrics = (await world.cp.get("/metrics")).text
    assert ('eecp_audit_suppressed_total{reason="measurement_mismatch:agent_dir_sha256"} '
            f"{12.0 - len(rows)}") in metrics

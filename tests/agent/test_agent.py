"""The agent (issue 3 §5), through real sockets.

A scripted fake control plane (``trio_websocket.serve_websocket`` on 127.0.0.1, port 0) lets
each test play eecp's side of the tunnel; the backend the agent probes is a real local HTTP
server (``tests.fakehttp``). Quotes come from the agent's ``dev`` provider and are verified by
the real ``dcap_qvl`` under that PKI's root. The only fake is configfs-tsm (the TDX hardware
edge), played by a fake kernel on a plain directory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dcap_qvl
import httpx
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    serve_websocket,
)

from agent import agent as agent_main
from agent import measure as measure_mod
from agent.agent import build_provider
from agent.config import AgentConfig, from_env
from agent.health import probe_backend
from agent.providers import (
    ConfigfsTsmProvider,
    DevQuoteProvider,
    QuoteProvider,
    QuoteProviderError,
)
from agent.tunnel import AgentState, Backoff, run_agent
from eecp.core.clock import isoformat
from eecp.core.errors import ConfigError
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.wire.measurements import Measurements, measurements_from_json, report_data_for
from eecp.wire.protocol import (
    DATA_PROTOCOL,
    AttestRequest,
    AttestResponse,
    Register,
    Status,
    decode_agent_message,
    encode_register,
)
from tests.fakehttp import FakeServer, Request, Response, open_fake_http

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_SCRIPT = REPO_ROOT / "agent" / "agent.py"
AGENT_ID = "5f0c6f2e-8c1a-4f57-9d3e-2b7a4c1d9e08"
IMAGE_ID = "tag=v1.2.0\nsha256=" + "c" * 64
WAIT = 10.0  # real seconds any single step may take before a test fails instead of hanging


# ---- fixtures ---------------------------------------------------------------------------------


def agent_env(url: str, backend: str, pki_dir: Path, agent_dir: Path, **extra: str
              ) -> dict[str, str]:
    """The environment of an agent on the dev provider with short test intervals."""
    return {
        "EE_CONTROL_WS": url,
        "EE_REPO": "acme/shop",
        "EE_RELEASE_TAG": "v1.2.0",
        "EE_APP_NAME": "shop",
        "EE_NETWORK": "forge-1",
        "EE_AGENT_ID": AGENT_ID,
        "EE_BACKEND_URL": backend,
        "EE_HEALTH_INTERVAL_SEC": "0.1",
        "EE_HEALTH_PROBE_TIMEOUT_SEC": "2",
        "EE_RECONNECT_MIN_SEC": "0.01",
        "EE_RECONNECT_MAX_SEC": "0.05",
        "EE_QUOTE_PROVIDER": "dev",
        "EE_DEV_PKI_DIR": str(pki_dir),
        "EE_AGENT_DIR": str(agent_dir),
        "EE_AGENT_FILE": str(agent_dir / "agent.py"),
        "VM_IMAGE_ID": IMAGE_ID,
        "SEAL_VM": "true",
        **extra,
    }


# ---- a scripted fake control plane ------------------------------------------------------------


@dataclass
class Peer:
    """eecp's end of one tunnel; the test scripts what it says."""

    ws: WebSocketConnection
    index: int
    received: list[dict[str, Any]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    async def next(self) -> dict[str, Any]:
        """The next message the agent sends (decoded JSON)."""
        with trio.fail_after(WAIT):
            data = await self.ws.get_message()
        assert isinstance(data, str), "the agent sends JSON text only"
        message: dict[str, Any] = json.loads(data)
        self.received.append(message)
        return message

    async def expect(self, kind: str) -> dict[str, Any]:
        """The next message of type ``kind``, skipping others (health reports interleave)."""
        while True:
            message = await self.next()
            if message.get("type") == kind:
                return message

    async def send(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def closed(self) -> tuple[int, str | None]:
        """Read until the agent closes the tunnel: its close code and reason."""
        with trio.fail_after(WAIT):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code, exc.reason.reason


@dataclass
class FakeEecp:
    """Accepts tunnels on 127.0.0.1 and hands each to the test as a :class:`Peer`."""

    url: str
    send_peer: trio.MemorySendChannel[Peer]
    receive_peer: trio.MemoryReceiveChannel[Peer]
    connections: int = 0

    async def accept(self) -> Peer:
        """The next tunnel the agent opens."""
        with trio.fail_after(WAIT):
            return await self.receive_peer.receive()

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        self.connections += 1
        peer = Peer(ws, self.connections)
        await self.send_peer.send(peer)
        # the tunnel lives until the test is done with it; then it is drained, so that the
        # agent's close handshake is answered (an unread queue would stall it)
        with trio.move_on_after(60):
            await peer.done.wait()
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed:
                pass


@asynccontextmanager
async def open_fake_eecp() -> AsyncIterator[FakeEecp]:
    send, receive = trio.open_memory_channel[Peer](16)
    async with trio.open_nursery() as nursery:
        fake = FakeEecp("", send, receive)
        server: WebSocketServer = await nursery.start(
            partial(serve_websocket, fake.handle, "127.0.0.1", 0, None))
        fake.url = f"ws://127.0.0.1:{server.port}/v1/tunnel"
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Backend:
    """The agent's backend: answers the health probe with ``status``."""

    status: int = 200
    server: FakeServer | None = None

    async def handle(self, request: Request) -> Response:
        return Response(self.status, b"ok")

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


@asynccontextmanager
async def open_backend() -> AsyncIterator[Backend]:
    backend = Backend()
    async with open_fake_http(backend.handle) as server:
        backend.server = server
        yield backend


@dataclass
class World:
    eecp: FakeEecp
    backend: Backend
    config: AgentConfig
    provider: QuoteProvider
    measurements: Measurements


@asynccontextmanager
async def open_world(pki_dir: Path, agent_dir: Path, **extra: str) -> AsyncIterator[World]:
    async with open_fake_eecp() as eecp, open_backend() as backend:
        config = from_env(agent_env(eecp.url, backend.url, pki_dir, agent_dir, **extra))
        provider = build_provider(config)
        assert isinstance(provider, DevQuoteProvider)
        yield World(eecp, backend, config, provider, measure_mod.measure(config))


@asynccontextmanager
async def running_agent(world: World, **kwargs: Any) -> AsyncIterator[AgentState]:
    """``run_agent`` in the background for the block, stopped gracefully at its end."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        state: AgentState = await nursery.start(partial(
            run_agent, world.config, world.provider, world.measurements, stop=stop, **kwargs))
        try:
            yield state
        finally:
            stop.set()
            nursery.cancel_scope.deadline = trio.current_time() + WAIT


async def wait_state(state: AgentState, predicate: Callable[[AgentState], bool]) -> None:
    with trio.fail_after(WAIT):
        await state.wait_for(predicate)


class MaxJitter(random.Random):
    """Jitter that always picks the ceiling: makes full-jitter delays predictable."""

    def uniform(self, a: float, b: float) -> float:
        return b


# ---- registering, attesting, renewing ---------------------------------------------------------


async def test_registers_with_configured_fields_then_reports_health(
        pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        first = await peer.next()
        assert first == {"type": "register", "repo": "acme/shop", "release_tag": "v1.2.0",
                         "app_name": "shop", "network": "forge-1", "agent_id": AGENT_ID,
                         "data_protocol": DATA_PROTOCOL}
        # eecp's own decoder accepts it as exactly the configured registration
        assert decode_agent_message(json.dumps(first)) == Register(
            "acme/shop", "v1.2.0", "shop", "forge-1", AGENT_ID)
        # a health report follows right away, before any interval has passed
        assert await peer.next() == {"type": "health", "status": "pass"}
        await wait_state(state, lambda s: s.connected and s.registrations == 1)
        assert world.backend.server is not None
        assert world.backend.server.requests[0].path == "/health"
        peer.done.set()


async def test_answers_a_challenge_with_a_quote_that_verifies(
        pki_dir: Path, agent_dir: Path) -> None:
    nonce = os.urandom(32)
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        await peer.expect("register")
        await peer.send(AttestRequest(nonce, 30, "register").encode())
        raw = await peer.expect("attest_response")
        await wait_state(state, lambda s: s.attestations == 1)
        peer.done.set()

    answer = decode_agent_message(json.dumps(raw))
    assert isinstance(answer, AttestResponse)
    expected = world.measurements
    material = (f"agent_dir={expected.agent_dir_sha256}\nagent_py={expected.agent_py_sha256}\n"
                f"vm_image_id={IMAGE_ID}\nsealed=true").encode()
    assert answer.nonce == nonce
    assert answer.report_data == hashlib.sha256(material).digest() + nonce
    assert answer.report_data == report_data_for(expected, nonce)
    assert measurements_from_json(answer.measurements) == expected
    # the quote binds exactly that report_data and verifies under the dev PKI's root
    pki = devpki.load_pki(pki_dir)
    now = time.time()
    collateral = devmint.make_collateral(pki, now=now).to_dcap()
    report = dcap_qvl.verify_with_root_ca(answer.quote, collateral, pki.root_der, int(now))
    assert report.status == "UpToDate"
    parsed = dcap_qvl.parse_quote(answer.quote).report
    assert parsed.report_data == answer.report_data
    assert parsed.mr_td == devmint.DEFAULT_MRTD


async def test_dev_quotes_carry_the_configured_mrtd_and_rtmrs(
        pki_dir: Path, agent_dir: Path) -> None:
    mrtd = hashlib.sha384(b"my mrtd").digest()
    rtmrs = [hashlib.sha384(bytes([i])).digest() for i in range(4)]
    async with open_world(pki_dir, agent_dir, EE_DEV_MRTD=mrtd.hex(),
                          EE_DEV_RTMRS=",".join(r.hex() for r in rtmrs)) as world, \
            running_agent(world):
        peer = await world.eecp.accept()
        await peer.send(AttestRequest(bytes(32), 5, "periodic").encode())
        raw = await peer.expect("attest_response")
        peer.done.set()
    report = dcap_qvl.parse_quote(base64.b64decode(raw["quote"])).report
    assert report.mr_td == mrtd
    assert [report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3] == rtmrs


@pytest.mark.parametrize("reason", ["ttl_warning", "registration_expired"])
async def test_registers_again_on_the_same_tunnel_to_renew(
        pki_dir: Path, agent_dir: Path, reason: str) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        first = await peer.expect("register")
        await peer.send(Status("ok", "attested", {"trigger": "register"}).encode())
        await wait_state(state, lambda s: s.last_status is not None)
        assert state.registrations == 1  # an ordinary status does not re-register
        await peer.send(Status("warning", reason, {"expires_at": "2030-01-01T00:00:00Z"})
                        .encode())
        again = await peer.expect("register")
        assert again == first
        assert state.last_status == Status("warning", reason,
                                           {"expires_at": "2030-01-01T00:00:00Z"})
        assert state.registrations == 2
        assert world.eecp.connections == 1  # same tunnel
        # and the renewal's challenge is answered on it as usual
        await peer.send(AttestRequest(bytes(range(32)), 30, "register").encode())
        assert (await peer.expect("attest_response"))["nonce"] == bytes(range(32)).hex()
        peer.done.set()


# ---- health -----------------------------------------------------------------------------------


async def next_health(peer: Peer, status: str) -> None:
    """Wait for a health report with ``status`` (reports keep coming every interval)."""
    while (await peer.expect("health"))["status"] != status:
        pass


async def test_health_follows_the_backend(pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        await next_health(peer, "pass")
        world.backend.status = 500
        await next_health(peer, "fail")
        assert state.last_health == "fail"
        world.backend.status = 302  # a redirect still proves the backend answers
        await next_health(peer, "pass")
        assert world.backend.server is not None
        world.backend.server.up = False  # connections dropped without an answer
        await next_health(peer, "fail")
        world.backend.server.up = True
        world.backend.status = 204
        await next_health(peer, "pass")
        peer.done.set()


async def test_health_fails_when_nothing_listens(pki_dir: Path, agent_dir: Path) -> None:
    with trio.socket.socket() as sock:  # a port that was free a moment ago
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with open_world(pki_dir, agent_dir, EE_BACKEND_URL=dead) as world, \
            running_agent(world):
        peer = await world.eecp.accept()
        await peer.expect("register")
        assert await peer.expect("health") == {"type": "health", "status": "fail"}
        peer.done.set()


async def test_probe_deadline_and_path() -> None:
    seen: list[str] = []

    async def slow(request: Request) -> Response:
        seen.append(request.path)
        if request.path == "/slow":
            await trio.sleep(5)
        return Response(200)

    async with open_fake_http(slow) as server, httpx.AsyncClient() as client:
        assert await probe_backend(client, server.url + "/ready", 2.0) == "pass"
        started = trio.current_time()
        assert await probe_backend(client, server.url + "/slow", 0.2) == "fail"
        assert trio.current_time() - started < 2.0
    assert seen == ["/ready", "/slow"]


# ---- reconnecting -----------------------------------------------------------------------------


async def test_reconnects_after_the_server_closes(pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world, \
            running_agent(world, rng=MaxJitter()) as state:
        for round_ in range(1, 5):
            peer = await world.eecp.accept()
            assert peer.index == round_
            assert (await peer.next())["type"] == "register"  # every tunnel starts afresh
            await peer.ws.aclose(4003, "tcb_status:OutOfDate")
            peer.done.set()
        await wait_state(state, lambda s: len(s.delays) >= 4)
        assert state.last_error == "closed:4003 tcb_status:OutOfDate"
        # short-lived tunnels count as failures: the backoff grows, then hits the cap
        assert list(state.delays)[:4] == [0.01, 0.02, 0.04, 0.05]
        assert state.connections == world.eecp.connections >= 4


async def test_backoff_resets_after_a_tunnel_that_lasted(pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir, EE_RECONNECT_RESET_SEC="0.3") as world, \
            running_agent(world, rng=MaxJitter()) as state:
        for hold in (0.0, 0.0, 0.5):
            peer = await world.eecp.accept()
            await peer.next()
            await trio.sleep(hold)
            await peer.ws.aclose(1001, "restarting")
            peer.done.set()
        await wait_state(state, lambda s: len(s.delays) >= 3)
        assert list(state.delays)[:3] == [0.01, 0.02, 0.01]


async def test_backoff_is_exponential_and_capped_while_eecp_is_down(
        autojump_clock: trio.testing.MockClock, pki_dir: Path, agent_dir: Path) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/tunnel"
    env = agent_env(dead, "http://127.0.0.1:9", pki_dir, agent_dir,
                    EE_RECONNECT_MIN_SEC="1", EE_RECONNECT_MAX_SEC="60")
    config = from_env(env)
    provider = DevQuoteProvider(pki_dir)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        state: AgentState = await nursery.start(partial(
            run_agent, config, provider, measure_mod.measure(config), rng=MaxJitter()))
        await state.wait_for(lambda s: len(s.delays) >= 9)
        nursery.cancel_scope.cancel()
    assert list(state.delays) == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert state.connections == 0
    assert state.last_error is not None and state.last_error.startswith("unreachable:")
    # the agent really waited: mock time advanced by the delays before the 9th attempt
    assert trio.current_time() - start >= sum([1, 2, 4, 8, 16, 32, 60, 60])


async def test_a_draining_eecp_is_left_at_once_and_is_no_failure(
        pki_dir: Path, agent_dir: Path) -> None:
    """eecp says it is draining: with nothing in flight the agent leaves the tunnel at once
    (1001 ``draining``) and dials again after the first step's delay, however often."""
    async with open_world(pki_dir, agent_dir) as world, \
            running_agent(world, rng=MaxJitter()) as state:
        for _ in range(3):
            peer = await world.eecp.accept()
            assert (await peer.next())["type"] == "register"
            await peer.send(Status("warning", "draining").encode())
            assert await peer.closed() == (1001, "draining")
            peer.done.set()
        await wait_state(state, lambda s: len(s.delays) >= 3)
        assert list(state.delays)[:3] == [0.01, 0.01, 0.01]  # no growth
        assert state.failures == 0 and state.drains >= 3
        assert state.last_error is not None and state.last_error.startswith("draining")


def test_full_jitter_stays_below_the_ceiling() -> None:
    backoff = Backoff(initial_sec=0.5, max_sec=10.0)
    rng = random.Random(7)
    for failures in range(40):
        ceiling = min(10.0, 0.5 * 2**failures)
        delays = [backoff.delay(failures, rng) for _ in range(50)]
        assert all(0.0 <= d <= ceiling for d in delays)
    assert backoff.delay(10_000, rng) <= 10.0  # no overflow for absurd failure counts


async def serve_silent_websocket(stream: trio.SocketStream) -> None:
    """A WebSocket server that completes the handshake and then never says anything again:
    no pong, no close (a control plane behind a dead NAT mapping, say)."""
    connection = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    async with stream:
        while data := await stream.receive_some(65536):
            connection.receive_data(data)
            for event in connection.events():
                if isinstance(event, wsproto.events.Request):
                    await stream.send_all(connection.send(wsproto.events.AcceptConnection()))


async def test_a_silent_peer_is_dropped_and_redialled(pki_dir: Path, agent_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_silent_websocket, 0,
                                                 host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with open_world(pki_dir, agent_dir, EE_TUNNEL_PING_INTERVAL_SEC="0.05",
                              EE_TUNNEL_DEAD_PEER_SEC="0.1") as world:
            world.config = dataclasses.replace(
                world.config, control_ws=f"ws://127.0.0.1:{port}/v1/tunnel")
            async with trio.open_nursery() as agent_nursery:
                state: AgentState = await agent_nursery.start(partial(
                    run_agent, world.config, world.provider, world.measurements))
                await wait_state(state, lambda s: s.connections >= 2)
                assert state.last_error == "peer_unresponsive: no pong within 0.1s"
                # cancelled, not stopped: a graceful close would wait for an answer in vain
                agent_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


# ---- bad input from the server ----------------------------------------------------------------


@pytest.mark.parametrize(("garbage", "code"), [
    ("this is not json", 1007),
    ("[1, 2, 3]", 1007),
    ("[" * 100_000, 1007),  # nests too deeply for json
    ('{"type":"attest_request","nonce":"zz","deadline_s":30,"reason":"register"}', 4005),
    ('{"type":"attest_request","nonce":"' + "00" * 32 + '","deadline_s":0,"reason":"x"}', 4005),
    ('{"type":"status","state":"great"}', 4005),
])
async def test_garbage_closes_the_tunnel_and_the_agent_comes_back(
        pki_dir: Path, agent_dir: Path, garbage: str, code: int) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        await peer.expect("register")
        await peer.send(garbage)
        closed_code, _ = await peer.closed()
        assert closed_code == code
        peer.done.set()
        again = await world.eecp.accept()
        assert (await again.next())["type"] == "register"
        assert state.last_error is not None
        again.done.set()


async def test_unknown_types_and_binary_frames_are_ignored(
        pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        await peer.expect("register")
        await peer.send('{"type":"proxy_request","request_id":"1"}')  # a newer eecp's message
        await peer.send(b"\x00\x01binary")  # proxied traffic, some day
        await peer.send(AttestRequest(bytes(32), 30, "periodic").encode())
        assert (await peer.expect("attest_response"))["nonce"] == "00" * 32
        assert world.eecp.connections == 1 and state.failures == 0
        peer.done.set()


async def test_a_quote_that_cannot_be_made_closes_the_tunnel(
        tmp_path: Path, pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world:
        world.provider = ConfigfsTsmProvider(tmp_path / "no-configfs-here")
        async with running_agent(world) as state:
            peer = await world.eecp.accept()
            await peer.expect("register")
            await peer.send(AttestRequest(bytes(32), 30, "register").encode())
            assert await peer.closed() == (1011, "quote_unavailable: configfs_tsm_unavailable")
            peer.done.set()
            await wait_state(state, lambda s: s.last_error is not None)
            assert state.last_error is not None
            assert state.last_error.startswith("quote_unavailable: configfs_tsm_unavailable: ")
            (await world.eecp.accept()).done.set()  # and it dials again


async def test_stopping_closes_with_going_away_and_returns(
        pki_dir: Path, agent_dir: Path) -> None:
    stop = trio.Event()
    async with open_world(pki_dir, agent_dir) as world:
        with trio.fail_after(WAIT):  # the nursery ends because run_agent returns by itself
            async with trio.open_nursery() as nursery:
                state: AgentState = await nursery.start(partial(
                    run_agent, world.config, world.provider, world.measurements, stop=stop))
                peer = await world.eecp.accept()
                await peer.expect("register")
                stop.set()
                assert await peer.closed() == (1001, "agent_stopping")
                peer.done.set()
        assert not state.connected
        assert world.eecp.connections == 1  # and it did not dial again


async def test_cancelling_the_agent_still_says_going_away(
        pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_agent, world.config, world.provider, world.measurements)
            peer = await world.eecp.accept()
            await peer.expect("register")
            started = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - started < 1.0  # no waiting for a handshake it cannot get
        assert await peer.closed() == (1001, "agent_stopping")
        peer.done.set()


# ---- measurements -----------------------------------------------------------------------------


def expected_dir_hash(root: Path, files: Mapping[str, bytes]) -> str:
    """The upstream scheme written out by hand: files in path-component order."""
    digest = hashlib.sha256()
    for rel in sorted(files, key=lambda r: r.split("/")):
        digest.update(rel.encode() + b"\n" + files[rel])
    return digest.hexdigest()


def test_agent_dir_hash_is_upstreams_scheme(tmp_path: Path) -> None:
    root = tmp_path / "tmp" / "agent"  # below a "tmp" directory: must not matter
    files = {"agent.py": b"main\n", "a/b": b"in a dir\n", "a-b": b"dash\n",
             "z/deep/x.txt": b"deep", ".hidden": b"dotfile"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    # never measured: caches, VCS data and upstream's scratch directories
    for skipped in ("__pycache__/agent.cpython-311.pyc", ".git/HEAD", "deployments/1.json",
                    "tmp/scratch", "a/__pycache__/b.pyc"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"noise")
    (root / "empty-dir").mkdir()

    digest = measure_mod.sha256_dir(root)
    assert digest == expected_dir_hash(root, files)
    # "a/b" before "a-b": component order, not string order
    assert digest != hashlib.sha256(b"".join(
        rel.encode() + b"\n" + files[rel] for rel in sorted(files))).hexdigest()
    assert measure_mod.sha256_dir(root) == digest  # deterministic

    (root / "a" / "b").write_bytes(b"changed\n")
    assert measure_mod.sha256_dir(root) != digest
    (root / "a" / "b").write_bytes(b"in a dir\n")
    (root / "a" / "b").rename(root / "a" / "c")
    assert measure_mod.sha256_dir(root) != digest  # names are measured, not just contents


def test_measure_uses_the_configured_inputs(tmp_path: Path, agent_dir: Path) -> None:
    base = agent_env("ws://127.0.0.1:1/v1/tunnel", "http://127.0.0.1:9", tmp_path / "pki",
                     agent_dir)
    m = measure_mod.measure(from_env(base))
    assert m.agent_py_sha256 == hashlib.sha256(b"print('hello from the agent')\n").hexdigest()
    assert m.agent_dir_sha256 == expected_dir_hash(agent_dir, {
        "agent.py": b"print('hello from the agent')\n", "pkg/helper.py": b"VALUE = 1\n"})
    assert (m.vm_image_id, m.sealed) == (IMAGE_ID, True)

    image_file = tmp_path / "vm_image_id"
    image_file.write_text("  tag=v9\nsha256=abc  \n")
    from_file = {**base, "VM_IMAGE_ID": "", "EE_VM_IMAGE_ID_FILE": str(image_file),
                 "SEAL_VM": "no"}
    m = measure_mod.measure(from_env(from_file))
    assert (m.vm_image_id, m.sealed) == ("tag=v9\nsha256=abc", False)

    missing = {**from_file, "EE_VM_IMAGE_ID_FILE": str(tmp_path / "nope")}
    assert measure_mod.measure(from_env(missing)).vm_image_id == "dev"  # dev provider only
    with pytest.raises(ConfigError) as err:
        measure_mod.measure(from_env({**missing, "EE_QUOTE_PROVIDER": "configfs-tsm"}))
    assert err.value.variable == "VM_IMAGE_ID"
    with pytest.raises(ConfigError) as err:
        measure_mod.measure(from_env({**base, "EE_AGENT_DIR": str(tmp_path / "nope")}))
    assert err.value.variable == "EE_AGENT_DIR"


def test_default_measurements_are_of_the_agent_package() -> None:
    config = from_env({"EE_CONTROL_WS": "ws://h/v1/tunnel", "EE_REPO": "a/b",
                       "EE_RELEASE_TAG": "v1", "EE_APP_NAME": "app", "VM_IMAGE_ID": "img"})
    assert config.agent_file == AGENT_SCRIPT
    assert config.agent_dir == AGENT_SCRIPT.parent
    m = measure_mod.measure(config)
    assert m.agent_py_sha256 == hashlib.sha256(AGENT_SCRIPT.read_bytes()).hexdigest()


# ---- configfs-tsm, against a fake kernel ------------------------------------------------------


class FakeTsmKernel(ConfigfsTsmProvider):
    """The provider on a plain directory, with the kernel's side of configfs-tsm played here:
    mkdir populates the attributes, writing inblob bumps generation, reading outblob produces
    a quote over inblob, rmdir takes the attributes with it."""

    def __init__(self, base: Path, pki: devpki.DevPki, *, races: int = 0,
                 provider_name: str = "tdx_guest", empty: bool = False,
                 deny: bool = False, max_attempts: int = 3) -> None:
        super().__init__(base, max_attempts=max_attempts)
        self.pki = pki
        self.races = races
        self.provider_name = provider_name
        self.empty = empty
        self.deny = deny
        self.created: list[str] = []
        self.inblobs: list[bytes] = []

    def _bump(self, entry: Path) -> None:
        generation = entry / "generation"
        generation.write_text(f"{int(generation.read_text()) + 1}\n")

    def _mkdir(self, path: Path) -> None:
        if self.deny:
            raise PermissionError(13, "Permission denied", str(path))
        super()._mkdir(path)
        (path / "provider").write_text(self.provider_name + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        self.created.append(path.name)

    def _write(self, path: Path, data: bytes) -> None:
        super()._write(path, data)
        if path.name == "inblob":
            self._bump(path.parent)

    def _read(self, path: Path) -> bytes:
        if path.name != "outblob":
            return super()._read(path)
        inblob = (path.parent / "inblob").read_bytes()
        if self.races > 0:  # another process writes this entry's inblob meanwhile
            self.races -= 1
            self._bump(path.parent)
        if self.empty:
            return b""
        return devmint.mint_tdx_quote(self.pki, now=time.time(), report_data=inblob).quote

    def _rmdir(self, path: Path) -> None:
        self.inblobs.append((path / "inblob").read_bytes())
        shutil.rmtree(path)


def leftovers(base: Path) -> list[str]:
    """Report entries still present under ``base``."""
    return sorted(os.listdir(base))


@pytest.fixture(scope="module")
def tsm_pki() -> devpki.DevPki:
    return devpki.make_pki(seed=11)


async def test_configfs_tsm_quote(tmp_path: Path, tsm_pki: devpki.DevPki) -> None:
    kernel = FakeTsmKernel(tmp_path, tsm_pki)
    report_data = os.urandom(64)
    quote = await kernel.quote(report_data)
    assert dcap_qvl.parse_quote(quote).report.report_data == report_data
    assert kernel.inblobs == [report_data]  # written exactly, no padding or truncation
    assert len(kernel.created) == 1 and kernel.created[0].startswith("eecp-")
    assert leftovers(tmp_path) == []  # the entry is gone


async def test_configfs_tsm_retries_when_another_writer_races(
        tmp_path: Path, tsm_pki: devpki.DevPki) -> None:
    kernel = FakeTsmKernel(tmp_path, tsm_pki, races=2)
    report_data = bytes(range(64))
    quote = await kernel.quote(report_data)
    assert dcap_qvl.parse_quote(quote).report.report_data == report_data
    assert len(set(kernel.created)) == 3  # a fresh entry per attempt
    assert leftovers(tmp_path) == []

    always = FakeTsmKernel(tmp_path, tsm_pki, races=99, max_attempts=3)
    with pytest.raises(QuoteProviderError) as err:
        await always.quote(report_data)
    assert err.value.reason == "tsm_generation_conflict"
    assert len(always.created) == 3
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"empty": True}, "quote_empty"),
    ({"provider_name": "sev_guest"}, "tsm_provider_unsupported"),
    ({"deny": True}, "configfs_tsm_denied"),
])
async def test_configfs_tsm_errors(tmp_path: Path, tsm_pki: devpki.DevPki,
                                   kwargs: dict[str, Any], reason: str) -> None:
    kernel = FakeTsmKernel(tmp_path, tsm_pki, **kwargs)
    with pytest.raises(QuoteProviderError) as err:
        await kernel.quote(bytes(64))
    assert err.value.reason == reason
    assert leftovers(tmp_path) == []


async def test_configfs_tsm_absent(tmp_path: Path) -> None:
    provider = ConfigfsTsmProvider(tmp_path / "sys" / "kernel" / "config" / "tsm" / "report")
    assert not provider.available()
    with pytest.raises(QuoteProviderError) as err:
        await provider.quote(bytes(64))
    assert err.value.reason == "configfs_tsm_unavailable"
    assert "does not exist" in err.value.detail
    with pytest.raises(ValueError, match="64 bytes"):
        await provider.quote(bytes(32))


# ---- configuration ----------------------------------------------------------------------------


def valid_env(**extra: str) -> dict[str, str]:
    return {"EE_CONTROL_WS": "ws://127.0.0.1:8088/v1/tunnel", "EE_REPO": "owner/repo",
            "EE_RELEASE_TAG": "v0.1.3", "EE_APP_NAME": "myapp", "EE_NETWORK": "forge-1",
            "EE_BACKEND_URL": "http://127.0.0.1:8080", **extra}


def test_config_defaults() -> None:
    config = from_env(valid_env())
    assert (config.health_interval_sec, config.health_path, config.reconnect_max_sec) == (
        30.0, "/health", 60.0)
    assert config.quote_provider == "configfs-tsm"
    assert config.tsm_report_dir == Path("/sys/kernel/config/tsm/report")
    assert config.health_url == "http://127.0.0.1:8080/health"
    assert str(uuid.UUID(config.agent_id)) == config.agent_id
    assert from_env(valid_env()).agent_id != config.agent_id  # fresh per process by default
    assert from_env(valid_env(EE_NETWORK="")).network == "forge-1"
    assert from_env(valid_env(EE_APP_NAME="MyApp")).app_name == "myapp"  # as eecp reads it


def test_the_probe_deadline_is_ee_health_probe_timeout_sec() -> None:
    config = from_env(valid_env(EE_HEALTH_PROBE_TIMEOUT_SEC="7"))
    assert config.health_probe_timeout_sec == 7.0 and config.warnings == ()
    assert from_env(valid_env()).health_probe_timeout_sec == 5.0
    with pytest.raises(ConfigError) as err:
        from_env(valid_env(EE_HEALTH_PROBE_TIMEOUT_SEC="-1"))
    assert err.value.variable == "EE_HEALTH_PROBE_TIMEOUT_SEC"


def test_the_old_name_ee_health_timeout_sec_is_still_read_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    config = from_env(valid_env(EE_HEALTH_TIMEOUT_SEC="3"))
    assert config.health_probe_timeout_sec == 3.0
    assert len(config.warnings) == 1
    assert "EE_HEALTH_TIMEOUT_SEC" in config.warnings[0]
    assert "EE_HEALTH_PROBE_TIMEOUT_SEC" in config.warnings[0]
    with pytest.raises(ConfigError) as err:  # a bad value names the variable it was read from
        from_env(valid_env(EE_HEALTH_TIMEOUT_SEC="soon"))
    assert err.value.variable == "EE_HEALTH_TIMEOUT_SEC"
    # both set (one file for eecp and the agent, say): the new name wins, the old is ignored
    both = from_env(valid_env(EE_HEALTH_TIMEOUT_SEC="120", EE_HEALTH_PROBE_TIMEOUT_SEC="4"))
    assert both.health_probe_timeout_sec == 4.0
    assert len(both.warnings) == 1 and "ignored" in both.warnings[0]
    # the agent logs it once, at start-up, once logging is set up
    caplog.set_level(logging.WARNING, logger="agent")
    agent_main._announce(config, ConfigfsTsmProvider(Path("/nonexistent")),
                         Measurements("a" * 64, "b" * 64, "image", False))
    said = [r.getMessage() for r in caplog.records if "EE_HEALTH_TIMEOUT_SEC" in r.getMessage()]
    assert said == [config.warnings[0]]


def test_the_node_id_is_sent_in_register_when_set() -> None:
    assert from_env(valid_env()).register.node_id is None
    assert "node_id" not in json.loads(encode_register(from_env(valid_env()).register))
    config = from_env(valid_env(EE_NODE_ID="acme-fra-1"))
    assert config.node_id == "acme-fra-1"
    sent = json.loads(encode_register(config.register))
    assert sent["node_id"] == "acme-fra-1"
    decoded = decode_agent_message(encode_register(config.register))
    assert isinstance(decoded, Register) and decoded.node_id == "acme-fra-1"


def test_agent_id_is_persisted_in_its_file(tmp_path: Path) -> None:
    id_file = tmp_path / "state" / "agent-id"
    first = from_env(valid_env(EE_AGENT_ID_FILE=str(id_file))).agent_id
    assert id_file.read_text().strip() == first
    assert from_env(valid_env(EE_AGENT_ID_FILE=str(id_file))).agent_id == first
    assert from_env(valid_env(EE_AGENT_ID=AGENT_ID.upper(),
                              EE_AGENT_ID_FILE=str(id_file))).agent_id == AGENT_ID
    id_file.write_text("garbage\n")
    with pytest.raises(ConfigError) as err:
        from_env(valid_env(EE_AGENT_ID_FILE=str(id_file)))
    assert err.value.variable == "EE_AGENT_ID_FILE"


@pytest.mark.parametrize(("variable", "value"), [
    ("EE_CONTROL_WS", ""),
    ("EE_CONTROL_WS", "http://127.0.0.1:8088/v1/tunnel"),
    ("EE_CONTROL_WS", "ws://127.0.0.1:99999/v1/tunnel"),
    ("EE_REPO", ""),
    ("EE_REPO", "not-a-repo"),
    ("EE_RELEASE_TAG", "../x"),
    ("EE_APP_NAME", "my_app!"),
    ("EE_NETWORK", "Forge 1"),
    ("EE_AGENT_ID", "not-a-uuid"),
    ("EE_NODE_ID", "Acme_1"),
    ("EE_NODE_ID", "-acme"),
    ("EE_BACKEND_URL", "127.0.0.1:8080"),
    ("EE_HEALTH_INTERVAL_SEC", "-1"),
    ("EE_HEALTH_INTERVAL_SEC", "nan"),
    ("EE_HEALTH_PATH", "health"),
    ("EE_QUOTE_PROVIDER", "sgx"),
    ("EE_DEV_MRTD", "abcd"),
    ("EE_DEV_RTMRS", ",".join(["00" * 48] * 3)),
    ("EE_RECONNECT_MAX_SEC", "0"),
    ("EE_RECONNECT_MIN_SEC", "120"),
    ("SEAL_VM", "maybe"),
    ("EE_LOG_LEVEL", "chatty"),
])
def test_bad_values_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_env(valid_env(**{variable: value}))
    assert err.value.variable == variable


def run_script(env: Mapping[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    argv = list(command) or [sys.executable, str(AGENT_SCRIPT)]
    return subprocess.run(argv, env={"PATH": os.environ.get("PATH", ""), **env},
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT.parent)


@pytest.mark.parametrize(("variable", "value"), [
    ("EE_REPO", "not-a-repo"),
    ("EE_HEALTH_INTERVAL_SEC", "soon"),
    ("EE_QUOTE_PROVIDER", "sgx"),
])
def test_script_exits_2_with_one_line_naming_the_variable(variable: str, value: str) -> None:
    result = run_script(valid_env(**{variable: value}))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"eecp-agent: configuration error: {variable}: ")
    assert result.stdout == ""


def test_script_needs_an_image_id_on_tdx() -> None:
    result = run_script(valid_env(EE_VM_IMAGE_ID_FILE="/nonexistent/vm_image_id"))
    assert result.returncode == 2
    assert result.stderr.startswith("eecp-agent: configuration error: VM_IMAGE_ID: ")


def test_console_script_is_the_same_entry_point() -> None:
    # installed beside the interpreter running the tests (CI does not put the venv on PATH)
    eecp_agent = str(Path(sys.executable).parent / "eecp-agent")
    assert Path(eecp_agent).exists(), "pip install -e . installs the eecp-agent script"
    result = run_script(valid_env(EE_CONTROL_WS="nope"), eecp_agent)
    assert result.returncode == 2
    assert result.stderr.startswith("eecp-agent: configuration error: EE_CONTROL_WS: ")


def test_a_production_agent_loads_no_development_code_and_no_hypercorn() -> None:
    """The agent's whole import graph, configured for configfs-tsm: the dev PKI is imported by
    the dev quote provider only when it is built (not for config defaults), and the wsproto
    patch it installs does not pull in the control plane's hypercorn."""
    probe = ("import sys, agent.agent, agent.config, agent.tunnel, agent.forward;"
             "from eecp.patches import wsproto;"
             "print(sorted(m for m in sys.modules if m.startswith(('eecp.dev', 'hypercorn'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_dev_provider_takes_the_dev_pki_defaults(pki_dir: Path) -> None:
    config = from_env(valid_env(EE_QUOTE_PROVIDER="dev", EE_DEV_PKI_DIR=str(pki_dir)))
    assert (config.dev_mrtd, config.dev_rtmrs, config.dev_fmspc) == (None, None, None)
    provider = build_provider(config)
    assert isinstance(provider, DevQuoteProvider)
    assert (provider.mrtd, provider.rtmrs, provider.fmspc) == (
        devmint.DEFAULT_MRTD, devmint.DEFAULT_RTMRS, devmint.DEFAULT_FMSPC)
    assert provider.root_pem_path == pki_dir / "root.pem"


async def test_script_connects_registers_and_stops_on_sigterm(
        tmp_path: Path, pki_dir: Path, agent_dir: Path) -> None:
    async with open_fake_eecp() as eecp, open_backend() as backend:
        env = {"PATH": os.environ.get("PATH", ""),
               **agent_env(eecp.url, backend.url, tmp_path / "fresh-pki", agent_dir,
                           EE_HEALTH_INTERVAL_SEC="30")}
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log_file:
            process = await trio.lowlevel.open_process(
                [sys.executable, str(AGENT_SCRIPT)], env=env, cwd=str(tmp_path),
                stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            peer = await eecp.accept()
            assert await peer.next() == {
                "type": "register", "repo": "acme/shop", "release_tag": "v1.2.0",
                "app_name": "shop", "network": "forge-1", "agent_id": AGENT_ID,
                "data_protocol": DATA_PROTOCOL}
            assert await peer.next() == {"type": "health", "status": "pass"}
            # the dev provider made its PKI, and answers with quotes under it
            await peer.send(AttestRequest(bytes(32), 30, "register").encode())
            raw = await peer.expect("attest_response")
            pki = devpki.load_pki(tmp_path / "fresh-pki")
            assert (tmp_path / "fresh-pki" / "root.pem").read_bytes() == pki.root_pem
            quote = base64.b64decode(raw["quote"])
            collateral = devmint.make_collateral(pki, now=time.time()).to_dcap()
            assert dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_der,
                                                int(time.time())).status == "UpToDate"
            process.send_signal(signal.SIGTERM)
            assert await peer.closed() == (1001, "agent_stopping")
            peer.done.set()
            with trio.fail_after(WAIT):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            print(log_path.read_text())  # shown by pytest when the test fails
        log = log_path.read_text()
        assert "SIGTERM: stopping" in log
        assert "EE_QUOTE_PROVIDER=dev" in log


# ---- end to end: the real control plane -------------------------------------------------------


async def test_attested_and_renewed_by_the_real_control_plane(
        mock_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    """Our agent against eecp's serve() (tests.harness): attested with a dev quote under the
    PKI eecp trusts, resolved as served, and its TTL renewed by itself on ttl_warning."""
    from tests import harness

    pki = devpki.make_pki(seed=11)
    extra = {
        # eecp trusts the root.pem the agent's dev PKI directory holds
        "EE_DCAP_ROOT_CA": str(devpki.save_pki(pki, tmp_path / "pki")),
        "EE_HEALTH_TIMEOUT_SEC": str(400 * 86400),  # the clock jumps 27 days
    }
    async with harness.open_upstreams(pki) as (pccs, github):
        env = harness.control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with harness.open_control_plane(env, pki, pccs, github) as cp, \
                open_backend() as backend:
            config = from_env({
                **valid_env(EE_CONTROL_WS=cp.ws_url, EE_BACKEND_URL=backend.url,
                            EE_REPO=harness.REPO, EE_RELEASE_TAG=harness.TAG,
                            EE_APP_NAME="shop", EE_AGENT_ID=AGENT_ID),
                "EE_QUOTE_PROVIDER": "dev", "EE_DEV_PKI_DIR": str(tmp_path / "pki"),
                "EE_TUNNEL_PING_INTERVAL_SEC": "0"})
            provider = build_provider(config)
            stop = trio.Event()

            def attested(n: int) -> Callable[[AgentState], bool]:
                return lambda s: s.attestations >= n and s.last_status is not None \
                    and s.last_status.reason == "attested"

            async with trio.open_nursery() as nursery:
                state: AgentState = await nursery.start(partial(
                    run_agent, config, provider, harness.MEAS, stop=stop))
                async with harness.real_deadline(WAIT):
                    await state.wait_for(attested(1))
                body = (await cp.resolve("shop")).json()
                assert body["allowed"] is True and body["connected"] is True, body
                assert body["registration_state"] == "active"
                assert [a["agent_id"] for a in (await cp.app("shop"))["agents"]] == [AGENT_ID]

                mock_clock.jump(27 * 86400)  # into the registration's warning window
                async with harness.real_deadline(WAIT):
                    await state.wait_for(lambda s: s.registrations >= 2)
                    await state.wait_for(lambda s: s.last_status is not None
                                         and s.last_status.extra.get("trigger") == "register"
                                         and s.attestations >= 2)
                body = (await cp.resolve("shop")).json()
                assert body["allowed"] is True and body["registration_state"] == "active"
                assert body["expires_at"] == isoformat(harness.START + 57 * 86400), body
                stop.set()
            assert state.connections == 1  # renewed on the same tunnel


async def test_an_agent_that_cannot_quote_tells_eecp_why_and_itself_how_to_develop(
        mock_clock: trio.testing.MockClock, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """No TDX here (configfs-tsm absent): the agent closes its tunnel with
    ``quote_unavailable: configfs_tsm_unavailable``, the real eecp logs that reason (not just
    that the agent left), and the agent's own log names the development way out."""
    from tests import harness

    pki = devpki.make_pki(seed=11)
    caplog.set_level(logging.INFO)
    async with harness.open_upstreams(pki) as (pccs, github):
        env = harness.control_plane_env(tmp_path, pki, pccs.url, github.url)
        async with harness.open_control_plane(env, pki, pccs, github) as cp, \
                open_backend() as backend:
            config = from_env({
                **valid_env(EE_CONTROL_WS=cp.ws_url, EE_BACKEND_URL=backend.url,
                            EE_REPO=harness.REPO, EE_RELEASE_TAG=harness.TAG,
                            EE_APP_NAME="shop", EE_AGENT_ID=AGENT_ID),
                "EE_TUNNEL_PING_INTERVAL_SEC": "0"})
            provider = ConfigfsTsmProvider(tmp_path / "no-configfs-here")
            stop = trio.Event()

            def eecp_says(text: str) -> bool:
                return any(text in r.getMessage() for r in caplog.records
                           if r.name == "eecp.tunnel")

            async with trio.open_nursery() as nursery:
                state: AgentState = await nursery.start(partial(
                    run_agent, config, provider, harness.MEAS, stop=stop))
                async with harness.real_deadline(WAIT):
                    await state.wait_for(lambda s: s.last_error is not None)
                    await harness.eventually(lambda: eecp_says("closed its tunnel"))
                stop.set()
    assert state.last_error is not None
    assert state.last_error.startswith("quote_unavailable: configfs_tsm_unavailable")
    assert eecp_says(f"agent {AGENT_ID} (shop) closed its tunnel: 1011 "
                     "quote_unavailable: configfs_tsm_unavailable")
    agent_lines = [r.getMessage() for r in caplog.records if r.name == "agent.tunnel"
                   and r.levelno == logging.ERROR]
    assert any("EE_QUOTE_PROVIDER=dev" in line and "configfs_tsm_unavailable" in line
               for line in agent_lines), agent_lines


# ---- the measured tree is the code the agent runs --------------------------------------------

def test_the_measured_tree_holds_every_eecp_module_the_agent_runs(tmp_path: Path) -> None:
    # what the agent's own modules load, asked of a fresh interpreter (the dev quote provider's
    # lazy import of the dev PKI included), must all be in what its measurement covers
    probe = ("import sys, agent.agent, agent.providers, agent.forward, agent.backend\n"
             "agent.providers.DevQuoteProvider\n"
             "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items()\n"
             "    if (n == 'eecp' or n.startswith('eecp.')) and getattr(m, '__file__', None))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=measure_mod.PROJECT).stdout.split()
    closure = {str(p) for p in measure_mod.import_closure(measure_mod.PROJECT / "agent")}
    assert loaded and set(loaded) <= closure, set(loaded) - closure
    for wire in ("frames", "streams", "protocol"):
        assert str(measure_mod.PROJECT / "eecp" / "wire" / f"{wire}.py") in closure


def test_agent_dir_sha256_changes_with_the_eecp_code_the_agent_imports(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "eecp" / "wire").mkdir(parents=True)
    (project / "agent").mkdir()
    (project / "eecp" / "__init__.py").write_text("")
    (project / "eecp" / "wire" / "__init__.py").write_text("")
    (project / "eecp" / "wire" / "frames.py").write_text("from eecp.wire import codec\n")
    (project / "eecp" / "wire" / "codec.py").write_text("X = 1\n")
    (project / "eecp" / "unused.py").write_text("Y = 1\n")
    (project / "agent" / "agent.py").write_text("def go():\n    from eecp.wire import frames\n")
    agent = project / "agent"

    def measured() -> str:
        return measure_mod.sha256_measured_tree(agent, project)

    before = measured()
    assert before != measure_mod.sha256_dir(agent)  # the closure is in it
    assert [p.relative_to(project).as_posix() for p in
            measure_mod.import_closure(agent, project)] == [
        "eecp/__init__.py", "eecp/wire/__init__.py", "eecp/wire/codec.py", "eecp/wire/frames.py"]
    (project / "eecp" / "unused.py").write_text("Y = 2\n")
    assert measured() == before  # code the agent never imports is not its measurement
    (project / "eecp" / "wire" / "codec.py").write_text("X = 2\n")  # imported through frames
    assert measured() != before
    (project / "agent" / "agent.py").write_text("def go():\n    pass\n")
    assert measured() == measure_mod.sha256_dir(agent)  # nothing of eecp: upstream's scheme

"""The hypercorn changes (eecp.patches.hypercorn): a write that loses the race with a close is
handled as a closed connection, a closed tunnel's ping task does not outlive it, a
connection's reads take more than one full DATA message at a time, a request head has
CONTROL_HEAD_TIMEOUT_SEC (keep-alive and tunnels untouched), and the control port has a
connection cap."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer
from trio.testing import MockClock

from eecp.core.capacity import HEAD_GRACE_SEC
from eecp.core.clock import TrioClock
from eecp.core.config import from_env
from eecp.dev import pki as devpki
from eecp.patches import hypercorn as hypercorn_fixes
from eecp.patches import versions
from eecp.service import CONTROL_HEAD_TIMEOUT_SEC, Bound, serve
from tests.harness import (
    START,
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    real_deadline,
    running_agent,
    safety_net,
)

WAIT = 20.0


class _BusyStream:
    """A stream whose send side is held by another task (as while ``send_eof`` runs)."""

    async def send_all(self, data: bytes) -> None:
        raise trio.BusyResourceError("another task is currently sending data on this stream")


class _Protocol:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def handle(self, event: Any) -> None:
        self.events.append(event)


async def test_a_write_racing_the_close_is_a_closed_connection_not_a_crash() -> None:
    assert hypercorn_fixes.apply()
    assert hypercorn_fixes.apply()  # idempotent
    server: Any = object.__new__(TCPServer)  # only what protocol_send touches
    server.send_lock = trio.Lock()
    server.stream = _BusyStream()
    server.protocol = _Protocol()
    await server.protocol_send(RawData(data=b"pong"))
    assert [type(e) for e in server.protocol.events] == [Closed]


def test_apply_refuses_a_hypercorn_the_fixes_were_not_written_for(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    patched = TCPServer.protocol_send
    monkeypatch.setattr(TCPServer, "_eecp_fixes_applied", False)  # as in a fresh process
    for version in ("0.19.0", "0.17.0", "0.19.0rc1", None):
        monkeypatch.setattr(versions, "installed", lambda distribution, v=version: v)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="eecp.patches.hypercorn"):
            assert not hypercorn_fixes.apply()
        assert f"hypercorn {version}: " in caplog.text and ">=0.18,<0.19" in caplog.text
        assert TCPServer.protocol_send is patched  # nothing (re)patched


def test_a_process_applies_the_patches_once_and_logs_their_versions() -> None:
    script = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s');"
              "from eecp import patches; patches.apply_all(); patches.apply_all()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    hypercorn, wsproto = versions.installed("hypercorn"), versions.installed("wsproto")
    assert result.stderr.splitlines() == [
        f"hypercorn {hypercorn}: 7 fixes applied",
        f"wsproto {wsproto}: masking in C and the two-copy frame writer installed"]


class _RecordingStream:
    """A stream with ``waiting`` bytes in its receive buffer, then EOF."""

    def __init__(self, waiting: bytes) -> None:
        self.waiting = waiting
        self.asked: list[int] = []

    async def receive_some(self, max_bytes: int) -> bytes:
        self.asked.append(max_bytes)
        data, self.waiting = self.waiting[:max_bytes], self.waiting[max_bytes:]
        return data


async def test_a_read_takes_several_full_data_messages_at_once() -> None:
    assert hypercorn_fixes.apply()
    server: Any = object.__new__(TCPServer)  # only what _read_data touches
    server.config = type("Config", (), {"read_timeout": None})()
    server.stream = _RecordingStream(b"x" * (3 * (64 * 1024 + 64)))  # three DATA messages
    server.protocol = _Protocol()
    await server._read_data()
    data = [e.data for e in server.protocol.events if isinstance(e, RawData)]
    assert len(data[0]) == 3 * (64 * 1024 + 64)  # one read, one round through the protocol
    assert all(asked >= hypercorn_fixes.READ_BYTES for asked in server.stream.asked)
    assert type(server.protocol.events[-1]) is Closed


async def test_shutdown_right_after_a_tunnel_closed_does_not_wait_out_the_pings(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """With pings every 10 s, a tunnel that just closed used to hold hypercorn's graceful
    shutdown for the whole grace period. Under a clock that only moves when told, the old
    behaviour never finishes; now the shutdown completes with no time passing."""
    pki = devpki.make_pki(seed=5)
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url,
                                EE_TUNNEL_PING_INTERVAL_SEC="10", EE_SHUTDOWN_GRACE_SEC="5")
        shutdown = trio.Event()
        async with real_deadline(WAIT), trio.open_nursery() as nursery:
            bound: Bound = await nursery.start(partial(
                serve, from_env(env), clock=TrioClock(START), shutdown=shutdown,
                handle_signals=False))
            agent = FakeAgent(f"ws://127.0.0.1:{bound.control_port}/v1/tunnel", pki)
            async with running_agent(agent):
                await agent.wait_status("attested")
            async with httpx.AsyncClient() as http:
                while (await http.get(f"{bound.control_url}/health")).json()[
                        "agents_connected"]:
                    await trio.to_thread.run_sync(time.sleep, 0.01)  # real time
            started = trio.current_time()
            shutdown.set()
        assert trio.current_time() == started


# ---- the head timeout and the connection cap (fixes 4 and 5) ------------------------------

HEAD = CONTROL_HEAD_TIMEOUT_SEC
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: t\r\n"  # no blank line: the head never ends


async def settle() -> None:
    """Let eecp take in what the clients sent (the mock clock only moves when told)."""
    await trio.testing.wait_all_tasks_blocked(0.01)


async def request(stream: trio.SocketStream, client: h11.Connection) -> int:
    """One GET /health on a kept-alive connection; its status."""
    await stream.send_all(client.send(h11.Request(method="GET", target="/health",
                                                  headers=[("Host", "t")]))
                          + client.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            client.start_next_cycle()
            return status


async def closed(stream: trio.SocketStream) -> bool:
    """True once eecp has closed the connection (having sent nothing more)."""
    try:
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:  # closed with our unread bytes: a reset
        return True


@asynccontextmanager
async def control_plane(tmp_path: Path, **extra: str) -> AsyncIterator[tuple[ControlPlane,
                                                                            FakeAgent]]:
    """eecp with one attested agent, whose tunnel is a control-port connection too."""
    pki = devpki.make_pki(seed=6)
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with (open_control_plane(env, pki, pccs, github) as cp,
                    running_agent(FakeAgent(cp.ws_url, pki)) as agent):
            await agent.wait_status("attested")
            yield cp, agent


async def connect(cp: ControlPlane, data: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", cp.bound.control_port)
    if data:
        await stream.send_all(data)
    await settle()
    return stream


async def test_a_request_head_gets_ten_seconds_on_the_control_port(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """hypercorn used to wait keep_alive_timeout (75 s) for a head: a slowloris held each
    socket that long. Now a fresh connection, silent or sending a head slowly, is closed after
    HEAD_TIMEOUT_SEC; a head completed within it is answered."""
    async with control_plane(tmp_path) as (cp, _):
        silent, slow, in_time = (await connect(cp), await connect(cp, HALF_HEAD),
                                 await connect(cp, HALF_HEAD))
        mock_clock.jump(HEAD - 1)
        await in_time.send_all(b"\r\n")
        async with safety_net(WAIT):
            client = h11.Connection(h11.CLIENT)
            client.send(h11.Request(method="GET", target="/health", headers=[("Host", "t")]))
            client.send(h11.EndOfMessage())  # (the bytes went out by hand)
            while not isinstance(event := client.next_event(), h11.Response):
                assert event is h11.NEED_DATA
                client.receive_data(await in_time.receive_some())
            assert event.status_code == 200
            await settle()
            mock_clock.jump(2)
            assert await closed(silent)
            assert await closed(slow)


async def test_keep_alive_stays_but_a_slow_next_head_is_closed_and_tunnels_are_untouched(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """Between requests a connection waits keep_alive_timeout (75 s) for the next one, and no
    longer (the timer used to be lost after a response, leaving the connection open for ever);
    once a head's first bytes arrive, it has HEAD_TIMEOUT_SEC. A tunnel (a WebSocket on the
    same port) is under neither timer."""
    async with control_plane(tmp_path) as (cp, agent), safety_net(WAIT):
        slow, quiet = await connect(cp), await connect(cp)
        clients = {stream: h11.Connection(h11.CLIENT) for stream in (slow, quiet)}
        for wait in (60, 0):
            for stream, client in clients.items():
                assert await request(stream, client) == 200
            await settle()
            mock_clock.jump(wait)  # kept alive: less than keep_alive_timeout
            await settle()
        await slow.send_all(HALF_HEAD)
        await settle()
        mock_clock.jump(HEAD + 1)
        assert await closed(slow)
        mock_clock.jump(65)  # quiet for 76 s since its last answer
        assert await closed(quiet)
        await settle()
        assert agent.closed is None  # quiet for 136 s: no timer applies to a tunnel
        assert (await cp.get("/health")).json()["agents_connected"] == 1


async def test_the_control_port_cap_closes_the_oldest_idle_connection_never_a_tunnel(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """EE_CONTROL_MAX_CONNECTIONS=3, one of them the agent's tunnel: a new connection makes
    room by closing the oldest idle one (silent, or kept alive between requests); with only
    the tunnel and heads under way left, a new one is closed at once."""
    async with (control_plane(tmp_path, EE_CONTROL_MAX_CONNECTIONS="3") as (cp, agent),
                safety_net(WAIT)):
        oldest, kept = await connect(cp), await connect(cp)
        assert await request(kept, h11.Connection(h11.CLIENT)) == 200  # then kept alive
        await settle()
        health = await cp.get("/health")  # a fourth connection: the oldest idle goes
        assert health.status_code == 200 and health.json()["agents_connected"] == 1
        assert await closed(oldest)
        await settle()  # (httpx has closed its connection too)
        await connect(cp, HALF_HEAD)  # under way: not evictable
        await connect(cp, HALF_HEAD)  # the last idle one makes room
        assert await closed(kept)
        refused = await connect(cp)
        assert await closed(refused)
        assert agent.closed is None


async def test_at_the_control_ports_cap_a_head_past_the_grace_makes_room(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """A byte on each connection left (heads under way) fills the cap only for the grace: a
    newcomer (an agent re-dialling, a health check) then takes the oldest head's place."""
    async with (control_plane(tmp_path, EE_CONTROL_MAX_CONNECTIONS="3") as (cp, agent),
                safety_net(WAIT)):
        first = await connect(cp, b"G")
        await connect(cp, b"G")
        await settle()
        refused = await connect(cp)
        assert await closed(refused)  # both heads are younger than the grace
        mock_clock.jump(HEAD_GRACE_SEC)
        health = await cp.get("/health")
        assert health.status_code == 200 and health.json()["agents_connected"] == 1
        assert await closed(first)
        assert agent.closed is None  # never the tunnel

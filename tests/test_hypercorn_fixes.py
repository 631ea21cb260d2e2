"""The hypercorn changes (eecp.hypercorn_fixes): a write that loses the race with a close is
handled as a closed connection, a closed tunnel's ping task does not outlive it, and a
connection's reads take more than one full DATA message at a time."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer
from trio.testing import MockClock

from eecp import hypercorn_fixes
from eecp.clock import TrioClock
from eecp.config import from_env
from eecp.service import Bound, serve
from tests import quotefactory as qf
from tests.harness import (
    START,
    FakeAgent,
    control_plane_env,
    open_upstreams,
    real_deadline,
    running_agent,
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
    pki = qf.make_pki(seed=5)
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

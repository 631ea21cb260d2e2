"""Bodies stream end to end, under flow control: a real eecp (its proxy listener), a real agent
forwarding over its tunnel (agent.forward, in tests.harness.FakeAgent), and a local backend that
reads and writes bodies piece by piece (tests/fakehttp.py reads a whole request body before it
answers, so it cannot tell a streaming proxy from a buffering one).

Waits are on trio events. Where a test needs "everything that can move has moved", it uses
``trio.testing.wait_all_tasks_blocked``: eecp, the agent, the backend and the client all run in
this trio run and the MockClock stands still, so once every task has been blocked for the
cushion, a transfer held by flow control stays held. Real-time bounds are safety nets only.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from trio.testing import MockClock

import eecp.agents.session
from eecp.dev import pki as devpki
from eecp.wire.frames import MAX_DATA
from eecp.wire.httpmsg import RequestHead
from eecp.wire.streams import Mux, Stream
from tests.harness import (
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    running_agent,
    safety_net,
)

WINDOW = 262144  # EE_STREAM_WINDOW_BYTES' default: eecp's receive window per stream
#: the download: 20× what the whole path buffered when held here (about 0.8 MiB: eecp's window,
#: the agent's chunk in hand, socket buffers kept small by SMALL_BUFFER)
TOTAL = 16 * 1024 * 1024
BODY = random.Random(7).randbytes(TOTAL)
PART = 200_000  # GET /part: a response that fits one window, so it completes unread
SMALL_BUFFER = 32 * 1024  # SO_RCVBUF of the client, SO_SNDBUF of the backend
HOST = b"shop.app.example.com"
SETTLE_SEC = 0.1  # real seconds every task must have been blocked for a transfer to be held


class WatchedMux(Mux):
    """eecp's side of a tunnel, noting the most response bytes it ever held unconsumed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[Stream] = []
        self.peak = 0

    @property
    def held(self) -> int:
        # every stream opened, not Mux.buffered: what a stream freed from the mux still held
        # (the bug this counts against) would not show there
        return sum(stream.buffered for stream in self.opened)

    async def open_stream(self, head: RequestHead, *, end: bool = False,
                          limit: int | None = None) -> Stream:
        stream = await super().open_stream(head, end=end, limit=limit)
        self.opened.append(stream)
        return stream

    async def feed(self, data: bytes) -> None:
        await super().feed(data)  # (within one feed held only grows: no consumer runs)
        self.peak = max(self.peak, self.held)


@pytest.fixture
def eecp_muxes(monkeypatch: pytest.MonkeyPatch) -> list[WatchedMux]:
    """The Mux of every tunnel eecp serves in the test (the agent's own is a plain Mux)."""
    made: list[WatchedMux] = []

    def make(*args: Any, **kwargs: Any) -> WatchedMux:
        made.append(WatchedMux(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(eecp.agents.session, "Mux", make)
    return made


@dataclass
class Backend:
    """The app. ``POST /upload`` notes the body as it arrives and, once it is complete, answers
    its length and SHA-256; ``GET /part`` gets BODY's first PART bytes; any other request gets
    BODY, in 64 KiB writes counted in ``sent``."""

    url: str = ""
    upload: bytearray = field(default_factory=bytearray)
    sent: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    _arrived: trio.Event = field(default_factory=trio.Event)

    async def wait_upload(self, size: int) -> None:
        while len(self.upload) < size:
            await self._arrived.wait()
            self._arrived = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        # a small send buffer: the kernel must not soak up what flow control holds back
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        conn = h11.Connection(h11.SERVER)
        async with stream:
            head = await self._next(stream, conn)
            assert isinstance(head, h11.Request)
            if head.target == b"/part":
                await self._respond(stream, conn, PART, [BODY[:PART]])
                return
            if head.target != b"/upload":
                with contextlib.suppress(trio.BrokenResourceError):  # the agent may hang up
                    await self._respond(stream, conn, TOTAL,
                                        (BODY[i:i + 65536] for i in range(0, TOTAL, 65536)))
                    self.done.set()
                return
            while isinstance(event := await self._next(stream, conn), h11.Data):
                self.upload += event.data
                self._arrived.set()
            answer = f"{len(self.upload)} {hashlib.sha256(self.upload).hexdigest()}".encode()
            await self._respond(stream, conn, len(answer), [answer])

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection, size: int,
                       chunks: Iterable[bytes]) -> None:
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("content-length", str(size)), ("connection", "close")])) or b"")
        for chunk in chunks:
            await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            self.sent += len(chunk)
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    @staticmethod
    async def _next(stream: trio.SocketStream, conn: h11.Connection) -> Any:
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        return event


@dataclass
class World:
    cp: ControlPlane
    clock: MockClock
    backend: Backend
    agent: FakeAgent


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=53)


@asynccontextmanager
async def open_world(tmp_path: Path, pki: devpki.DevPki, clock: MockClock,
                     **extra: str) -> AsyncIterator[World]:
    """eecp, the backend, and an attested agent forwarding to it."""
    assert trio.lowlevel.current_clock() is clock, "request mock_clock in the test"
    backend = Backend()
    async with open_upstreams(pki) as (pccs, github), trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, backend.serve, 0,
                                                host="127.0.0.1"))
        backend.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as cp, running_agent(
                FakeAgent(cp.ws_url, pki, backend_url=backend.url)) as agent:
            await agent.wait_status("attested")
            yield World(cp, clock, backend, agent)
        nursery.cancel_scope.cancel()


async def open_client(cp: ControlPlane) -> trio.SocketStream:
    """A raw connection to the proxy listener with a small receive buffer (set before connecting,
    so the kernel does not grow it): a client that stops reading pushes back soon."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    await sock.connect(("127.0.0.1", cp.bound.proxy_port))
    return trio.SocketStream(sock)


async def read_response(client: trio.SocketStream) -> tuple[bytes, bytes]:
    """The response head and its Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await client.receive_some(65536)
    head, _, first = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = bytearray(first)
    while len(body) < length:
        chunk = await client.receive_some(65536)
        assert chunk, f"connection closed after {len(body)} of {length} body bytes"
        body += chunk
    return head, bytes(body)


async def fetch(cp: ControlPlane, path: bytes, answers: list[tuple[bytes, bytes]]) -> None:
    """GET ``path`` on a connection of its own; its (head, body) is appended to ``answers``."""
    client = await open_client(cp)
    async with client:
        await client.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        answers.append(await read_response(client))


async def hold_download(world: World, muxes: list[WatchedMux]
                        ) -> tuple[trio.SocketStream, WatchedMux]:
    """GET the download from a client that reads nothing; return once nothing moves."""
    client = await open_client(world.cp)
    await client.send_all(b"GET /download HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    async with safety_net(10):
        while not (muxes and muxes[0].held):  # until the first bytes reached eecp
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked(SETTLE_SEC)
    return client, muxes[0]


def assert_held_back(world: World, mux: WatchedMux) -> None:
    # eecp holds what the agent had credit for: the agent spent it (more than the half that
    # eecp hands back at once), and never got more than one window (+ one frame of slack)
    assert WINDOW // 2 < mux.held <= mux.peak <= WINDOW + MAX_DATA, (mux.held, mux.peak)
    # and the backend is held back: most of its body could not leave
    assert world.backend.sent < TOTAL // 2 and not world.backend.done.is_set()


# ---- 1. request bodies are forwarded as they arrive ----------------------------------------

@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_the_backend_gets_the_first_upload_chunk_before_the_client_sends_the_next(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock, framing: str) -> None:
    first, second = b"a" * 20_000, b"b" * 30_000
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n"
        parts = [b"%x\r\n%b\r\n" % (len(first), first),
                 b"%x\r\n%b\r\n0\r\n\r\n" % (len(second), second)]
    else:
        head = b"Content-Length: %d\r\n" % (len(first) + len(second))
        parts = [first, second]
    async with open_world(tmp_path, pki, mock_clock) as world:
        client = await open_client(world.cp)
        async with client:
            await client.send_all(b"POST /upload HTTP/1.1\r\nHost: " + HOST + b"\r\n" + head
                                  + b"\r\n" + parts[0])
            # the client holds the rest back: only a path that forwards what it has, as it
            # arrives, gets the first chunk to the backend (one that gathers the body first
            # waits for the rest, and the safety net fails the test)
            async with safety_net(10):
                await world.backend.wait_upload(len(first))
            assert world.backend.upload == first
            await client.send_all(parts[1])
            async with safety_net(10):
                status, answer = await read_response(client)
    assert status.startswith(b"HTTP/1.1 200 ")
    whole = first + second
    assert answer == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()


# ---- 2. a download to a client that stops reading stays bounded in eecp -------------------

async def test_a_download_to_a_client_that_does_not_read_is_held_back_within_one_window(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        eecp_muxes: list[WatchedMux]) -> None:
    async with open_world(tmp_path, pki, mock_clock) as world:
        client, mux = await hold_download(world, eecp_muxes)
        async with client:
            assert_held_back(world, mux)
            async with safety_net(20):  # the client reads: the whole body comes, intact
                status, body = await read_response(client)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert len(body) == TOTAL and hashlib.sha256(body).digest() == hashlib.sha256(BODY).digest()
    assert world.backend.done.is_set()
    assert mux.peak <= WINDOW + MAX_DATA  # nor did eecp hold more while it flowed


async def test_responses_complete_but_unread_hold_their_slots(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        eecp_muxes: list[WatchedMux]) -> None:
    # a response that reached eecp whole but waits for a slow client still takes one of the
    # agent's EE_TUNNEL_MAX_STREAMS slots: otherwise every slow client would hold a window
    # of its own, and eecp's memory per agent would grow with the number of clients
    async with open_world(tmp_path, pki, mock_clock, EE_TUNNEL_MAX_STREAMS="1") as world:
        slow = await open_client(world.cp)
        await slow.send_all(b"GET /part HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        async with safety_net(10):
            while not (eecp_muxes and eecp_muxes[0].opened and eecp_muxes[0].opened[0].finished):
                await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked(SETTLE_SEC)
        mux = eecp_muxes[0]
        assert mux.held > 0 and mux.in_flight == 1  # complete, unread, counted
        async with safety_net(10), trio.open_nursery() as nursery:
            answers: list[tuple[bytes, bytes]] = []
            nursery.start_soon(fetch, world.cp, b"/part", answers)
            await trio.testing.wait_all_tasks_blocked(SETTLE_SEC)
            world.clock.jump(2.5)  # longer than a request waits for a slot
        [(status, body)] = answers
        assert status.startswith(b"HTTP/1.1 503 ") and b"agent_busy" in body
        async with slow, safety_net(10):  # the slow client reads: all of it, and the slot frees
            status, body = await read_response(slow)
            assert status.startswith(b"HTTP/1.1 200 ") and body == BODY[:PART]
            while mux.in_flight:
                await trio.testing.wait_all_tasks_blocked()
        assert mux.peak <= WINDOW + MAX_DATA


async def test_a_client_that_takes_nothing_is_dropped_and_frees_the_slot(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        eecp_muxes: list[WatchedMux]) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_TUNNEL_MAX_STREAMS="1",
                          EE_PROXY_SEND_TIMEOUT_SEC="30") as world:
        client, mux = await hold_download(world, eecp_muxes)
        async with client:
            assert_held_back(world, mux)
            assert mux.in_flight == 1  # the agent's only slot
            world.clock.jump(31)  # its write has waited longer than EE_PROXY_SEND_TIMEOUT_SEC
            async with safety_net(10):
                while mux.in_flight:
                    await trio.testing.wait_all_tasks_blocked()
                with contextlib.suppress(trio.BrokenResourceError):  # (or a reset)
                    while await client.receive_some(65536):  # what was in flight, the close
                        pass
        answers: list[tuple[bytes, bytes]] = []
        async with safety_net(10):
            await fetch(world.cp, b"/part", answers)  # the next request gets the slot
        [(status, body)] = answers
        assert status.startswith(b"HTTP/1.1 200 ") and body == BODY[:PART]


# ---- 3. control messages keep flowing while data is held by flow control -------------------

async def test_attestation_and_health_go_on_while_a_download_is_held(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        eecp_muxes: list[WatchedMux]) -> None:
    # the hour's jump would otherwise also be an hour of health silence (EE_HEALTH_TIMEOUT_SEC,
    # 120 s by default, is test_tunnel's subject): only the messages themselves matter here
    # and a client that takes nothing for an hour would be dropped (EE_PROXY_SEND_TIMEOUT_SEC)
    async with open_world(tmp_path, pki, mock_clock, EE_HEALTH_TIMEOUT_SEC="86400",
                          EE_PROXY_SEND_TIMEOUT_SEC="86400") as world:
        client, mux = await hold_download(world, eecp_muxes)
        agent = world.agent
        async with client:
            assert_held_back(world, mux)
            # health reports cross the tunnel whose only stream is stuck, and are acted on
            await agent.health("fail")
            await agent.wait_status("health_fail")
            assert (await world.cp.resolve("shop")).status_code == 403
            await agent.health("pass")
            await agent.wait_status("health_restored")
            assert (await world.cp.resolve("shop")).status_code == 200
            # an hour on, the periodic challenge goes out, is answered and accepted
            world.clock.jump(3600)
            await agent.wait_for(lambda a: a.statuses().count(("ok", "attested")) == 2)
            assert [c["reason"] for c in agent.challenges()] == ["register", "periodic"]
            assert (await world.cp.resolve("shop")).status_code == 200
            assert agent.closed is None
            # the download is still held, not lost: it resumes and arrives whole
            assert_held_back(world, mux)
            async with safety_net(20):
                status, body = await read_response(client)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert hashlib.sha256(body).digest() == hashlib.sha256(BODY).digest()

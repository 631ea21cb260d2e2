"""A stream's failure ends that stream only: abandoned uploads, bad chunks, backends that break
mid-answer, resets either way. The tunnel, every other stream on it (a long SSE stream of
another user) and the agent's attestation state are untouched.

A real eecp (its proxy listener), the real agent forwarding code over a real tunnel
(``agent.forward`` in :class:`tests.harness.FakeAgent`), and a backend on a real socket whose
answers the test paces with events.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from eecp.dev import pki as devpki
from tests.harness import (
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    running_agent,
    safety_net,
)

HOST = b"shop.example.com"
EVENTS = 6
CHUNK = bytes(65536)
DOWNLOAD = 64 * len(CHUNK)  # 4 MiB: more than the socket buffers between eecp and a client
SMALL_BUFFER = 32 * 1024  # SO_RCVBUF of a client that stops reading


@dataclass
class Backend:
    """``GET /sse`` writes one event each time ``tick`` is called, ``EVENTS`` in all;
    ``POST /upload`` reads its body and answers its length; ``GET /broken-head`` and
    ``GET /broken-body`` hang up mid-head and mid-body."""

    url: str = ""
    _tick: trio.MemorySendChannel[None] | None = None
    _ticks: trio.MemoryReceiveChannel[None] | None = None
    uploads_started: int = 0
    sse_done: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._tick, self._ticks = trio.open_memory_channel[None](EVENTS)

    def tick(self) -> None:
        assert self._tick is not None
        self._tick.send_nowait(None)

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            head = await _next(stream, conn)
            assert isinstance(head, h11.Request)
            with contextlib.suppress(trio.BrokenResourceError):  # the agent hung up
                await self._answer(stream, conn, head)

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection,
                      head: h11.Request) -> None:
        if head.target == b"/sse":
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "text/event-stream")])) or b"")
            assert self._ticks is not None
            for i in range(EVENTS):
                await self._ticks.receive()
                await stream.send_all(conn.send(h11.Data(data=b"data: %d\n\n" % i)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            self.sse_done.set()
        elif head.target == b"/upload":
            self.uploads_started += 1
            size = 0
            while isinstance(event := await _next(stream, conn), h11.Data):
                size += len(event.data)
            body = str(size).encode()
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", str(len(body)))])) or b"")
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
        elif head.target == b"/hello":
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", "5")])) or b"")
            await stream.send_all(conn.send(h11.Data(data=b"hello")) or b"")
        elif head.target == b"/download":
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-length", str(DOWNLOAD))])) or b"")
            for _ in range(DOWNLOAD // len(CHUNK)):
                await stream.send_all(conn.send(h11.Data(data=CHUNK)) or b"")
        elif head.target == b"/broken-head":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Le")
        elif head.target == b"/broken-body":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")


async def _next(stream: trio.SocketStream, conn: h11.Connection) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("the agent hung up")
        conn.receive_data(data)
    return event


@dataclass
class World:
    cp: ControlPlane
    backend: Backend
    agent: FakeAgent


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=61)


@asynccontextmanager
async def open_world(tmp_path: Path, pki: devpki.DevPki, **extra: str) -> AsyncIterator[World]:
    backend = Backend()
    async with open_upstreams(pki) as (pccs, github), trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, backend.serve, 0,
                                                host="127.0.0.1"))
        backend.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as cp, running_agent(
                FakeAgent(cp.ws_url, pki, backend_url=backend.url)) as agent:
            await agent.wait_status("attested")
            yield World(cp, backend, agent)
        nursery.cancel_scope.cancel()


async def connect(cp: ControlPlane) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", cp.bound.proxy_port)


async def read_until(client: trio.SocketStream, buffer: bytearray, marker: bytes) -> None:
    while marker not in buffer:
        data = await client.receive_some(65536)
        assert data, f"connection closed before {marker!r}; got {bytes(buffer)!r}"
        buffer += data


async def abandon_upload(cp: ControlPlane, how: str) -> None:
    """Start an upload and walk away from it (``how``), on a connection of its own."""
    client = await connect(cp)
    if how == "client_gone_mid_body":
        await client.send_all(b"POST /upload HTTP/1.1\r\nHost: " + HOST
                              + b"\r\nContent-Length: 100\r\n\r\n0123456789")
    elif how == "bad_chunk":
        await client.send_all(b"POST /upload HTTP/1.1\r\nHost: " + HOST
                              + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nzz\r\n")
    elif how == "client_gone_mid_chunked":
        await client.send_all(b"POST /upload HTTP/1.1\r\nHost: " + HOST
                              + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n")
    # let the body reach the agent and the backend start reading it before the client goes
    await trio.testing.wait_all_tasks_blocked(0.05)
    await client.aclose()
    await trio.testing.wait_all_tasks_blocked(0.05)


async def fetch(cp: ControlPlane, path: bytes) -> bytes:
    """GET ``path``; the raw response up to the connection's close (Connection: close)."""
    client = await connect(cp)
    async with client:
        await client.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST
                              + b"\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := await client.receive_some(65536):
            data += chunk
        return bytes(data)


FAILURES = ["client_gone_mid_body", "bad_chunk", "client_gone_mid_chunked", "broken_head",
            "broken_body"]


async def fail_one_stream(cp: ControlPlane, how: str) -> None:
    if how == "broken_head":
        answer = await fetch(cp, b"/broken-head")
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        assert b'"agent_error"' in answer
    elif how == "broken_body":
        answer = await fetch(cp, b"/broken-body")
        # the head left: the only honest signal is the connection closing short of the body
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert not answer.endswith(b"\r\n\r\n" + b"0123456789" + b"x" * 90)
    else:
        await abandon_upload(cp, how)


async def test_failed_streams_leave_a_long_sse_stream_and_the_session_alone(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_world(tmp_path, pki) as world, safety_net(60):
        sse = await connect(world.cp)
        await sse.send_all(b"GET /sse HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        received = bytearray()
        await read_until(sse, received, b"\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 200 "), bytes(received)
        for i in range(EVENTS):
            # every way one stream can fail, interleaved with the SSE stream's events
            for how in FAILURES:
                await fail_one_stream(world.cp, how)
            world.backend.tick()
            await read_until(sse, received, b"data: %d\n\n" % i)
        await world.backend.sse_done.wait()
        await read_until(sse, received, b"0\r\n\r\n")  # the chunked body's end
        await sse.aclose()
        # the tunnel never ended, and the agent is still attested and served
        assert world.agent.closed is None
        answer = (await world.cp.resolve("shop")).json()
        assert answer["allowed"] is True, answer
        # a fresh upload on the same tunnel still works
        client = await connect(world.cp)
        async with client:
            await client.send_all(b"POST /upload HTTP/1.1\r\nHost: " + HOST
                                  + b"\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            answer_bytes = bytearray()
            await read_until(client, answer_bytes, b"\r\n\r\n5")
        # the session never ended; no traceback for any of it: one line per failed stream
        assert not [r for r in caplog.records if r.name == "eecp.session"
                    and "ended" in r.getMessage()]
        tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert not tracebacks, [r.getMessage() for r in tracebacks]
        lines = [r.getMessage() for r in caplog.records if r.name == "eecp.dataplane"
                 and "failed" in r.getMessage()]
        assert len(lines) == EVENTS * 4, lines  # the broken head is a plain 502 answer


# ---- slow peers cannot starve an app ---------------------------------------------------------

def as_client(address: str) -> bytes:
    """The header a trusted front proxy (the test connects from loopback) names a client by."""
    return b"X-Forwarded-For: " + address.encode() + b"\r\n"


async def trickle(cp: ControlPlane, client: str, answers: list[bytes]) -> None:
    """An upload that sends a byte every 3 s (of the mock clock) until the server answers."""
    sock = await connect(cp)
    async with sock:
        await sock.send_all(b"POST /upload HTTP/1.1\r\nHost: " + HOST + b"\r\n"
                            + as_client(client) + b"Content-Length: 100000\r\n\r\nx")
        async with trio.open_nursery() as nursery:
            async def drip() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    while True:
                        await trio.sleep(3)
                        await sock.send_all(b"x")
            nursery.start_soon(drip)
            answer = bytearray()
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await sock.receive_some(65536):
                    answer += chunk
            nursery.cancel_scope.cancel()
        answers.append(bytes(answer))


async def hold_download(cp: ControlPlane, client: str, heads: list[bytes]) -> None:
    """A download whose client reads its head, then nothing more."""
    raw = trio.socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    await raw.connect(("127.0.0.1", cp.bound.proxy_port))
    sock = trio.SocketStream(raw)
    async with sock:
        await sock.send_all(b"GET /download HTTP/1.1\r\nHost: " + HOST + b"\r\n"
                            + as_client(client) + b"\r\n")
        head = bytearray()
        await read_until(sock, head, b"\r\n\r\n")
        heads.append(bytes(head))
        await trio.sleep_forever()


async def served_at(cp: ControlPlane, client: str, started: float) -> float:
    """Ask for /hello as ``client`` until it is served; the mock seconds that took."""
    while True:
        sock = await connect(cp)
        async with sock:
            await sock.send_all(b"GET /hello HTTP/1.1\r\nHost: " + HOST + b"\r\n"
                                + as_client(client) + b"Connection: close\r\n\r\n")
            answer = bytearray()
            while chunk := await sock.receive_some(65536):
                answer += chunk
        if answer.startswith(b"HTTP/1.1 200 "):
            return trio.current_time() - started
        assert answer.startswith(b"HTTP/1.1 503 "), bytes(answer)  # agent_busy meanwhile


async def run_for(clock: MockClock, seconds: int) -> None:
    """Let ``seconds`` of mock time pass, one at a time, everything settling in between."""
    for _ in range(seconds):
        clock.jump(1)
        await trio.testing.wait_all_tasks_blocked(0.02)


async def test_one_client_cannot_hold_every_stream_slot(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki) as world, safety_net(60), \
            trio.open_nursery() as nursery:
        answers: list[bytes] = []
        for _ in range(100):  # one client, a hundred trickling uploads
            nursery.start_soon(trickle, world.cp, "198.51.100.1", answers)
        await trio.testing.wait_all_tasks_blocked(0.05)
        # all but EE_PROXY_MAX_STREAMS_PER_CLIENT (16) were refused at once
        assert len(answers) == 100 - 16
        assert all(a.startswith(b"HTTP/1.1 429 ") and b'"client_stream_limit"' in a
                   for a in answers), answers[:1]
        # another client is served at once; this one may not open more meanwhile
        assert await served_at(world.cp, "203.0.113.9", trio.current_time()) == 0
        mine = await fetch_as(world.cp, b"/hello", "198.51.100.1")
        assert mine.startswith(b"HTTP/1.1 429 "), mine
        nursery.cancel_scope.cancel()


async def fetch_as(cp: ControlPlane, path: bytes, client: str) -> bytes:
    sock = await connect(cp)
    async with sock:
        await sock.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n"
                            + as_client(client) + b"Connection: close\r\n\r\n")
        data = bytearray()
        while chunk := await sock.receive_some(65536):
            data += chunk
        return bytes(data)


async def test_trickling_uploads_cannot_starve_an_app(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki) as world, safety_net(60), \
            trio.open_nursery() as nursery:
        answers: list[bytes] = []
        for i in range(100):  # a hundred clients, each trickling a byte every 3 s
            nursery.start_soon(trickle, world.cp, f"198.51.100.{i + 1}", answers)
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert answers == []  # every stream slot of the agent is held
        started = trio.current_time()
        result: list[float] = []

        async def fresh() -> None:
            result.append(await served_at(world.cp, "203.0.113.9", started))
        nursery.start_soon(fresh)
        await run_for(mock_clock, 25)
        # the trickles were cut at the minimum rate's grace; the fresh request then got a slot
        assert result and result[0] <= 20, result
        assert len(answers) == 100
        assert all(a.startswith(b"HTTP/1.1 408 ") and b'"body_too_slow"' in a
                   for a in answers), answers[:1]
        nursery.cancel_scope.cancel()


async def test_clients_that_stop_reading_cannot_starve_an_app(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, EE_TUNNEL_MAX_STREAMS="20") as world, \
            safety_net(60), trio.open_nursery() as nursery:
        heads: list[bytes] = []
        for i in range(20):  # twenty clients whose downloads fill the buffers, then stall
            nursery.start_soon(hold_download, world.cp, f"198.51.100.{i + 1}", heads)
        async with safety_net(20):
            while len(heads) < 20:
                await trio.testing.wait_all_tasks_blocked(0.05)
        assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads)
        started = trio.current_time()
        result: list[float] = []

        async def fresh() -> None:
            result.append(await served_at(world.cp, "203.0.113.9", started))
        nursery.start_soon(fresh)
        await run_for(mock_clock, 25)
        assert result and result[0] <= 20, result
        nursery.cancel_scope.cancel()

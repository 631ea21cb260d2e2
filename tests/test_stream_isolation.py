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

from tests import quotefactory as qf
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
def pki() -> qf.TestPki:
    return qf.make_pki(seed=61)


@asynccontextmanager
async def open_world(tmp_path: Path, pki: qf.TestPki) -> AsyncIterator[World]:
    backend = Backend()
    async with open_upstreams(pki) as (pccs, github), trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, backend.serve, 0,
                                                host="127.0.0.1"))
        backend.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        env = control_plane_env(tmp_path, pki, pccs.url, github.url)
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
        tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock,
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

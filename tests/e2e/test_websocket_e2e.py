"""WebSocket apps through the tunnel (issue 17, part 2), end to end through real sockets: a
trio-websocket client (or a raw one, for bytes made by hand) → eecp's proxy listener → the
tunnel → the real agent forwarding (agent.forward, in tests.harness.FakeAgent) → a real
WebSocket app (tests/wsapp.py). Real clock.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket

from eecp.dev import pki as devpki
from tests.e2e.test_seed_agent import SeedAgent
from tests.fakehttp import Request, Response, open_fake_http
from tests.harness import (
    ControlPlane,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    real_deadline,
    resolve_until,
    running_agent,
)
from tests.wsapp import MAX_MESSAGE, MIB, RawEcho, client_frame, raw_handshake, serve_echo


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=172)


@asynccontextmanager
async def open_cp(tmp_path: Path, pki: devpki.DevPki, **env: str
                  ) -> AsyncIterator[ControlPlane]:
    async with open_upstreams(pki) as (pccs, github), open_control_plane(
            control_plane_env(tmp_path, pki, pccs.url, github.url, **env), pki, pccs,
            github) as cp:
        yield cp


@asynccontextmanager
async def served(tmp_path: Path, pki: devpki.DevPki, backend_url: str | None = None,
                 **env: str) -> AsyncIterator[tuple[ControlPlane, FakeAgent]]:
    """eecp with one attested agent forwarding to ``backend_url`` (else the echo app)."""
    async with open_cp(tmp_path, pki, **env) as cp, trio.open_nursery() as nursery:
        if backend_url is None:
            server = await nursery.start(serve_echo)
            backend_url = f"http://127.0.0.1:{server.port}"
        agent = FakeAgent(cp.ws_url, pki, backend_url=backend_url)
        async with running_agent(agent):
            await resolve_until(cp, "shop", lambda b: b["allowed"])
            yield cp, agent
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(cp: ControlPlane, path: str = "/echo") -> AsyncIterator[WebSocketConnection]:
    port = cp.bound.proxy_port
    async with open_websocket("127.0.0.1", port, path, use_ssl=False,
                              extra_headers=[(b"x-ee-app", b"shop")],
                              max_message_size=MAX_MESSAGE) as ws:
        yield ws


async def test_text_binary_large_and_close_codes_pass_through(tmp_path: Path,
                                                              pki: devpki.DevPki) -> None:
    big = random.Random(17).randbytes(MIB)
    async with served(tmp_path, pki) as (cp, _), real_deadline(30):
        async with client(cp, "/headers") as ws:
            headers = json.loads(await ws.get_message())
            # the app saw a WebSocket handshake of its own, with eecp's forwarding headers
            assert headers["upgrade"].lower() == "websocket"
            assert "sec-websocket-key" in headers and "x-forwarded-for" in headers
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(big)
            assert await ws.get_message() == big
            await ws.ping(b"are you there")  # answered by the app, through the tunnel
            await ws.send_message("close:4321:done here")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 4321
        assert closed.value.reason.reason == "done here"
        async with client(cp) as ws:  # the client closing first
            await ws.send_message(b"\x00\x01")
            assert await ws.get_message() == b"\x00\x01"
            await ws.aclose(1000, "bye")
        assert ws.closed is not None and ws.closed.code == 1000
        # many at once, each its own stream
        async with client(cp) as one, client(cp) as two:
            await one.send_message("one")
            await two.send_message("two")
            assert (await two.get_message(), await one.get_message()) == ("two", "one")
        # and the slots are free again once they closed
        await streams_drain(cp)


async def streams_drain(cp: ControlPlane) -> None:
    """Wait until eecp has no proxied stream in flight (its gauge says 0)."""
    for _ in range(500):
        if "eecp_streams_in_flight 0.0" in (await cp.get("/metrics")).text:
            return
        await trio.sleep(0.02)
    raise AssertionError("streams still in flight")


async def test_bytes_are_relayed_exactly(tmp_path: Path, pki: devpki.DevPki) -> None:
    """Fragments, a ping between them, a 16-bit and a 64-bit length, a close: the app gets
    the client's bytes exactly, and the client the app's (here: the same bytes back)."""
    raw = RawEcho()
    async with trio.open_nursery() as nursery:
        await nursery.start(raw.serve)
        async with served(tmp_path, pki, raw.url) as (cp, _), real_deadline(30):
            stream, head, rest = await raw_handshake(cp.bound.proxy_port, "shop")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"sec-websocket-accept:" in head.lower()
            sent = b"".join([
                client_frame(0x1, b"frag", fin=False), client_frame(0x9, b"ping!"),
                client_frame(0x0, b"ment", fin=False), client_frame(0x0, b"ed", fin=True),
                client_frame(0x2, random.Random(3).randbytes(1000)),
                client_frame(0x2, random.Random(4).randbytes(70_000)),
                client_frame(0x8, b"\x03\xe8bye")])
            await stream.send_all(sent)
            got = bytearray(rest)
            while len(got) < len(sent):
                got += await stream.receive_some(65536)
            assert bytes(got) == sent
            assert bytes(raw.received) == sent
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_health_fail_closes_the_agents_websockets(tmp_path: Path,
                                                          pki: devpki.DevPki) -> None:
    async with served(tmp_path, pki) as (cp, agent), real_deadline(30):
        async with client(cp) as ws:
            await ws.send_message("before")
            assert await ws.get_message() == "before"
            await agent.health("fail")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 1001
        assert closed.value.reason.reason == "health_fail"
        await streams_drain(cp)


async def test_an_idle_websocket_is_closed(tmp_path: Path, pki: devpki.DevPki) -> None:
    async with served(tmp_path, pki, EE_PROXY_WS_IDLE_SEC="0.5") as (cp, _), \
            real_deadline(30):
        async with client(cp) as ws:
            await ws.send_message("x")
            assert await ws.get_message() == "x"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()  # nothing moves: eecp ends it
        assert closed.value.reason.code == 1001
        assert closed.value.reason.reason == "idle_timeout"


async def test_websocket_streams_hold_the_agents_stream_slots(tmp_path: Path,
                                                              pki: devpki.DevPki) -> None:
    async with served(tmp_path, pki, EE_TUNNEL_MAX_STREAMS="2",
                      EE_PROXY_SLOT_RESERVE="0") as (cp, _), real_deadline(30), \
            client(cp) as one, client(cp) as two:
        await one.send_message("1")
        await two.send_message("2")
        assert await one.get_message() == "1" and await two.get_message() == "2"
        async with httpx.AsyncClient() as http:
            busy = await http.get(f"{cp.proxy_url}/echo", headers={"x-ee-app": "shop"})
        assert busy.status_code == 503
        assert busy.json()["reason"] == "agent_busy"


async def test_an_app_refusing_the_upgrade_answers_as_usual(tmp_path: Path,
                                                            pki: devpki.DevPki) -> None:
    """A plain HTTP app behind the agent: its answer to the handshake is relayed."""
    async def plain(request: Request) -> Response:
        return Response(200, b"no websockets here")

    async with open_fake_http(plain) as app, served(tmp_path, pki, app.url) as (cp, _):
        stream, head, _ = await raw_handshake(cp.bound.proxy_port, "shop", "/hello")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"upgrade:" not in head.lower()
        await stream.aclose()


async def test_a_seed_protocol_agent_refuses_websockets(tmp_path: Path,
                                                        pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp, trio.open_nursery() as nursery:
        seed = SeedAgent(cp.ws_url, pki)
        await nursery.start(seed.run)
        await resolve_until(cp, "shop", lambda b: b["allowed"])
        stream, head, rest = await raw_handshake(cp.bound.proxy_port, "shop")
        assert head.startswith(b"HTTP/1.1 501 ")
        while b"}" not in rest:
            rest += await stream.receive_some(4096)
        assert json.loads(rest)["reason"] == "websocket_unsupported"
        await stream.aclose()
        nursery.cancel_scope.cancel()

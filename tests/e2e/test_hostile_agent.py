"""What an agent sends is hostile input too: response heads an agent must not send, data frames
before it is admitted, floods of frames after, and compression on the tunnel. Through a real eecp
and real WebSockets."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from trio.testing import MockClock
from wsproto.extensions import PerMessageDeflate

from eecp.dev import pki as devpki
from eecp.wire.frames import DataFrame, encode_frame
from eecp.wire.httpmsg import ResponseHead
from eecp.wire.streams import Mux
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


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=67)


@asynccontextmanager
async def open_cp(tmp_path: Path, pki: devpki.DevPki) -> AsyncIterator[ControlPlane]:
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url)
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield cp


# ---- response heads and bodies an agent must not send -----------------------------------------

ANSWERS = {
    "/switching": (ResponseHead(101, [("upgrade", "websocket")]), b""),
    "/early-hints": (ResponseHead(103, [("link", "</a.css>; rel=preload")]), b""),
    "/negative": (ResponseHead(200, [("content-length", "-1")]), b"abc"),
    "/two-lengths": (ResponseHead(200, [("content-length", "3"), ("content-length", "4")]),
                     b"abcd"),
    "/too-long": (ResponseHead(200, [("content-length", "5")]), b"0123456789"),
}


async def hostile_streams(mux: Mux) -> None:
    """Answer each request with what ANSWERS has for its path."""
    async with trio.open_nursery() as nursery:
        while True:
            stream, head = await mux.accept_stream()
            answer, body = ANSWERS[head.path]

            async def respond(stream=stream, answer=answer, body=body) -> None:  # type: ignore[no-untyped-def]
                async with stream:
                    await stream.send_head(answer)
                    if body:
                        await stream.send(body, end=True)
                    else:
                        await stream.end()
            nursery.start_soon(respond)


async def get(cp: ControlPlane, path: bytes) -> bytes:
    client = await trio.open_tcp_stream("127.0.0.1", cp.bound.proxy_port)
    async with client:
        await client.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST
                              + b"\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := await client.receive_some(65536):
            data += chunk
        return bytes(data)


async def test_heads_an_agent_must_not_send_are_502_agent_error(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_cp(tmp_path, pki) as cp, running_agent(
            FakeAgent(cp.ws_url, pki, serve_streams=hostile_streams)) as agent, \
            safety_net(30):
        await agent.wait_status("attested")
        for path in ("/switching", "/early-hints", "/negative", "/two-lengths"):
            answer = await get(cp, path.encode())
            assert answer.startswith(b"HTTP/1.1 502 "), (path, answer)
            assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
                "allowed": True, "reason": "agent_error"}
        # a body longer than its Content-Length: the declared bytes, the rest dropped
        answer = await get(cp, b"/too-long")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"01234", answer
        assert b"content-length: 5" in head.lower()
        assert agent.closed is None  # the tunnel carries on
        bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert not bad, [r.getMessage() for r in bad]
        assert any("more than its Content-Length" in r.getMessage() for r in caplog.records)


# ---- before admission, only JSON control messages ---------------------------------------------

async def test_data_frames_before_the_first_accepted_attestation_end_the_session(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    async with open_cp(tmp_path, pki) as cp, running_agent(
            FakeAgent(cp.ws_url, pki, auto=False)) as agent, safety_net(30):
        await agent.wait_for(lambda a: bool(a.challenges()))  # registered, not yet admitted
        await agent.send(encode_frame(DataFrame(1, b"x" * 100)))
        assert await agent.wait_closed() == (1007, "binary_unexpected")


# ---- no compression on tunnels: the close reason always arrives --------------------------------

async def refused_with_compression_offered(cp: ControlPlane
                                           ) -> tuple[list[str] | None, int, str | None]:
    """Open a tunnel offering permessage-deflate, register with an unsupported data protocol;
    the extensions eecp accepted, and the close code and reason it sent."""
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock = await trio.open_tcp_stream("127.0.0.1", cp.bound.control_port)
    async with sock:
        await sock.send_all(ws.send(wsproto.events.Request(
            host="127.0.0.1", target="/v1/tunnel", extensions=[PerMessageDeflate()])))
        accepted: list[str] | None = None
        while True:
            data = await sock.receive_some(65536)
            assert data, "eecp closed the connection without a close frame"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, wsproto.events.AcceptConnection):
                    accepted = [e.name for e in event.extensions]
                    await sock.send_all(ws.send(wsproto.events.TextMessage(json.dumps({
                        "type": "register", "repo": "acme/shop", "release_tag": "v1.2.0",
                        "app_name": "shop", "network": "forge-1",
                        "agent_id": "6f1c1d6e-3b1e-4a5e-9c5e-1e2f3a4b5c6d",
                        "data_protocol": 99}))))
                elif isinstance(event, wsproto.events.CloseConnection):
                    return accepted, event.code, event.reason


async def test_tunnels_never_negotiate_compression_and_refusals_keep_their_reason(
        tmp_path: Path, pki: devpki.DevPki) -> None:
    async with open_cp(tmp_path, pki) as cp:
        with trio.fail_after(60):
            for _ in range(20):
                accepted, code, reason = await refused_with_compression_offered(cp)
                assert accepted == []  # no permessage-deflate
                assert (code, reason) == (4004, "data_protocol_unsupported")

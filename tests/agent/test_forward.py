"""The agent's forwarding (agent.forward) against a real local backend, through a Mux pair.

eecp's side is a real :class:`~eecp.wire.streams.Mux` (the opener) wired to the agent's by the
in-memory tunnel of ``tests.wire.test_streams``; the backend is a tiny trio + h11 HTTP/1.1 server on
127.0.0.1 that can stream its answer chunk by chunk. The last tests run the whole agent over a
real WebSocket (``tests.agent.test_agent``'s scripted eecp). Every test is bounded in time.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from agent.forward import ForwardError, backend_target, open_backend_pool, serve_forwarding
from eecp.dataplane.http import Request, Responder, serve_http
from eecp.wire.frames import ResponseHeadFrame
from eecp.wire.httpmsg import RequestHead, ResponseHead
from eecp.wire.streams import Mux, Stream, StreamError
from tests.agent.test_agent import open_world, running_agent
from tests.wire.test_streams import Pair, mux_pair, read_all

WAIT = 10.0
BIG = 50 * 1024 * 1024


# ---- a streaming backend ----------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the backend received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower-cased (h11's), order kept
    size: int = 0
    sha256: str = ""
    body: bytes = b""  # the first MiB

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


class Reply:
    """The handler's side of one connection: answer in pieces, or misbehave."""

    def __init__(self, sock: trio.SocketStream, conn: h11.Connection) -> None:
        self._sock = sock
        self._conn = conn

    async def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        # one request per connection; no Content-Length given means chunked
        await self._write(h11.Response(status_code=status,
                                       headers=[*headers, ("Connection", "close")]))

    async def chunk(self, data: bytes) -> None:
        await self._write(h11.Data(data=data))

    async def end(self) -> None:
        await self._write(h11.EndOfMessage())

    async def raw(self, data: bytes) -> None:
        await self._sock.send_all(data)

    async def client_gone(self) -> None:
        """Return once the client (the agent's httpx) closes the connection."""
        try:
            while await self._sock.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass

    async def _write(self, event: h11._events.Event) -> None:
        data = self._conn.send(event)
        if data:
            await self._sock.send_all(data)


Handler = Callable[[Seen, Reply], Awaitable[None]]


@dataclass
class Backend:
    url: str
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0


async def _read_request(sock: trio.SocketStream, conn: h11.Connection) -> Seen | None:
    seen: Seen | None = None
    digest = hashlib.sha256()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await sock.receive_some(65536)
            if not data:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            seen = Seen(event.method.decode(), event.target.decode(),
                        [(n.decode(), v.decode("latin-1")) for n, v in event.headers])
        elif isinstance(event, h11.Data) and seen is not None:
            digest.update(event.data)
            seen.size += len(event.data)
            if len(seen.body) < 1 << 20:
                seen.body += event.data
        elif isinstance(event, h11.EndOfMessage) and seen is not None:
            seen.sha256 = digest.hexdigest()
            return seen
        else:
            return None


@asynccontextmanager
async def open_backend(handler: Handler) -> AsyncIterator[Backend]:
    """Serve ``handler`` on 127.0.0.1:<random port> for the block."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend = Backend(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")

    async def on_connection(sock: trio.SocketStream) -> None:
        backend.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with sock:
            try:
                seen = await _read_request(sock, conn)
                if seen is not None:
                    backend.seen.append(seen)
                    await handler(seen, Reply(sock, conn))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the agent gave up on this request: what some tests want

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, on_connection, listeners)
        yield backend
        nursery.cancel_scope.cancel()


async def echo(seen: Seen, reply: Reply) -> None:
    """Answer with what was asked, as JSON, plus hop-by-hop headers the agent must drop."""
    body = json.dumps({"method": seen.method, "target": seen.target, "headers": seen.headers,
                       "body": seen.body.decode("latin-1")}).encode()
    await reply.head(200, [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("Set-Cookie", "a=1; Path=/"), ("Keep-Alive", "timeout=5"), ("X-Hop", "1"),
        ("Connection", "X-Hop"), ("Proxy-Authenticate", "Basic"), ("Set-Cookie", "b=2"),
        ("Trailer", "X-Checksum"), ("Upgrade", "h2c"), ("set-cookie", "c=3"),
        ("X-End", "kept")])
    await reply.chunk(body)
    await reply.end()


# ---- driving requests through the tunnel ------------------------------------------------------


@asynccontextmanager
async def forwarding(backend_url: str, *, timeout_sec: float = WAIT, wait: float = WAIT
                     ) -> AsyncIterator[Pair]:
    """eecp's mux and the agent's, with ``serve_forwarding`` on the agent's; at the end the
    agent's mux is closed, and ``serve_forwarding`` must return by itself for the block to."""
    async with (mux_pair(wait=wait) as pair, open_backend_pool(backend_url) as pool,
                trio.open_nursery() as nursery):
        nursery.start_soon(partial(serve_forwarding, pair.agent, pool, timeout_sec=timeout_sec))
        yield pair
        pair.agent.close()


async def call(pair: Pair, method: str, path: str, headers: list[tuple[str, str]] | None = None,
               body: bytes | None = None) -> tuple[ResponseHead, bytes]:
    """One request from eecp's side; the answer, or the StreamError of its reset."""
    async with await pair.eecp.open_stream(RequestHead(method, path, headers or [])) as stream:
        if body is not None:
            await stream.send(body)
        await stream.end()
        head = await stream.receive_head()
        return head, await read_all(stream)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- requests and responses -------------------------------------------------------------------


async def test_get_and_post_round_trip() -> None:
    async with open_backend(echo) as backend, forwarding(backend.url) as p:
        head, body = await call(p, "GET", "/items?q=a%20b&x=1")
        assert head.status == 200
        got = json.loads(body)
        assert (got["method"], got["target"], got["body"]) == ("GET", "/items?q=a%20b&x=1", "")
        head, body = await call(p, "POST", "/items", [("Content-Type", "text/plain"),
                                                      ("Content-Length", "5")], b"hello")
        got = json.loads(body)
        assert (got["method"], got["body"]) == ("POST", "hello")
        seen = backend.seen[-1]
        assert seen.header("content-length") == ["5"] and seen.header("transfer-encoding") == []
        # a body without a length is streamed chunked
        _, body = await call(p, "PUT", "/items/1", [], b"x" * 100_000)
        assert backend.seen[-1].size == 100_000
        assert backend.seen[-1].header("transfer-encoding") == ["chunked"]
        assert p.eecp.in_flight == 0


async def test_hop_by_hop_headers_are_dropped_both_ways_and_repeats_kept_in_order() -> None:
    request = [("Host", "evil.example"), ("Connection", "keep-alive, X-Drop"), ("X-Drop", "1"),
               ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Upgrade", "websocket"),
               ("Proxy-Authorization", "Basic eA=="), ("Proxy-Connection", "keep-alive"),
               ("Expect", "100-continue"), ("X-Rep", "1"), ("Cookie", "a=1"), ("x-rep", "2"),
               ("X-Rep", "3"), ("Accept", "*/*")]
    async with open_backend(echo) as backend, forwarding(backend.url) as p:
        head, _ = await call(p, "GET", "/", request)
    seen = backend.seen[0]
    names = [n for n, _ in seen.headers]
    assert seen.header("host") == [backend.url.removeprefix("http://")]
    for dropped in ("connection", "x-drop", "keep-alive", "te", "upgrade", "expect",
                    "proxy-authorization", "proxy-connection"):
        assert dropped not in names
    assert [(n, v) for n, v in seen.headers if n == "x-rep"] == [
        ("x-rep", "1"), ("x-rep", "2"), ("x-rep", "3")]
    assert seen.header("cookie") == ["a=1"] and seen.header("accept") == ["*/*"]
    # httpx adds nothing of its own (no Accept-Encoding: the client did not ask for gzip)
    assert set(names) == {"host", "x-rep", "cookie", "accept"}
    # the response: Set-Cookie three times, in order; every hop-by-hop header gone
    assert [(n, v) for n, v in head.headers if n.lower() == "set-cookie"] == [
        ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2"), ("set-cookie", "c=3")]
    assert [n.lower() for n, _ in head.headers] == [
        "content-type", "content-length", "set-cookie", "set-cookie", "set-cookie", "x-end"]


@pytest.mark.parametrize("path", [
    "http://169.254.169.254/latest/meta-data/", "//169.254.169.254/x", "//evil.example",
    "/\\evil.example", "*", "https:/x", "x/../../y",
])
async def test_paths_that_could_leave_the_backend_are_refused_without_a_request(path: str
                                                                                ) -> None:
    async with open_backend(echo) as backend, forwarding(backend.url) as p:
        with pytest.raises(StreamError) as caught:
            await call(p, "GET", path)
        assert caught.value.reason == "stream_reset:bad_path"
        assert (await call(p, "GET", "/fine"))[0].status == 200  # the tunnel goes on
    assert backend.connections == 1  # only /fine's


async def test_a_backend_path_prefix_is_kept() -> None:
    async with open_backend(echo) as backend, forwarding(backend.url + "/app/") as p:
        assert (await call(p, "GET", "/x?y=1"))[0].status == 200
    assert backend.seen[-1].target == "/app/x?y=1"
    host = backend.url.removeprefix("http://")
    assert backend.seen[-1].header("host") == [host]


def test_only_origin_form_targets_pass() -> None:
    assert backend_target("/x?y=1") == "/x?y=1"
    for bad in ("//evil/x", "http://evil/", "x", "*"):
        with pytest.raises(ForwardError):
            backend_target(bad)


# ---- failures ---------------------------------------------------------------------------------


async def test_a_backend_that_is_down_resets_with_backend_unreachable() -> None:
    async with forwarding(f"http://127.0.0.1:{free_port()}") as p:
        with pytest.raises(StreamError) as caught:
            await call(p, "GET", "/")
        assert caught.value.reason == "stream_reset:backend_unreachable"
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0


async def test_a_backend_answering_garbage_resets_with_backend_error() -> None:
    async def garbage(seen: Seen, reply: Reply) -> None:
        await reply.raw(b"HTTP/1.1 abc\r\n\r\n")

    async with open_backend(garbage) as backend, forwarding(backend.url) as p:
        with pytest.raises(StreamError, match="stream_reset:backend_error"):
            await call(p, "GET", "/")


async def test_a_response_head_the_protocol_cannot_carry_resets_with_backend_error() -> None:
    async def odd_status(seen: Seen, reply: Reply) -> None:
        await reply.raw(b"HTTP/1.1 600 Beyond\r\ncontent-length: 0\r\n\r\n")

    async with open_backend(odd_status) as backend, forwarding(backend.url) as p:
        with pytest.raises(StreamError, match="stream_reset:backend_error"):
            await call(p, "GET", "/")
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0


async def test_a_slow_backend_resets_with_backend_timeout() -> None:
    async def silent(seen: Seen, reply: Reply) -> None:
        await reply.client_gone()  # never answers; the agent hangs up

    async with open_backend(silent) as backend, forwarding(backend.url, timeout_sec=0.2) as p:
        with pytest.raises(StreamError, match="stream_reset:backend_timeout"):
            await call(p, "GET", "/slow")
    assert len(backend.seen) == 1


async def test_a_response_that_goes_idle_resets_with_backend_timeout() -> None:
    async def stalls(seen: Seen, reply: Reply) -> None:
        await reply.head(200, [])
        await reply.chunk(b"first")
        await reply.client_gone()

    async with open_backend(stalls) as backend, forwarding(backend.url, timeout_sec=0.2) as p:
        stream = await p.eecp.open_stream(RequestHead("GET", "/", []))
        await stream.end()
        assert (await stream.receive_head()).status == 200
        assert await stream.receive() == b"first"
        with pytest.raises(StreamError, match="stream_reset:backend_timeout"):
            await stream.receive()


async def test_waiting_on_eecp_for_the_body_is_not_the_backends_slowness() -> None:
    async with open_backend(echo) as backend, forwarding(backend.url, timeout_sec=0.2) as p:
        stream = await p.eecp.open_stream(RequestHead("POST", "/", []))
        await stream.send(b"slow ")
        await trio.sleep(0.5)  # the client uploads slowly: longer than the timeout
        await stream.send(b"client")
        await stream.end()
        assert json.loads(await _body_of(stream))["body"] == "slow client"


async def _body_of(stream: Stream) -> bytes:
    await stream.receive_head()
    return await read_all(stream)


def hanging_backend() -> tuple[Handler, trio.Event, trio.Event]:
    """A backend that never answers: set ``arrived`` when asked, ``hung_up`` when the agent
    closes the connection."""
    arrived, hung_up = trio.Event(), trio.Event()

    async def hangs(seen: Seen, reply: Reply) -> None:
        arrived.set()
        await reply.client_gone()
        hung_up.set()
    return hangs, arrived, hung_up


async def test_a_reset_from_eecp_cancels_the_backend_request() -> None:
    hangs, arrived, hung_up = hanging_backend()
    async with open_backend(hangs) as backend, forwarding(backend.url) as p:
        stream = await p.eecp.open_stream(RequestHead("GET", "/forever", []))
        await stream.end()
        await arrived.wait()
        await stream.reset("client_gone")
        await hung_up.wait()  # the agent closed the backend connection
        await trio.testing.wait_all_tasks_blocked()
        assert p.agent.in_flight == 0
    assert len(backend.seen) == 1


async def test_the_tunnel_closing_cancels_backend_requests_and_forwarding_returns() -> None:
    hangs, arrived, hung_up = hanging_backend()
    async with open_backend(hangs) as backend, forwarding(backend.url) as p:
        stream = await p.eecp.open_stream(RequestHead("GET", "/forever", []))
        await stream.end()
        await arrived.wait()
        p.agent.close()  # serve_forwarding returns: the block ends only if it does
        await hung_up.wait()


# ---- streaming --------------------------------------------------------------------------------


async def test_a_streamed_response_arrives_chunk_by_chunk() -> None:
    read_first = trio.Event()

    async def events(seen: Seen, reply: Reply) -> None:
        await reply.head(200, [("Content-Type", "text/event-stream")])
        await reply.chunk(b"data: 1\n\n")
        await read_first.wait()  # chunk 2 exists only once eecp's side has read chunk 1
        await reply.chunk(b"data: 2\n\n")
        await reply.end()

    async with open_backend(events) as backend, forwarding(backend.url) as p:
        stream = await p.eecp.open_stream(RequestHead("GET", "/events", []))
        await stream.end()
        head = await stream.receive_head()
        assert ("Content-Type", "text/event-stream") in head.headers
        assert await stream.receive() == b"data: 1\n\n"
        read_first.set()
        assert await stream.receive() == b"data: 2\n\n"
        assert await stream.receive() is None


def _download_block(i: int) -> bytes:
    return i.to_bytes(4, "big") * (16 * 1024)  # 64 KiB, different for every i


async def test_backend_connections_are_kept_alive_beyond_twenty_at_once() -> None:
    """Many requests at once, twice over: the second round reuses the first round's
    connections (no new TCP connection per request once many are busy)."""
    at_once = 40
    peers: set[tuple[str, int]] = set()
    arrived = 0
    all_in = trio.Event()

    async def held(request: Request, responder: Responder) -> None:
        nonlocal arrived
        assert request.client is not None
        peers.add(request.client)
        arrived += 1
        if arrived % at_once == 0:
            all_in.set()
        await all_in.wait()
        await responder.respond(200, [("content-type", "text/plain")], b"ok")

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, held, "127.0.0.1", 0)
        async with forwarding(f"http://127.0.0.1:{port}") as p:
            for _ in range(2):
                all_in = trio.Event()
                async with trio.open_nursery() as calls:
                    for _ in range(at_once):
                        calls.start_soon(call, p, "GET", "/")
            assert arrived == 2 * at_once
            assert len(peers) == at_once
        nursery.cancel_scope.cancel()


async def test_fifty_mib_up_and_down_match_and_stay_within_the_window() -> None:
    blocks = BIG // (64 * 1024)

    async def big(seen: Seen, reply: Reply) -> None:
        await reply.head(200, [("X-Upload-Sha256", seen.sha256),
                               ("Content-Length", str(BIG))])
        for i in range(blocks):
            await reply.chunk(_download_block(i))
        await reply.end()

    upload = hashlib.sha256()
    download = hashlib.sha256()
    expected_download = hashlib.sha256()
    for i in range(blocks):
        expected_download.update(_download_block(i))

    async with (open_backend(big) as backend,
                forwarding(backend.url, wait=60) as p):
        stream = await p.eecp.open_stream(RequestHead("PUT", "/blob", [
            ("Content-Length", str(BIG))]))

        async def send_body() -> None:
            piece = bytes(range(256)) * 1024  # 256 KiB
            for _ in range(BIG // len(piece)):
                upload.update(piece)
                await stream.send(piece)
            await stream.end()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            head = await stream.receive_head()
            size = 0
            while (chunk := await stream.receive()) is not None:
                assert stream.buffered <= p.eecp.window
                download.update(chunk)
                size += len(chunk)
        await stream.aclose()

    assert dict(head.headers)["X-Upload-Sha256"] == upload.hexdigest()
    assert backend.seen[0].size == BIG
    assert size == BIG and download.hexdigest() == expected_download.hexdigest()
    # neither side ever held more than one window of this stream's body
    assert 0 < p.max_buffered["agent"] <= p.agent.window
    assert 0 < p.max_buffered["eecp"] <= p.eecp.window


# ---- the whole agent, over a real WebSocket ---------------------------------------------------


async def _feed_binary(ws: Any, mux: Mux) -> None:
    """eecp's reader, reduced to the data plane: binary → mux, text (health) ignored."""
    while True:
        data = await ws.get_message()
        if isinstance(data, bytes):
            await mux.feed(data)


async def test_the_agent_forwards_requests_over_its_tunnel(pki_dir: Path, agent_dir: Path
                                                           ) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world) as state:
        peer = await world.eecp.accept()
        await peer.expect("register")
        mux = Mux(peer.ws.send_message, opener=True)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_feed_binary, peer.ws, mux)
                answers = [await call_mux(mux, f"/hello/{n}") for n in range(3)]
                nursery.cancel_scope.cancel()
        peer.done.set()
    assert answers == [(200, b"ok")] * 3
    assert [r.path for r in world.backend.server.requests  # type: ignore[union-attr]
            if r.path.startswith("/hello")] == ["/hello/0", "/hello/1", "/hello/2"]
    assert state.failures == 0


async def call_mux(mux: Mux, path: str) -> tuple[int, bytes]:
    async with await mux.open_stream(RequestHead("GET", path, [])) as stream:
        await stream.end()
        head = await stream.receive_head()
        return head.status, await read_all(stream)


async def test_a_malformed_frame_ends_the_tunnel_with_its_close_code(
        pki_dir: Path, agent_dir: Path) -> None:
    async with open_world(pki_dir, agent_dir) as world, running_agent(world):
        peer = await world.eecp.accept()
        await peer.expect("register")
        await peer.send(b"\x03\x00\x00\x00\x00data")  # stream id 0
        assert await peer.closed() == (4005, "invalid_frame:stream_id")
        peer.done.set()
        (await world.eecp.accept()).done.set()  # and it dials again


async def test_a_whole_small_answer_is_one_message() -> None:
    """A response complete when its head arrives goes out as one frame: its head, its body
    (BODY) and its end (FIN)."""
    async def answer(request: Request, responder: Responder) -> None:
        if request.path == "/empty":
            await responder.respond(204, [], b"")
        else:
            await responder.respond(200, [("content-type", "text/plain")], b"x" * 100)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, answer, "127.0.0.1", 0)
        async with forwarding(f"http://127.0.0.1:{port}") as p:
            for path, body in (("/small", b"x" * 100), ("/empty", b"")):
                p.to_eecp.frames.clear()
                stream = await p.eecp.open_stream(RequestHead("GET", path, []), end=True)
                async with stream:
                    await stream.receive_head()
                    assert await read_all(stream) == body
                (frame,) = p.to_eecp.frames
                assert isinstance(frame, ResponseHeadFrame), path
                assert frame.fin and frame.data == body, path
        nursery.cancel_scope.cancel()

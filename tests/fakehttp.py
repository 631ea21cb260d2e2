"""A tiny real HTTP/1.1 server on trio + h11 for stand-in upstreams (PCCS, GitHub) in tests.

Real sockets on 127.0.0.1, port 0; the handler is a plain async function. One request per
connection (``Connection: close``) keeps it small; httpx copes with that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11
import trio


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: a streamed body (sent chunked, each chunk flushed as it comes) instead of ``body``
    chunks: AsyncIterator[bytes] | None = None

    @classmethod
    def json(cls, text: str, status: int = 200, headers: list[tuple[str, str]] | None = None
             ) -> Response:
        return cls(status, text.encode(), [("content-type", "application/json"), *(headers or [])])


Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class FakeServer:
    """What ``open_fake_http`` yields: the base URL and every request it has seen."""

    url: str
    requests: list[Request] = field(default_factory=list)
    #: set to False to make every request fail with a dropped connection (an unreachable upstream)
    up: bool = True


async def _handle(stream: trio.SocketStream, handler: Handler, server: FakeServer) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        request = await _read_request(stream, conn)
        if request is None:
            return
        server.requests.append(request)
        if not server.up:
            return
        response = await handler(request)
        framing = ("transfer-encoding", "chunked") if response.chunks is not None else (
            "content-length", str(len(response.body)))
        headers = [*response.headers, framing, ("connection", "close")]
        await stream.send_all(conn.send(h11.Response(status_code=response.status,
                                                     headers=headers)) or b"")
        if response.chunks is not None:
            async for chunk in response.chunks:
                await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
        else:
            await stream.send_all(conn.send(h11.Data(data=response.body)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await stream.aclose()


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = urlsplit(head.target.decode())
            return Request(
                method=head.method.decode(),
                path=target.path,
                query=dict(parse_qsl(target.query)),
                headers={k.decode().lower(): v.decode() for k, v in head.headers},
                body=bytes(body),
            )
        else:
            return None


@asynccontextmanager
async def open_fake_http(handler: Handler) -> AsyncIterator[FakeServer]:
    """Serve ``handler`` on 127.0.0.1:<random port> for the duration of the ``async with``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = FakeServer(url=f"http://127.0.0.1:{port}")

    async def on_conn(stream: trio.SocketStream) -> None:
        await _handle(stream, handler, server)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, on_conn, listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()

"""The data plane's HTTP/1.1 server (``eecp.dataplane.http``), over real loopback sockets.

Raw ``trio.open_tcp_stream`` clients where the bytes on the wire matter (pipelining, 100
Continue, malformed input, framing), httpx where a real client's view is enough. Every test is
bounded in time: ``fail_after`` in real time, or the autojump clock where server timeouts are
the subject (the clock jumps to the next deadline whenever every task is blocked).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import httptools
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eecp.core.capacity import HEAD_GRACE_SEC
from eecp.dataplane.http import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_CONNECTIONS,
    HOLD_BYTES,
    ClientDisconnected,
    Handler,
    Limits,
    Request,
    Responder,
    serve_http,
)
from eecp.dataplane.http.parser import MAX_PIPELINED, ParsedRequest, RequestParser

WAIT = 10  # real seconds any single step may take before the test fails


@asynccontextmanager
async def running(handler: Handler, limits: Limits = DEFAULT_LIMITS,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS) -> AsyncIterator[int]:
    """Serve ``handler`` on 127.0.0.1 (a free port) for the block; yields the port."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0,
                                                limits=limits, max_connections=max_connections))
        yield port
        nursery.cancel_scope.cancel()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class RawClient:
    """A raw socket plus an httptools response parser: replies come off the wire in order."""

    stream: trio.SocketStream
    replies: deque[Reply] = field(default_factory=deque)
    _headers: dict[str, str] = field(default_factory=dict)
    _body: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self) -> Reply:
        while not self.replies:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError("connection closed before a whole reply")
            self.parser.feed_data(data)
        return self.replies.popleft()

    async def closed(self) -> bool:
        """True when the server closes the connection without sending anything more."""
        try:
            return await self.stream.receive_some() == b""
        except trio.BrokenResourceError:
            return True

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers, self._body = {}, bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.replies.append(Reply(status, self._headers, bytes(self._body)))


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


def error_of(reply: Reply) -> str:
    assert reply.headers["content-type"] == "application/json"
    reason: str = json.loads(reply.body)["error"]
    return reason


async def echo(request: Request, responder: Responder) -> None:
    """Answers with what it saw: method, target, one header, and the body."""
    body = await request.read_body(1 << 20)
    doc = {"method": request.method, "path": request.path, "query": request.query,
           "version": request.http_version, "x": request.header("X-Test"), "body": body.decode()}
    await responder.respond(200, [("content-type", "application/json")], json.dumps(doc).encode())


def get(path: str = "/", *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: t", *extra, "", ""]).encode()


# ---- the basics ---------------------------------------------------------------------------


async def test_get_with_httpx() -> None:
    async with running(echo) as port, httpx.AsyncClient() as client:
        with trio.fail_after(WAIT):
            response = await client.get(f"http://127.0.0.1:{port}/a/b?c=d&e",
                                        headers={"X-Test": "yes"})
    assert response.status_code == 200
    assert response.json() == {"method": "GET", "path": "/a/b", "query": "c=d&e",
                               "version": "1.1", "x": "yes", "body": ""}
    assert response.headers["content-length"] == str(len(response.content))
    assert "date" in response.headers


async def test_request_headers_keep_order_and_repeats() -> None:
    seen: list[Request] = []

    async def record(request: Request, responder: Responder) -> None:
        seen.append(request)
        await responder.respond(204, [], b"")

    async with running(record) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(get("/", "X-A: 1", "x-b: 2", "X-A: 3"))
            reply = await client.reply()
    assert reply.status == 204 and "content-length" not in reply.headers
    request = seen[0]
    assert request.headers == [("host", "t"), ("x-a", "1"), ("x-b", "2"), ("x-a", "3")]
    assert request.header("X-a") == "1" and request.header("missing") is None
    assert request.client[0] == "127.0.0.1" and request.client[1] > 0


async def test_keep_alive_reuses_one_connection() -> None:
    clients: set[tuple[str, int]] = set()

    async def handler(request: Request, responder: Responder) -> None:
        clients.add(request.client)
        await responder.respond(200, [], request.path.encode())

    async with running(handler) as port, httpx.AsyncClient() as client:
        with trio.fail_after(WAIT):
            bodies = [(await client.get(f"http://127.0.0.1:{port}/{i}")).content for i in range(5)]
    assert bodies == [b"/0", b"/1", b"/2", b"/3", b"/4"]
    assert len(clients) == 1  # one accepted connection carried all five


async def test_pipelined_requests_are_answered_in_order() -> None:
    first_may_finish = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/slow":
            await first_may_finish.wait()
        await responder.respond(200, [], request.path.encode())

    async with running(handler) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(get("/slow") + get("/b") + get("/c"))
            # the later requests are complete, yet nothing may overtake the first answer
            await trio.testing.wait_all_tasks_blocked()
            first_may_finish.set()
            replies = [await client.reply() for _ in range(3)]
    assert [r.body for r in replies] == [b"/slow", b"/b", b"/c"]


async def test_connection_close_is_honoured() -> None:
    async with running(echo) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(get("/", "Connection: close"))
            reply = await client.reply()
            assert await client.closed()
    assert reply.status == 200 and reply.headers["connection"] == "close"


async def test_head_has_headers_but_no_body() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.respond(200, [("x-kind", "full")], b"0123456789")

    async with running(handler) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(WAIT):
            await stream.send_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
                                  + get("/", "Connection: close"))
            data = await read_all(stream)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 10" in head
    # the very next bytes are the second answer: no body leaked after the HEAD answer
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\n0123456789")


async def test_http10_response_without_length_ends_with_the_connection() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("content-type", "text/plain")])
        await responder.send(b"first,")
        await responder.send(b"second")
        await responder.end()

    async with running(handler) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(WAIT):
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            data = await read_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length" not in head and b"transfer-encoding" not in head
    assert b"connection: close" in head
    assert body == b"first,second"


async def test_http10_keep_alive_only_when_asked() -> None:
    async with running(echo) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            first = await client.reply()
            await client.send(b"GET /2 HTTP/1.0\r\n\r\n")
            second = await client.reply()
            assert await client.closed()
    assert first.headers["connection"] == "keep-alive"
    assert second.headers["connection"] == "close"
    assert json.loads(second.body)["path"] == "/2"


# ---- streaming ----------------------------------------------------------------------------


async def test_chunked_request_body_reaches_the_handler_as_it_arrives() -> None:
    chunks: list[bytes] = []
    got_first = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        async for chunk in request.body_chunks():
            chunks.append(chunk)
            got_first.set()
        await responder.respond(200, [], b"|".join(chunks))

    async with running(handler) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n")
            await got_first.wait()  # the request is far from over
            assert chunks == [b"hello"]
            await client.send(b"6\r\n world\r\n0\r\n\r\n")
            reply = await client.reply()
    assert reply.status == 200 and reply.body == b"hello| world"


async def test_streamed_response_is_read_incrementally() -> None:
    client_has_first = trio.Event()

    async def events(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("content-type", "text/event-stream")])
        await responder.send(b"data: one\n\n")
        await client_has_first.wait()  # the next event only once the first was received
        await responder.send(b"data: two\n\n")
        await responder.end()

    async with running(events) as port, httpx.AsyncClient() as client:
        with trio.fail_after(WAIT):
            async with client.stream("GET", f"http://127.0.0.1:{port}/events") as response:
                assert response.headers["transfer-encoding"] == "chunked"
                received = []
                async for chunk in response.aiter_bytes():
                    received.append(chunk)
                    client_has_first.set()
    assert received == [b"data: one\n\n", b"data: two\n\n"]


async def test_response_with_length_streams_and_keeps_the_connection() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Length", "6")])
        await responder.send(b"abc")
        await responder.send(b"def")
        await responder.end()

    async with running(handler) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(get("/1") + get("/2"))
            replies = [await client.reply(), await client.reply()]
    assert [r.body for r in replies] == [b"abcdef", b"abcdef"]
    assert "transfer-encoding" not in replies[0].headers


async def test_a_handler_s_date_replaces_the_server_s() -> None:
    # a proxy passes its origin's Date on (RFC 9110 6.6.1): one Date line, never two
    origin = "Tue, 01 Jan 2030 00:00:00 GMT"

    async def handler(request: Request, responder: Responder) -> None:
        dated = [] if request.path == "/plain" else [
            ("Date", origin), ("date", "Wed, 02 Jan 2030 00:00:00 GMT")]  # the first counts
        if request.path == "/streamed":
            await responder.send_head(200, [("content-type", "text/plain"), *dated])
            await responder.send(b"x")
            await responder.end()
        else:
            await responder.respond(200, [("content-type", "text/plain"), *dated], b"x")

    async with running(handler) as port:
        for path in ("/whole", "/streamed", "/plain"):
            with trio.fail_after(WAIT):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(get(path, "Connection: close"))
                    head = (await read_all(stream)).partition(b"\r\n\r\n")[0].decode()
            dates = [line.partition(":")[2].strip() for line in head.split("\r\n")
                     if line.lower().startswith("date:")]
            assert len(dates) == 1, (path, head)
            assert (dates[0] == origin) is (path != "/plain"), (path, head)


async def test_held_bytes_wait_for_the_next_write_and_never_exceed_the_limit() -> None:
    steps = [trio.Event() for _ in range(3)]
    done = [trio.Event() for _ in range(3)]

    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("content-type", "text/plain")], hold=True)
        await responder.send(b"held", hold=True)
        done[0].set()
        await steps[0].wait()
        await responder.send(b"+now")  # the held head and chunk go out with this write
        done[1].set()
        await steps[1].wait()
        for _ in range(HOLD_BYTES // 1000 + 1):  # more than may be held: flushed on the way
            await responder.send(b"x" * 1000, hold=True)
        done[2].set()
        await steps[2].wait()
        await responder.end()

    async with running(handler) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(WAIT):
            await stream.send_all(get("/"))
            await done[0].wait()
            with trio.move_on_after(0.2):
                assert await stream.receive_some() == b"", "nothing may leave while held"
            steps[0].set()
            await done[1].wait()
            seen = bytearray()
            while not seen.endswith(b"4\r\n+now\r\n"):
                seen += await stream.receive_some()
            assert seen.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\n\r\n4\r\nheld\r\n4\r\n+now\r\n" in seen
            steps[1].set()
            await done[2].wait()
            with trio.move_on_after(0.2):
                while True:
                    seen += await stream.receive_some()
            # the chunk that would have held more than HOLD_BYTES sent everything out
            framed = b"3e8\r\n" + b"x" * 1000 + b"\r\n"
            assert seen.split(b"+now\r\n", 1)[1] == framed * (HOLD_BYTES // 1000 + 1)
            steps[2].set()
            while not seen.endswith(b"0\r\n\r\n"):
                seen += await stream.receive_some()
        await stream.aclose()


async def test_server_stops_reading_while_the_handler_does_not_consume(
        autojump_clock: trio.testing.MockClock) -> None:
    size = 32 * 1024 * 1024  # far more than the kernel buffers on both sides hold
    may_read = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        await may_read.wait()
        total = 0
        async for chunk in request.body_chunks():
            total += len(chunk)
        await responder.respond(200, [], str(total).encode())

    # 100s of (mock) time pass while the server holds back: no body timeout may count them
    async with running(handler, Limits(body_read_timeout_sec=10)) as port:
        client = await RawClient.open(port)
        sent = trio.Event()

        async def upload() -> None:
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
            await client.send(b"x" * size)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await trio.sleep(100)
            assert not sent.is_set()  # the server stopped taking bytes
            may_read.set()
            with trio.fail_after(1000):
                reply = await client.reply()
    assert reply.status == 200 and reply.body == str(size).encode()


# ---- Expect: 100-continue and unread bodies -------------------------------------------------


async def test_100_continue_is_sent_before_the_body() -> None:
    async with running(echo) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                              b"Expect: 100-continue\r\n\r\n")
            interim = await client.reply()
            assert interim.status == 100
            await client.send(b"hello")
            final = await client.reply()
    assert final.status == 200 and json.loads(final.body)["body"] == "hello"


async def test_no_100_continue_when_the_handler_answers_first() -> None:
    async def refuse(request: Request, responder: Responder) -> None:
        await responder.respond(403, [], b"no")

    async with running(refuse) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                              b"Expect: 100-continue\r\n\r\n")
            reply = await client.reply()
            assert await client.closed()  # the body may or may not follow: not reusable
    assert reply.status == 403 and reply.headers["connection"] == "close"


async def test_small_unread_body_is_drained_and_the_connection_kept() -> None:
    async def ignore_body(request: Request, responder: Responder) -> None:
        await responder.respond(200, [], request.path.encode())

    async with running(ignore_body) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"POST /1 HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
            first = await client.reply()  # answered before the body is even sent
            await client.send(b"0123456789" + get("/2"))
            second = await client.reply()
    assert "connection" not in first.headers
    assert (first.body, second.body) == (b"/1", b"/2")


async def test_large_unread_body_closes_the_connection() -> None:
    async def ignore_body(request: Request, responder: Responder) -> None:
        await responder.respond(200, [], b"ok")

    async with running(ignore_body) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n"
                              + b"x" * 1000)
            reply = await client.reply()
            assert await client.closed()
    assert reply.status == 200 and reply.headers["connection"] == "close"


# ---- refusals -------------------------------------------------------------------------------


async def refused(port: int, data: bytes) -> Reply:
    """Send ``data``, expect one answer and then the end of the connection."""
    client = await RawClient.open(port)
    await client.send(data)
    reply = await client.reply()
    assert await client.closed()
    assert reply.headers["connection"] == "close"
    return reply


async def test_malformed_request_line_is_400() -> None:
    async with running(echo) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, b"GET / HTTP/1.1 extra\r\n\r\n")
    assert reply.status == 400 and error_of(reply) == "bad_request"


@pytest.mark.parametrize(("version", "status"), [("2.0", 505), ("1.2", 505), ("0.9", 505)])
async def test_unsupported_versions_are_505(version: str, status: int) -> None:
    async with running(echo) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, f"GET / HTTP/{version}\r\nHost: t\r\n\r\n".encode())
    assert reply.status == status and error_of(reply) == "http_version_not_supported"


async def test_unsupported_transfer_encoding_is_501() -> None:
    async with running(echo) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, b"POST / HTTP/1.1\r\nHost: t\r\n"
                                        b"Transfer-Encoding: gzip, chunked\r\n\r\n")
    assert reply.status == 501 and error_of(reply) == "unsupported_transfer_encoding"


async def test_header_too_large_is_431() -> None:
    async with running(echo, Limits(max_head_bytes=1024)) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, get("/", "X-Big: " + "a" * 2000))
    assert reply.status == 431 and error_of(reply) == "header_too_large"


async def test_header_dripped_without_end_is_431() -> None:
    # The value never ends, so no parser callback ever reports it: the byte count must.
    async with running(echo, Limits(max_head_bytes=4096)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(b"GET / HTTP/1.1\r\nX-Drip: ")
            for _ in range(8):
                await trio.testing.wait_all_tasks_blocked()  # one read per piece
                await client.send(b"a" * 1024)
            reply = await client.reply()
    assert reply.status == 431 and error_of(reply) == "header_too_large"


async def test_two_host_headers_are_400() -> None:
    # which one names the app? RFC 9112 says refuse; a pipelined request after a good one too
    async with running(echo) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, get("/", "Host: other"))
            client = await RawClient.open(port)
            await client.send(get("/a") + get("/b", "HOST: other"))
            first, second = await client.reply(), await client.reply()
    assert reply.status == 400 and error_of(reply) == "bad_request"
    assert (first.status, second.status) == (200, 400)


async def test_too_many_headers_is_431() -> None:
    async with running(echo, Limits(max_headers=10)) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, get("/", *[f"X-{i}: {i}" for i in range(11)]))
            fine = await RawClient.open(port)
            await fine.send(get("/", *[f"X-{i}: {i}" for i in range(9)]))  # 9 + Host = 10
            assert (await fine.reply()).status == 200
    assert reply.status == 431 and error_of(reply) == "too_many_headers"


async def test_body_over_the_limit_by_content_length_is_413_before_the_handler() -> None:
    calls: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        calls.append(request.path)
        await echo(request, responder)

    async with running(handler, Limits(max_body_bytes=100)) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, b"POST /big HTTP/1.1\r\nHost: t\r\n"
                                        b"Content-Length: 101\r\n\r\n")
    assert reply.status == 413 and error_of(reply) == "body_too_large"
    assert calls == []


async def test_chunked_body_over_the_limit_is_413() -> None:
    async with running(echo, Limits(max_body_bytes=100)) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: "
                                        b"chunked\r\n\r\n64\r\n" + b"a" * 100 + b"\r\n1\r\nb\r\n")
    assert reply.status == 413 and error_of(reply) == "body_too_large"


CHUNKED_HEAD = (b"POST /t HTTP/1.1\r\nHost: t\r\nX-Test: head\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


async def test_trailers_are_read_and_dropped_never_merged_into_the_head() -> None:
    seen: list[list[tuple[str, str]]] = []

    async def handler(request: Request, responder: Responder) -> None:
        body = await request.read_body(1 << 20)
        seen.append(list(request.headers))
        await responder.respond(200, [], body)

    async with running(handler) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            # head, body and trailers in one write: the parser has them all before the handler
            await client.send(CHUNKED_HEAD + b"3\r\nabc\r\n0\r\nX-Test: trailer\r\n"
                              b"X-Forwarded-For: 6.6.6.6\r\nHost: evil\r\n\r\n" + get("/next"))
            first, second = await client.reply(), await client.reply()
    assert (first.status, first.body, second.status) == (200, b"abc", 200)
    assert seen[0] == [("host", "t"), ("x-test", "head"), ("transfer-encoding", "chunked")]
    assert seen[1] == [("host", "t")]  # the next request's head starts afresh


@pytest.mark.parametrize(("tail", "reason"), [
    (b"0\r\nX-Drip: ", "header_too_large"),  # one trailer field that never ends
    (b"3;ext=", "header_too_large"),  # a chunk extension that never ends
])
async def test_endless_chunk_framing_is_431_not_memory(tail: bytes, reason: str) -> None:
    # httptools holds an unfinished field until it ends: the byte count must stop it
    async with running(echo, Limits(max_head_bytes=4096)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(WAIT):
            await client.send(CHUNKED_HEAD + b"3\r\nabc\r\n" + tail)
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(8):
                    await trio.testing.wait_all_tasks_blocked()  # one read per piece
                    await client.send(b"a" * 1024)
            reply = await client.reply()
    assert reply.status == 431 and error_of(reply) == reason


@pytest.mark.parametrize(("trailers", "reason"), [
    ([f"X-{i}: {i}" for i in range(11)], "too_many_headers"),
    ([f"X-{i}: {'a' * 200}" for i in range(8)], "header_too_large"),
])
async def test_trailer_sections_are_bounded_like_heads(trailers: list[str], reason: str) -> None:
    async with running(echo, Limits(max_head_bytes=1024, max_headers=10)) as port:
        with trio.fail_after(WAIT):
            section = "".join(f"{t}\r\n" for t in trailers).encode()
            reply = await refused(port, CHUNKED_HEAD + b"3\r\nabc\r\n0\r\n" + section
                                  + b"\r\n")
            fine = await RawClient.open(port)
            await fine.send(CHUNKED_HEAD + b"3\r\nabc\r\n0\r\nX-1: 1\r\n\r\n")
            assert json.loads((await fine.reply()).body)["body"] == "abc"
    assert reply.status == 431 and error_of(reply) == reason


async def test_read_body_limit_is_413() -> None:
    async def small(request: Request, responder: Responder) -> None:
        await responder.respond(200, [], await request.read_body(4))

    async with running(small) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: "
                                        b"chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    assert reply.status == 413 and error_of(reply) == "body_too_large"


# ---- timeouts (mock time) -------------------------------------------------------------------


async def test_slowloris_head_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    async with running(echo, Limits(header_timeout_sec=10)) as port:
        client = await RawClient.open(port)
        start = trio.current_time()
        with trio.fail_after(1000):
            await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slo")  # ... and nothing more
            reply = await client.reply()
            answered = trio.current_time()
            assert await client.closed()
    assert reply.status == 408 and error_of(reply) == "header_timeout"
    assert answered - start >= 10


async def drip(client: RawClient, data: bytes, every: float) -> None:
    """Send ``data`` one byte at a time, ``every`` seconds apart (until the server has gone)."""
    with contextlib.suppress(trio.BrokenResourceError):
        for i in range(len(data)):
            await client.send(data[i:i + 1])
            await trio.sleep(every)


# A head that never ends: a timeout restarting at each byte would wait for it for 3 * 60 s.
DRIPPED_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\nX-Drip: " + b"a" * 30


@pytest.mark.parametrize("kept_alive", [False, True])
async def test_dripped_head_gets_408_at_a_deadline_fixed_for_the_whole_head(
        autojump_clock: trio.testing.MockClock, kept_alive: bool) -> None:
    # one byte every 3 s: each gap is well within header_timeout, the whole head is not
    async with running(echo, Limits(header_timeout_sec=10, idle_timeout_sec=300)) as port:
        client = await RawClient.open(port)
        start = trio.current_time()  # a fresh connection's head is due 10 s after the accept
        with trio.fail_after(1000):
            if kept_alive:
                await client.send(get("/1"))
                assert (await client.reply()).status == 200
                await trio.sleep(100)  # idle, well within idle_timeout
                start = trio.current_time()  # a later head is due 10 s after its first byte
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip, client, DRIPPED_HEAD, 3)
                reply = await client.reply()
                answered = trio.current_time()
                nursery.cancel_scope.cancel()
            assert await client.closed()
    assert reply.status == 408 and error_of(reply) == "header_timeout"
    # at the deadline (bytes went out at 0, 3, 6 and 9 s), not 10 s after the last byte
    assert 10 <= answered - start < 11


async def test_slow_second_head_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    async with running(echo, Limits(header_timeout_sec=10, idle_timeout_sec=300)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(get("/1"))
            assert (await client.reply()).status == 200
            await trio.sleep(100)  # idle, well within idle_timeout
            await client.send(b"GET /2 HTTP/1.1\r\n")
            start = trio.current_time()
            reply = await client.reply()
            assert trio.current_time() - start >= 10
    assert reply.status == 408


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    async with running(echo, Limits(idle_timeout_sec=30)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(get("/"))
            assert (await client.reply()).status == 200
            start = trio.current_time()
            assert await client.closed()  # no answer, just the end of the connection
            assert trio.current_time() - start >= 30


async def test_idle_timeout_restarts_after_each_answer_and_closes_on_time(
        autojump_clock: trio.testing.MockClock) -> None:
    async with running(echo, Limits(header_timeout_sec=10, idle_timeout_sec=30)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(get("/1"))
            assert (await client.reply()).status == 200
            await trio.sleep(20)  # two thirds of the idle timeout
            await client.send(get("/2"))  # the same connection still carries a request
            second = await client.reply()
            start = trio.current_time()
            assert await client.closed()  # no answer, just the end of the connection
            closed = trio.current_time()
    assert second.status == 200 and json.loads(second.body)["path"] == "/2"
    assert 30 <= closed - start < 31  # 30 s after the last answer, not after the first


async def test_fresh_connection_must_start_a_request_within_the_header_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    # an idle timeout (300 s) is for kept-alive connections: an accepted socket that never
    # sends a byte is closed after header_timeout, without an answer
    async with running(echo, Limits(header_timeout_sec=10, idle_timeout_sec=300)) as port:
        client = await RawClient.open(port)
        start = trio.current_time()
        with trio.fail_after(1000):
            assert await client.closed()
            closed = trio.current_time()
    assert 10 <= closed - start < 11


async def test_stalled_body_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    async with running(echo, Limits(body_read_timeout_sec=20)) as port:
        with trio.fail_after(1000):
            reply = await refused(port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n"
                                        b"\r\nabc")
    assert reply.status == 408 and error_of(reply) == "body_timeout"


async def test_100_continue_wait_does_not_count_against_the_client(
        autojump_clock: trio.testing.MockClock) -> None:
    async def slow_reader(request: Request, responder: Responder) -> None:
        await trio.sleep(100)  # busy elsewhere; the client waits for our 100 Continue
        await echo(request, responder)

    async with running(slow_reader, Limits(body_read_timeout_sec=10)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                              b"Expect: 100-continue\r\n\r\n")
            assert (await client.reply()).status == 100
            await client.send(b"ok")
            reply = await client.reply()
    assert reply.status == 200 and json.loads(reply.body)["body"] == "ok"


# ---- while a handler is slow (the guard reads for it) ---------------------------------------


async def test_request_sent_during_a_slow_handler_is_answered_next(
        autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/slow":
            await trio.sleep(50)
        await responder.respond(200, [], request.path.encode())

    async with running(handler) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(get("/slow"))
            await trio.sleep(10)  # the handler is slow by now: the guard reads meanwhile
            await client.send(get("/next"))
            replies = [await client.reply(), await client.reply()]
            await client.send(get("/after"))  # the serving task reads again
            replies.append(await client.reply())
    assert [r.body for r in replies] == [b"/slow", b"/next", b"/after"]


async def test_stalled_head_during_a_slow_handler_gets_408_after_its_answer(
        autojump_clock: trio.testing.MockClock) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await trio.sleep(100)
        await responder.respond(200, [], b"done")

    async with running(handler, Limits(header_timeout_sec=10)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(get("/slow") + b"GET /2 HTTP/1.1\r\nHo")
            first = await client.reply()
            second = await client.reply()
            assert await client.closed()
    assert first.body == b"done"
    assert second.status == 408 and error_of(second) == "header_timeout"


# ---- failures -------------------------------------------------------------------------------


async def test_handler_exception_is_500_and_the_server_carries_on(
        caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/boom":
            raise ValueError("kaboom")
        await responder.respond(200, [], b"fine")

    async with running(handler) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, get("/boom"))
            async with httpx.AsyncClient() as client:
                after = await client.get(f"http://127.0.0.1:{port}/ok")
    assert reply.status == 500 and error_of(reply) == "internal_error"
    assert after.status_code == 200 and after.content == b"fine"
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)


@pytest.mark.parametrize("header", [("content-length", v) for v in (
    "-1", "+5", "1_0", "５", "1" * 20, "5, 5")] + [("x-a", "1\r\nset-cookie: evil")])
@pytest.mark.parametrize("streamed", [True, False])
async def test_a_bad_response_head_never_reaches_the_wire(header: tuple[str, str],
                                                          streamed: bool) -> None:
    # int() takes most of these lengths, and a CR/LF would split the response: still a 500
    async def handler(request: Request, responder: Responder) -> None:
        if streamed:
            await responder.send_head(200, [header])
        else:
            await responder.respond(200, [header], b"12345")

    async with running(handler) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, get("/"))
    assert reply.status == 500 and error_of(reply) == "internal_error"


async def test_handler_exception_after_the_head_closes_the_connection() -> None:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [])
        await responder.send(b"partial")
        raise ValueError("mid-stream")

    async with running(handler) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(WAIT):
            await stream.send_all(get("/"))
            data = await read_all(stream)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"7\r\npartial\r\n")  # no last chunk: the client sees the truncation


async def test_handler_that_does_not_answer_is_500() -> None:
    async def silent(request: Request, responder: Responder) -> None:
        pass

    async with running(silent) as port:
        with trio.fail_after(WAIT):
            reply = await refused(port, get("/"))
    assert reply.status == 500


async def test_client_leaving_mid_body_cancels_the_handler() -> None:
    got_some = trio.Event()
    finished = trio.Event()
    outcome: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        try:
            async for _ in request.body_chunks():
                got_some.set()
            outcome.append("body read")
        except (trio.Cancelled, ClientDisconnected) as exc:
            outcome.append(type(exc).__name__)
            raise
        finally:
            finished.set()

    async with running(handler) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(WAIT):
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                                  b"0123456789")
            await got_some.wait()
            await stream.aclose()
            await finished.wait()
    assert outcome in (["Cancelled"], ["ClientDisconnected"])


async def test_client_leaving_while_the_handler_waits_cancels_it() -> None:
    started = trio.Event()
    finished = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        started.set()
        try:
            await trio.sleep_forever()  # an upstream that never answers
        finally:
            finished.set()

    async with running(handler) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(WAIT):
            await stream.send_all(get("/"))
            await started.wait()
            await stream.aclose()
            await finished.wait()


# ---- random input ---------------------------------------------------------------------------

_ANSWERS = {200, 400, 408, 413, 431, 500, 501, 505}
_HEADS = st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nHost: t\r\n",
                          b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                          b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"])


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=_HEADS, noise=st.binary(max_size=600))
async def test_random_bytes_never_break_the_server(head: bytes, noise: bytes) -> None:
    errors = _Errors()
    logging.getLogger("eecp.httpserver").addHandler(errors)
    try:
        async with running(echo, Limits(max_head_bytes=256, max_headers=8)) as port:
            with trio.fail_after(WAIT):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(head + noise)
                await stream.send_eof()  # nothing more is coming: the server must decide
                data = await read_all(stream)
                for status in re.findall(rb"^HTTP/1\.1 (\d{3}) ", data, re.MULTILINE):
                    assert int(status) in _ANSWERS
                assert not data or data.startswith(b"HTTP/1.1 ")
                async with httpx.AsyncClient() as client:
                    assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
    finally:
        logging.getLogger("eecp.httpserver").removeHandler(errors)
    assert errors.records == []


async def test_a_client_that_stops_reading_a_streamed_response_is_dropped(
        autojump_clock: trio.testing.MockClock) -> None:
    # it must not hold its request (on the proxy listener: an agent's stream slot and a window
    # of eecp's memory) for ever
    chunk = b"x" * 65536
    waited: list[float] = []
    ended = trio.Event()

    async def endless(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("content-type", "application/octet-stream")])
        start = trio.current_time()
        try:
            while True:
                await responder.send(chunk)
                start = trio.current_time()  # a write was taken: the next one's time starts
        finally:
            waited.append(trio.current_time() - start)
            ended.set()

    async with running(endless, Limits(send_timeout_sec=20)) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            await client.send(get("/"))
            await ended.wait()  # the client reads nothing: socket buffers fill, writes stall
            drained = 0
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await client.stream.receive_some(65536):  # then the close
                    drained += len(data)
    assert 20 <= waited[0] < 21, waited  # the stalled write was given send_timeout_sec
    assert drained > 0


# ---- the minimum rate (Limits.min_rate_bytes_sec) -----------------------------------------

RATED = Limits(min_rate_bytes_sec=100, rate_grace_sec=10, body_read_timeout_sec=60,
               send_timeout_sec=60)


async def drip_body(client: RawClient, pieces: int, piece: bytes, every: float) -> None:
    await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                      % (pieces * len(piece)))
    with contextlib.suppress(trio.BrokenResourceError):
        for _ in range(pieces):
            await trio.sleep(every)
            await client.send(piece)


async def test_a_trickled_body_is_408_body_too_slow_after_the_grace(
        autojump_clock: trio.testing.MockClock) -> None:
    # a byte every 3 s is progress (no body_timeout gap), but far below 100 B/s
    async with running(echo, RATED) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip_body, client, 1000, b"x", 3)
                reply = await client.reply()
                nursery.cancel_scope.cancel()
            took = trio.current_time() - start
    assert reply.status == 408 and error_of(reply) == "body_too_slow"
    assert 10 <= took < 13, took


async def test_a_body_at_the_minimum_rate_is_accepted(
        autojump_clock: trio.testing.MockClock) -> None:
    async with running(echo, RATED) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:  # 1 KB every 5 s: 200 B/s for 60 s
                nursery.start_soon(drip_body, client, 12, b"y" * 1000, 5)
                reply = await client.reply()
    assert reply.status == 200 and len(json.loads(reply.body)["body"]) == 12_000


async def test_time_the_handler_spends_elsewhere_does_not_count_against_the_body(
        autojump_clock: trio.testing.MockClock) -> None:
    async def busy_reader(request: Request, responder: Responder) -> None:
        size = 0
        async for chunk in request.body_chunks():
            size += len(chunk)
            await trio.sleep(30)  # e.g. the agent gives no credit: the client is not slow
        await responder.respond(200, [], b"%d" % size)

    async with running(busy_reader, RATED) as port:
        client = await RawClient.open(port)
        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip_body, client, 4, b"z" * 2000, 0)
                reply = await client.reply()
    assert reply.status == 200 and reply.body == b"8000"


async def small_buffer_client(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 16 * 1024)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def streaming(total: int, waited: list[float]) -> Handler:
    chunk = b"x" * 65536

    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("content-length", str(total))])
        start = trio.current_time()
        try:
            for _ in range(total // len(chunk)):
                await responder.send(chunk)
                start = trio.current_time()
        finally:
            waited.append(trio.current_time() - start)
    return handler


async def test_a_client_that_stops_reading_is_dropped_after_the_rate_grace(
        autojump_clock: trio.testing.MockClock) -> None:
    waited: list[float] = []
    # send_timeout alone would give it 60 s; taking nothing at all is below any rate
    async with running(streaming(64 * 65536, waited), RATED) as port:
        client = await small_buffer_client(port)
        with trio.fail_after(1000):
            await client.send_all(get("/"))
            await trio.sleep(100)
    # within two graces: what its kernel took into its receive buffer after the write began
    # counts as taken, once
    assert len(waited) == 1 and 10 <= waited[0] < 21, waited


async def test_a_slow_reader_that_keeps_the_minimum_rate_is_served_whole(
        autojump_clock: trio.testing.MockClock) -> None:
    waited: list[float] = []
    total = 16 * 65536
    async with running(streaming(total, waited), RATED) as port:
        client = await small_buffer_client(port)
        received = 0
        with trio.fail_after(5000):
            await client.send_all(get("/"))
            # 8 KiB a second, far below what the server could send: its kernel reopens the
            # window each time half its receive buffer is free (about every 2 s)
            while data := await client.receive_some(8192):
                received += len(data)
                if received >= total:
                    break
                await trio.sleep(1)
    assert received >= total and waited, (received, waited)


# ---- connection caps and accept errors (eecp.capacity) --------------------------------------


async def opened(port: int, data: bytes = b"") -> RawClient:
    """A connection the server has taken in (and read ``data`` from)."""
    client = await RawClient.open(port)
    if data:
        await client.send(data)
    await trio.testing.wait_all_tasks_blocked()
    return client


async def test_at_the_cap_a_new_connection_closes_the_oldest_idle_one() -> None:
    """Idle is accepted and silent, or kept alive between requests; a connection whose head is
    under way is never closed to make room."""
    async with running(echo, max_connections=3) as port:
        with trio.fail_after(WAIT):
            silent = await opened(port)
            kept = await opened(port, get())
            assert (await kept.reply()).status == 200
            slow = await opened(port, b"GET /slow HTTP/1.1\r\n")
            fresh = await opened(port, get("/fresh"))
            assert (await fresh.reply()).status == 200
            assert await silent.closed()  # the oldest idle one made room
            newer = await opened(port, get("/newer"))
            assert (await newer.reply()).status == 200
            assert await kept.closed()  # then the next oldest
            await slow.send(b"Host: t\r\n\r\n")
            assert json.loads((await slow.reply()).body)["path"] == "/slow"
            await fresh.send(get("/again"))  # kept alive all along
            assert (await fresh.reply()).status == 200


async def test_at_the_cap_with_none_idle_a_new_connection_is_closed_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    release = trio.Event()

    async def held(request: Request, responder: Responder) -> None:
        await release.wait()
        await responder.respond(200, [], b"done")

    async with running(held, max_connections=2) as port:
        with trio.fail_after(WAIT):
            busy = [await opened(port, get()), await opened(port, get())]
            for _ in range(3):
                refused = await opened(port)
                assert await refused.closed()
            release.set()
            for client in busy:
                assert (await client.reply()).body == b"done"
            later = await opened(port, get())  # closes an idle one, now that there are some
            assert (await later.reply()).body == b"done"
    lines = [r.getMessage() for r in caplog.records if r.name == "eecp.capacity"]
    assert lines == ["HTTP listener is at its cap of 2 connections; since the last report: 0 "
                     "idle closed to make room, 1 new refused"]  # then quiet for a minute


@pytest.fixture
def own_accept_filter() -> Iterator[None]:
    """eecp rate-limits trio's accept errors once per process: this test gets a fresh limit."""
    logger = logging.getLogger("trio.serve_listeners")
    saved = logger.filters[:]
    logger.filters.clear()
    yield
    logger.filters[:] = saved


async def test_out_of_descriptors_is_one_log_line_and_the_server_recovers(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
        own_accept_filter: None) -> None:
    """With no descriptor left, accept fails with EMFILE; trio retried every 0.1 s, logging an
    ERROR with a traceback each time. Now: one warning line, and the connection is served once
    descriptors are back."""
    async with running(echo) as port:
        client = socket.socket()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no descriptor left
        try:
            client.connect(("127.0.0.1", port))  # the kernel completes it; accept cannot
            await trio.sleep(30)  # (the clock jumps: 300 retries)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stream = RawClient(trio.SocketStream(trio.socket.from_stdlib_socket(client)))
        with trio.fail_after(WAIT):
            await stream.send(get("/after"))
            assert json.loads((await stream.reply()).body)["path"] == "/after"
    records = [r for r in caplog.records if r.name == "trio.serve_listeners"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "accept failed with EMFILE (Too many open files)" in records[0].getMessage()
    assert "Traceback" not in caplog.text


async def test_at_the_cap_a_head_under_way_past_the_grace_makes_room(
        autojump_clock: trio.testing.MockClock) -> None:
    # one byte on each of a cap's worth of connections (a flood that needs no idle one): the
    # oldest head gives way once it is older than the grace, instead of the newcomer refused
    async with running(echo, max_connections=3) as port:
        with trio.fail_after(100):
            dribbles = [await opened(port, b"G") for _ in range(3)]
            young = await opened(port, get("/young"))
            assert await young.closed()  # none past the grace yet: refused
            await trio.sleep(HEAD_GRACE_SEC)
            fresh = await opened(port, get("/fresh"))
            assert json.loads((await fresh.reply()).body)["path"] == "/fresh"
            assert await dribbles[0].closed()  # the oldest head made room
            await dribbles[1].send(b"ET /slow HTTP/1.1\r\nHost: t\r\n\r\n")  # within its 10 s
            assert json.loads((await dribbles[1].reply()).body)["path"] == "/slow"


async def test_a_client_that_pipelines_and_never_reads_is_dropped(
        autojump_clock: trio.testing.MockClock) -> None:
    # thousands of pipelined requests in one write, and not one answer taken: the server parses
    # ahead a bounded number (MAX_PIPELINED; the last of them closes the connection), and once
    # the socket buffers are full, an answer the client does not take makes the server drop it
    # after the send timeout, as for a stream; it held the connection for ever before
    handled = 0

    async def large(request: Request, responder: Responder) -> None:
        nonlocal handled
        handled += 1
        await responder.respond(200, [("content-type", "text/plain")], b"x" * 200_000)

    async with running(large, Limits(send_timeout_sec=20)) as port:
        client = await small_buffer_client(port)
        with trio.fail_after(1000):
            await client.send_all(get("/") * 3600)
            await trio.sleep(30)  # reads nothing meanwhile
            received = 0
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await client.receive_some(65536):
                    received += len(data)
    assert 0 < handled < MAX_PIPELINED, handled  # dropped while answering
    assert received < handled * 200_000


def test_the_parser_stops_parsing_ahead_at_its_bound() -> None:
    parser: RequestParser[ParsedRequest] = RequestParser(
        ParsedRequest, max_head_bytes=16384, max_headers=100, max_body_bytes=None,
        max_pending=8)
    parser.feed(get("/") * 100)
    assert len(parser.pending) == 8 and parser.done
    assert [r.keep_alive for r in parser.pending] == [True] * 7 + [False]  # then it closes

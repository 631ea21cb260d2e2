"""The agent's HTTP/1.1 client to its backend (agent.backend), against scripted real servers.

Each backend here is a real TCP (or TLS) server on 127.0.0.1 whose script writes exact bytes,
so the framings a client meets in the field (chunked, until close, HEAD, 1xx, a connection
closed while idle, stray bytes) are each met for real. The last tests go through
:mod:`agent.forward` to prove the retry rule: a bodyless request that met a closed kept-alive
connection is sent again on a fresh one; a request with a body never is.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from agent.backend import BackendError, BackendExchange, BackendPool
from eecp.wire.httpmsg import RequestHead
from eecp.wire.streams import Stream, StreamError
from tests.agent.test_forward import call, forwarding
from tests.selfsigned import make_self_signed
from tests.wire.test_streams import read_all

WAIT = 10.0


# ---- a scripted backend -----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]


class Peer:
    """The server's side of one connection: read requests, write exact bytes."""

    def __init__(self, stream: trio.abc.Stream, index: int, seen: list[Seen]) -> None:
        self.stream = stream
        self.index = index  # 0 for the first connection the backend accepted
        self._buffer = b""
        self._seen = seen

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self._buffer += data
        return bool(data)

    async def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not await self._more():
                raise EOFError
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    async def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._more():
                raise EOFError
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def request(self) -> Seen | None:
        """The next request, body included (Content-Length or chunked); None at EOF."""
        try:
            method, target, _ = (await self._line()).decode().split(" ", 2)
            headers = []
            while line := await self._line():
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name, value.strip()))
            seen = Seen(method, target, headers, b"")
            if seen.header("transfer-encoding") == ["chunked"]:
                while size := int(await self._line(), 16):
                    seen.body += await self._exactly(size)
                    await self._line()
                await self._line()
            elif seen.header("content-length"):
                seen.body = await self._exactly(int(seen.header("content-length")[0]))
        except EOFError:
            return None
        self._seen.append(seen)
        return seen

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class Backend:
    url: str
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0


@asynccontextmanager
async def scripted(script: Script, *, tls: ssl.SSLContext | None = None
                   ) -> AsyncIterator[Backend]:
    backend = Backend("")

    async def handler(stream: trio.SocketStream) -> None:
        index = backend.connections
        backend.connections += 1
        wrapped: trio.abc.Stream = stream
        if tls is not None:
            wrapped = trio.SSLStream(stream, tls, server_side=True)
        try:
            await script(Peer(wrapped, index, backend.seen))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(wrapped)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        backend.url = f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}" \
                      f":{port}"
        yield backend
        nursery.cancel_scope.cancel()


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_answering(peer: Peer) -> None:
    """Answer every request on the connection with 200 and its target."""
    while (seen := await peer.request()) is not None:
        await peer.send(ok(seen.target.encode()))


async def exchange(pool: BackendPool, method: str = "GET", target: str = "/",
                   headers: list[tuple[str, str]] | None = None,
                   body: list[bytes] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in body or []:
            yield chunk

    with trio.fail_after(WAIT):
        async with BackendExchange(pool) as ex:
            await ex.send_request(method, target, headers or [],
                                  None if body is None else chunks())
            status, got = await ex.receive_head()
            data = b"".join([chunk async for chunk in ex.body()])
            return status, got, data


# ---- keep-alive -------------------------------------------------------------------------------


async def test_a_kept_alive_connection_carries_the_next_request() -> None:
    async with scripted(keep_answering) as backend, BackendPool(backend.url) as pool:
        for i in range(5):
            status, _, data = await exchange(pool, target=f"/n{i}")
            assert (status, data) == (200, f"/n{i}".encode())
        assert backend.connections == 1 and pool.opened == 1
        assert backend.seen[0].header("host") == [backend.url.removeprefix("http://")]


async def test_a_connection_the_backend_closed_while_idle_is_not_used_again() -> None:
    closed = trio.Event()

    async def once_then_close(peer: Peer) -> None:
        seen = await peer.request()
        assert seen is not None
        await peer.send(ok(b"first"))
        if peer.index == 0:
            await peer.close()
            closed.set()
            return
        await keep_answering(peer)

    async with scripted(once_then_close) as backend, BackendPool(backend.url) as pool:
        assert (await exchange(pool))[2] == b"first"
        await closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert (await exchange(pool))[2] == b"first"  # on a new connection, no error
        assert backend.connections == 2


async def test_an_idle_connection_past_its_keepalive_is_replaced(
        autojump_clock: trio.testing.MockClock) -> None:
    async with scripted(keep_answering) as backend, \
            BackendPool(backend.url, keepalive_sec=4) as pool:
        await exchange(pool)
        await trio.sleep(3)
        await exchange(pool)
        assert backend.connections == 1
        await trio.sleep(5)
        await exchange(pool)
        assert backend.connections == 2


async def test_idle_connections_are_capped() -> None:
    release = trio.Event()
    arrived = 0

    async def held(peer: Peer) -> None:
        nonlocal arrived
        while await peer.request() is not None:
            arrived += 1
            if arrived == 3:
                release.set()
            await release.wait()
            await peer.send(ok())

    async with scripted(held) as backend, BackendPool(backend.url, max_idle=1) as pool:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(exchange, pool)
        assert backend.connections == 3
        for _ in range(3):  # one by one: the one idle connection serves them all
            await exchange(pool)
        assert backend.connections == 3


# ---- framings ---------------------------------------------------------------------------------


async def test_a_chunked_response_is_dechunked_and_its_trailers_dropped() -> None:
    async def chunked(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n"
                            b"x-a: 2\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n"
                            b"\r\n")

    async with scripted(chunked) as backend, BackendPool(backend.url) as pool:
        _, headers, data = await exchange(pool)
        await exchange(pool)
        assert data == b"hello world"
        assert [v for n, v in headers if n == "x-a"] == ["1", "2"]
        assert not [n for n, _ in headers if n.lower() == "x-trailer"]
        assert backend.connections == 1  # and the connection was reusable after it


async def test_a_body_until_close_ends_with_the_close_and_is_not_reused() -> None:
    async def until_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\npart one ")
        await peer.send(b"part two")
        await peer.close()

    async with scripted(until_close) as backend, BackendPool(backend.url) as pool:
        assert (await exchange(pool))[2] == b"part one part two"
        assert (await exchange(pool))[2] == b"part one part two"
        assert backend.connections == 2


async def test_head_204_and_304_have_no_body_and_keep_the_connection() -> None:
    async def no_bodies(peer: Peer) -> None:
        while (seen := await peer.request()) is not None:
            if seen.method == "HEAD":
                await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            elif seen.target == "/204":
                await peer.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                await peer.send(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n")

    async with scripted(no_bodies) as backend, BackendPool(backend.url) as pool:
        assert (await exchange(pool, "HEAD"))[::2] == (200, b"")
        assert (await exchange(pool, "GET", "/204"))[::2] == (204, b"")
        assert (await exchange(pool, "GET", "/304"))[::2] == (304, b"")
        assert (await exchange(pool, "HEAD"))[::2] == (200, b"")
        assert backend.connections == 1


async def test_interim_responses_are_skipped() -> None:
    async def early_hints(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" + ok(b"final"))

    async with scripted(early_hints) as backend, BackendPool(backend.url) as pool:
        status, headers, data = await exchange(pool)
        assert (status, data) == (200, b"final")
        assert not [n for n, _ in headers if n == "link"]


@pytest.mark.parametrize("stray_bytes", [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsmugg",
                                         b"!garbage"])
async def test_stray_bytes_after_a_response_retire_the_connection(stray_bytes: bytes) -> None:
    async def stray(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(ok(b"x") + stray_bytes)

    async with scripted(stray) as backend, BackendPool(backend.url) as pool:
        assert (await exchange(pool))[2] == b"x"
        assert (await exchange(pool))[2] == b"x"
        assert backend.connections == 2


# ---- request bodies ---------------------------------------------------------------------------


async def test_a_body_without_a_length_goes_chunked_and_one_with_goes_as_is() -> None:
    async with scripted(keep_answering) as backend, BackendPool(backend.url) as pool:
        await exchange(pool, "POST", "/c", [("x-b", "1")], [b"abc", b"", b"def"])
        await exchange(pool, "POST", "/l", [("Content-Length", "6")], [b"abc", b"def"])
        await exchange(pool, "POST", "/empty", [], None)
        chunked, sized, empty = backend.seen
        assert chunked.header("transfer-encoding") == ["chunked"] and chunked.body == b"abcdef"
        assert sized.header("content-length") == ["6"] and sized.body == b"abcdef"
        assert not sized.header("transfer-encoding")
        assert empty.header("content-length") == ["0"]
        assert backend.connections == 1


@pytest.mark.parametrize(("declared", "chunks"), [("6", [b"abc"]), ("2", [b"abc"]),
                                                  ("x1", [b"a"]), ("1, 2", [b"a"])])
async def test_a_body_that_does_not_match_its_length_is_a_bad_request(
        declared: str, chunks: list[bytes]) -> None:
    async with scripted(keep_answering) as backend, BackendPool(backend.url) as pool:
        with pytest.raises(BackendError) as caught:
            await exchange(pool, "POST", "/", [("content-length", declared)], chunks)
        assert caught.value.reason == "bad_request"
        assert await exchange(pool, "GET", "/after")  # a new connection: the old one is gone
        assert backend.connections == 2


# ---- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 5"
                                    b"\r\ncontent-length: 6\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", b""])
async def test_a_broken_answer_is_a_backend_error(answer: bytes) -> None:
    async def broken(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.close()

    async with scripted(broken) as backend, BackendPool(backend.url) as pool:
        with pytest.raises(BackendError) as caught:
            await exchange(pool)
        assert caught.value.reason == "backend_error"
        assert not caught.value.retryable  # a fresh connection: the backend did see it


async def test_a_backend_that_is_down_is_unreachable() -> None:
    async with scripted(keep_answering) as backend:
        url = backend.url
    async with BackendPool(url) as pool:
        with pytest.raises(BackendError) as caught:
            await exchange(pool)
        assert caught.value.reason == "backend_unreachable"


async def test_a_cancelled_exchange_closes_its_connection() -> None:
    async def stalls_mid_body(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhalf")
            if peer.index == 0:
                await trio.sleep_forever()
            await peer.send(b"-of-it!")

    async with scripted(stalls_mid_body) as backend, BackendPool(backend.url) as pool:
        with trio.move_on_after(0.2):
            await exchange(pool)
        assert (await exchange(pool))[2] == b"half-of-it!"
        assert backend.connections == 2


# ---- TLS --------------------------------------------------------------------------------------


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for localhost: the server's context and a client trusting it."""
    cert_pem, key_pem = make_self_signed(tmp_path, "localhost", ["localhost"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


async def test_an_https_backend_is_reached_over_tls_and_kept_alive(tmp_path: Path) -> None:
    server, client = tls_contexts(tmp_path)
    async with scripted(keep_answering, tls=server) as backend, \
            BackendPool(backend.url, ssl_context=client) as pool:
        assert (await exchange(pool, target="/a"))[2] == b"/a"
        assert (await exchange(pool, target="/b"))[2] == b"/b"
        assert backend.connections == 1


async def test_an_untrusted_https_backend_is_unreachable(tmp_path: Path) -> None:
    server, _ = tls_contexts(tmp_path)
    async with scripted(keep_answering, tls=server) as backend, \
            BackendPool(backend.url) as pool:  # the system's roots: not this certificate
        with pytest.raises(BackendError) as caught:
            await exchange(pool)
        assert caught.value.reason == "backend_unreachable"


# ---- through agent.forward: the retry rule ----------------------------------------------------


def closes_on_second_request(peer: Peer) -> Awaitable[None]:
    """The race a kept-alive connection meets: the backend closes it just as the next request
    arrives on it (its idle timeout), without answering."""
    async def script() -> None:
        if peer.index > 0:
            await keep_answering(peer)
            return
        seen = await peer.request()
        if seen is not None:
            await peer.send(ok(seen.target.encode()))
        await peer.request()
        await peer.close()
    return script()


async def test_a_bodyless_request_is_sent_again_when_its_kept_alive_connection_was_closed(
        ) -> None:
    async with scripted(closes_on_second_request) as backend, forwarding(backend.url) as p:
        assert (await call(p, "GET", "/one"))[1] == b"/one"
        head, body = await call(p, "GET", "/two")
        assert (head.status, body) == (200, b"/two")
        assert backend.connections == 2
        assert [s.target for s in backend.seen] == ["/one", "/two", "/two"]


async def test_a_request_with_a_body_is_never_sent_twice() -> None:
    async with scripted(closes_on_second_request) as backend, forwarding(backend.url) as p:
        assert (await call(p, "GET", "/one"))[1] == b"/one"
        with pytest.raises(StreamError) as caught:
            await call(p, "POST", "/pay", [("content-length", "3")], b"abc")
        assert caught.value.reason == "stream_reset:backend_error"
        assert [s.target for s in backend.seen] == ["/one", "/pay"]


async def test_a_response_head_that_never_ends_is_a_backend_error() -> None:
    async def endless(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        while True:
            await peer.send(b"x-filler: " + b"y" * 1000 + b"\r\n")

    async with scripted(endless) as backend, BackendPool(backend.url) as pool:
        with pytest.raises(BackendError) as caught:
            await exchange(pool)
        assert caught.value.reason == "backend_error"
        assert "response head or trailers over" in caught.value.detail


async def test_a_switch_of_protocols_is_a_backend_error() -> None:
    async def upgrades(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                        b"connection: upgrade\r\n\r\n\x81\x02hi")

    async with scripted(upgrades) as backend, BackendPool(backend.url) as pool:
        with pytest.raises(BackendError) as caught:
            await exchange(pool)
        assert caught.value.reason == "backend_error"


async def test_a_non_chunked_transfer_coding_is_read_until_the_close() -> None:
    async def gzip_until_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzipped")
        await peer.close()

    async with scripted(gzip_until_close) as backend, BackendPool(backend.url) as pool:
        assert (await exchange(pool))[2] == b"zipped"


async def test_an_interim_response_with_a_body_adds_nothing_to_the_answer() -> None:
    async def interim_body(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 150 Odd\r\ncontent-length: 3\r\n\r\nabc" + ok(b"final"))

    async with scripted(interim_body) as backend, BackendPool(backend.url) as pool:
        status, _, data = await exchange(pool)
        assert (status, data) == (200, b"final")


async def test_trailers_that_never_end_are_a_backend_error() -> None:
    async def endless_trailer(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                        b"2\r\nhi\r\n0\r\nx-trailer: ")
        while True:
            await peer.send(b"z" * 4096)

    async with scripted(endless_trailer) as backend, BackendPool(backend.url) as pool:
        with pytest.raises(BackendError) as caught:
            await exchange(pool)
        assert caught.value.reason == "backend_error"


async def test_an_https_body_delimited_by_the_close_ends_cleanly(tmp_path: Path) -> None:
    server, client = tls_contexts(tmp_path)

    async def until_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        assert isinstance(peer.stream, trio.SSLStream)
        await peer.stream.transport_stream.aclose()  # no close_notify, as many servers do

    async with scripted(until_close, tls=server) as backend, \
            BackendPool(backend.url, ssl_context=client) as pool:
        assert (await exchange(pool))[2] == b"all of it"


async def test_an_unsafe_bodyless_request_is_never_sent_twice() -> None:
    async with scripted(closes_on_second_request) as backend, forwarding(backend.url) as p:
        assert (await call(p, "GET", "/one"))[1] == b"/one"
        with pytest.raises(StreamError) as caught:
            await call(p, "POST", "/charge", [("content-length", "0")])
        assert caught.value.reason == "stream_reset:backend_error"
        assert [s.target for s in backend.seen] == ["/one", "/charge"]


async def test_an_early_answer_is_relayed_while_the_upload_is_still_coming() -> None:
    """A backend that refuses an upload before reading it (413) and stops reading: its answer
    reaches eecp, instead of the agent waiting in a write the backend will never drain."""
    answered = trio.Event()

    async def refuses_early(peer: Peer) -> None:
        while await peer._line():  # the request head only, not its body
            pass
        await peer.send(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\n\r\ntoo big!")
        answered.set()
        await trio.sleep_forever()  # and never reads, never closes

    async def upload(stream: Stream) -> None:
        with contextlib.suppress(StreamError):
            for _ in range(1024):  # 64 MiB: far beyond what the sockets and windows hold
                await stream.send(bytes(64 * 1024))
            await stream.end()

    async with scripted(refuses_early) as backend, forwarding(backend.url) as p:
        head = RequestHead("PUT", "/blob", [("content-length", str(64 << 20))])
        with trio.fail_after(WAIT):
            async with await p.eecp.open_stream(head) as stream, trio.open_nursery() as nursery:
                nursery.start_soon(upload, stream)
                response = await stream.receive_head()
                assert (response.status, await read_all(stream)) == (413, b"too big!")
        assert answered.is_set() and backend.connections == 1

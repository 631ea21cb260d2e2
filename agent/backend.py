"""The agent's HTTP/1.1 client to its backend: the forwarding hot path, on trio + httptools.

Why not httpx here (the agent's other HTTP, health probes, stays on httpx): forwarding is one
request per proxied request, and httpx/httpcore cost about half the agent's CPU per request —
its pool checks every idle connection for readability on each request (O(connections)), and
its layers (auth, redirects, cookies, URL objects) do work a proxy must not do anyway. This
client does one thing: send a request head and a streamed body over a kept-alive connection
and hand back the response head and its body chunk by chunk, as :mod:`agent.forward` needs.

* :class:`BackendPool` keeps up to ``max_idle`` idle connections (last used first: the warmest
  one), checks only the one it hands out (a peer that closed it makes it readable), and forgets
  a connection idle longer than ``keepalive_sec``.
* :class:`BackendExchange` is one request/response on one connection. A connection goes back
  to the pool only when the exchange completed cleanly (request sent whole, response read to
  its end, keep-alive on both sides, no stray bytes); anything else closes it.
* The response framing is llhttp's (``Content-Length``, chunked, until close, none for 1xx /
  204 / 304 and for a HEAD request). Bodies come out de-chunked but not decoded
  (``Content-Encoding`` passes through), each chunk what one read brought (≤ 64 KiB).
* No timeouts in here: callers put their deadlines around the calls (:mod:`agent.forward`).

Failures are :class:`BackendError` with the reasons :mod:`agent.forward` resets a stream with:
``backend_unreachable`` (connecting failed), ``backend_error`` (the connection broke or the
answer is not HTTP), ``bad_request`` (the request's body does not match its Content-Length).
``retryable`` tells whether the request never reached a fresh connection's backend: a kept-alive
connection the backend closed just as it was reused.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
import trio

from eecp.core.errors import EecpError
from eecp.wire.httpmsg import content_length

READ_BYTES = 64 * 1024
#: the most a response head (status line, headers, interim 1xx heads) may take: what the
#: tunnel could carry (its heads are at most 64 KiB of JSON), and a bound on a backend that
#: never ends its headers
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
#: how long an idle connection is kept: under the keep-alive timeout of common servers
#: (Node 5 s, gunicorn 2 s is shorter: a closed one is noticed and replaced, see retryable)
DEFAULT_KEEPALIVE_SEC = 4.0


class BackendError(EecpError):
    """A backend exchange failed: ``backend_unreachable``, ``backend_error``, ``bad_request``.
    ``retryable``: nothing of the response arrived on a connection that had been idle, so the
    backend most likely closed it before reading the request."""

    http_status = 502

    def __init__(self, reason: str, detail: str = "", *, retryable: bool = False) -> None:
        super().__init__(reason, detail)
        self.retryable = retryable


class BackendPool:
    """Connections to one backend origin (``http://`` or ``https://``), reused while idle."""

    def __init__(self, backend_url: str, *, max_idle: int = 100,
                 keepalive_sec: float = DEFAULT_KEEPALIVE_SEC,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(backend_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{backend_url!r} is not an http:// or https:// URL")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        #: the Host header the backend gets (its own, not the public one)
        self.authority = host if default_port else f"{host}:{self.port}"
        #: the backend URL's path, without its trailing slash: prefixed to every target
        self.prefix = parts.path.rstrip("/")
        self._ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self._max_idle = max_idle
        self._keepalive_sec = keepalive_sec
        self._idle: list[tuple[float, trio.abc.Stream]] = []
        #: TCP connections opened so far (tests and benches read it)
        self.opened = 0

    async def connect(self, *, fresh: bool = False) -> tuple[trio.abc.Stream, bool]:
        """A connection for one exchange, and whether it is a reused one (never when
        ``fresh``: a retry after a reused connection turned out closed)."""
        now = trio.current_time()
        while self._idle and not fresh:
            since, stream = self._idle.pop()
            if now - since < self._keepalive_sec and not _peer_spoke(stream):
                return stream, True
            await trio.aclose_forcefully(stream)
        return await self._open(), False

    async def _open(self) -> trio.abc.Stream:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise BackendError("backend_unreachable", f"{self.authority}: {exc}") from None
        self.opened += 1
        if self._ssl is not None:
            # https_compatible: many servers close without close_notify, and a body delimited
            # by the close must still end cleanly
            tls = trio.SSLStream(stream, self._ssl, server_hostname=self.host,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                await trio.aclose_forcefully(stream)
                raise BackendError("backend_unreachable", f"{self.authority}: TLS: {exc}"
                                   ) from None
            except BaseException:  # cancelled mid-handshake: no half-open socket left behind
                await trio.aclose_forcefully(stream)
                raise
            stream = tls
        return stream

    def release(self, stream: trio.abc.Stream) -> bool:
        """Keep a cleanly finished connection for the next exchange; False (not kept: the
        caller closes it) when the pool is full."""
        if len(self._idle) >= self._max_idle:
            return False
        self._idle.append((trio.current_time(), stream))
        return True

    async def aclose(self) -> None:
        """Close every idle connection (connections in use are closed by their exchanges)."""
        idle, self._idle = self._idle, []
        for _, stream in idle:
            await trio.aclose_forcefully(stream)

    async def __aenter__(self) -> BackendPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _peer_spoke(stream: trio.abc.Stream) -> bool:
    """An idle connection that is readable was closed by the backend (or it sent bytes it
    should not have): either way it must not carry another request."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock = getattr(transport, "socket", None)
    return sock is None or bool(sock.is_readable())


class BackendExchange:
    """One request and its response on a connection of ``pool``. Use as::

        async with BackendExchange(pool) as exchange:
            await exchange.send_request(method, target, headers, body)
            status, headers = await exchange.receive_head()
            async for chunk in exchange.body(): ...

    Leaving the block returns the connection to the pool when the exchange completed
    cleanly, and closes it otherwise (an error, a cancellation, a body not read to its end).
    """

    def __init__(self, pool: BackendPool, *, fresh: bool = False) -> None:
        self._pool = pool
        self._fresh = fresh
        self._stream: trio.abc.Stream | None = None
        #: a kept-alive connection: its backend may have closed it as it was handed out
        self.reused = False
        self._response = _Response()
        self._parser = self._response.parser = httptools.HttpResponseParser(self._response)
        self._head_request = False
        #: a 101 is an answer, not an error (:meth:`take_upgraded`): the request asked for it
        self.upgrade = False
        self._upgraded_tail: bytes | None = None  # the new protocol's first bytes, after a 101
        self._sent_whole = False
        self._overhead = 0  # bytes read since the last body byte

    async def open(self) -> None:
        """Take a connection from the pool (a new one when ``fresh``)."""
        self._stream, self.reused = await self._pool.connect(fresh=self._fresh)

    async def close(self, *, failed: bool = False) -> None:
        """Give the connection back if the exchange completed cleanly, else close it."""
        if self.release_nowait(failed=failed):
            return
        stream, self._stream = self._stream, None
        assert stream is not None
        await trio.aclose_forcefully(stream)

    def release_nowait(self, *, failed: bool = False) -> bool:
        """:meth:`close` if it needs no wait: True once the connection went back to the pool
        (or there was none); False when it must be closed, by :meth:`close` (the usual case
        costs no cancel scope to shield a close that does not happen)."""
        stream = self._stream
        if stream is None:
            return True
        r = self._response
        if (not failed and self._sent_whole and r.complete and r.keep_alive and not r.extra
                and self._pool.release(stream)):
            self._stream = None
            return True
        return False

    @property
    def complete(self) -> bool:
        """The whole response has been read (nothing more will come from :meth:`body`)."""
        return self._response.complete and not self._response.chunks

    async def __aenter__(self) -> BackendExchange:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        with trio.CancelScope(shield=True):  # closing is instant; a cancelled caller too
            await self.close(failed=exc_type is not None)

    async def send_request(self, method: str, target: str, headers: list[tuple[str, str]],
                           body: AsyncIterator[bytes] | None) -> None:
        """Send the request: ``target`` is origin-form (the pool's path prefix is added),
        ``headers`` end-to-end ones (``Host`` and the body's framing are set here). A body
        with a ``Content-Length`` goes as is and must match it; one without goes chunked."""
        self._head_request = method == "HEAD"
        length = _content_length(headers) if body is not None else None
        lines = [f"{method} {self._pool.prefix}{target} HTTP/1.1\r\nhost: "
                 f"{self._pool.authority}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers
                  if name.lower() != "content-length"]
        if body is None:
            if method in ("POST", "PUT", "PATCH"):
                lines.append("content-length: 0\r\n")
        elif length is not None:
            lines.append(f"content-length: {length}\r\n")
        else:
            lines.append("transfer-encoding: chunked\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        if body is None:
            await self._write(head)
        elif length is not None:
            await self._send_sized(head, body, length)
        else:
            await self._send_chunked(head, body)
        self._sent_whole = True

    async def _send_sized(self, head: bytes, body: AsyncIterator[bytes], length: int) -> None:
        pending, left = head, length
        async for chunk in body:
            if len(chunk) > left:
                raise BackendError("bad_request", f"body longer than its Content-Length "
                                   f"({length})")
            left -= len(chunk)
            await self._write(pending + chunk if pending else chunk)  # the head with chunk 1
            pending = b""
        if left:
            raise BackendError("bad_request", f"body {left} bytes short of its Content-Length "
                               f"({length})")
        if pending:
            await self._write(pending)

    async def _send_chunked(self, head: bytes, body: AsyncIterator[bytes]) -> None:
        pending = head
        async for chunk in body:
            if chunk:
                await self._write(b"%s%x\r\n%s\r\n" % (pending, len(chunk), chunk))
                pending = b""
        await self._write(pending + b"0\r\n\r\n")

    async def _write(self, data: bytes) -> None:
        assert self._stream is not None
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BackendError("backend_error", f"sending the request: {exc}",
                               retryable=self.reused) from None

    async def receive_head(self) -> tuple[int, list[tuple[str, str]]]:
        """The response's status and headers (raw order and repeats, names as sent); interim
        1xx responses are skipped."""
        r = self._response
        while not r.head_done:
            await self._read(before_response=not r.started)
        if r.status == 101 and not self.upgrade:
            raise BackendError("backend_error", "the backend switched protocols")
        if self._head_request and not r.complete:
            # a HEAD response has no body whatever its headers say (llhttp cannot know that
            # the request was a HEAD; this parser serves one response only)
            r.complete, r.until_close = True, False
            r.keep_alive = r.framed and self._parser.should_keep_alive()
        return r.status, r.headers

    def take_upgraded(self) -> tuple[trio.abc.Stream, bytes]:
        """After a 101 (``upgrade`` set before the request): the connection, now the new
        protocol's and the caller's to close (it never goes back to the pool), and the bytes
        of that protocol that came with the head."""
        stream, self._stream = self._stream, None
        if stream is None or self._upgraded_tail is None:
            raise BackendError("backend_error", "the backend's 101 did not switch protocols")
        return stream, self._upgraded_tail

    def take_buffered(self) -> bytes:
        """The body bytes that have arrived and not been taken yet (they came with the head):
        to go out with it. :meth:`body` goes on from what follows."""
        chunks = self._response.chunks
        data = b"".join(chunks)
        chunks.clear()
        return data

    async def body(self) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk as it arrives."""
        r = self._response
        while True:
            if r.chunks:
                chunk = b"".join(r.chunks) if len(r.chunks) > 1 else r.chunks[0]
                r.chunks.clear()
                yield chunk
            if r.complete:
                return
            await self._read(before_response=False)

    async def _read(self, *, before_response: bool) -> None:
        assert self._stream is not None
        try:
            data = await self._stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BackendError("backend_error", f"reading the response: {exc}",
                               retryable=before_response and self.reused) from None
        if not data:
            self._on_eof(before_response)
            return
        r = self._response
        body_before = r.body_bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # a 101 with Upgrade: no HTTP after it
            if not (self.upgrade and r.status == 101):
                raise BackendError("backend_error", "the backend switched protocols") from None
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._upgraded_tail = bytes(data[offset:])
            return
        except httptools.HttpParserError as exc:
            if r.complete:  # garbage after a whole response: retire, not fail
                r.extra = True
                return
            raise BackendError("backend_error", f"invalid HTTP response: {exc}") from None
        # Bytes that are not body (the head, chunk framing, trailers) are bounded: llhttp has
        # no limit of its own, and a backend that never ends its headers or trailers must not
        # grow the agent's memory for as long as its timeout.
        self._overhead = 0 if r.body_bytes > body_before else self._overhead + len(data)
        if self._overhead > MAX_RESPONSE_HEAD_BYTES + READ_BYTES and not r.complete:
            raise BackendError("backend_error", "response head or trailers over "
                               f"{MAX_RESPONSE_HEAD_BYTES} bytes")

    def _on_eof(self, before_response: bool) -> None:
        r = self._response
        if r.head_done and r.until_close:
            r.complete, r.keep_alive = True, False  # a body delimited by the close: ends here
            return
        where = "before the response" if before_response else "mid-response"
        raise BackendError("backend_error", f"the backend closed the connection {where}",
                           retryable=before_response and self.reused)


class _Response:
    """httptools' callbacks for one response: what has arrived so far."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None  # set by its exchange
        self.started = False
        self.head_done = False
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self.extra = False
        self.framed = False  # a Content-Length, or a Transfer-Encoding ending in chunked
        self._interim = False
        self.body_bytes = 0

    def on_message_begin(self) -> None:
        if self.head_done:  # bytes after the response: never reuse this connection
            self.extra = True
        self.started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # chunked trailers: dropped, as a proxy may
        key = name.lower()
        if key == b"content-length" or (
                key == b"transfer-encoding"
                and value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"):
            self.framed = True
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        if self.head_done:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (103 Early Hints): not forwarded
            self.headers, self.framed, self._interim = [], False, True
            return
        self.status, self.head_done = status, True
        # no framing on a response that may have a body: llhttp reads it until the close
        self.until_close = not self.framed and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        if not self.extra and not self._interim:  # (a 1xx body is no part of the answer)
            self.chunks.append(body)
            self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        if self._interim:
            self._interim = False
            return
        if not self.extra:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    try:
        return content_length(headers)
    except ValueError as exc:
        raise BackendError("bad_request", str(exc)) from None

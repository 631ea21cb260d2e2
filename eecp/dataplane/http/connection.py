"""One client connection of the HTTP server: its I/O, its timeouts, and the request and
responder its handler is given.

Longer than this codebase's ~500 lines on purpose: :class:`Connection`, :class:`Request` and
:class:`Responder` are one piece. The request's body reads and the responder's writes go
through the connection (whose deadlines they run under), and the connection drives both (it
makes them, decides whether the connection survives a response from the responder's framing
and the body left unread, and answers for a handler that failed). Cut apart, each would reach
into the others' privates. What is not I/O lives beside it: the parser
(:mod:`~eecp.dataplane.http.parser`) and the bytes written (:mod:`~eecp.dataplane.http.encoding`).

One connection is one task with one nursery; nothing it starts outlives it::

    connection                          one per accepted socket
      ├─ serving task    reads the next request (llhttp) and runs handler(request, responder)
      │                  itself, one request at a time; the handler pulls its body as it reads
      └─ guard           idle and head timeouts; while a handler is slow (> WATCH_AFTER_SEC),
                         reads for it: the client leaving cancels the handler

The hot path (a small request, a quick answer) is one read and one write in the serving task,
with no hand-off between tasks: a second task per request doubled the cost of each request.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import struct
import termios
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import cast

import trio

from eecp.core.capacity import ConnectionGate
from eecp.core.trioutil import Wakeup, leaf_error
from eecp.dataplane.http.encoding import (
    CHUNKED,
    CLOSE,
    CONTINUE,
    JSON_CLOSE,
    LAST_CHUNK,
    connection_line,
    date_line,
    error_body,
    header_block,
    status_line,
)
from eecp.dataplane.http.parser import (
    BETWEEN,
    BODY,
    HEAD,
    ParsedRequest,
    RequestError,
    RequestParser,
)

log = logging.getLogger("eecp.httpserver")

RECEIVE_BYTES = 64 * 1024
"""Largest single read from a socket (and so the most one parser feed can produce)."""
BODY_BUFFER_BYTES = 64 * 1024
"""The guard stops reading for a slow handler once this much body waits unread."""
MAX_QUEUED_REQUESTS = 16
"""The guard stops reading for a slow handler once this many requests wait for their turn."""
HOLD_BYTES = 64 * 1024
"""Most response bytes a handler may hold back for its next write (``hold=True``)."""
DRAIN_BYTES = 64 * 1024
"""Most unread request body discarded to keep a connection alive (more: close instead)."""
LINGER_SEC = 2.0
"""After an error answer, how long unread input is discarded before closing (see _linger)."""
LINGER_BYTES = 1024 * 1024
WATCH_AFTER_SEC = 0.1
"""A handler running longer than this is slow: the guard reads for it meanwhile (to notice the
client leaving). Quicker ones are not watched, which keeps the hot path to one task."""

_INT = bytes(4)  # the buffer of an ioctl that answers one C int
# Response body framing.
_NO_BODY, _LENGTH, _CHUNK, _UNTIL_CLOSE = 0, 1, 2, 3


@dataclass(frozen=True)
class Limits:
    """What one connection may cost. Timeouts are enforced by the server, per connection."""

    max_head_bytes: int = 16 * 1024
    """Request line plus headers."""
    max_headers: int = 100
    header_timeout_sec: float = 10.0
    """The whole head must arrive within this (slowloris); on a fresh connection it also bounds
    the wait for the first byte."""
    idle_timeout_sec: float = 60.0
    """A kept-alive connection with no request under way is closed after this."""
    body_read_timeout_sec: float = 60.0
    """Longest gap between two pieces of a request body while the server waits for it."""
    max_body_bytes: int | None = None
    """None: unlimited; otherwise a larger body is refused with 413."""
    send_timeout_sec: float = 60.0
    """A streamed response's write (a body chunk, at most about 64 KiB on the proxy listener)
    that the client has not taken whole within this long closes the connection: a client that
    stopped reading must not hold its request (and, on the proxy listener, one of its agent's
    stream slots and a window of memory) for ever."""
    min_rate_bytes_sec: int = 0
    """0: off. Otherwise the least a client must move while the server waits on it, judged
    over every ``rate_grace_sec``: while a request body is awaited, at least
    ``min_rate_bytes_sec × rate_grace_sec`` bytes of it must arrive in each such stretch of
    waiting (else 408 ``body_too_slow``), and while a response write waits on the client, the
    client must take (acknowledge) at least that many bytes in each stretch (else the
    connection closes: within two stretches of its last read, as what its kernel buffers after
    the write began counts once). Time the server spends not waiting on the client (the app
    has not answered, an SSE stream is quiet) never counts, so a slow app is not a slow
    client. What a trickle or a client that stopped reading costs is then bounded by the
    grace, not by its patience (slowloris on bodies and on reads)."""
    rate_grace_sec: float = 10.0
    """The stretch over which ``min_rate_bytes_sec`` is judged (see there)."""

    @property
    def rate_quantum(self) -> int:
        """Bytes a client must move per ``rate_grace_sec`` of waiting (1 when the rate is off:
        any progress)."""
        return max(1, int(self.min_rate_bytes_sec * self.rate_grace_sec))


DEFAULT_LIMITS = Limits()


class ClientDisconnected(trio.BrokenResourceError):
    """The client went away: raised by :class:`Responder` writes and body reads."""


class Request(ParsedRequest):
    """One parsed request head; its body is read with :meth:`body_chunks` or :meth:`read_body`.

    ``headers`` keeps the order and repeats of the request, names lower-cased.
    """

    __slots__ = ("_conn", "_rate_bytes", "_rate_waited", "client")

    def __init__(self, conn: Connection, method: str, target: str, http_version: str,
                 headers: list[tuple[str, str]], keep_alive: bool, content_length: int | None,
                 expect_continue: bool) -> None:
        super().__init__(method, target, http_version, headers, keep_alive, content_length,
                         expect_continue)
        self.client = conn.client
        self._conn = conn
        # the body's rate (Limits.min_rate_bytes_sec): bytes parsed when the current stretch
        # of waiting began, and the seconds waited on the client since
        self._rate_bytes = 0
        self._rate_waited = 0.0

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk as it arrives (Content-Length or chunked).

        Answers ``Expect: 100-continue`` on first use, unless a response was already started.
        Raises :class:`RequestError` (timeout, too large, malformed chunking) and
        :class:`ClientDisconnected`.
        """
        if self._expect_continue:
            self._expect_continue = False
            await self._conn.send_continue(self)
        while (chunk := await self._conn.next_body_chunk(self)) is not None:
            yield chunk

    async def read_body(self, limit: int) -> bytes:
        """The whole body, refused with :class:`RequestError` 413 beyond ``limit`` bytes."""
        too_large = RequestError(413, "body_too_large", f"more than {limit} bytes")
        if self.content_length is not None and self.content_length > limit:
            raise too_large  # before soliciting the body with a 100 Continue
        parts: list[bytes] = []
        size = 0
        async for chunk in self.body_chunks():
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
        return b"".join(parts)


class Responder:
    """Writes the response to one request: :meth:`respond` in one go, or :meth:`send_head`,
    :meth:`send` as often as needed, then :meth:`end`.

    Framing is the server's business: handler headers named Content-Length fix the length,
    Transfer-Encoding and Connection are dropped (hop-by-hop) except that ``Connection: close``
    is honoured. Without a length the body is chunked (HTTP/1.1) or ends with the connection
    (HTTP/1.0). HEAD, 204 and 304 answers never carry a body (what is sent is discarded). The
    server writes the Date, unless the handler's headers carry one (a proxied answer keeps its
    origin's, RFC 9110 6.6.1): there is one Date either way.
    """

    __slots__ = ("_close", "_conn", "_ended", "_held", "_held_bytes", "_mode", "_remaining",
                 "_request", "head_sent")

    def __init__(self, conn: Connection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self.head_sent = False
        self._ended = False
        self._close = False  # close the connection after this response
        self._mode = _NO_BODY
        self._remaining = 0  # bytes still owed under Content-Length
        self._held: list[bytes] = []  # written, not yet sent (``hold=True``)
        self._held_bytes = 0

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        """The whole response, head and body, in one write (the fast path: pass ``headers``
        as a tuple and their encoding is cached)."""
        block, _, close, dated = header_block(headers)  # before _start: a bad head is a 500
        self._start(status)
        request = self._request
        self._close = close = close or not self._conn.may_keep_alive(request)
        if status == 204 or status == 304:
            framing, body = b"", b""
        else:
            framing = b"content-length: %d\r\n" % len(body)
        if request.method == "HEAD":
            body = b""
        self._ended = True
        data = b"".join((status_line(status),
                         b"" if dated else date_line(), block, framing,
                         connection_line(request.http_version, close), b"\r\n", body))
        # through Connection.write, stamps and all: a client that takes not even a small
        # answer (one that pipelines requests and never reads) is dropped by the guard like
        # one that stops reading a stream, instead of holding its connection for ever
        await self._conn.write(data)

    async def send_head(self, status: int, headers: Sequence[tuple[str, str]], *,
                        hold: bool = False) -> None:
        """Start a streamed response; the body follows with :meth:`send` and :meth:`end`.

        ``hold=True`` (here and in :meth:`send`) keeps the bytes back to go out with the next
        write: for a caller that knows more follows at once (a small proxied answer is then
        one write instead of three). At most :data:`HOLD_BYTES` are held."""
        block, length, close, dated = header_block(headers)  # before _start: a bad head: 500
        self._start(status)
        request = self._request
        framing = b"" if length is None else b"content-length: %d\r\n" % length
        if request.method == "HEAD" or status == 304:
            self._mode = _NO_BODY
        elif status == 204:
            self._mode, framing = _NO_BODY, b""
        elif length is not None:
            self._mode, self._remaining = _LENGTH, length
        elif request.http_version == "1.1":
            self._mode, framing = _CHUNK, CHUNKED
        else:
            self._mode, close = _UNTIL_CLOSE, True
        self._close = close = close or not self._conn.may_keep_alive(request)
        await self._write(b"".join((
            status_line(status), b"" if dated else date_line(), block, framing,
            connection_line(request.http_version, close), b"\r\n")), hold)

    async def send(self, chunk: bytes, *, hold: bool = False) -> None:
        """Write the next piece of the body (flow-controlled by the client)."""
        if not self.head_sent or self._ended:
            raise RuntimeError("send() before send_head() or after end()")
        if not chunk or self._mode == _NO_BODY:
            if not hold:
                await self._flush()
            return
        if self._mode == _CHUNK:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        elif self._mode == _LENGTH:
            if len(chunk) > self._remaining:
                raise RuntimeError("response body longer than its Content-Length")
            self._remaining -= len(chunk)
        await self._write(chunk, hold)

    async def _write(self, data: bytes, hold: bool) -> None:
        if hold and self._held_bytes + len(data) <= HOLD_BYTES:
            self._held.append(data)
            self._held_bytes += len(data)
            return
        if self._held:
            data = b"".join((*self._held, data))
            self._held.clear()
            self._held_bytes = 0
        await self._conn.write(data)

    async def _flush(self) -> None:
        if self._held:
            await self._write(b"", False)

    async def end(self) -> None:
        """Finish the body. A body shorter than its Content-Length closes the connection, so
        the client sees the truncation."""
        if not self.head_sent:
            raise RuntimeError("end() before send_head()")
        if self._ended:
            return
        self._ended = True
        if self._mode == _CHUNK:
            await self._write(LAST_CHUNK, False)
            return
        await self._flush()
        if self._mode == _LENGTH and self._remaining:
            log.warning("response to %s %s ended %d bytes short of its Content-Length; closing",
                        self._request.method, self._request.path, self._remaining)
            self._close = True

    async def switch_protocols(self, headers: Sequence[tuple[str, str]]) -> Upgraded:
        """Answer an upgrade request (``request.upgrading``, its body complete) with
        ``101 Switching Protocols`` and ``headers`` (which name the protocol: ``Upgrade``;
        ``Connection: upgrade`` is written here); the connection is then the returned
        :class:`Upgraded` byte stream's until the handler returns, and closes after it.

        From here on the server's own deadlines and its guard stand aside (nothing more is
        parsed, nothing is read for the handler): the handler keeps its own time."""
        request = self._request
        if not request.upgrading or not request._complete:
            raise RuntimeError("switch_protocols() on a request that is no upgrade")
        block, _, _, _ = header_block(headers)  # before anything is sent: a bad head is a 500
        if self.head_sent:
            raise RuntimeError("response already started")
        self.head_sent = self._ended = self._close = True
        upgraded = self._conn.upgrade()
        await self._conn.write(b"".join((status_line(101), block, b"connection: upgrade\r\n",
                                         b"\r\n")))
        return upgraded

    def _start(self, status: int) -> None:
        if self.head_sent:
            raise RuntimeError("response already started")
        if not 200 <= status <= 999:
            raise ValueError(f"status {status} cannot be sent by a handler")
        self.head_sent = True


class Upgraded:
    """The client's connection after a 101: raw bytes both ways (see
    :meth:`Responder.switch_protocols`). Reads and writes raise :class:`ClientDisconnected`
    when the client is gone; :meth:`receive_some` returns ``b""`` at the client's end of input
    (its half-close), which, unlike on a request, cancels nothing."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def receive_some(self) -> bytes:
        """The client's next bytes (those that came with the request's head first), as one
        read brought them (at most :data:`RECEIVE_BYTES`); ``b""`` at its end of input."""
        return await self._conn.receive_raw()

    async def send_all(self, data: bytes) -> None:
        await self._conn.write(data)

    async def send_eof(self) -> None:
        """Half-close toward the client (what a peer's END means)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._conn.stream.send_eof()


Handler = Callable[[Request, Responder], Awaitable[None]]


class Connection:
    """One client connection.

    The serving task reads requests and runs the handler itself: in the hot path (a small
    request, a quick answer) nothing is handed between tasks. Input is pulled when needed, by
    whoever needs it: the serving task for the next request, the handler (through
    :meth:`next_body_chunk`) for its body, so a body is never read faster than it is consumed.
    The guard task enforces the idle and head timeouts and, while a handler is slow (waiting
    for an upstream, say), reads for it: to notice the client leaving, which cancels the
    handler, and to queue what the client sends meanwhile, within the buffer limits.
    """

    def __init__(self, stream: trio.SocketStream, handler: Handler, limits: Limits,
                 gate: ConnectionGate) -> None:
        self.stream = stream
        self.handler = handler
        self.limits = limits
        self.gate = gate
        self.listed_idle = False  # the gate may evict it (see _list_idle)
        self.client = _peer(stream)
        # What was read: requests not yet handled (or the refusal that ends the connection),
        # their bodies, and whether anything more will be parsed (parser.done).
        self.parser = RequestParser(
            partial(Request, self), max_head_bytes=limits.max_head_bytes,
            max_headers=limits.max_headers, max_body_bytes=limits.max_body_bytes)
        self.pending = self.parser.pending
        now = trio.current_time()
        self.eof = False  # the client is gone
        self.last_input = now  # when the last read returned
        # Who reads: one task at a time; another one waits for what it gets.
        self.pulling = False
        self.pulled = Wakeup()
        # The serving task. Cancelled when the client leaves during a request, or by the guard.
        self.serve_scope = trio.CancelScope()
        self.active = False  # a request is being handled
        self.responder: Responder | None = None
        self.idle_deadline = now + limits.header_timeout_sec  # fresh: a request must come soon
        self.idle_closed = False
        # The write under way (see write()): when its client was last seen to take enough of
        # it (inf: no write under way), and how much the client had taken by then.
        self.write_started = math.inf
        self.write_mark = math.inf
        self.write_mark_taken = 0
        self.sent_total = 0  # bytes the kernel accepted from us on this connection
        self.stalled = False  # dropped by the guard: a write waited on the client too long
        self.refusal: RequestError | None = None  # the guard's verdict, sent once serving ends
        # The guard sleeps under guard_scope until something may be due. Its deadline is kept
        # lazily: never later than what is due, moved earlier only when needed, and when it
        # fires early the guard just sleeps again (one wake now and then, instead of deadline
        # updates on every request).
        self.guard_scope = trio.CancelScope()
        self.watch_at = math.inf  # when the request in hand counts as slow
        self.watch_scope: trio.CancelScope | None = None  # the guard's read, while watching
        # The head being read must be complete by then (the first one: header_timeout_sec
        # after the accept; each next one: after the read that began it).
        self.head_deadline = now + limits.header_timeout_sec
        #: after a 101 (:meth:`upgrade`): the client's bytes not yet taken, in order
        self.raw: deque[bytes] | None = None

    def upgrade(self) -> Upgraded:
        """The connection becomes a raw byte stream (:class:`Upgraded`): nothing more is
        parsed, the guard stops reading and timing, and the client's end of input no longer
        cancels the handler (it reads ``b""`` instead)."""
        self.raw = deque()
        if self.parser.upgrade_tail:
            self.raw.append(self.parser.upgrade_tail)
            self.parser.upgrade_tail = b""
        self.watch_at = math.inf
        if self.watch_scope is not None:
            self.watch_scope.cancel()  # the guard's read stops (trio loses no bytes)
        return Upgraded(self)

    async def receive_raw(self) -> bytes:
        raw = self.raw
        assert raw is not None
        while not raw:
            if self.eof:
                return b""
            await self._pull()
        return raw.popleft()

    async def run(self) -> None:
        self._list_idle()  # accepted, nothing read yet: the first in line to make room
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard)
                with self.serve_scope:
                    await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self.gate.busy(self)
        if self.refusal is not None:
            # the guard is gone: this last answer is bounded here (a client that reads nothing
            # must not hold the connection with it)
            with trio.move_on_after(self.limits.send_timeout_sec):
                await self._send_error(self.refusal)
        if not self.eof and not self.idle_closed and not self.stalled:
            await self._linger()

    # ---- serving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        while (item := await self._next_item()) is not None:
            if isinstance(item, RequestError):
                log.debug("refused request from %s: %s", self.client, item)
                await self._send_error(item)
                return
            if not await self._handle(item):
                return
            self._become_idle()

    async def _next_item(self) -> Request | RequestError | None:
        while not self.pending:
            if self.parser.done:
                return None
            await self._pull()
        item = self.pending.popleft()
        self.active = True
        # From the read that brought it: a request queued a while ago counts as slow sooner,
        # which only makes the guard watch earlier.
        self.watch_at = self.last_input + WATCH_AFTER_SEC
        self._call_guard(self.watch_at)
        return item

    async def _handle(self, request: Request) -> bool:
        """Run the handler; True when the connection may carry another request.

        The request's boundary: whatever the handler raises costs this request (and maybe its
        connection), never the listener — also an exception group that mixes a failure with
        the cancellation of the handler's other tasks (``except*``: the cancellation goes on
        up to its scope, the failure is handled here)."""
        responder = self.responder = Responder(self, request)
        failure: RequestError | None = None
        gone = False
        try:
            await self.handler(request, responder)
            if not responder.head_sent:
                raise RuntimeError("handler returned without responding")
            await responder.end()
        except* ClientDisconnected:
            gone = True
        except* RequestError as group:
            failure = cast(RequestError, leaf_error(group))
        except* Exception as group:
            log.error("handler failed on %s %s", request.method, request.path,
                      exc_info=leaf_error(group))
            failure = RequestError(500, "internal_error")
        if gone:
            log.debug("client %s went away during %s %s", self.client, request.method,
                      request.path)
            return False
        if failure is not None:
            await self._fail(responder, failure)
            return False
        if request._chunks or not request._complete:
            # the answer is out: drop what the handler left of the body. What has not arrived
            # yet (at most DRAIN_BYTES, or the connection closes: see may_keep_alive) is
            # skipped by the parser while the next request is read
            self.parser.forget(request)
        return not responder._close

    async def _fail(self, responder: Responder, error: RequestError) -> None:
        if responder.head_sent:
            return  # too late for a status: closing the connection tells the client
        with contextlib.suppress(ClientDisconnected):
            await responder.respond(error.http_status, JSON_CLOSE, error_body(error))

    async def _send_error(self, error: RequestError) -> None:
        head = status_line(error.http_status)
        body = error_body(error)
        with contextlib.suppress(ClientDisconnected):
            await self.write(b"%scontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                             % (head, len(body), CLOSE, body))

    def _become_idle(self) -> None:
        self.active = False
        self.responder = None
        if self.watch_scope is not None:
            self.watch_scope.cancel()  # the guard stops reading; the next request is ours
        if not self.pending:
            # No need to call the guard: it is due at watch_at, which is earlier.
            self.idle_deadline = trio.current_time() + self.limits.idle_timeout_sec
            if self.parser.state == BETWEEN and not self.parser.done:
                self._list_idle()

    # ---- connection accounting (eecp.capacity) ----------------------------------------------

    def _list_idle(self) -> None:
        """No request under way and no byte of the next one: the gate may close this
        connection to make room for a new one. Any input ends that (:meth:`_feed`)."""
        self.listed_idle = True
        self.gate.idle(self)

    def _unlist(self) -> None:
        if self.listed_idle:
            self.listed_idle = False
            self.gate.busy(self)

    def evict(self) -> None:
        """Closed by the gate, while idle (or slow with its head), to make room: like an idle
        timeout, but now."""
        self.listed_idle = False
        self.idle_closed = True
        self.serve_scope.cancel()

    def may_keep_alive(self, request: Request) -> bool:
        """Whether the connection can survive this response: the client wants it and the
        request's body is (or can cheaply be) read to its end."""
        if not request.keep_alive or request._error is not None:
            return False
        if request._complete:
            return True
        if request._expect_continue or request.content_length is None:
            return False  # the body may never come, or may be endless
        return request.content_length - request._consumed <= DRAIN_BYTES

    async def write(self, data: bytes) -> None:
        # Stamps, not a cancel scope (one costs about 10 µs, a write's stamps under 1): the
        # guard drops a connection whose write waited too long on its client (_write_stalled).
        # The whole small answers of respond(), its hot path, go without.
        self.write_started = self.write_mark = trio.current_time()
        if self.limits.min_rate_bytes_sec:  # (one ioctl per write; none without a rate)
            self.write_mark_taken = self._taken()
        sock = self.stream.socket
        try:
            with memoryview(data) as view:
                done = 0
                while done < len(view):
                    with view[done:] as rest:
                        sent = await sock.send(rest)
                    done += sent
                    self.sent_total += sent
        except (OSError, trio.ClosedResourceError) as exc:
            raise ClientDisconnected(str(exc)) from exc
        finally:
            self.write_started = self.write_mark = math.inf

    def _taken(self) -> int:
        """Bytes of ours the client has taken: what the kernel accepted, less what it still
        holds unacknowledged (TIOCOUTQ). A socket's send buffer grows to megabytes, so a write
        returning, or the kernel taking more, says little about a client; its acknowledgements
        do: they come at the pace of its network, and stop once a client that stopped reading
        has filled its receive buffer. (A client *application* reading slowly is seen in bursts:
        its kernel reopens the window only once half its receive buffer is free.) Where the
        query is unsupported, everything the kernel accepted counts as taken."""
        try:
            queued: int = struct.unpack("i", fcntl.ioctl(self.stream.socket.fileno(),
                                                         termios.TIOCOUTQ, _INT))[0]
        except (OSError, ValueError):
            queued = 0
        return self.sent_total - queued

    async def send_continue(self, request: Request) -> None:
        if request._complete or request is not self.parser.current:
            return  # the body is here already, or the parser is past it
        if self.responder is None or self.responder.head_sent:
            return  # the final answer is out: the body is not wanted
        await self.write(CONTINUE)

    async def next_body_chunk(self, request: Request) -> bytes | None:
        """The next chunk of ``request``'s body, reading it from the client if needed; None at
        its end."""
        while not request._chunks:
            if request._error is not None:
                raise request._error
            if request._complete:
                return None
            if self.eof:
                raise ClientDisconnected("the client left during the request body")
            await self._pull_body(request)
        return self.parser.take(request)

    async def _pull_body(self, request: Request) -> None:
        """Read body bytes for ``request``, within its deadlines: the gap timeout, and the
        minimum rate (both count only while we wait, not while the handler was busy)."""
        limits = self.limits
        rated = limits.min_rate_bytes_sec > 0
        if rated and request._rate_waited >= limits.rate_grace_sec:
            request._error = RequestError(
                408, "body_too_slow", f"less than {limits.rate_quantum} bytes in "
                f"{limits.rate_grace_sec:g} s (EE_PROXY_MIN_RATE_BYTES_SEC)")
            return
        patience = limits.body_read_timeout_sec
        if rated:
            patience = min(patience, limits.rate_grace_sec - request._rate_waited)
        began = trio.current_time()
        with trio.move_on_after(patience) as gap:
            await self._pull()
        if rated:
            request._rate_waited += trio.current_time() - began
            if request._received - request._rate_bytes >= limits.rate_quantum:
                request._rate_bytes, request._rate_waited = request._received, 0.0
        if gap.cancelled_caught and request._error is None and not (
                rated and request._rate_waited >= limits.rate_grace_sec):
            request._error = RequestError(408, "body_timeout")

    # ---- reading ----------------------------------------------------------------------------

    async def _pull(self) -> None:
        """Read once from the client and feed the parser; if another task is reading, wait
        for what it gets instead."""
        if self.pulling:
            await self.pulled.wait()
            return
        self.pulling = True
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except trio.BrokenResourceError:
            data = b""
        finally:
            self.pulling = False
            self.pulled.wake()  # runs after the feed below: nothing yields in between
        self.last_input = trio.current_time()
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if not data:
            self._unlist()
            self._on_eof()
            return
        if self.raw is not None:  # upgraded: the bytes are the handler's, unparsed
            self.raw.append(data)
            return
        parser = self.parser
        if parser.done:
            self._unlist()
            return  # nothing more is parsed (read only to notice the client leaving)
        begun = parser.messages
        parser.feed(data)
        if self.listed_idle:
            if parser.state == HEAD and not self.pending and not parser.done:
                self.gate.heading(self)  # a head under way: evictable after a grace
            else:
                self._unlist()
        if parser.messages > begun and parser.messages > 1:
            # a next request began in this read: its head is due header_timeout_sec from now
            self.head_deadline = self.last_input + self.limits.header_timeout_sec
        if parser.state == HEAD and not parser.done:
            self._call_guard(self.head_deadline)  # a head split over reads: rare

    def _on_eof(self) -> None:
        if self.active and self.raw is None:
            log.debug("client %s went away; cancelling its request", self.client)
            self.serve_scope.cancel()
        self.eof = True
        self.parser.stop()

    # ---- the guard --------------------------------------------------------------------------

    def _call_guard(self, when: float) -> None:
        """Make sure the guard looks again no later than ``when``."""
        if when < self.guard_scope.deadline:
            self.guard_scope.deadline = when

    def _guard_due(self) -> float:
        """When something may be due: the request in hand turning slow, or a client timeout
        (only while the serving task waits for a request)."""
        if self.active:
            return self.watch_at  # (inf once upgraded: the handler keeps its own time)
        if self.parser.done or self.pending:
            return math.inf  # the serving task has something to do
        if self.parser.state == HEAD:
            return self.head_deadline
        return self.idle_deadline

    async def _guard(self) -> None:
        while True:
            self.guard_scope = trio.CancelScope(deadline=self._guard_due())
            with self.guard_scope:
                await trio.sleep_forever()
            now = trio.current_time()
            if now < self._guard_due():
                continue  # early: the deadline had moved on
            if self.active:
                await self._watch()
                if self._write_stalled():
                    self._drop_stalled()
                    return
                if self.active and self.raw is None:
                    # Still slow (it reads its own body, or the buffers are full): look again.
                    self.watch_at = trio.current_time() + WATCH_AFTER_SEC
            elif self.parser.state == HEAD:
                self.refusal = RequestError(408, "header_timeout")
                self.serve_scope.cancel()
                return
            else:
                self.idle_closed = True
                self.serve_scope.cancel()
                return

    async def _watch(self) -> None:
        """Read for a slow handler (unless it reads itself, or the buffers are full) until it
        ends: a client leaving cancels it, pipelined requests and body are queued (or, once
        nothing more is parsed, discarded)."""
        while (self.active and self.raw is None and not self.pulling
               and len(self.pending) < MAX_QUEUED_REQUESTS
               and self.parser.buffered < BODY_BUFFER_BYTES and not self.eof):
            deadline = self._watch_deadline()
            # the read may wait for ever (no request under way): a write may stall meanwhile
            stall_check = min(self.write_mark, trio.current_time()) + self._write_patience()
            with trio.CancelScope(deadline=min(deadline, stall_check)) as self.watch_scope:
                await self._pull()
            self.watch_scope = None
            if self._write_stalled():
                return  # the guard drops the connection
            if self.active and trio.current_time() >= deadline:
                self._on_watch_timeout()
                return

    def _write_stalled(self) -> bool:
        """Whether the write under way has waited ``send_timeout_sec`` in all, or (with a
        minimum rate) ``rate_grace_sec`` while its client took less than ``rate_quantum``
        bytes: a client that took enough starts a new stretch."""
        now = trio.current_time()
        limits = self.limits
        if now - self.write_started >= limits.send_timeout_sec:
            return True
        if not limits.min_rate_bytes_sec or now - self.write_mark < limits.rate_grace_sec:
            return False
        taken = self._taken()
        if taken - self.write_mark_taken >= limits.rate_quantum:
            self.write_mark, self.write_mark_taken = now, taken
            return False
        return True

    def _write_patience(self) -> float:
        """How long after the write's mark the guard must look again."""
        limits = self.limits
        if not limits.min_rate_bytes_sec:
            return limits.send_timeout_sec
        if self.write_started == math.inf:  # no write under way: only when to look next
            return limits.rate_grace_sec
        return min(limits.rate_grace_sec,
                   self.write_started + limits.send_timeout_sec - self.write_mark)

    def _drop_stalled(self) -> None:
        log.info("dropping %s: a response write waited on it too long (it took less than %d "
                 "bytes in %g s, or nothing whole in %g s)", self.client,
                 self.limits.rate_quantum, self.limits.rate_grace_sec,
                 self.limits.send_timeout_sec)
        self.stalled = True
        self.serve_scope.cancel()

    def _watch_deadline(self) -> float:
        """The client's deadline for the read the guard is about to make."""
        parser = self.parser
        if parser.done:
            return math.inf
        if parser.state == HEAD:
            return self.head_deadline
        if parser.state == BODY:
            if parser.current is not None and parser.current._expect_continue:
                return math.inf  # the client waits for our 100 Continue
            return trio.current_time() + self.limits.body_read_timeout_sec  # the gap starts now
        return math.inf  # between requests while one is handled: no timeout

    def _on_watch_timeout(self) -> None:
        parser = self.parser
        if parser.state == HEAD:
            self.pending.append(RequestError(408, "header_timeout"))  # after the one in hand
        elif parser.current is not None:
            parser.current._error = RequestError(408, "body_timeout")
        parser.stop()

    async def _linger(self) -> None:
        """Close gently: send FIN, then discard input for a while. Closing a socket that still
        has unread input makes the kernel send a reset, which can destroy the answer we just
        sent before the client reads it (e.g. a 413 while the body is still coming)."""
        with trio.move_on_after(LINGER_SEC):
            try:
                await self.stream.send_eof()
                discarded = 0
                while discarded < LINGER_BYTES:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        return
                    discarded += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        address = stream.socket.getpeername()
    except OSError:  # already disconnected
        return ("", 0)
    return (str(address[0]), int(address[1]))

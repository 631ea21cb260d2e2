"""The agent's half of the data plane: every stream eecp opens becomes one request to the backend.

:func:`serve_forwarding` accepts streams from the tunnel's :class:`~eecp.wire.streams.Mux`
and serves each in its own task, in a nursery it owns (nothing outlives it)::

    forwarding nursery
      └─ forward:<id>    one per stream: body in → backend → head and body out; eecp
                         resetting the stream (its client left) cancels its backend call

A request goes to ``backend_url`` with the path eecp sent, which must be origin-form (``/…``):
an absolute URL or ``//host`` is refused (RESET ``bad_path``) before any request is made, so a
request through the tunnel can reach the app and nothing else from inside the TD. Hop-by-hop
headers are dropped both ways; ``Host`` becomes the backend's; repeated headers keep their
order. Bodies stream both ways chunk by chunk (SSE and chunked responses flow as the app writes
them, and a large download never sits in memory), at the pace the tunnel's flow control allows.
The HTTP client is :mod:`agent.backend` (kept-alive connections, one pool per tunnel client).

A backend that cannot be reached, is too slow or answers garbage costs one stream, reset with
a stable reason, never the tunnel:

=======================  ====================================================================
``bad_path``             the path is not origin-form (``/…``, not ``//…``)
``backend_unreachable``  connecting to the backend failed
``backend_timeout``      no progress for ``timeout_sec``: request sent and head not back, or
                         the response body idle that long (time spent waiting on eecp — for
                         the request body or for window credit — does not count)
``backend_error``        the backend broke the connection or answered invalid HTTP
``bad_request``          the request itself cannot be sent (a body shorter than its
                         Content-Length)
``agent_error``          a bug in this module (logged with its traceback)
=======================  ====================================================================
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import trio

from agent.backend import BackendError, BackendExchange, BackendPool
from eecp.core.errors import EecpError
from eecp.core.trioutil import leaf_error, single_error
from eecp.wire.httpmsg import (
    WEBSOCKET,
    RequestHead,
    ResponseHead,
    is_origin_form,
    strip_hop_by_hop,
)
from eecp.wire.streams import Mux, Stream, StreamError

log = logging.getLogger("agent.forward")

#: dropped from requests on top of the hop-by-hop headers both ends drop
#: (:func:`eecp.wire.httpmsg.strip_hop_by_hop`): ``Host`` (the backend's own is set) and
#: ``Expect`` (the body is already on its way)
_REQUEST_ONLY = frozenset({"host", "expect"})
#: requests the agent may send twice (see _forward): bodyless and safe, as Go's net/http has it;
#: a POST or DELETE the backend may have acted on before its connection broke is not resent
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class ForwardError(EecpError):
    """Why a stream was reset instead of answered: ``bad_path``, ``backend_unreachable``,
    ``backend_timeout``, ``backend_error``, ``bad_request``."""

    http_status = 502


def open_backend_pool(backend_url: str, max_streams: int = 100) -> BackendPool:
    """The connection pool forwarding uses (``async with``): it keeps as many idle backend
    connections as the tunnel serves streams at once, so a busy tunnel never opens a new TCP
    connection per request. No proxy from the environment (the backend is on the VM's
    loopback), no redirects followed, no cookie jar: a proxy must not remember its clients'
    cookies (see :mod:`agent.backend`)."""
    return BackendPool(backend_url, max_idle=max_streams)


async def serve_forwarding(mux: Mux, pool: BackendPool, *, timeout_sec: float) -> None:
    """Serve every stream ``mux`` accepts until the mux is closed (the tunnel is gone), then
    cancel what is still in flight and return."""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream, head = await mux.accept_stream()
            except StreamError:
                nursery.cancel_scope.cancel()  # their tunnel is gone: nobody awaits answers
                return
            nursery.start_soon(_serve_stream, stream, head, pool, timeout_sec,
                               name=f"forward:{stream.id}")


async def _serve_stream(stream: Stream, head: RequestHead, pool: BackendPool,
                        timeout_sec: float) -> None:
    async with stream:
        with trio.CancelScope() as scope:
            # eecp reset the stream (its client went away) or the tunnel closed: stop the
            # backend call, which may be waiting on a backend that will never answer
            stream.cancel_on_failure(scope)
            await _exchange(stream, head, pool, timeout_sec)
        if scope.cancelled_caught:
            log.debug("stream %d ended by eecp; its backend request was cancelled", stream.id)


async def _exchange(stream: Stream, head: RequestHead, pool: BackendPool,
                    timeout_sec: float) -> None:
    """One request/response. This is the stream's boundary: whatever fails here ends this one
    stream (a RESET with its reason, or quietly when eecp reset it) and never the tunnel —
    also when it arrives as an exception group in which one task's failure is mixed with the
    cancellation of the others (only that cancellation goes on up, to the scope that made it).
    """
    failure: ForwardError | None = None
    try:
        await _forward(stream, head, pool, timeout_sec)
    except* StreamError as group:
        log.debug("stream %d ended by eecp: %s", stream.id, leaf_error(group))
    except* ForwardError as group:
        failure = cast(ForwardError, leaf_error(group))  # (every leaf is one)
    except* Exception as group:  # a bug here must cost this one request, not the tunnel
        log.error("stream %d %s %s failed", stream.id, head.method, _path(head),
                  exc_info=leaf_error(group))
        failure = ForwardError("agent_error", "a bug in the agent's forwarding")
    if failure is not None and not stream.finished:
        log.info("stream %d %s %s: %s", stream.id, head.method, _path(head), failure)
        await stream.reset(failure.reason)


def _path(head: RequestHead) -> str:
    """The request's path for a log line: no query (it may carry tokens), bounded."""
    return head.path.partition("?")[0][:200]


async def _forward(stream: Stream, head: RequestHead, pool: BackendPool,
                   timeout_sec: float) -> None:
    target = backend_target(head.path)  # before anything else: no request for a bad path
    headers = request_headers(head.headers)
    if head.upgrade is not None:
        await _upgrade(stream, head, target, headers, pool, timeout_sec)
        return
    first = await stream.receive()  # a body or not: a GET's END follows its head at once
    # a bodyless safe request can be sent again: once, on a fresh connection, when the
    # kept-alive one it went out on turns out closed by the backend before any answer came
    replayable = first is None and head.method in _REPLAYABLE
    for fresh in (False, True):
        exchange = BackendExchange(pool, fresh=fresh)
        try:
            await _answer(stream, head, target, headers, first, exchange, timeout_sec)
            return
        except BackendError as exc:
            if exc.retryable and replayable and not fresh:  # (only before the head)
                log.debug("stream %d: %s on a kept-alive connection; retrying", stream.id, exc)
                continue
            raise ForwardError(exc.reason, exc.detail) from None


async def _answer(stream: Stream, head: RequestHead, target: str,
                  headers: list[tuple[str, str]], first: bytes | None,
                  exchange: BackendExchange, timeout_sec: float) -> None:
    progress = trio.CancelScope()  # its deadline moves with the backend's progress
    failed = True
    try:
        if first is None:  # (the common case, without a nursery: nothing runs beside it)
            with progress:
                progress.deadline = trio.current_time() + timeout_sec
                await exchange.open()
                await exchange.send_request(head.method, target, headers, None)
                status, raw = await exchange.receive_head()
            _raise_if_late(progress, timeout_sec)
            await _respond(stream, exchange, status, raw, timeout_sec)
        else:
            body = _RequestBody(stream, first, progress, timeout_sec)
            with single_error():
                async with trio.open_nursery() as nursery:
                    upload = _Upload(exchange, progress)
                    with progress:
                        progress.deadline = trio.current_time() + timeout_sec
                        await exchange.open()
                        # beside the wait: the backend may answer before it read it all
                        nursery.start_soon(upload.run, head.method, target, headers, body)
                        status, raw = await exchange.receive_head()
                    upload.head_received = True
                    if upload.error is not None:  # it failed before any answer came
                        raise upload.error
                    _raise_if_late(progress, timeout_sec)
                    await _respond(stream, exchange, status, raw, timeout_sec)
                    # answered: what the backend did not read of the body is moot (the
                    # connection is then not reused)
                    nursery.cancel_scope.cancel()
        failed = False
    finally:
        if not exchange.release_nowait(failed=failed):
            with trio.CancelScope(shield=True):  # close the backend connection whatever happened
                await exchange.close(failed=failed)


async def _upgrade(stream: Stream, head: RequestHead, target: str,
                   headers: list[tuple[str, str]], pool: BackendPool, timeout_sec: float
                   ) -> None:
    """A WebSocket handshake (``head.upgrade``): the request to the backend on a connection
    of its own, asking for the upgrade; a 101 goes back with the backend's headers (hop-by-hop
    ones dropped: eecp writes its own ``Upgrade``/``Connection``), and from then on the
    connection's bytes are relayed both ways as they come, never re-framed
    (docs/tunnel-data-protocol.md, section 9). Any other answer is relayed as an ordinary
    response. Only the wait for the head is under ``timeout_sec``: a quiet WebSocket is no
    slow backend (eecp's ``EE_PROXY_WS_IDLE_SEC`` ends idle ones)."""
    if head.upgrade != WEBSOCKET:
        raise ForwardError("bad_request", f"upgrade to {str(head.upgrade)[:40]!r} is not supported")
    exchange = BackendExchange(pool, fresh=True)  # never a pooled one: it will not come back
    exchange.upgrade = True
    headers = [*headers, ("upgrade", WEBSOCKET), ("connection", "upgrade")]
    failed = True
    try:
        with trio.move_on_after(timeout_sec) as late:
            await exchange.open()
            await exchange.send_request("GET", target, headers, None)
            status, raw = await exchange.receive_head()
        if late.cancelled_caught:
            raise ForwardError("backend_timeout", f"no response head within {timeout_sec:g}s")
        if status != 101:
            await _respond(stream, exchange, status, raw, timeout_sec)
            failed = False
            return
        backend, first = exchange.take_upgraded()
    except BackendError as exc:
        raise ForwardError(exc.reason, exc.detail) from None
    finally:
        if not exchange.release_nowait(failed=failed):
            with trio.CancelScope(shield=True):
                await exchange.close(failed=failed)
    try:
        await _send_head(stream, ResponseHead(101, response_headers(raw)), first, end=False)
        await _relay_upgraded(stream, backend)
    finally:
        await trio.aclose_forcefully(backend)


async def _relay_upgraded(stream: Stream, backend: trio.abc.Stream) -> None:
    """The upgraded connection's bytes both ways until the backend closes it (its END to
    eecp); eecp's END (its client's half-close) half-closes toward the backend."""
    async def to_backend() -> None:
        while (chunk := await stream.receive()) is not None:
            await _backend_send(backend, chunk)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 OSError, AttributeError):
            await cast(trio.SocketStream, backend).send_eof()  # (TLS has no half-close)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(to_backend)
        while True:
            try:
                data = await backend.receive_some(64 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            await stream.send(bytes(data))  # at the pace of eecp's credit
        await stream.end()
        nursery.cancel_scope.cancel()


async def _backend_send(backend: trio.abc.Stream, data: bytes) -> None:
    try:
        await backend.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ForwardError("backend_error", f"the upgraded connection broke: {exc}") from None


def _raise_if_late(progress: trio.CancelScope, timeout_sec: float) -> None:
    if progress.cancelled_caught:
        raise ForwardError("backend_timeout", f"no response head within {timeout_sec:g}s")


async def _respond(stream: Stream, exchange: BackendExchange, status: int,
                   raw: list[tuple[str, str]], timeout_sec: float) -> None:
    """The backend's answer to eecp, once its head is in."""
    # what came with the head goes with it, and a response already complete ends with it: a
    # small answer is one message
    first_bytes = exchange.take_buffered()
    await _send_head(stream, ResponseHead(status, response_headers(raw)), first_bytes,
                     end=exchange.complete)
    await _relay_body(stream, exchange, timeout_sec)


class _Upload:
    """The request body going to the backend while its answer is awaited and relayed: a
    backend may answer early (a 413 before it read a large upload) and stop reading. A failure
    before the answer's head is the exchange's failure; after it, only the upload's."""

    def __init__(self, exchange: BackendExchange, progress: trio.CancelScope) -> None:
        self._exchange = exchange
        self._progress = progress
        self.head_received = False
        self.error: BackendError | None = None

    async def run(self, method: str, target: str, headers: list[tuple[str, str]],
                  body: AsyncIterator[bytes]) -> None:
        try:
            await self._exchange.send_request(method, target, headers, body)
        except BackendError as exc:
            if not self.head_received:
                self.error = exc
                self._progress.cancel()  # stop waiting for a head: this is the answer
        except StreamError:
            # eecp reset the stream (its client left mid-body, or sent a bad chunk): the
            # stream's failure cancels this exchange (cancel_on_failure); nothing to add
            pass


async def _send_head(stream: Stream, head: ResponseHead, body: bytes, *, end: bool) -> None:
    """The backend's response head to eecp; one the protocol cannot carry (a status over 599,
    a header over the head limit) is the backend's fault, not eecp's."""
    try:
        await stream.send_head(head, body=body, end=end)
    except StreamError as exc:
        if exc.reason != "invalid_head":
            raise
        raise ForwardError("backend_error", f"unsendable response head: {exc.detail}") from None


async def _relay_body(stream: Stream, exchange: BackendExchange, timeout_sec: float) -> None:
    """The response body to eecp, chunk by chunk as the backend writes it; the last chunk
    carries the end when it is known to be the last (the response is complete), else END
    follows."""
    if exchange.complete:  # it all went with the head
        await stream.end()  # (a no-op: the head carried the end)
        return
    # closed at once, not when collected: it holds the exchange's read side
    body = exchange.body()
    assert isinstance(body, AsyncGenerator)
    async with contextlib.aclosing(body) as chunks:
        while True:
            chunk: bytes | None = None
            with trio.move_on_after(timeout_sec) as idle:
                chunk = await anext(chunks, None)
            if idle.cancelled_caught:
                raise ForwardError("backend_timeout", f"response idle for {timeout_sec:g}s")
            if chunk is None:
                break
            # waits for eecp's credit: not under the idle deadline
            await stream.send(chunk, end=exchange.complete)
    await stream.end()  # (nothing is sent when the last chunk carried the end)


class _RequestBody:
    """The request body for httpx, from the stream; pushes the progress deadline forward as
    the backend takes each chunk, and suspends it while waiting for eecp's next one."""

    def __init__(self, stream: Stream, first: bytes, progress: trio.CancelScope,
                 timeout_sec: float) -> None:
        self._stream = stream
        self._first: bytes | None = first
        self._progress = progress
        self._timeout_sec = timeout_sec

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        self._progress.deadline = math.inf  # eecp's client is slow, not the backend
        chunk_or_end = await self._stream.receive()
        self._progress.deadline = trio.current_time() + self._timeout_sec
        if chunk_or_end is None:
            raise StopAsyncIteration
        return chunk_or_end


def backend_target(path: str) -> str:
    """``path`` (with its query) as the request target for the backend, or
    ``ForwardError("bad_path")`` for anything but an origin-form target
    (:func:`eecp.wire.httpmsg.is_origin_form`): nothing but the backend can be reached."""
    if not is_origin_form(path):
        raise ForwardError("bad_path", f"{path[:80]!r} is not an origin-form path")
    return path


def request_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What to send the backend: hop-by-hop, ``Host`` and ``Expect`` dropped."""
    return [(n, v) for n, v in strip_hop_by_hop(headers) if n.lower() not in _REQUEST_ONLY]


def response_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What to send eecp: the backend's headers, hop-by-hop dropped, order and repeats kept."""
    return strip_hop_by_hop(raw)

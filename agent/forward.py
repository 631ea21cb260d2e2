"""The agent's half of the data plane: every stream eecp opens becomes one request to the backend.

:func:`serve_forwarding` accepts streams from the tunnel's :class:`~eecp.streams.Mux` and serves
each in its own task, in a nursery it owns (nothing outlives it)::

    forwarding nursery
      └─ forward:<id>    one per stream: body in → backend → head and body out
           └─ watch      eecp reset the stream (its client left) → cancel the backend call

A request goes to ``backend_url`` with the path eecp sent, which must be origin-form (``/…``):
an absolute URL or ``//host`` is refused (RESET ``bad_path``) before any request is made, so a
request through the tunnel can reach the app and nothing else from inside the TD. Hop-by-hop
headers are dropped both ways; ``Host`` becomes the backend's; repeated headers keep their
order. Bodies stream both ways chunk by chunk (``aiter_raw``: SSE and chunked responses flow as
the app writes them, and a large download never sits in memory), at the pace the tunnel's flow
control allows.

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
import http.cookiejar
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import httpx
import trio

from eecp.errors import EecpError
from eecp.frames import is_origin_form
from eecp.streams import Mux, RequestHead, ResponseHead, Stream, StreamError

log = logging.getLogger("agent.forward")

#: headers that describe one hop, not the message (RFC 9110 §7.6.1), plus ``Host`` (the
#: backend's own is set) and ``Expect`` (the body is already on its way; httpx cannot honour
#: 100-continue). ``Proxy-*`` are dropped by prefix.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te",
                        "trailer", "trailers", "proxy-connection"})
_REQUEST_ONLY = frozenset({"host", "expect"})
#: httpx's own timeouts are off: every deadline here is a trio one, at its call site
_NO_TIMEOUTS = httpx.Timeout(None).as_dict()


class ForwardError(EecpError):
    """Why a stream was reset instead of answered: ``bad_path``, ``backend_unreachable``,
    ``backend_timeout``, ``backend_error``, ``bad_request``."""

    http_status = 502


def forwarding_client(max_streams: int = 100) -> httpx.AsyncClient:
    """An httpx client fit for forwarding: no proxy from the environment (the backend is on
    the VM's loopback), no timeouts of its own, no redirects followed, and no cookie jar (a
    proxy must not remember its clients' cookies).

    It keeps as many backend connections alive as the tunnel serves streams at once: httpcore
    counts its keep-alive limit against *all* its connections, so a smaller limit would close
    a connection after every request once that many were busy (a new TCP connection per
    request under load)."""
    jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(trust_env=False, timeout=None, follow_redirects=False,
                             cookies=jar, limits=httpx.Limits(
                                 max_connections=max_streams,
                                 max_keepalive_connections=max_streams))


async def serve_forwarding(mux: Mux, client: httpx.AsyncClient, backend_url: str, *,
                           timeout_sec: float) -> None:
    """Serve every stream ``mux`` accepts until the mux is closed (the tunnel is gone), then
    cancel what is still in flight and return."""
    base = httpx.URL(backend_url)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream, head = await mux.accept_stream()
            except StreamError:
                nursery.cancel_scope.cancel()  # their tunnel is gone: nobody awaits answers
                return
            nursery.start_soon(_serve_stream, stream, head, client, base, timeout_sec,
                               name=f"forward:{stream.id}")


async def _serve_stream(stream: Stream, head: RequestHead, client: httpx.AsyncClient,
                        base: httpx.URL, timeout_sec: float) -> None:
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_when_failed, stream, nursery.cancel_scope, name="watch")
        await _exchange(stream, head, client, base, timeout_sec)
        nursery.cancel_scope.cancel()  # done: stop watching


async def _cancel_when_failed(stream: Stream, scope: trio.CancelScope) -> None:
    """eecp reset the stream (its client went away) or the tunnel closed: stop the backend
    call, which may be waiting on a backend that will never answer."""
    error = await stream.wait_failed()
    log.debug("stream %d: %s; cancelling its backend request", stream.id, error.reason)
    scope.cancel()


async def _exchange(stream: Stream, head: RequestHead, client: httpx.AsyncClient,
                    base: httpx.URL, timeout_sec: float) -> None:
    """One request/response; every failure ends as a RESET with its reason (or, when eecp
    reset the stream itself, quietly)."""
    try:
        await _forward(stream, head, client, base, timeout_sec)
    except ForwardError as exc:
        log.info("stream %d %s %s: %s", stream.id, head.method, head.path[:200], exc)
        await stream.reset(exc.reason)
    except StreamError as exc:
        log.debug("stream %d ended by eecp: %s", stream.id, exc.reason)
    except Exception:  # a bug here must cost this one request, not the tunnel
        log.exception("stream %d %s %s failed", stream.id, head.method, head.path[:200])
        await stream.reset("agent_error")


async def _forward(stream: Stream, head: RequestHead, client: httpx.AsyncClient,
                   base: httpx.URL, timeout_sec: float) -> None:
    url = backend_url_for(base, head.path)  # before anything else: no request for a bad path
    progress = trio.CancelScope()  # its deadline moves with the backend's progress
    first = await stream.receive()  # a body or not: a GET's END follows its head at once
    body = None if first is None else _RequestBody(stream, first, progress, timeout_sec)
    request = httpx.Request(head.method, url, headers=request_headers(head.headers),
                            content=body, extensions={"timeout": _NO_TIMEOUTS})
    with progress:
        progress.deadline = trio.current_time() + timeout_sec
        response = await _send(client, request)
    if progress.cancelled_caught:
        raise ForwardError("backend_timeout", f"no response head within {timeout_sec:g}s")
    try:
        await _send_head(stream, ResponseHead(response.status_code,
                                              response_headers(response.headers.raw)))
        await _relay_body(stream, response, timeout_sec)
    finally:
        with trio.CancelScope(shield=True):  # release the backend connection whatever happened
            await response.aclose()


async def _send_head(stream: Stream, head: ResponseHead) -> None:
    """The backend's response head to eecp; one the protocol cannot carry (a status over 599,
    a header over the head limit) is the backend's fault, not eecp's."""
    try:
        await stream.send_head(head)
    except StreamError as exc:
        if exc.reason != "invalid_head":
            raise
        raise ForwardError("backend_error", f"unsendable response head: {exc.detail}") from None


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``client.send`` with httpx's errors turned into stable reasons."""
    try:
        return await client.send(request, stream=True)
    except httpx.ConnectError as exc:
        raise ForwardError("backend_unreachable", str(exc) or type(exc).__name__) from None
    except httpx.TimeoutException as exc:
        raise ForwardError("backend_timeout", str(exc) or type(exc).__name__) from None
    except httpx.LocalProtocolError as exc:
        raise ForwardError("bad_request", str(exc) or type(exc).__name__) from None
    except httpx.TransportError as exc:
        raise ForwardError("backend_error", str(exc) or type(exc).__name__) from None


async def _relay_body(stream: Stream, response: httpx.Response, timeout_sec: float) -> None:
    """The response body to eecp, chunk by chunk as the backend writes it, then END."""
    # closed at once, not when collected: it holds the backend connection's read side
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())  # typed as an iterator
    async with contextlib.aclosing(raw) as chunks:
        while True:
            chunk: bytes | None = None
            with trio.move_on_after(timeout_sec) as idle:
                try:
                    chunk = await anext(chunks, None)
                except httpx.TransportError as exc:
                    raise ForwardError("backend_error", str(exc) or type(exc).__name__
                                       ) from None
            if idle.cancelled_caught:
                raise ForwardError("backend_timeout", f"response idle for {timeout_sec:g}s")
            if chunk is None:
                break
            await stream.send(chunk)  # waits for eecp's credit: not under the idle deadline
    await stream.end()


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


def backend_url_for(base: httpx.URL, path: str) -> httpx.URL:
    """``path`` (with its query) on the backend, or ``ForwardError("bad_path")`` for anything
    but an origin-form target (:func:`eecp.frames.is_origin_form`)."""
    if not is_origin_form(path):
        raise ForwardError("bad_path", f"{path[:80]!r} is not an origin-form path")
    prefix = base.raw_path.rstrip(b"/")
    try:
        return base.copy_with(raw_path=prefix + path.encode("ascii"))
    except (UnicodeEncodeError, httpx.InvalidURL) as exc:
        raise ForwardError("bad_path", str(exc)) from None


def request_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What to send the backend: hop-by-hop, ``Host`` and ``Expect`` dropped."""
    return [(n, v) for n, v in _end_to_end(headers) if n.lower() not in _REQUEST_ONLY]


def response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """What to send eecp: the backend's headers, hop-by-hop dropped, order and repeats kept."""
    return _end_to_end([(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw])


def _end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    named = {token.strip().lower() for name, value in headers if name.lower() == "connection"
             for token in value.split(",")}
    return [(n, v) for n, v in headers
            if n.lower() not in HOP_BY_HOP and n.lower() not in named
            and not n.lower().startswith("proxy-")]

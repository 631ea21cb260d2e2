"""Forwarding HTTP requests to an app over its agents' tunnels, independent of the HTTP server
in front (the data-plane proxy listener and ``POST /v1/proxy/{app}`` both use it).

:meth:`Forwarder.open_upstream` enforces the same allow decision as resolve, picks the least
loaded routable agent, opens a stream on its tunnel, pumps the request body while waiting for
the response head (bounded by ``EE_PROXY_TIMEOUT_SEC``), and yields the response for the caller
to stream out. A request that failed before any response byte may be retried once on another agent
when its method is idempotent and it has no body. Refusals are :class:`ProxyError` with the
HTTP status and a stable reason.

A request's end travels on its last frame where eecp knows it when it writes that frame (the
FIN flag, docs/tunnel-data-protocol.md): a request without a body is one message (its head),
and the chunk that completes a declared ``Content-Length`` is the body's last. A chunked body
ends with a separate END once its source is exhausted: waiting for the next chunk to learn
that this one was the last would delay it.

An agent that announced no ``data_protocol`` (written against the seed's protocol) gets each
request as one JSON message instead (:mod:`eecp.wire.seed`, :func:`_seed_attempt`): the body
is read whole first (at most ``EE_TUNNEL_MAX_MESSAGE_BYTES``, else 413 ``body_too_large``),
its slot and busy wait are the binary protocol's, the wait for the answer is
``EE_PROXY_TIMEOUT_SEC``, and the answer reaches the caller as an :class:`Upstream` whose body
is already here (:class:`Buffered`), so both entry points relay it unchanged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from eecp.core.clock import Clock
from eecp.core.drain import Drain
from eecp.core.errors import EecpError, ProtocolError
from eecp.core.trioutil import single_error
from eecp.wire.frames import check_head
from eecp.wire.httpmsg import RequestHead, ResponseHead, content_length, is_origin_form
from eecp.wire.protocol import ProxyResponse
from eecp.wire.seed import SeedTunnel
from eecp.wire.streams import Mux, Stream, StreamError

if TYPE_CHECKING:
    from eecp.agents.registry import AgentView, Registry

log = logging.getLogger("eecp.proxy")

#: how long a request waits for a stream slot on a busy agent before 503 agent_busy
BUSY_WAIT_SEC = 2.0
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class ProxyError(EecpError):
    """A request that cannot be forwarded: ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.http_status = status

    @property
    def allowed(self) -> bool:
        """The error body's ``allowed``, alike on both entry points: true for a 5xx (the app
        may be served; forwarding this request failed), false for a refusal (403, resolve's
        reason) and a request that could not be forwarded (400)."""
        return self.http_status >= 500


MAX_JSON_PROXY_BODY = 16 * 1024 * 1024
_METHOD = re.compile(r"^[A-Z]{1,16}$")


@dataclass(frozen=True)
class ProxyCall:
    """A ``POST /v1/proxy/{app}`` request, validated."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body_bytes: bytes | None

    def body(self) -> AsyncIterator[bytes] | None:
        if self.body_bytes is None:
            return None
        data = self.body_bytes

        async def once() -> AsyncIterator[bytes]:
            yield data
        return once()


def parse_proxy_call(doc: object) -> ProxyCall:
    """Validate ``{"method","path","headers","body_b64"}``; ``ProxyError(400, ...)`` names
    the bad field."""
    if not isinstance(doc, dict):
        raise ProxyError(400, "invalid_body", "expected a JSON object")
    method = doc.get("method", "GET")
    if not isinstance(method, str) or not _METHOD.match(method.upper()):
        raise ProxyError(400, "invalid_field:method")
    path = doc.get("path", "/")
    if not isinstance(path, str) or not is_origin_form(path) or len(path) > 8192:
        raise ProxyError(400, "invalid_field:path", "expected an origin-form path")
    raw_headers = doc.get("headers") or {}
    pairs = list(raw_headers.items()) if isinstance(raw_headers, dict) else raw_headers
    if not isinstance(pairs, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
            and not any(c in p[0] + p[1] for c in "\r\n\0") for p in pairs):
        raise ProxyError(400, "invalid_field:headers")
    body_b64 = doc.get("body_b64")
    body = None
    if body_b64 not in (None, ""):
        if not isinstance(body_b64, str):
            raise ProxyError(400, "invalid_field:body_b64")
        try:
            body = base64.b64decode(body_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProxyError(400, "invalid_field:body_b64") from None
    call = ProxyCall(method.upper(), path, [(str(n), str(v)) for n, v in pairs], body)
    try:  # what the tunnel would refuse (header names, control characters, size) is a 400
        check_head(RequestHead(call.method, call.path, call.headers))
    except ProtocolError as exc:
        field_name = exc.reason.removeprefix("invalid_frame:")
        raise ProxyError(400, f"invalid_field:{field_name}", exc.detail) from None
    return call


class Buffered:
    """A body that is all here already (a seed-protocol agent's answer), read like a
    :class:`Stream`'s: its bytes in one chunk, then the end."""

    ready = True  #: receive() never waits

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    async def receive(self) -> bytes | None:
        data, self._data = self._data, None
        return data or None


@dataclass
class Upstream:
    """The app's answer: its head, then its body as it arrives."""

    head: ResponseHead
    stream: Stream | Buffered
    agent: AgentView

    async def chunks(self) -> AsyncIterator[bytes]:
        """The response body, chunk by chunk, as the agent sends it."""
        while True:
            chunk = await self.stream.receive()
            if chunk is None:
                return
            yield chunk


async def counted(chunks: AsyncIterable[bytes], counter: Any) -> AsyncIterator[bytes]:
    """``chunks`` as they pass, their bytes added to ``counter`` (a metric's child): a request
    body counted on both entry points alike."""
    async for chunk in chunks:
        counter.inc(len(chunk))
        yield chunk


class Forwarder:
    """Opens upstreams: routes by ``registry`` at ``clock``'s time, waits at most
    ``timeout_sec`` (``EE_PROXY_TIMEOUT_SEC``) for progress. Both entry points share one, and
    with it the rules that keep a few clients from holding an app's every stream slot: at
    most ``max_streams_per_client`` requests in flight per (app, client), and the last
    ``slot_reserve`` slots of each agent (at most all but one) only for a client holding none
    of the app's requests. A client is its address, an IPv6 one by its /64 (one host's or
    one customer's network: an address apiece there is free)."""

    def __init__(self, registry: Registry, clock: Clock, timeout_sec: float, *,
                 max_streams_per_client: int = 0, slot_reserve: int = 0,
                 tunnel_max_streams: int = 1, drain: Drain | None = None) -> None:
        self._registry = registry
        #: eecp's drain: new requests refused while it lasts, those in flight counted
        self._drain = drain if drain is not None else Drain()
        self._clock = clock
        self._timeout_sec = timeout_sec
        self._per_client = max_streams_per_client
        self._reserve = max(0, min(slot_reserve, tunnel_max_streams - 1))
        #: requests in flight per (app, client)
        self._clients: dict[tuple[str, str], int] = {}

    @asynccontextmanager
    async def open_upstream(self, app: str, head: RequestHead,
                            body: AsyncIterable[bytes] | None, *, client: str = ""
                            ) -> AsyncIterator[Upstream]:
        """Forward one request of ``client`` (its address as trusted: see
        :func:`eecp.dataplane.forwarded.client_address`) to ``app``; yields the response.
        Raises :class:`ProxyError`: 429 ``client_stream_limit`` when the client has its share
        of the app's requests in flight already, the refusals and failures otherwise. A
        request whose client is unknown (``""``: only trusted proxies in its chain) is not
        counted per client: that front proxy's own limits are what applies to it. While eecp
        drains, 503 ``draining`` (:mod:`eecp.core.drain`)."""
        if self._drain.started:
            raise ProxyError(503, "draining", "eecp is stopping: ask another replica")
        with self._drain.track():
            async with self._open_for(app, head, body, client) as up:
                yield up

    @asynccontextmanager
    async def _open_for(self, app: str, head: RequestHead, body: AsyncIterable[bytes] | None,
                        client: str) -> AsyncIterator[Upstream]:
        if not client:  # no client to count (a trusted proxy that names none): its own limits
            async with self._open(app, head, body, 0) as up:
                yield up
            return
        key = (app, client_key(client))
        holding = self._clients.get(key, 0)
        if self._per_client and holding >= self._per_client:
            raise ProxyError(429, "client_stream_limit",
                             f"{holding} requests of this client to {app} are in flight")
        self._clients[key] = holding + 1
        try:
            # a client already holding one of the app's streams may not take the last slots
            async with self._open(app, head, body, self._reserve if holding else 0) as up:
                yield up
        finally:
            if (left := self._clients[key] - 1) > 0:
                self._clients[key] = left
            else:
                del self._clients[key]

    @asynccontextmanager
    async def _open(self, app: str, head: RequestHead, body: AsyncIterable[bytes] | None,
                    reserve: int) -> AsyncIterator[Upstream]:
        now = self._clock.now()
        decision = self._registry.resolve(app, now)
        if not decision.allowed:
            raise ProxyError(403, decision.reason)
        agents = [a for a in self._registry.routable(app, now)
                  if a.mux is not None or a.seed is not None]
        if head.upgrade is not None:
            agents = _upgradable(agents)
        if not agents:
            raise ProxyError(503, "no_tunnel")
        retryable = body is None and head.method.upper() in IDEMPOTENT
        candidates = agents[:2] if retryable else agents[:1]
        for attempt, agent in enumerate(candidates):
            last = attempt == len(candidates) - 1
            answered = False
            try:
                async with _attempt(self._timeout_sec, agent, head, body,
                                    reserve) as upstream:
                    answered = True
                    yield upstream
                    return
            except ProxyError as exc:
                # the app's answer was too large: the same app on another agent answers the same
                if answered or last or exc.http_status not in (502, 503) \
                        or exc.reason == "response_too_large":
                    raise
                log.info("retrying %s %s on another agent after %s", head.method, app,
                         exc.reason)
        raise AssertionError("unreachable")  # pragma: no cover


    def revocation(self, app: str, agent: AgentView) -> str | None:
        """Why ``agent`` may no longer serve ``app`` (resolve's reasons, or
        ``release_changed``), or None while it may: an upgraded stream outlives the allow
        decision taken at its upgrade, so it is checked again while it lasts."""
        return self._registry.revocation(agent, app, self._clock.now())


def _upgradable(agents: list[AgentView]) -> list[AgentView]:
    """The agents that can carry an upgrade: the binary protocol's (a seed-protocol agent
    has one JSON message each way per request, no byte stream): ``ProxyError(501,
    "websocket_unsupported")`` when the app has only the others."""
    able = [a for a in agents if a.mux is not None]
    if agents and not able:
        raise ProxyError(501, "websocket_unsupported", "the app's agents announced no "
                         "data_protocol: WebSockets need data_protocol 2")
    return able


def client_key(address: str) -> str:
    """What counts as one client: an IPv4 address (IPv4-mapped ones included), an IPv6
    address's /64 network; anything else as it is."""
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


@asynccontextmanager
async def _attempt(timeout_sec: float, agent: AgentView, head: RequestHead,
                   body: AsyncIterable[bytes] | None, reserve: int = 0
                   ) -> AsyncIterator[Upstream]:
    if agent.seed is not None:
        async with _seed_attempt(timeout_sec, agent, agent.seed, head, body,
                                 reserve) as upstream:
            yield upstream
        return
    mux = agent.mux
    assert mux is not None
    # an upgrade has no body, yet its direction stays open: the upgraded bytes may follow
    upgrade = head.upgrade is not None
    stream = await _open_stream(mux, head, end=body is None and not upgrade,
                                limit=mux.max_streams - reserve)
    agent.in_flight += 1
    started = time.perf_counter()
    # the wait for the head, which every chunk of the upload extends
    progress = Progress(timeout_sec)
    try:
        if body is None:  # (the common case, without a nursery: nothing runs beside it)
            answer = await _await_head(stream, progress, upgrade)
            if upgrade and answer.status != 101:  # refused: an ordinary answer, no bytes follow
                await stream.end()
            yield Upstream(answer, stream, agent)
            return
        upload = _Upload(stream, body, declared_length(head.headers), progress)
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    upload.scope = nursery.cancel_scope
                    nursery.start_soon(upload.run)
                    yield Upstream(await _await_head(stream, progress), stream, agent)
                    nursery.cancel_scope.cancel()  # the app answered: an unread body is moot
        except Exception:
            upload.raise_failure()  # the client's failure caused whatever else went wrong
            raise
        upload.raise_failure()
    finally:
        agent.in_flight -= 1
        if stream.finished:  # nothing left to say, but maybe a body nobody will read now
            stream.release()
        else:
            with trio.CancelScope(shield=True):
                await _finish(stream)
        log.debug("stream %d done in %.3fs", stream.id, time.perf_counter() - started)


@asynccontextmanager
async def _seed_attempt(timeout_sec: float, agent: AgentView, seed: SeedTunnel,
                        head: RequestHead, body: AsyncIterable[bytes] | None, reserve: int
                        ) -> AsyncIterator[Upstream]:
    """One request to a seed-protocol agent: the whole body, one ``proxy_request``, its
    ``proxy_response`` within ``timeout_sec`` (see the module docstring)."""
    data = await _whole_body(head, body, seed.max_body)
    limit = seed.max_streams - reserve
    if seed.in_flight >= limit:
        with trio.move_on_after(BUSY_WAIT_SEC):
            await seed.wait_slot(limit)
        if seed.in_flight >= limit:
            raise ProxyError(503, "agent_busy")
    answer: tuple[ResponseHead, bytes] | None = None
    agent.in_flight += 1
    try:
        # the slot is held until the answer is here (or given up): the body then is too
        with seed.exchange() as exchange, trio.move_on_after(timeout_sec):
            response = await exchange.call(head, data)
            answer = _seed_head(head, response), response.body
    except StreamError as exc:
        reason = exc.reason if exc.reason == "response_too_large" else public_reason(
            exc.reason)
        raise ProxyError(502, reason, exc.detail) from None
    finally:
        agent.in_flight -= 1
    if answer is None:
        raise ProxyError(504, "upstream_timeout")
    yield Upstream(answer[0], Buffered(answer[1]), agent)


async def _whole_body(head: RequestHead, body: AsyncIterable[bytes] | None, limit: int
                      ) -> bytes:
    """The request body, read whole: ``ProxyError(413, "body_too_large")`` beyond ``limit``
    bytes (before reading, when its Content-Length says so)."""
    if body is None:
        return b""
    too_large = ProxyError(413, "body_too_large", f"over {limit} bytes: this agent takes "
                           "whole bodies (no data_protocol)")
    declared = declared_length(head.headers)
    if declared is not None and declared > limit:
        raise too_large
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


def _seed_head(request: RequestHead, response: ProxyResponse) -> ResponseHead:
    """The head eecp relays for a seed-protocol answer: the body is whole, so its length is
    eecp's to state (the agent's Content-Length and Transfer-Encoding are dropped; a HEAD
    answer keeps the agent's length, which describes the body a GET would have). A head the
    binary protocol would refuse fails this request only (502 ``agent_error``)."""
    bodyless = request.method.upper() == "HEAD" or response.status in (204, 304)
    headers = [(n, v) for n, v in response.headers
               if n.lower() != "transfer-encoding"
               and (n.lower() != "content-length" or request.method.upper() == "HEAD")]
    if not bodyless:
        headers.append(("content-length", str(len(response.body))))
    head = ResponseHead(response.status, headers)
    try:
        check_head(head)
    except ProtocolError as exc:
        raise ProxyError(502, "agent_error", f"the agent's response head: {exc.detail}"
                         ) from None
    check_response_head(head)
    return head


async def _open_stream(mux: Mux, head: RequestHead, *, end: bool, limit: int) -> Stream:
    """A stream for ``head`` on ``mux`` while fewer than ``limit`` are open; waits up to
    BUSY_WAIT_SEC for a free slot, then ``ProxyError(503, "agent_busy")``. With a slot free
    there is no wait to bound (and no cancel scope to pay for): writing the head can only
    stall if the tunnel stopped reading, and the session's dead-peer check closes such a
    tunnel, failing the write."""
    if mux.in_flight < limit:
        return await _opened(mux, head, end, limit)
    with trio.move_on_after(BUSY_WAIT_SEC):
        return await _opened(mux, head, end, limit)
    raise ProxyError(503, "agent_busy")


async def _opened(mux: Mux, head: RequestHead, end: bool, limit: int) -> Stream:
    try:
        # no body: the head says so (FIN), and no END follows
        return await mux.open_stream(head, end=end, limit=limit)
    except StreamError as exc:
        if exc.reason == "invalid_head":  # the request itself, not the agent: no retry
            raise ProxyError(400, "invalid_request", exc.detail) from None
        raise ProxyError(502, exc.reason) from None


@dataclass
class Progress:
    """A cancel scope whose deadline is ``patience_sec`` after the last sign of progress."""

    patience_sec: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def moved(self) -> None:
        self.scope.deadline = trio.current_time() + self.patience_sec


async def _await_head(stream: Stream, progress: Progress, upgrade: bool = False
                      ) -> ResponseHead:
    """The response head, within ``EE_PROXY_TIMEOUT_SEC`` of the request's last progress."""
    with progress.scope:
        progress.moved()
        return await _response_head(stream, upgrade)
    raise ProxyError(504, "upstream_timeout")


async def _response_head(stream: Stream, upgrade: bool = False) -> ResponseHead:
    try:
        head = await stream.receive_head()
    except StreamError as exc:
        raise ProxyError(502, public_reason(exc.reason), exc.detail) from None
    check_response_head(head, upgrade=upgrade)
    return head


def check_response_head(head: ResponseHead, *, upgrade: bool = False) -> int | None:
    """The body length ``head`` declares; ``ProxyError(502, "agent_error")`` for a head an
    agent must not send: an informational status (1xx: the tunnel carries one final answer
    per request; 101 only to a request that asked for an upgrade, and then without a length)
    or a ``Content-Length`` that is not one plain number. What an agent sends is hostile input
    like any client's, and refusing it here keeps it from ever reaching the HTTP server's
    framing (where it was a 500 and a traceback)."""
    if head.status == 101 and upgrade:
        return None
    if head.status < 200:
        raise ProxyError(502, "agent_error", f"the agent answered with status {head.status}")
    try:
        return content_length(head.headers)
    except ValueError as exc:
        raise ProxyError(502, "agent_error", f"the agent's response head: {exc}") from None


def public_reason(reason: str) -> str:
    """``tunnel_closed`` stays; an agent's reset (backend down, ...) is ``agent_error``."""
    return "tunnel_closed" if reason == "tunnel_closed" else "agent_error"


def declared_length(headers: list[tuple[str, str]]) -> int | None:
    """The body length a request's ``Content-Length`` declares; ``None`` without one, with
    conflicting ones, or with one that is not a plain decimal number (the body then ends with
    END, and the agent reports the bad length)."""
    try:
        return content_length(headers)
    except ValueError:
        return None


class _Upload:
    """The request body going to the agent, beside the wait for its answer (and beside the
    answer itself: an app may stream its response while it still reads the upload).

    The client failing its own body — gone mid-body, a malformed chunk, more bytes than its
    Content-Length, a body timeout — fails this one request only. The error is kept here, the
    stream is reset toward the agent with the reason (``client_gone``, ``bad_request``), and
    the attempt's scope is cancelled (the wait for the head, or the caller relaying the
    answer); :func:`_attempt` then raises the kept error as itself. It never travels as a
    nursery's exception group mixed with that cancellation, which the HTTP server's
    per-request boundary could not tell from a bug (each one was a logged traceback).

    The chunk that completes the declared length carries the end (FIN); otherwise END follows
    once the body is exhausted (chunked). Each chunk that leaves is progress, so a long upload
    is no upstream timeout (a stalled one is, ``EE_PROXY_TIMEOUT_SEC`` after its last chunk).
    """

    def __init__(self, stream: Stream, body: AsyncIterable[bytes], length: int | None,
                 progress: Progress) -> None:
        self._stream = stream
        self._body = body
        self._length = length
        self._progress = progress
        self.scope: trio.CancelScope | None = None
        self.failure: Exception | None = None

    async def run(self) -> None:
        try:
            await self._pump()
        except StreamError:
            pass  # the agent's side failed: the response side reports what went wrong
        except Exception as exc:  # the client's (or a bug's): this request ends with it
            self.failure = exc
            # cancelled before the reset: the tasks waiting on the stream must end cancelled,
            # not wake up to the reset and report it as the agent's error
            if self.scope is not None:
                self.scope.cancel()
            reason = "client_gone" if isinstance(exc, trio.BrokenResourceError) else (
                "bad_request")
            with trio.CancelScope(shield=True), contextlib.suppress(StreamError):
                await self._stream.reset(reason)

    async def _pump(self) -> None:
        sent = 0
        chunks = aiter(self._body)
        while True:
            chunk = await anext(chunks, None)
            if chunk is None:
                break
            if not chunk:
                continue
            sent += len(chunk)
            if self._length is not None and sent > self._length:
                raise ProxyError(400, "invalid_request", "the body is longer than its "
                                 f"Content-Length of {self._length}")
            await self._stream.send(chunk, end=sent == self._length)
            self._progress.moved()
        await self._stream.end()  # a no-op when the last chunk carried the end

    def raise_failure(self) -> None:
        """Raise the client's failure, if its body failed (see the class docstring)."""
        if self.failure is not None:
            raise self.failure


async def _finish(stream: Stream) -> None:
    with contextlib.suppress(StreamError):
        await stream.aclose()

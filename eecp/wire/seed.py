"""Requests to an agent written against the seed's protocol: JSON messages on the tunnel.

An agent whose ``register`` announces no ``data_protocol`` (one written for the upstream
control plane) never reads a binary frame. eecp forwards each request to it as one text
message and waits for one text message back, matched by ``request_id``::

    eecp → agent  {"type":"proxy_request","request_id":"<32 hex>","method":"GET","path":"/x",
                   "headers":{"name":"value",...},"body_b64":"..."}
    agent → eecp  {"type":"proxy_response","request_id":"<32 hex>","status":200,
                   "headers":{"name":"value",...},"body_b64":"..."}

Design decisions:

* **Whole bodies, bounded.** A message carries a whole body, so each is at most
  ``max_body`` bytes decoded (``EE_TUNNEL_MAX_MESSAGE_BYTES``): the dataplane answers a larger
  request 413 before anything is sent, and a larger response fails its request only (502
  ``response_too_large``). No streaming, no flow control, no WebSocket: those need data
  protocol 2 (docs/tunnel-data-protocol.md).
* **The same slots as the binary protocol.** At most ``max_streams``
  (``EE_TUNNEL_MAX_STREAMS``) requests are in flight per agent, so the dataplane's busy wait
  and slot reserve apply unchanged; each exchange holds its slot from the moment it is
  opened until its answer arrived, failed or was given up (then a late answer is unknown).
* **Answers are matched, never trusted.** A ``request_id`` is 128 random bits, so an agent
  cannot answer a request it was not sent; an answer for no request in flight (late, repeated,
  made up) is dropped and reported to the caller (:meth:`SeedTunnel.deliver`), which counts it.
* **A dead tunnel fails everything at once.** :meth:`SeedTunnel.close` wakes every waiting
  exchange with the reason (``tunnel_closed``), as :meth:`eecp.wire.streams.Mux.close` does
  for streams.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from eecp.core.trioutil import Signal
from eecp.wire.httpmsg import RequestHead
from eecp.wire.protocol import ProxyResponse
from eecp.wire.streams import StreamError

__all__ = ["Exchange", "SeedTunnel", "encode_proxy_request", "headers_object"]


def headers_object(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The seed's header object: repeated names joined into one value (``; `` for Cookie,
    which RFC 9110 lets only be joined that way, ``, `` for the rest)."""
    joined: dict[str, str] = {}
    for name, value in headers:
        if name in joined:
            joined[name] += ("; " if name.lower() == "cookie" else ", ") + value
        else:
            joined[name] = value
    return joined


def encode_proxy_request(request_id: str, head: RequestHead, body: bytes) -> str:
    """One ``proxy_request`` message."""
    return json.dumps({"type": "proxy_request", "request_id": request_id,
                       "method": head.method, "path": head.path,
                       "headers": headers_object(head.headers),
                       "body_b64": base64.b64encode(body).decode()})


class Exchange:
    """One request in flight: sent once, answered (or failed) once."""

    def __init__(self, tunnel: SeedTunnel, request_id: str) -> None:
        self._tunnel = tunnel
        self.request_id = request_id
        self._done = trio.Event()
        self._response: ProxyResponse | None = None
        self._error: str | None = None

    async def call(self, head: RequestHead, body: bytes) -> ProxyResponse:
        """Send the request and wait for its answer; :class:`StreamError` with
        ``tunnel_closed`` (or the tunnel's close reason) or ``response_too_large``."""
        await self._tunnel._send(encode_proxy_request(self.request_id, head, body))
        await self._done.wait()
        if self._response is None:
            raise StreamError(self._error or "tunnel_closed")
        return self._response

    def _finish(self, response: ProxyResponse | None, error: str | None) -> None:
        self._response, self._error = response, error
        self._done.set()


class SeedTunnel:
    """The requests in flight to one seed-protocol agent (see the module docstring)."""

    def __init__(self, send_message: Callable[[str], Awaitable[None]], *, max_streams: int,
                 max_body: int) -> None:
        if max_streams < 1 or max_body < 0:
            raise ValueError("max_streams must be >= 1 and max_body >= 0")
        self._send = send_message
        self.max_streams = max_streams
        self.max_body = max_body
        self._pending: dict[str, Exchange] = {}
        self._slots = Signal()
        self._closed: str | None = None

    @property
    def in_flight(self) -> int:
        """Exchanges holding a slot."""
        return len(self._pending)

    async def wait_slot(self, limit: int) -> None:
        """Return once fewer than ``limit`` exchanges hold a slot (or the tunnel closed:
        opening then fails)."""
        while self.in_flight >= limit and self._closed is None:
            await self._slots.wait()

    @contextmanager
    def exchange(self) -> Iterator[Exchange]:
        """A slot and a fresh ``request_id`` for one request, given back on exit (a later
        answer to it is then unknown). :class:`StreamError` once the tunnel is closed."""
        if self._closed is not None:
            raise StreamError(self._closed)
        request_id = secrets.token_hex(16)
        exchange = self._pending[request_id] = Exchange(self, request_id)
        try:
            yield exchange
        finally:
            del self._pending[request_id]
            self._slots.fire()

    def deliver(self, response: ProxyResponse) -> bool:
        """Hand an agent's answer to its exchange; False for an answer to no request in
        flight (the caller counts it; nothing else happens)."""
        exchange = self._pending.get(response.request_id)
        if exchange is None or exchange._done.is_set():
            return False
        if len(response.body) > self.max_body:
            exchange._finish(None, "response_too_large")
        else:
            exchange._finish(response, None)
        return True

    def close(self, reason: str) -> None:
        """The tunnel is gone: every exchange in flight fails with ``reason`` now."""
        if self._closed is None:
            self._closed = reason
        for exchange in self._pending.values():
            if not exchange._done.is_set():
                exchange._finish(None, reason)
        self._slots.fire()

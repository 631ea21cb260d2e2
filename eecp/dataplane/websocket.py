"""WebSocket apps through the tunnel: once the app answered an upgrade with 101, the client's
connection and the tunnel stream carry the WebSocket's bytes both ways, unchanged
(docs/tunnel-data-protocol.md, section 9).

Decisions:

* **Bytes, never messages.** eecp and the agent relay what each side wrote, as it arrives:
  text, binary, ping/pong, close, fragmented and compressed (``permessage-deflate`` is
  negotiated end to end) frames pass as bytes, whatever their size. Nothing is re-framed,
  buffered whole or validated: the WebSocket is the client's and the app's.
* **The one thing eecp reads** is where the app's frames begin and end (their two- to
  fourteen-byte headers, :class:`FrameTracker`), so that when eecp itself must end a WebSocket
  it can put a close frame *between* two of the app's frames, never inside one (RFC 6455 §5.4
  lets a control frame come between the fragments of a message, so any frame boundary will
  do). Its own close frame is the only byte eecp ever adds, and it adds it only when the app's
  bytes are at a boundary and the app has not sent its own close; otherwise it just closes the
  TCP connection.
* **Why eecp ends one:** the serving agent may no longer serve the app (its attestation was
  refused or lapsed, it reports health ``fail``, the app's registration expired, the app moved
  to another release, its node was suspended: checked every :data:`RECHECK_SEC` against the
  registry, so a revoked agent serves nothing for longer than that) — close code 1001 with
  the reason; nothing moved either way for ``EE_PROXY_WS_IDLE_SEC`` — 1001 ``idle_timeout``;
  the stream failed (the agent reset it, the tunnel died) — 1011 with ``agent_error`` or
  ``tunnel_closed``. The agent's stream is reset with the same reason.
* **Ends, both ways.** The app closing its connection (END from the agent) ends the relay: eecp
  closes the client's connection once the bytes before it are out. The client's end of input
  (its half-close) is END toward the agent, and eecp keeps relaying the app's bytes until the
  app closes too (or the idle timeout).
* **Limits.** The stream holds one of its agent's stream slots, and counts as one of its
  client's requests in flight, for as long as it lasts (``EE_TUNNEL_MAX_STREAMS``,
  ``EE_PROXY_MAX_STREAMS_PER_CLIENT``); both directions are flow controlled like bodies (eecp
  holds at most its window of the app's bytes; the client's are read only as the agent grants
  credit). A client that does not take a write within ``EE_PROXY_SEND_TIMEOUT_SEC`` is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable
from typing import Any

import trio

from eecp.dataplane.http import ClientDisconnected
from eecp.dataplane.http.connection import Upgraded
from eecp.wire.streams import Stream, StreamError

log = logging.getLogger("eecp.websocket")

#: how often an upgraded stream checks that its agent may still serve the app
RECHECK_SEC = 1.0
#: RFC 6455 close codes eecp sends: it ends the WebSocket on purpose (revoked, idle) ...
CLOSE_GOING_AWAY = 1001
#: ... or the side behind it failed (the agent reset the stream, the tunnel died)
CLOSE_INTERNAL_ERROR = 1011
#: the longest a close frame's reason may be (a control frame's payload is at most 125 bytes)
MAX_CLOSE_REASON = 123
#: how long eecp's own close frame may take to leave
CLOSE_SEND_SEC = 5.0

_OP_CLOSE = 0x8


class FrameTracker:
    """Where one direction's WebSocket frames begin and end (RFC 6455 §5.2), from their
    headers alone: the bytes themselves are never copied or changed. ``closed`` once a close
    frame began; ``at_boundary`` between two frames."""

    __slots__ = ("_head", "_left", "closed")

    def __init__(self) -> None:
        self._head = b""  # a header split over chunks, as far as it came
        self._left = 0  # payload bytes of the current frame still to come
        self.closed = False

    @property
    def at_boundary(self) -> bool:
        return not self._left and not self._head

    def feed(self, data: bytes) -> None:
        """Follow the next bytes of the direction."""
        at, size = 0, len(data)
        while at < size:
            if self._left:
                step = min(self._left, size - at)
                self._left -= step
                at += step
                continue
            head = self._head + data[at:at + 14] if self._head else data[at:at + 14]
            need = _header_size(head)
            if need is None or len(head) < need:  # the header goes on in the next chunk
                self._head = head
                return
            at += need - len(self._head)
            self._head = b""
            if head[0] & 0x0F == _OP_CLOSE:
                self.closed = True
            self._left = _payload_size(head)


def _header_size(head: bytes) -> int | None:
    """A frame header's size, from its first two bytes (None: not there yet)."""
    if len(head) < 2:
        return None
    short = head[1] & 0x7F
    extended = 2 if short == 126 else 8 if short == 127 else 0
    return 2 + extended + (4 if head[1] & 0x80 else 0)


def _payload_size(head: bytes) -> int:
    short = head[1] & 0x7F
    if short == 126:
        return int(struct.unpack_from("!H", head, 2)[0])
    if short == 127:
        return int(struct.unpack_from("!Q", head, 2)[0])
    return short


def close_frame(code: int, reason: str) -> bytes:
    """A server's close frame (unmasked): ``code``, then ``reason`` cut to fit."""
    text = reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return bytes((0x80 | _OP_CLOSE, 2 + len(text))) + struct.pack("!H", code) + text


class Relay:
    """One upgraded connection: the client's bytes to the stream and the stream's back, until
    either end closes, the agent is revoked or the WebSocket idles (see the module)."""

    def __init__(self, client: Upgraded, stream: Stream, *, idle_sec: float,
                 send_timeout_sec: float, revocation: Callable[[], str | None],
                 bytes_in: Any = None, bytes_out: Any = None) -> None:
        self._client = client
        self._stream = stream
        self._idle_sec = idle_sec
        self._send_timeout_sec = send_timeout_sec
        self._revocation = revocation
        self._bytes_in = bytes_in
        self._bytes_out = bytes_out
        self._tracker = FrameTracker()
        self._intact = True  # every write to the client went out whole
        self._last = trio.current_time()
        #: how it ended: None (the app closed), or (close code, reason) for eecp to send
        self.ending: tuple[int, str] | None = None
        self.client_gone = False

    async def run(self) -> None:
        """Relay until the end; then eecp's close frame, when it has one to send (see the
        module), and the agent's stream reset with the reason."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream, nursery.cancel_scope)
            nursery.start_soon(self._watch, nursery.cancel_scope)
            await self._downstream()
            nursery.cancel_scope.cancel()
        if self.ending is None or self.client_gone:
            return
        code, reason = self.ending
        log.info("websocket on stream %d ended by eecp: %d %s", self._stream.id, code, reason)
        with trio.CancelScope(shield=True):
            with contextlib.suppress(StreamError):
                await self._stream.reset(reason)
            tracker = self._tracker
            if self._intact and tracker.at_boundary and not tracker.closed:
                with trio.move_on_after(min(self._send_timeout_sec, CLOSE_SEND_SEC)), \
                        contextlib.suppress(ClientDisconnected):
                    await self._client.send_all(close_frame(code, reason))

    def _end(self, scope: trio.CancelScope, code: int, reason: str) -> None:
        if self.ending is None:
            self.ending = (code, reason)
        scope.cancel()

    async def _downstream(self) -> None:
        """The app's bytes to the client, until the app's END (or a failure, kept in
        ``ending``). Each write is shielded, within the send timeout: a revocation waits for
        the frame bytes under way, so eecp's close frame never lands inside one of the app's."""
        stream, client, tracker = self._stream, self._client, self._tracker
        try:
            while (chunk := await stream.receive()) is not None:
                self._last = trio.current_time()
                tracker.feed(chunk)
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self._send_timeout_sec) as late:
                        await client.send_all(chunk)
                if late.cancelled_caught:
                    self._intact = False
                    log.info("websocket on stream %d: the client took no write for %g s; "
                             "dropping it", stream.id, self._send_timeout_sec)
                    self.client_gone = True
                    return
                if self._bytes_out is not None:
                    self._bytes_out.inc(len(chunk))
        except StreamError as exc:
            reason = "tunnel_closed" if exc.reason == "tunnel_closed" else "agent_error"
            if self.ending is None:
                self.ending = (CLOSE_INTERNAL_ERROR, reason)
        except ClientDisconnected:
            self._intact = False
            self.client_gone = True

    async def _upstream(self, scope: trio.CancelScope) -> None:
        """The client's bytes to the app; the client's end of input is END."""
        stream, client = self._stream, self._client
        try:
            while data := await client.receive_some():
                self._last = trio.current_time()
                await stream.send(data)  # at the pace of the agent's credit
                if self._bytes_in is not None:
                    self._bytes_in.inc(len(data))
            await stream.end()
        except StreamError as exc:
            reason = "tunnel_closed" if exc.reason == "tunnel_closed" else "agent_error"
            self._end(scope, CLOSE_INTERNAL_ERROR, reason)
        except ClientDisconnected:
            self.client_gone = True
            scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        """The idle timeout, and the agent's right to serve, checked every RECHECK_SEC."""
        while True:
            idle_at = self._last + self._idle_sec
            await trio.sleep_until(min(idle_at, trio.current_time() + RECHECK_SEC))
            if trio.current_time() >= self._last + self._idle_sec:
                self._end(scope, CLOSE_GOING_AWAY, "idle_timeout")
                return
            reason = self._revocation()
            if reason is not None:
                self._end(scope, CLOSE_GOING_AWAY, reason)
                return

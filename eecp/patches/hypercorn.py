"""Six changes to hypercorn's trio worker that eecp's control port needs; :func:`apply` installs
them once, at the process's start (:func:`eecp.patches.apply_all`), before any server runs.

1. **A close racing a write ends the whole server.** ``TCPServer._close`` sends EOF outside
   the send lock every other write takes; a write that starts meanwhile — the pong hypercorn
   sends itself for an agent's ping, or its own ping — fails with ``trio.BusyResourceError``.
   ``TCPServer.protocol_send`` catches only broken and closed streams, so that error leaves the
   connection's task, then ``serve_listeners``' nursery, and every tunnel and request of the
   process goes with it. An agent could provoke it by pinging while its tunnel is closed. The
   fix: a write that loses that race is what it is — a write to a closing connection — and is
   handled as hypercorn handles a broken one.
2. **A closed WebSocket's ping task sleeps out its interval.** ``WSStream._send_pings`` checks
   ``closed`` only between sleeps, so each closed tunnel keeps its connection's tasks alive for
   up to ``EE_TUNNEL_PING_INTERVAL_SEC``, and a shutdown waits the whole grace period for them.
   The fix: the ping loop runs in a cancel scope that the stream's close cancels.
3. **Reads of 64 KiB.** hypercorn reads at most ``MAX_RECV`` (64 KiB) at a time, and a
   tunnel's full DATA message (64 KiB of body plus headers) never fits one read: each took two
   reads and two rounds through h11 and wsproto. Reads of :data:`READ_BYTES` take several
   messages at once (``bench/RESULTS.md``). An idle connection holds no such buffer: trio
   allocates one only for a read that finds data waiting.
4. **A request head may take 75 s.** hypercorn has one timer for a connection without a request
   under way, ``keep_alive_timeout`` (75 s here, so that clients reusing connections between API
   calls keep them), and it also runs while a head is coming in: a slowloris held a connection
   for 75 s a socket. ``read_timeout`` is no help, as it bounds every read, tunnels' included.
   The fix: while no request is under way, the first bytes of the next head (and a fresh
   connection's accept) start the config's ``eecp_head_timeout_sec``
   (``eecp.service.CONTROL_HEAD_TIMEOUT_SEC``) for the whole head; once it is complete, the timer
   stops as before. A kept-alive connection that sends nothing still waits
   ``keep_alive_timeout``, and an established WebSocket is never under the timer (hypercorn stops
   it when the upgrade's head is complete and never restarts it). And the timer is restarted
   after each response for sure: under quart-trio, the restart ran in the app's task just as
   quart cancelled it (its request nursery, once the response is out), so after a connection's
   first request it had no timer at all and could stay open, silent, for ever.
5. **No connection cap.** The config's ``eecp_gate`` (an :class:`eecp.core.capacity.ConnectionGate`)
   admits each accepted connection; at the cap it closes the oldest connection waiting for a
   request (not one receiving a head, nor one serving a request or a tunnel) to make room, or
   the new connection is closed at once.
6. **No permessage-deflate.** hypercorn accepts the compression any client offers. On tunnels
   it buys nothing (bodies are mostly compressed already, control messages tiny), costs a
   zlib context per tunnel and CPU per message, and, with it, a client refused by eecp saw
   ``1002 decompression failed`` instead of the refusal's close reason most of the time. The
   fix: the handshake ignores ``Sec-WebSocket-Extensions`` (the only WebSockets on the control
   port are tunnels), so no extension is ever negotiated.

7. **The agent's close reason is lost.** When the peer closes a WebSocket, hypercorn tells the
   app ``websocket.disconnect`` with a code of its own making (1000 or 1006), never the code
   and reason the peer sent, so eecp could only log ``peer_closed`` for an agent that said
   why it left (``quote_unavailable: ...``). The fix: the peer's close frame is remembered
   as hypercorn answers it, and the disconnect carries its ``code`` and ``reason`` (the
   ``reason`` key ASGI 2.4 defines), which :class:`eecp.agents.tunnels.AsgiSocket` records.

The fixes patch private methods (the third a module constant), read in hypercorn 0.18.0. So
:func:`apply` patches only the releases in :data:`WRITTEN_FOR` (pyproject pins the same range)
and only when every name it patches is there; otherwise it patches nothing and logs a warning
naming the version. A plain hypercorn config (without the ``eecp_*`` attributes) gets
hypercorn's own timers and no cap. ``tests/patches/test_hypercorn_fixes.py`` pins the behaviour.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import hypercorn.trio.tcp_server as tcp_server
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import Handshake, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from eecp.core.capacity import ConnectionGate
from eecp.patches import versions

log = logging.getLogger("eecp.patches.hypercorn")

#: the hypercorn releases the fixes were written for: 0.18.x (pyproject: the same pin)
WRITTEN_FOR: tuple[versions.Release, versions.Release] = ((0, 18), (0, 19))
FIXES = 7
_APPLIED = "_eecp_fixes_applied"
#: what one read of a control-port connection may take (hypercorn's own is 64 KiB)
READ_BYTES = 256 * 1024
_PATCHED = ((TCPServer, "protocol_send"), (TCPServer, "run"), (TCPServer, "_idle_timeout"),
            (TCPServer, "_initiate_server_close"), (H11Protocol, "handle"),
            (WSStream, "_send_pings"), (WSStream, "handle"), (WSStream, "_send_wsproto_event"))


def apply() -> bool:
    """Install the seven changes (idempotent); False, and nothing patched, when this hypercorn
    is not one they were written for or lacks what they patch."""
    if getattr(TCPServer, _APPLIED, False):
        return True
    version = versions.installed("hypercorn")
    if not versions.within(version, WRITTEN_FOR):
        log.warning("hypercorn %s: eecp's fixes were written for hypercorn %s and are not "
                    "applied (its close/write race, ping linger, read size, head timeout, "
                    "connection cap, compression and lost close reasons stay as they are)",
                    version, versions.describe(WRITTEN_FOR))
        return False
    missing = [f"{cls.__name__}.{name}" for cls, name in _PATCHED
               if not callable(getattr(cls, name, None))]
    if "extensions" not in Handshake([], "1.1").__dict__:
        missing.append("Handshake.extensions")
    if missing or not isinstance(getattr(tcp_server, "MAX_RECV", None), int):
        log.warning("hypercorn %s changed (%s): its close/write race, ping linger, read "
                    "size, head timeout, connection cap, compression and close reasons are "
                    "not patched",
                    version, ", ".join(missing) or "MAX_RECV")
        return False
    _patch_protocol_send()
    _patch_peer_close()  # before the pings' handle, which must wrap this one's
    _patch_pings()
    _patch_no_compression()
    tcp_server.MAX_RECV = max(tcp_server.MAX_RECV, READ_BYTES)
    _patch_idle_timer()
    _patch_admission()
    setattr(TCPServer, _APPLIED, True)
    log.info("hypercorn %s: %d fixes applied", version, FIXES)
    return True


@dataclass(frozen=True)
class HeadBegun(Event):
    """From the h11 protocol to its TCP server: bytes of a request head arrived while no
    request was under way."""


def _patch_protocol_send() -> None:
    original = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
        if isinstance(event, HeadBegun):
            _head_begun(self)
            return
        if isinstance(event, Updated):
            if not event.idle:
                self._eecp_head_begun = False  # the head is complete: the timer stops
            # (re)starting or stopping the idle timer takes a lock and a nursery.start: under
            # quart-trio the restart after a response runs in the app's task just as quart
            # cancels it, and the timer was lost, leaving the connection without one
            with trio.CancelScope(shield=True):
                await original(self, event)
            return
        try:
            await original(self, event)
        except trio.BusyResourceError:
            # only _close's send_eof holds the stream's send side outside the send lock: the
            # connection is closing, and this write can never be delivered
            await self.protocol.handle(Closed())

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


def _patch_no_compression() -> None:
    original = Handshake.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.extensions = None  # as if the client offered none: nothing is negotiated

    Handshake.__init__ = __init__  # type: ignore[method-assign]


def _patch_peer_close() -> None:
    original_send = WSStream._send_wsproto_event
    original_handle = WSStream.handle

    async def _send_wsproto_event(self: Any, event: Any) -> None:
        # hypercorn answers a peer's close with its response, in REMOTE_CLOSING alone
        if isinstance(event, CloseConnection) and \
                self.connection.state == ConnectionState.REMOTE_CLOSING:
            self._eecp_peer_close = (event.code, event.reason or "")
        await original_send(self, event)

    async def handle(self: Any, event: Any) -> None:
        close: tuple[int, str] | None = getattr(self, "_eecp_peer_close", None)
        if isinstance(event, StreamClosed) and close is not None and not self.closed \
                and self.app_put is not None:
            self.closed = True  # as hypercorn's own branch does, with the peer's words
            code, reason = close
            await self.app_put({"type": "websocket.disconnect", "code": code,
                                "reason": reason})
            return
        await original_handle(self, event)

    WSStream._send_wsproto_event = _send_wsproto_event  # type: ignore[method-assign]
    WSStream.handle = handle  # type: ignore[method-assign]


def _patch_pings() -> None:
    original_pings = WSStream._send_pings
    original_handle = WSStream.handle

    async def _send_pings(self: Any) -> None:
        with trio.CancelScope() as self._eecp_pings:
            if not self.closed:
                await original_pings(self)

    async def handle(self: Any, event: Any) -> None:
        await original_handle(self, event)
        if self.closed:  # only handle() ever sets it
            scope: trio.CancelScope | None = getattr(self, "_eecp_pings", None)
            if scope is not None:
                scope.cancel()

    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    WSStream.handle = handle  # type: ignore[method-assign]


class _IdleWait:
    """One period of a control-port connection without a request under way (hypercorn's idle
    timer): what the gate evicts, and whose deadline a head's first bytes shorten."""

    __slots__ = ("gate", "scope")

    def __init__(self, scope: trio.CancelScope, gate: ConnectionGate | None) -> None:
        self.scope = scope
        self.gate = gate

    def evict(self) -> None:
        self.scope.cancel()

    def head_begun(self, head_timeout_sec: float | None) -> None:
        if self.gate is not None:
            self.gate.heading(self)  # receiving a head: evictable after a grace
        if head_timeout_sec is not None:
            self.scope.deadline = min(self.scope.deadline,
                                      trio.current_time() + head_timeout_sec)


def _head_begun(server: Any) -> None:
    if getattr(server, "_eecp_head_begun", False):
        return  # one deadline for the whole head, from its first bytes
    server._eecp_head_begun = True
    wait: _IdleWait | None = getattr(server, "_eecp_idle", None)
    if wait is not None:
        wait.head_begun(getattr(server.config, "eecp_head_timeout_sec", None))


def _patch_idle_timer() -> None:
    original_idle = TCPServer._idle_timeout
    original_handle = H11Protocol.handle

    async def _idle_timeout(self: Any) -> None:
        # hypercorn starts this at the accept and after each response, and stops it (cancels
        # the task) when a request head is complete; it waits keep_alive_timeout, then closes
        config = self.config
        gate: ConnectionGate | None = getattr(config, "eecp_gate", None)
        head_timeout: float | None = getattr(config, "eecp_head_timeout_sec", None)
        fresh = not getattr(self, "_eecp_was_idle", False)
        self._eecp_was_idle = True
        begun = getattr(self, "_eecp_head_begun", False)  # bytes came before this task ran
        with trio.CancelScope() as scope:
            wait = self._eecp_idle = _IdleWait(scope, gate)
            if head_timeout is not None and (fresh or begun):
                scope.deadline = trio.current_time() + head_timeout
            if gate is not None:
                if begun:
                    gate.heading(wait)  # a head began before this task ran
                else:
                    gate.idle(wait)
            try:
                await original_idle(self)
                return
            finally:
                if self._eecp_idle is wait:
                    self._eecp_idle = None
                if gate is not None:
                    gate.busy(wait)
        # our scope, not hypercorn's stop: the head is late, or the gate needs the room
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def handle(self: Any, event: Any) -> None:
        if self.stream is None and isinstance(event, RawData) and event.data:
            await self.send(HeadBegun())  # (a tunnel has its stream: nothing on its hot path)
        await original_handle(self, event)

    TCPServer._idle_timeout = _idle_timeout  # type: ignore[method-assign]
    H11Protocol.handle = handle  # type: ignore[method-assign]


def _patch_admission() -> None:
    original_run = TCPServer.run

    async def run(self: Any) -> None:
        gate: ConnectionGate | None = getattr(self.config, "eecp_gate", None)
        if gate is None:
            await original_run(self)
            return
        if not gate.admit():
            return  # closed at once (trio.serve_listeners closes the stream as we return)
        try:
            await original_run(self)
        finally:
            gate.leave()

    TCPServer.run = run  # type: ignore[method-assign]

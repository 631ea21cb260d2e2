"""Four changes to hypercorn's trio worker that eecp's tunnels need; :func:`apply` installs them
once, before the control server starts (``eecp.service.serve_control``).

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
4. **No permessage-deflate.** hypercorn accepts the compression any client offers. On tunnels
   it buys nothing (bodies are mostly compressed already, control messages tiny), costs a
   zlib context per tunnel and CPU per message, and, with it, a client refused by eecp saw
   ``1002 decompression failed`` instead of the refusal's close reason most of the time. The
   fix: the handshake ignores ``Sec-WebSocket-Extensions`` (the only WebSockets on the control
   port are tunnels), so no extension is ever negotiated.

The first two patch private methods, the third a module constant, the fourth the handshake's
constructor, so :func:`apply` checks that
they are there and refuses (logging why) to patch anything else;
``tests/test_hypercorn_fixes.py`` pins the behaviour.
"""

from __future__ import annotations

import logging
from typing import Any

import hypercorn.trio.tcp_server as tcp_server
import trio
from hypercorn.events import Closed
from hypercorn.protocol.ws_stream import Handshake, WSStream
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("eecp.hypercorn_fixes")

_APPLIED = "_eecp_fixes_applied"
#: what one read of a control-port connection may take (hypercorn's own is 64 KiB)
READ_BYTES = 256 * 1024


def apply() -> bool:
    """Install the four changes (idempotent); False when this hypercorn lacks what they
    patch."""
    if getattr(TCPServer, _APPLIED, False):
        return True
    if not all(callable(getattr(cls, name, None)) for cls, name in (
            (TCPServer, "protocol_send"), (WSStream, "_send_pings"), (WSStream, "handle"))
    ) or not isinstance(getattr(tcp_server, "MAX_RECV", None), int) or (
            "extensions" not in Handshake([], "1.1").__dict__):
        log.warning("hypercorn changed: its close/write race, ping linger, read size and "
                    "compression are not patched")
        return False
    _patch_protocol_send()
    _patch_pings()
    _patch_no_compression()
    tcp_server.MAX_RECV = max(tcp_server.MAX_RECV, READ_BYTES)
    setattr(TCPServer, _APPLIED, True)
    return True


def _patch_protocol_send() -> None:
    original = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Any) -> None:
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

"""``GET /v1/tunnel``: accepting agents' WebSockets and running one session each.

Tunnels are served at the ASGI level (:class:`TunnelRouter` sits in front of the quart app):
an idle tunnel costs hypercorn's connection and eecp's session and nothing more — quart's
per-WebSocket tasks, queues and request context cost about 15 KiB per tunnel, and a copy of
every message on the data path. Everything else goes to the quart app.

:class:`Tunnels` keeps the live sessions by agent id, so that an agent that reconnects before its
old connection was noticed dead supersedes it (the old one is closed with ``superseded``). Which
app an agent_id may serve at all is not decided here but by the store, where the id is bound to
the app and repo it was first admitted for (``Store.bind_agent``): that holds while the agent is
offline, across restarts and across processes.

While eecp drains (:mod:`eecp.core.drain`) a new tunnel is refused before its handshake
completes: HTTP 503 with ``{"allowed":false,"reason":"draining"}`` (the ASGI WebSocket
denial response; a server without it closes, which clients see as 403). Refusing before the
upgrade costs no session, and an agent behind a load balancer simply dials again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from eecp.agents.deps import SessionDeps
from eecp.agents.session import AgentSession, TunnelSocket
from eecp.core.drain import Drain
from eecp.wire import protocol

log = logging.getLogger("eecp.tunnel")


TUNNEL_PATH = "/v1/tunnel"
_MAX_CLOSE_REASON = 123  # RFC 6455: what a close frame can hold

# ASGI's callables, loosely typed: the messages are plain dicts whose keys we check ourselves
Scope = Any
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


class AsgiSocket:
    """One ASGI WebSocket as a :class:`~eecp.agents.session.TunnelSocket`."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        #: the close code and reason the peer sent, once it closed the tunnel (hypercorn
        #: passes them on with eecp.patches.hypercorn, fix 7; None until then, or without)
        self.peer_close: tuple[int, str] | None = None

    async def accept(self) -> bool:
        """Complete the handshake; False when the client left before it."""
        if (await self._receive())["type"] != "websocket.connect":
            return False
        await self._send({"type": "websocket.accept"})
        return True

    async def receive(self) -> str | bytes | None:
        while True:
            message = await self._receive()
            if message["type"] == "websocket.receive":
                text = message.get("text")
                return text if text is not None else bytes(message.get("bytes") or b"")
            if message["type"] == "websocket.disconnect":
                reason = message.get("reason")
                if isinstance(reason, str):
                    self.peer_close = (int(message.get("code") or 1005), reason)
                return None

    async def send(self, data: str | bytes) -> None:
        # after a disconnect hypercorn drops what is sent: the session learns it from receive
        if isinstance(data, str):
            await self._send({"type": "websocket.send", "text": data})
        else:
            await self._send({"type": "websocket.send", "bytes": data})

    async def close(self, code: int, reason: str) -> None:
        # RFC 6455 limits a close reason to 123 bytes
        await self._send({"type": "websocket.close", "code": code,
                          "reason": reason.encode()[:123].decode(errors="ignore")})


def log_peer_close(session: AgentSession, code: int, reason: str) -> None:
    """Why the agent itself closed its tunnel, in its own words (``quote_unavailable:
    configfs_tsm_unavailable``, ``agent_stopping``): the session only knows that it left.
    The words are the agent's: non-printable characters are not written to the log."""
    register = session.register
    who = f"agent {register.agent_id} ({register.app_name})" if register else session.peer
    shown = "".join(c if c.isprintable() else "?" for c in reason[:_MAX_CLOSE_REASON])
    level = logging.INFO if code in (protocol.CLOSE_NORMAL, protocol.CLOSE_GOING_AWAY) \
        else logging.WARNING
    log.log(level, "%s closed its tunnel: %d %s", who, code, shown or "(no reason)")


class TunnelRouter:
    """ASGI: WebSockets on ``/v1/tunnel`` to a session of :class:`Tunnels`, all else to
    ``app``."""

    def __init__(self, app: Any, tunnels: Tunnels) -> None:
        self._app = app
        self._tunnels = tunnels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope.get("path") == TUNNEL_PATH:
            if self._tunnels.draining:
                await _deny_draining(scope, receive, send)
                return
            socket = AsgiSocket(receive, send)
            if await socket.accept():
                client = scope.get("client")
                session = await self._tunnels.serve_session(socket,
                                                            str(client[0]) if client else "?")
                if socket.peer_close is not None:
                    log_peer_close(session, *socket.peer_close)
            return
        await self._app(scope, receive, send)


async def _deny_draining(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse a tunnel's handshake: 503 ``draining`` where the server can say it."""
    if (await receive())["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": protocol.CLOSE_GOING_AWAY})
        return
    body = json.dumps({"allowed": False, "reason": protocol.DRAINING}).encode()
    await send({"type": "websocket.http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "websocket.http.response.body", "body": body})


class Tunnels:
    """The live agent sessions of this process."""

    def __init__(self, deps: SessionDeps, drain: Drain | None = None) -> None:
        self._deps = deps
        self._drain = drain if drain is not None else Drain()
        self.sessions: dict[str, AgentSession] = {}
        self._live: set[AgentSession] = set()  # registered or not
        self._ended = trio.Event()  # set (and replaced) whenever a session ends

    @property
    def connected(self) -> int:
        """How many sessions have been admitted (their first attestation accepted)."""
        return len(self.sessions)

    async def serve_session(self, socket: TunnelSocket, peer: str) -> AgentSession:
        """Run one agent's session to its end (the caller owns the WebSocket); the session,
        ended."""
        session = AgentSession(self._deps, socket, peer, on_registered=self._registered)
        if self.draining:  # the drain began during its handshake
            session.drain()
        self._live.add(session)
        try:
            await session.run()
            return session
        finally:
            self._live.discard(session)
            register = session.register
            if register is not None and self.sessions.get(register.agent_id) is session:
                del self.sessions[register.agent_id]
            self._ended.set()
            self._ended = trio.Event()

    async def wait_idle(self) -> None:
        """Return once no session runs (each has finished its cleanup: at shutdown, their
        last availability events are queued by then)."""
        while self._live:
            await self._ended.wait()

    @property
    def draining(self) -> bool:
        return self._drain.started

    def drain(self) -> None:
        """Begin the drain (:mod:`eecp.core.drain`): new tunnels and new requests are refused
        from now on, and every live session tells its agent to move once its requests in
        flight end (status ``warning draining``)."""
        self._drain.start()
        for session in list(self._live):
            session.drain()

    def end_all(self, reason: str) -> None:
        """Close every session with 1001 (going away): agents reconnect to the next eecp."""
        for session in list(self._live):
            session.end(protocol.CLOSE_GOING_AWAY, reason)

    async def _registered(self, session: AgentSession) -> None:
        """``session`` was admitted: the store bound its agent_id to its app and repo at a new
        epoch (:mod:`eecp.agents.admission`), so it becomes the live session of that id, and
        an older one is superseded (the agent reconnected before its old tunnel was noticed
        dead; or an operator released the id and another app's agent took it). The older
        session's writes are fenced by the database already: this only closes its tunnel."""
        assert session.register is not None
        agent_id = session.register.agent_id
        old = self.sessions.get(agent_id)
        self.sessions[agent_id] = session
        if old is not None and old is not session and old.ending is None:
            log.info("agent %s reconnected: superseding its previous session", agent_id)
            old.end(protocol.CLOSE_SUPERSEDED, "superseded")

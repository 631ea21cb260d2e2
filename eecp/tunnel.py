"""``GET /v1/tunnel``: accepting agents' WebSockets and running one session each.

:class:`Tunnels` keeps the live sessions by agent id, so that an agent that reconnects before its
old connection was noticed dead supersedes it (the old one is closed with ``superseded``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from eecp import protocol
from eecp.session import AgentSession

if TYPE_CHECKING:
    from eecp.service import Services

log = logging.getLogger("eecp.tunnel")


class QuartSocket:
    """A quart websocket as a :class:`~eecp.session.TunnelSocket`."""

    def __init__(self, websocket: Any) -> None:
        self._ws = websocket

    async def receive(self) -> str | bytes:
        data: str | bytes = await self._ws.receive()
        return data

    async def send(self, data: str | bytes) -> None:
        await self._ws.send(data)

    async def close(self, code: int, reason: str) -> None:
        # RFC 6455 limits a close reason to 123 bytes
        await self._ws.close(code, reason.encode()[:123].decode(errors="ignore"))


class Tunnels:
    """The live agent sessions of this process."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self.sessions: dict[str, AgentSession] = {}
        self._live: set[AgentSession] = set()  # registered or not

    @property
    def connected(self) -> int:
        """How many sessions have registered."""
        return len(self.sessions)

    async def serve_session(self, socket: QuartSocket, peer: str) -> None:
        """Run one agent's session to its end (the caller owns the WebSocket)."""
        session = AgentSession(self._services, socket, peer, on_registered=self._registered)
        self._live.add(session)
        try:
            await session.run()
        finally:
            self._live.discard(session)
            register = session.register
            if register is not None and self.sessions.get(register.agent_id) is session:
                del self.sessions[register.agent_id]

    def end_all(self, reason: str) -> None:
        """Close every session with 1001 (going away): agents reconnect to the next eecp."""
        for session in list(self._live):
            session.end(protocol.CLOSE_GOING_AWAY, reason)

    async def _registered(self, session: AgentSession) -> None:
        assert session.register is not None
        agent_id = session.register.agent_id
        old = self.sessions.get(agent_id)
        self.sessions[agent_id] = session
        if old is not None and old is not session:
            log.info("agent %s reconnected: superseding its previous session", agent_id)
            old.end(protocol.CLOSE_SUPERSEDED, "superseded")

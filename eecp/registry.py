"""The in-memory view of apps and their agents: what resolve answers from, with no database
round trip. Sessions change it (synchronously, so a check and its update cannot interleave with
another session's) and persist through the store themselves.

:func:`decide` is the allow decision, pure: an app may be served when its registration has not
expired and at least one of its agents serving the current repo/tag is connected, attested,
not failing health, and sealed where the network requires it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from eecp.clock import isoformat
from eecp.config import Network
from eecp.records import AgentRecord, AppRecord
from eecp.registration import RegistrationState, registration_state
from eecp.streams import Mux

Health = Literal["pass", "fail", "unknown"]


@dataclass
class AgentView:
    """One agent as this process sees it. ``connected`` is never persisted."""

    record: AgentRecord
    connected: bool = False
    attested: bool = False
    health: Health = "unknown"
    health_at: float | None = None
    in_flight: int = 0
    mux: Mux | None = None  # the tunnel's stream multiplexer while connected

    @property
    def agent_id(self) -> str:
        return self.record.agent_id

    def routable_for(self, app: AppRecord, network: Network | None) -> bool:
        """May this agent serve ``app`` right now?"""
        r = self.record
        return (self.connected and self.attested and self.health != "fail"
                and r.repo == app.repo and r.release_tag == app.release_tag
                and (network is None or not network.sealed or r.sealed is True))


@dataclass
class AppView:
    """An app registration and the agents known to serve it."""

    record: AppRecord
    agents: dict[str, AgentView] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Resolve's answer for one app."""

    allowed: bool
    reason: str
    app: str
    body: dict[str, Any]

    @property
    def registration_state(self) -> str:
        return str(self.body.get("registration_state", ""))

    @property
    def release_tag(self) -> str:
        return str(self.body.get("release_tag", ""))


class Registry:
    """Apps and agents of one eecp process."""

    def __init__(self, networks: Iterable[Network], warn_sec: float) -> None:
        self.apps: dict[str, AppView] = {}
        self._networks = {n.name: n for n in networks}
        self._warn_sec = warn_sec

    def load(self, apps: Iterable[AppRecord], agents: Iterable[AgentRecord]) -> None:
        """Fill from the store at start-up: every agent reads disconnected until it dials in."""
        for app in apps:
            self.apps[app.name] = AppView(app)
        for agent in agents:
            view = self.apps.get(agent.app_name)
            if view is not None:
                view.agents[agent.agent_id] = AgentView(agent)

    def app(self, name: str) -> AppRecord | None:
        view = self.apps.get(name)
        return view.record if view else None

    def network(self, name: str) -> Network | None:
        return self._networks.get(name)

    def put_app(self, record: AppRecord) -> None:
        """Insert or replace an app's record, keeping its agents."""
        view = self.apps.get(record.name)
        if view is None:
            self.apps[record.name] = AppView(record)
        else:
            view.record = record

    def attach(self, agent: AgentView) -> None:
        """Show ``agent`` under its app (which must be registered): from now on resolve and
        admin see it. A new app's first agent is attached once its registration commits."""
        view = self.apps[agent.record.app_name]
        view.agents[agent.agent_id] = agent

    def detach(self, agent: AgentView) -> None:
        """The agent's session ended: it stays listed, disconnected."""
        agent.connected = False
        agent.attested = False
        agent.mux = None
        view = self.apps.get(agent.record.app_name)
        if view is not None and view.agents.get(agent.agent_id) is agent:
            view.agents[agent.agent_id] = AgentView(agent.record)

    def update_agent(self, agent: AgentView, **changes: Any) -> AgentRecord:
        """Replace fields of an agent's record; returns the new record for persisting."""
        agent.record = replace(agent.record, **changes)
        return agent.record

    def resolve(self, name: str, now: float) -> Decision:
        """The allow decision for app ``name`` at ``now``."""
        view = self.apps.get(name)
        return decide(view, name, now, self._networks, self._warn_sec)

    def routable(self, name: str, now: float) -> list[AgentView]:
        """Agents that may serve ``name`` now, least loaded first."""
        view = self.apps.get(name)
        if view is None or registration_state(view.record.expires_at, now,
                                              self._warn_sec) == "expired":
            return []
        network = self._networks.get(view.record.network)
        agents = [a for a in view.agents.values() if a.routable_for(view.record, network)]
        return sorted(agents, key=lambda a: a.in_flight)


def decide(view: AppView | None, name: str, now: float, networks: dict[str, Network],
           warn_sec: float) -> Decision:
    """Pure allow decision; reasons: ``unknown_app``, ``registration_expired``,
    ``not_connected``, ``not_attested``, ``health_fail``, ``sealed_required``."""
    if view is None:
        return Decision(False, "unknown_app", name, {"allowed": False, "reason": "unknown_app",
                                                      "app": name})
    app = view.record
    network = networks.get(app.network)
    state = registration_state(app.expires_at, now, warn_sec)
    current = [a for a in view.agents.values()
               if a.record.repo == app.repo and a.record.release_tag == app.release_tag]
    best = _best_agent(current, app, network)
    reason = _deny_reason(state, best, app, network)
    body = _body(app, state, best, current, reason)
    return Decision(reason == "ok", reason, name, body)


def _best_agent(agents: list[AgentView], app: AppRecord, network: Network | None
                ) -> AgentView | None:
    """The agent that best represents the app: routable first, then the furthest along."""
    def rank(a: AgentView) -> tuple[bool, bool, bool, bool]:
        return (a.routable_for(app, network), a.connected and a.attested, a.connected,
                a.health != "fail")
    return max(agents, key=rank, default=None)


def _deny_reason(state: RegistrationState, best: AgentView | None, app: AppRecord,
                 network: Network | None) -> str:
    if state == "expired":
        return "registration_expired"
    if best is None or not best.connected:
        return "not_connected"
    if not best.attested:
        return "not_attested"
    if best.health == "fail":
        return "health_fail"
    if network is not None and network.sealed and best.record.sealed is not True:
        return "sealed_required"
    return "ok"


def _body(app: AppRecord, state: RegistrationState, best: AgentView | None,
          agents: list[AgentView], reason: str) -> dict[str, Any]:
    record = best.record if best else None
    return {
        "allowed": reason == "ok",
        "reason": reason,
        "app": app.name,
        "repo": app.repo,
        "release_tag": app.release_tag,
        "network": app.network,
        "registration_state": state,
        "expires_at": isoformat(app.expires_at),
        "attestation": {
            "status": "attested" if best and best.attested else
            (record.last_reason if record and record.last_reason else "pending"),
            "at": isoformat(record.last_attested_at) if record and record.last_attested_at
            else None,
        },
        "health": best.health if best else "unknown",
        "sealed": record.sealed if record else None,
        "connected": bool(best and best.connected),
        "agents": sum(1 for a in agents if a.connected),
    }

"""The in-memory view of apps and their agents: what resolve answers from, with no database
round trip. Sessions change it (synchronously, so a check and its update cannot interleave with
another session's) and persist through the store themselves.

:func:`decide` is the allow decision, pure: an app may be served when its registration has not
expired and at least one of its agents serving the current repo/tag is connected, attested,
not failing health, and sealed where the network requires it.

Resolve is the hot path (every request through nginx or Caddy asks it), so
:meth:`Registry.resolve` remembers each registered app's decision. A remembered decision is
never stale: it is kept only while nothing it was computed from has changed (every write to a
field :func:`decide` reads bumps one process-wide generation — see :class:`AgentView`,
:class:`AppView`) and while ``now`` stays inside the registration state it was computed in
(``active`` ends at ``expires_at - warn``, ``warning`` at ``expires_at``). There is no TTL: an
agent drained at one instant is refused at that instant.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from eecp.agents.registration import RegistrationState, registration_state
from eecp.core.clock import isoformat
from eecp.core.config import Network
from eecp.core.metrics import StateGauges
from eecp.ledger.routing import UNROUTABLE, NodeView, rank
from eecp.store.records import AgentRecord, AppRecord
from eecp.wire.seed import SeedTunnel
from eecp.wire.streams import Mux

Health = Literal["pass", "fail", "unknown"]


class _Generation:
    """Bumped by every change to what a decision reads; remembered decisions compare it."""

    value = 0


def _changed() -> None:
    _Generation.value += 1


_UNSET = object()

#: the AgentView fields :func:`decide` reads (``in_flight``, ``mux``, ``seed``, ``health_at``
#: are not)
_DECISION_FIELDS = frozenset({"record", "connected", "attested", "health", "ppid"})
_NOBODY: frozenset[str] = frozenset()


class _AgentMap(dict[str, "AgentView"]):
    """An app's agents by id; adding or removing one is a change to the app's decision."""

    def __setitem__(self, key: str, value: AgentView) -> None:
        _changed()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        _changed()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        _changed()
        return super().pop(*args)

    def popitem(self) -> tuple[str, AgentView]:
        _changed()
        return super().popitem()

    def clear(self) -> None:
        _changed()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        _changed()
        super().update(*args, **kwargs)

    def setdefault(self, key: str, default: Any = None) -> Any:
        _changed()
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> _AgentMap:  # type: ignore[override,misc]
        _changed()
        super().update(other)
        return self


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
    #: instead of ``mux``: an agent that announced no data_protocol, served with the seed's
    #: JSON proxy messages (:mod:`eecp.wire.seed`)
    seed: SeedTunnel | None = None
    #: the PPID of the latest quote accepted in this process (None: none, or not a PPID)
    ppid: str | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # only a real change counts: a health report repeating "pass" every 30 s must not
        # throw away every app's remembered decision
        if name in _DECISION_FIELDS and getattr(self, name, _UNSET) != value:
            _changed()
        object.__setattr__(self, name, value)

    @property
    def agent_id(self) -> str:
        return self.record.agent_id

    def routable_for(self, app: AppRecord, network: Network | None,
                     blocked: frozenset[str] = _NOBODY) -> bool:
        """May this agent serve ``app`` right now? ``blocked``: the PPIDs of suspended and
        banned nodes' platforms (the ledger's node views; empty with the ledger off)."""
        return self.refusal(app, network, blocked) is None

    def refusal(self, app: AppRecord, network: Network | None,
                blocked: frozenset[str] = _NOBODY) -> str | None:
        """Why this agent may not serve ``app`` right now, or None: the one rule resolve,
        the proxy's pick and the WebSocket revocation share (``not_connected``,
        ``not_attested``, ``health_fail``, ``release_changed``, ``sealed_required``,
        ``node_suspended``, in that order)."""
        r = self.record
        if not self.connected:
            return "not_connected"
        if not self.attested:
            return "not_attested"
        if self.health == "fail":
            return "health_fail"
        if r.repo != app.repo or r.release_tag != app.release_tag:
            return "release_changed"
        if network is not None and network.sealed and r.sealed is not True:
            return "sealed_required"
        if self.ppid is not None and self.ppid in blocked:
            return "node_suspended"
        return None


@dataclass
class AppView:
    """An app registration and the agents known to serve it."""

    record: AppRecord
    agents: dict[str, AgentView] = field(default_factory=_AgentMap)

    def __setattr__(self, name: str, value: Any) -> None:
        _changed()
        if name == "agents" and not isinstance(value, _AgentMap):
            value = _AgentMap(value)
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Decision:
    """Resolve's answer for one app. Shared by every caller while it stays valid, so its
    document is handed out as a copy (:meth:`document`)."""

    allowed: bool
    reason: str
    app: str
    _body: dict[str, Any] = field(repr=False)
    #: the stretch of time it holds for, ``[valid_from, valid_until)`` (registration state)
    valid_from: float = -math.inf
    valid_until: float = math.inf

    @functools.cached_property
    def json(self) -> bytes:
        """The document as compact JSON (computed once per decision)."""
        return json.dumps(self._body, separators=(",", ":")).encode()

    def document(self) -> dict[str, Any]:
        """The decision as resolve's JSON document, a fresh copy the caller may extend."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self._body.items()}

    @property
    def registration_state(self) -> str:
        return str(self._body.get("registration_state", ""))

    @property
    def release_tag(self) -> str:
        return str(self._body.get("release_tag", ""))

    def holds(self, now: float) -> bool:
        """Is ``now`` inside the registration state it was computed in?"""
        return self.valid_from <= now < self.valid_until


class Registry:
    """Apps and agents of one eecp process."""

    def __init__(self, networks: Iterable[Network], warn_sec: float) -> None:
        self.apps: dict[str, AppView] = {}
        self._networks = {n.name: n for n in networks}
        self._warn_sec = warn_sec
        #: app name -> (generation, decision): registered apps only, so it is bounded
        self._decisions: dict[str, tuple[int, Decision]] = {}
        #: the ledger's node views by PPID (empty with the ledger off: today's pick)
        self._views: Mapping[str, NodeView] = {}
        self._band_pct = 0
        self._blocked = _NOBODY

    def set_node_views(self, views: Mapping[str, NodeView], band_pct: int) -> None:
        """Route by the ledger's node views from now on (spec §12): agents on a suspended or
        banned node's platform leave routing and resolve (``node_suspended``), bound agents
        within ``band_pct`` of the cheapest effective price are tried first."""
        self._views, self._band_pct = dict(views), band_pct
        blocked = frozenset(p for p, v in views.items() if v.status in UNROUTABLE)
        if blocked != self._blocked:
            self._blocked = blocked
            _changed()

    def load(self, apps: Iterable[AppRecord], agents: Iterable[AgentRecord]) -> None:
        """Fill from the store at start-up: every agent reads disconnected until it dials in."""
        _changed()
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
        _changed()
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
        agent.seed = None
        view = self.apps.get(agent.record.app_name)
        if view is not None and view.agents.get(agent.agent_id) is agent:
            view.agents[agent.agent_id] = AgentView(agent.record)

    def update_agent(self, agent: AgentView, **changes: Any) -> AgentRecord:
        """Replace fields of an agent's record; returns the new record for persisting."""
        agent.record = replace(agent.record, **changes)
        return agent.record

    def resolve(self, name: str, now: float) -> Decision:
        """The allow decision for app ``name`` at ``now`` (remembered while it holds)."""
        generation = _Generation.value
        cached = self._decisions.get(name)
        if cached is not None and cached[0] == generation and cached[1].holds(now):
            return cached[1]
        view = self.apps.get(name)
        decision = decide(view, name, now, self._networks, self._warn_sec, self._blocked)
        if view is not None:
            self._decisions[name] = (generation, decision)
        return decision

    def routable(self, name: str, now: float) -> list[AgentView]:
        """Agents that may serve ``name`` now, in the order the proxy tries them.

        Two orders combine, the protocol first: every agent speaking the binary data protocol
        (``mux``) comes before every one speaking the seed's JSON messages (``seed``: whole
        bodies only, no streaming), and within each group the order is
        :func:`eecp.ledger.routing.rank`'s (least loaded first, or by the ledger's node views).
        So a binary agent in a dearer price band still goes before a JSON agent in the
        cheapest; the JSON agents serve when no binary one can (or on a retry)."""
        view = self.apps.get(name)
        if view is None or registration_state(view.record.expires_at, now,
                                              self._warn_sec) == "expired":
            return []
        network = self._networks.get(view.record.network)
        agents = [a for a in view.agents.values()
                  if a.routable_for(view.record, network, self._blocked)]
        ranked = rank(agents, self._views, self._band_pct)
        # (a stable partition: each group keeps rank's order)
        return ([a for a in ranked if a.seed is None]
                + [a for a in ranked if a.seed is not None])

    def revocation(self, agent: AgentView, name: str, now: float) -> str | None:
        """Why ``agent`` may no longer serve app ``name`` at ``now``, or None while it may
        (what :meth:`routable` would keep it for; no ranking, so cheap enough to ask every
        second for each upgraded stream): ``registration_expired``, ``not_connected`` (its
        session ended or was replaced), ``not_attested``, ``health_fail``,
        ``release_changed`` (the app now runs another repo or tag), ``sealed_required``,
        ``node_suspended``."""
        view = self.apps.get(name)
        if view is None or registration_state(view.record.expires_at, now,
                                              self._warn_sec) == "expired":
            return "registration_expired"
        if view.agents.get(agent.agent_id) is not agent:  # its session was replaced
            return "not_connected"
        return agent.refusal(view.record, self._networks.get(view.record.network),
                             self._blocked)

    def gauges(self, now: float) -> StateGauges:
        """What the metrics' state gauges show (read at each scrape)."""
        agents = [a for view in self.apps.values() for a in view.agents.values()]
        return StateGauges(
            agents_connected=sum(a.connected for a in agents),
            streams_in_flight=sum(a.in_flight for a in agents),
            apps_by_state=Counter(self.resolve(name, now).reason for name in list(self.apps)),
            registrations_by_state=Counter(
                registration_state(v.record.expires_at, now, self._warn_sec)
                for v in self.apps.values()),
            attestation_age_by_app={name: self._attestation_age(view, now)
                                    for name, view in self.apps.items()})

    def _attestation_age(self, view: AppView, now: float) -> float:
        """Seconds since the last accepted attestation of the agent resolve judges the app by
        (its best current one); inf when that agent has none, or there is none."""
        app = view.record
        best = _best_agent(_current(view), app, self._networks.get(app.network), self._blocked)
        at = best.record.last_attested_at if best is not None else None
        return math.inf if at is None else max(0.0, now - at)


def decide(view: AppView | None, name: str, now: float, networks: dict[str, Network],
           warn_sec: float, blocked: frozenset[str] = _NOBODY) -> Decision:
    """Pure allow decision; reasons: ``unknown_app``, ``registration_expired``,
    ``not_connected``, ``not_attested``, ``health_fail``, ``sealed_required``,
    ``node_suspended`` (every agent that could serve is on a suspended or banned node's
    platform, ``blocked``)."""
    if view is None:
        return Decision(False, "unknown_app", name, {"allowed": False, "reason": "unknown_app",
                                                      "app": name})
    app = view.record
    network = networks.get(app.network)
    state = registration_state(app.expires_at, now, warn_sec)
    current = _current(view)
    best = _best_agent(current, app, network, blocked)
    reason = _deny_reason(state, best, app, network, blocked)
    body = _body(app, state, best, current, reason)
    return Decision(reason == "ok", reason, name, body, *_state_span(state, app, warn_sec))


def _current(view: AppView) -> list[AgentView]:
    """The app's agents serving its current repo and release tag."""
    app = view.record
    return [a for a in view.agents.values()
            if a.record.repo == app.repo and a.record.release_tag == app.release_tag]


def _state_span(state: RegistrationState, app: AppRecord, warn_sec: float
                ) -> tuple[float, float]:
    """When ``state`` began and ends (see :func:`eecp.agents.registration.registration_state`)."""
    if state == "active":
        return -math.inf, app.expires_at - warn_sec
    if state == "warning":
        return app.expires_at - warn_sec, app.expires_at
    return app.expires_at, math.inf


def _best_agent(agents: list[AgentView], app: AppRecord, network: Network | None,
                blocked: frozenset[str]) -> AgentView | None:
    """The agent that best represents the app: routable first, then the furthest along."""
    def progress(a: AgentView) -> tuple[bool, bool, bool, bool, bool]:
        return (a.routable_for(app, network, blocked), a.routable_for(app, network),
                a.connected and a.attested, a.connected, a.health != "fail")
    return max(agents, key=progress, default=None)


def _deny_reason(state: RegistrationState, best: AgentView | None, app: AppRecord,
                 network: Network | None, blocked: frozenset[str]) -> str:
    if state == "expired":
        return "registration_expired"
    if best is None:
        return "not_connected"
    # (best serves the app's current repo and tag: release_changed is never its reason)
    return best.refusal(app, network, blocked) or "ok"


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

"""Measuring one node-period from eecp's own records (spec §8.3, §21.1, §21.2, §21.12).

Inputs, all plain values: the span ``[start, end)``; the node's *carry-in* (which sessions were
up at ``start``, whether each agent was expected, and the cause and time of its current
downtime), which is the previous period's carry-out; the node's availability events with
``start <= at < end``; the observer rows of the eecp instances; the policy. Output: the counted
downtime intervals (:class:`Miss`) per agent with their causes, the node's and each app's
``down_seconds`` (the measure of the union over agents) and ``observed_up``, the observer gaps,
and the carry-out. Because each period starts from its predecessor's carry-out, only one
period's events are ever read, and measuring periods 1..k in turn gives the same downtime as
measuring their union (a property the tests check).

The rules, per agent, sweeping its events in time order. At one instant: downs, then releases,
then ups, then synthesized losses (so an agent that reconnects at the very second it dropped
is up, and an up on an instance that has already stopped covering is lost at once).

- ``up``: that session is up; the agent becomes *expected*; its down cause clears.
- ``down``: that session is no longer up. If no session of the agent is up afterwards, the agent
  is down with this event's reason as cause from its time (every such down sets the cause,
  so an attestation refusal followed by the disconnect it provokes shows both causes in
  ``misses``, and a health failure the app reported is superseded by a tunnel drop that does
  count). A down never ends another session, so an agent that reconnected to replica B
  before replica A noticed its old tunnel die was never down.
- ``release``: the agent is no longer expected, so its downtime stops counting (a launcher
  stopping a workload releases it first).
- A session whose instance stops covering ends at ``max(its last up, the instance's coverage
  end)`` with cause ``observer_lost`` (a crashed replica writes no down). Coverage is
  authoritative: an event that instance writes after its coverage ended cannot revive it.
- Downtime = expected and no session up.

Excused and uncounted time:
- Observer gaps (no instance covering) never count.
- ``observer_shutdown``, ``observer_lost`` and ``superseded`` are eecp's own doing: excused from
  the cause's time until ``reconnect_grace_sec`` after the first covered instant at or after it
  (agents cannot reconnect while no eecp runs, so the grace starts when one is back; the first
  draft started it at the shutdown, Appendix A).
- ``health_fail`` (the agent's probe of the *user's* app failed) counts only when
  ``app_health_counts`` is on (§21.1); silence (``health_timeout``) always counts.

Times are float Unix seconds as the store keeps them; intervals are half-open.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

EventKind = Literal["up", "down", "release"]
GapPolicy = Literal["hold", "pay", "refund"]
Interval = tuple[float, float]

OBSERVER_LOST: Final = "observer_lost"
#: causes that are eecp's own restarts, crashes and supersedes: excused for the grace
EXCUSABLE_CAUSES: Final = frozenset({"observer_shutdown", OBSERVER_LOST, "superseded"})
HEALTH_FAIL: Final = "health_fail"
#: the order events at one instant are applied in (synthesized losses come last)
_RANK: Final[Mapping[str, int]] = MappingProxyType({"down": 0, "release": 1, "up": 2})


@dataclass(frozen=True)
class Event:
    """One ``availability_event`` row of the node (append-only, written by the sessions)."""

    at: float
    agent_id: str
    app: str
    session_id: str
    instance_id: str
    kind: EventKind
    reason: str = ""


@dataclass(frozen=True)
class Observer:
    """One eecp instance's ``observer`` row."""

    instance_id: str
    started_at: float
    last_beat_at: float
    stopped_at: float | None = None

    def coverage(self, beat_sec: float) -> Interval:
        """``[started_at, stopped_at or last_beat_at + 2 × beat)``."""
        end = self.stopped_at if self.stopped_at is not None else self.last_beat_at + 2 * beat_sec
        return (self.started_at, end)


@dataclass(frozen=True)
class Policy:
    """The knobs measurement and eligibility read (snapshotted on each settled node-period)."""

    reconnect_grace_sec: float = 120.0  # EE_SETTLEMENT_RECONNECT_GRACE_SEC
    gap_tolerance_sec: float = 60.0  # EE_OBSERVER_GAP_TOLERANCE_SEC
    beat_sec: float = 10.0  # EE_OBSERVER_BEAT_SEC
    app_health_counts: bool = False  # EE_SETTLEMENT_APP_HEALTH_COUNTS
    downtime_grace_sec: float = 0.0  # EE_SETTLEMENT_DOWNTIME_GRACE_SEC (0: zero tolerance)
    gap_policy: GapPolicy = "hold"  # EE_SETTLEMENT_GAP_POLICY

    def __post_init__(self) -> None:
        for name in ("reconnect_grace_sec", "gap_tolerance_sec", "downtime_grace_sec"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.beat_sec > 0:
            raise ValueError("beat_sec must be > 0")
        if self.gap_policy not in ("hold", "pay", "refund"):
            raise ValueError(f"gap_policy {self.gap_policy!r}")

    def snapshot(self) -> dict[str, float | bool | str]:
        """The knob values, as stored with a settled node-period."""
        return {"reconnect_grace_sec": self.reconnect_grace_sec,
                "gap_tolerance_sec": self.gap_tolerance_sec, "beat_sec": self.beat_sec,
                "app_health_counts": self.app_health_counts,
                "downtime_grace_sec": self.downtime_grace_sec, "gap_policy": self.gap_policy}


# --- carry ----------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class SessionCarry:
    """A session up at the boundary."""

    session_id: str
    instance_id: str
    last_up: float


@dataclass(frozen=True)
class AgentCarry:
    """One agent's state at the boundary. ``cause``/``since`` describe its current downtime;
    ``reachable_at`` is the first covered instant at or after ``since`` once it is known (it
    starts an excused cause's grace; None: no eecp has covered since)."""

    agent_id: str
    app: str
    expected: bool
    sessions: tuple[SessionCarry, ...] = ()
    cause: str | None = None
    since: float | None = None
    reachable_at: float | None = None


@dataclass(frozen=True)
class Carry:
    """The state of a node's agents at the instant ``at``: a node-period's carry-out and its
    successor's carry-in (stored as JSON on ``node_period.carry_out``)."""

    at: float
    agents: tuple[AgentCarry, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "agents": [
            {"agent_id": a.agent_id, "app": a.app, "expected": a.expected,
             "sessions": [{"session_id": s.session_id, "instance_id": s.instance_id,
                           "last_up": s.last_up} for s in a.sessions],
             "cause": a.cause, "since": a.since, "reachable_at": a.reachable_at}
            for a in self.agents]}

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Carry:
        """The inverse of :meth:`to_json` (ValueError on a malformed document)."""
        try:
            agents = tuple(
                AgentCarry(_str(a["agent_id"]), _str(a["app"]), a["expected"] is True,
                           tuple(SessionCarry(_str(s["session_id"]), _str(s["instance_id"]),
                                              _float(s["last_up"]))
                                 for s in _objects(a["sessions"])),
                           None if a["cause"] is None else _str(a["cause"]),
                           _opt_float(a["since"]), _opt_float(a["reachable_at"]))
                for a in _objects(doc["agents"]))
            return cls(_float(doc["at"]), agents)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed carry: {exc!r}") from None


def _objects(value: object) -> list[Mapping[str, object]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise TypeError("expected a list of objects")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a time")
    return float(value)


def _opt_float(value: object) -> float | None:
    return None if value is None else _float(value)


# --- results --------------------------------------------------------------------------------

def miss_reason(cause: str) -> str:
    """The ``reasons[]`` entry a counted interval of ``cause`` fails a period with (§9.2):
    ``attest_miss``, ``app_health_fail``, else ``health_miss`` (silence, a disconnect, an
    excused cause whose grace ran out, and any cause eecp does not know)."""
    if cause.startswith("attestation_refused:") or cause == "attestation_timeout":
        return "attest_miss"
    if cause == HEALTH_FAIL:
        return "app_health_fail"
    return "health_miss"


@dataclass(frozen=True)
class Miss:
    """A counted downtime interval ``[start, end)`` (``from``/``to`` in the API)."""

    agent_id: str
    app: str
    cause: str
    start: float
    end: float

    @property
    def reason(self) -> str:
        return miss_reason(self.cause)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class View:
    """The node, or one app of it: counted downtime, whether it was ever up, the evidence."""

    down_seconds: float = 0.0
    observed_up: bool = False
    misses: tuple[Miss, ...] = ()


@dataclass(frozen=True)
class Measurement:
    start: float
    end: float
    node: View
    apps: Mapping[str, View]
    gaps: tuple[Interval, ...]
    carry_out: Carry

    @property
    def gap_seconds(self) -> float:
        """The longest gap inside the span (a gap across a boundary counts in each period
        for the part inside it)."""
        return max((b - a for a, b in self.gaps), default=0.0)

    def view(self, app: str | None) -> View:
        """What a hold is judged on: the app's agents when it names one, else the node's."""
        return self.node if app is None else self.apps.get(app, View())


# --- coverage -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Coverage:
    merged: tuple[Interval, ...]  # the union of all instances, sorted, disjoint
    ends: Mapping[str, float]  # each instance's coverage end
    start: float
    end: float

    @classmethod
    def of(cls, observers: Iterable[Observer], beat_sec: float, start: float,
           end: float) -> _Coverage:
        spans = sorted(iv for o in observers if (iv := o.coverage(beat_sec))[1] > iv[0])
        merged: list[Interval] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        ends = {o.instance_id: o.coverage(beat_sec)[1] for o in observers}
        return cls(tuple(merged), MappingProxyType(ends), start, end)

    def instance_end(self, instance_id: str) -> float:
        # an instance with no row covers nothing: its sessions are lost at once
        return self.ends.get(instance_id, -math.inf)

    def first_covered(self, at: float) -> float | None:
        """The first covered instant ≥ ``at`` inside the span, or None."""
        for a, b in self.merged:
            if b > at:
                first = max(a, at)
                return first if first < self.end else None
        return None

    def clip(self, lo: float, hi: float) -> list[Interval]:
        """The covered parts of ``[lo, hi)``."""
        return [(max(a, lo), min(b, hi)) for a, b in self.merged if max(a, lo) < min(b, hi)]

    def gaps(self) -> tuple[Interval, ...]:
        out: list[Interval] = []
        cursor = self.start
        for a, b in self.clip(self.start, self.end):
            if a > cursor:
                out.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < self.end:
            out.append((cursor, self.end))
        return tuple(out)


# --- the sweep ------------------------------------------------------------------------------

@dataclass
class _Agent:
    """One agent's mutable state during the sweep (never escapes :func:`measure`)."""

    agent_id: str
    app: str
    expected: bool
    sessions: dict[tuple[str, str], float]  # (instance, session) -> last up
    cause: str | None
    since: float | None
    reachable: float | None  # known first covered instant ≥ since (from the carry only)
    cursor: float  # the state below holds on [cursor, next change)
    down: list[tuple[float, float, str, str, float, float | None]] = field(default_factory=list)
    up_apps: set[str] = field(default_factory=set)

    def close(self, t: float) -> None:
        """End the current state's interval at ``t``; zero-length intervals (several changes
        at one instant) leave no trace."""
        if t > self.cursor:
            if self.sessions:
                self.up_apps.add(self.app)
            elif self.expected and self.cause is not None and self.since is not None:
                self.down.append((self.cursor, t, self.cause, self.app, self.since,
                                  self.reachable))
            self.cursor = t

    def set_cause(self, cause: str, at: float) -> None:
        self.cause, self.since, self.reachable = cause, at, None


def measure(start: float, end: float, carry_in: Carry, events: Sequence[Event],
            observers: Iterable[Observer], policy: Policy) -> Measurement:
    """Measure the node over ``[start, end)`` (normally one period). See the module docstring.

    ``carry_in.at`` must be ``start`` and every event must lie in the span (ValueError
    otherwise): the store reads exactly one period. ``observers`` must include every instance
    whose coverage overlaps the span; an instance named by a session but absent is taken to
    cover nothing."""
    if not start < end:
        raise ValueError("an empty span")
    if carry_in.at != start:
        raise ValueError(f"the carry describes {carry_in.at}, not the span's start {start}")
    if any(not start <= e.at < end or e.kind not in _RANK for e in events):
        raise ValueError("an event outside the span, or of an unknown kind")
    coverage = _Coverage.of(list(observers), policy.beat_sec, start, end)
    by_agent: dict[str, list[tuple[int, Event]]] = {}
    for index, event in enumerate(events):
        by_agent.setdefault(event.agent_id, []).append((index, event))
    carried = {a.agent_id: a for a in carry_in.agents}
    agents = [_sweep(carried.get(agent_id), agent_id, sorted(
        by_agent.get(agent_id, []), key=lambda ie: (ie[1].at, _RANK[ie[1].kind], ie[0])),
        coverage, start, end) for agent_id in sorted(set(carried) | set(by_agent))]
    misses = [m for agent in agents for m in _counted(agent, coverage, policy)]
    apps = sorted({m.app for m in misses} | {app for agent in agents for app in agent.up_apps})
    return Measurement(
        start, end, _view(misses, any(agent.up_apps for agent in agents)),
        MappingProxyType({app: _view([m for m in misses if m.app == app],
                                     any(app in agent.up_apps for agent in agents))
                          for app in apps}),
        coverage.gaps(), Carry(end, tuple(c for agent in agents
                                          if (c := _carry_out(agent, coverage)) is not None)))


def _sweep(carry: AgentCarry | None, agent_id: str, events: list[tuple[int, Event]],
           coverage: _Coverage, start: float, end: float) -> _Agent:
    if carry is None:
        agent = _Agent(agent_id, events[0][1].app, False, {}, None, None, None, start)
    else:
        agent = _Agent(agent_id, carry.app, carry.expected,
                       {(s.instance_id, s.session_id): s.last_up for s in carry.sessions},
                       carry.cause, carry.since, carry.reachable_at, start)

    def loss_time(key: tuple[str, str]) -> float:
        # a carried-in session was up at start, whatever its instance's row says
        return max(agent.sessions[key], coverage.instance_end(key[0]), start)

    def lose(at: float) -> None:
        for key in [k for k in agent.sessions if loss_time(k) == at]:
            agent.close(at)
            del agent.sessions[key]
            if not agent.sessions:
                agent.set_cause(OBSERVER_LOST, at)

    i = 0
    while True:
        next_event = events[i][1].at if i < len(events) else math.inf
        next_loss = min((loss_time(k) for k in agent.sessions), default=math.inf)
        if next_loss < next_event and next_loss < end:
            lose(next_loss)
            continue
        if next_event == math.inf:
            break
        while i < len(events) and events[i][1].at == next_event:
            _apply(agent, events[i][1])
            i += 1
        lose(next_event)
    agent.close(end)
    return agent


def _apply(agent: _Agent, event: Event) -> None:
    agent.close(event.at)
    agent.app = event.app
    key = (event.instance_id, event.session_id)
    if event.kind == "up":
        agent.sessions[key] = event.at
        agent.expected = True
        agent.cause = agent.since = agent.reachable = None
    elif event.kind == "down":
        agent.sessions.pop(key, None)
        if not agent.sessions:
            agent.set_cause(event.reason, event.at)
    else:
        agent.expected = False


def _counted(agent: _Agent, coverage: _Coverage, policy: Policy) -> list[Miss]:
    misses: list[Miss] = []
    for lo, hi, cause, app, since, reachable in agent.down:
        if cause == HEALTH_FAIL and not policy.app_health_counts:
            continue
        if cause in EXCUSABLE_CAUSES:
            back = reachable if reachable is not None else coverage.first_covered(
                max(since, coverage.start))
            lo = max(lo, back + policy.reconnect_grace_sec if back is not None else math.inf)
        for a, b in coverage.clip(lo, hi):
            last = misses[-1] if misses else None
            if last is not None and last.cause == cause and last.app == app and last.end == a:
                misses[-1] = Miss(agent.agent_id, app, cause, last.start, b)
            else:
                misses.append(Miss(agent.agent_id, app, cause, a, b))
    return misses


def _view(misses: list[Miss], observed_up: bool) -> View:
    return View(_union_seconds([(m.start, m.end) for m in misses]), observed_up, tuple(
        sorted(misses, key=lambda m: (m.start, m.agent_id))))


def _union_seconds(intervals: list[Interval]) -> float:
    total, cursor = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > cursor:
            total += b - max(a, cursor)
            cursor = b
    return total


def _carry_out(agent: _Agent, coverage: _Coverage) -> AgentCarry | None:
    if not agent.expected and not agent.sessions:
        return None  # released and gone: nothing the next period needs
    reachable = agent.reachable
    if reachable is None and agent.cause in EXCUSABLE_CAUSES and agent.since is not None:
        reachable = coverage.first_covered(max(agent.since, coverage.start))
    sessions = tuple(sorted(SessionCarry(s, i, up) for (i, s), up in agent.sessions.items()))
    return AgentCarry(agent.agent_id, agent.app, agent.expected, sessions,
                      None if agent.sessions else agent.cause,
                      None if agent.sessions else agent.since,
                      None if agent.sessions else reachable)

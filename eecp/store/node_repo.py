"""The ledger's node rows inside a unit of work: nodes, their terms, platforms and claims, the
availability events the sessions write and the observer heartbeats of eecp processes.

A :class:`NodeTx` is ``tx.nodes`` of a unit of work (:class:`~eecp.store.store.Tx`); like
:class:`~eecp.store.ledger_repo.LedgerTx` it reads and writes rows and leaves every rule to
:mod:`eecp.ledger`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import peewee

from eecp.store.ledger_records import (
    ClaimRow,
    EventRow,
    NodeRow,
    ObserverRow,
    PlatformRow,
    TermsRow,
)
from eecp.store.ledger_tables import LedgerBound


class NodeTx:
    """Nodes, platforms, availability records in one unit of work (``tx.nodes``)."""

    def __init__(self, db: Any, m: LedgerBound, locks: bool) -> None:
        self._db = db
        self._m = m
        self._locks = locks  # True exactly on PostgreSQL

    def _read(self, query: Any, lock: bool) -> Any:
        return query.for_update() if lock and self._locks else query

    def _insert_if_absent(self, model: Any, data: dict[str, Any]) -> bool:
        cursor = self._db.execute(model.insert(**data).on_conflict_ignore())
        return bool(cursor.rowcount == 1)

    # -- nodes --

    def node(self, node_id: str, *, lock: bool = False) -> NodeRow | None:
        N = self._m.Node
        row = self._read(N.select().where(N.node_id == node_id), lock).dicts().first()
        return NodeRow(**row) if row is not None else None

    def node_by_token(self, token_sha256: str) -> NodeRow | None:
        """The node whose token hashes to ``token_sha256`` (compare it again in constant
        time: an index lookup is not a comparison of secrets)."""
        N = self._m.Node
        row = N.select().where(N.token_sha256 == token_sha256).dicts().first()
        return NodeRow(**row) if row is not None else None

    def nodes(self) -> list[NodeRow]:
        N = self._m.Node
        return [NodeRow(**row) for row in N.select().order_by(N.node_id).dicts()]

    def insert_node(self, row: NodeRow) -> bool:
        """Create ``row`` unless the node exists; False when it does."""
        return self._insert_if_absent(self._m.Node, dataclasses.asdict(row))

    def write_node(self, row: NodeRow) -> None:
        N = self._m.Node
        data = dataclasses.asdict(row)
        del data["node_id"]
        N.update(**data).where(N.node_id == row.node_id).execute()

    # -- terms --

    def terms(self, node_id: str) -> list[TermsRow]:
        """The node's schedule, oldest first."""
        T = self._m.NodeTerms
        query = T.select().where(T.node_id == node_id).order_by(T.effective_from)
        return [TermsRow(**_without(row, "id")) for row in query.dicts()]

    def all_terms(self) -> dict[str, list[TermsRow]]:
        """Every node's schedule, oldest first (one query for views over every node)."""
        T = self._m.NodeTerms
        out: dict[str, list[TermsRow]] = {}
        for row in T.select().order_by(T.node_id, T.effective_from).dicts():
            out.setdefault(row["node_id"], []).append(TermsRow(**_without(row, "id")))
        return out

    def insert_terms(self, row: TermsRow) -> None:
        self._m.NodeTerms.insert(**dataclasses.asdict(row)).execute()

    def delete_terms_after(self, node_id: str, after: float) -> int:
        """Delete the rows not yet in effect (``effective_from > after``): a new change
        replaces them."""
        T = self._m.NodeTerms
        return int(T.delete().where((T.node_id == node_id)
                                    & (T.effective_from > after)).execute())

    # -- platforms and claims --

    def platform(self, ppid: str) -> PlatformRow | None:
        P = self._m.NodePlatform
        row = P.select().where(P.ppid == ppid).dicts().first()
        return PlatformRow(**row) if row is not None else None

    def platforms(self, node_id: str) -> list[PlatformRow]:
        P = self._m.NodePlatform
        query = P.select().where(P.node_id == node_id).order_by(P.confirmed_at, P.ppid)
        return [PlatformRow(**row) for row in query.dicts()]

    def all_platforms(self) -> list[PlatformRow]:
        """Every confirmed platform (banned nodes' included: they stay, refused)."""
        P = self._m.NodePlatform
        return [PlatformRow(**row) for row in P.select().order_by(P.ppid).dicts()]

    def insert_platform(self, row: PlatformRow) -> bool:
        """Confirm ``row`` unless the PPID has an owner; False when it has one."""
        return self._insert_if_absent(self._m.NodePlatform, dataclasses.asdict(row))

    def delete_platform(self, ppid: str) -> bool:
        P = self._m.NodePlatform
        return bool(P.delete().where(P.ppid == ppid).execute())

    def claim(self, ppid: str, node_id: str) -> ClaimRow | None:
        C = self._m.PlatformClaim
        row = C.select().where((C.ppid == ppid) & (C.node_id == node_id)).dicts().first()
        return ClaimRow(**row) if row is not None else None

    def claims(self, node_id: str) -> list[ClaimRow]:
        C = self._m.PlatformClaim
        query = C.select().where(C.node_id == node_id).order_by(C.first_seen, C.ppid)
        return [ClaimRow(**row) for row in query.dicts()]

    def upsert_claim(self, row: ClaimRow) -> None:
        """Record that a TD on ``row.ppid`` named ``row.node_id``: a new claim, or the
        existing one seen again (its agent, audit entry and ``last_seen`` move on; its
        ``first_seen`` stays)."""
        C = self._m.PlatformClaim
        C.insert(**dataclasses.asdict(row)).on_conflict(
            conflict_target=[C.ppid, C.node_id],
            update={C.agent_id: row.agent_id, C.audit_id: row.audit_id,
                    C.last_seen: row.last_seen}).execute()

    # -- availability events --

    def append_event(self, row: EventRow) -> int:
        data = dataclasses.asdict(row)
        del data["id"]
        return int(self._m.Event.insert(**data).execute())

    def events(self, node_id: str, start: float, end: float) -> list[EventRow]:
        """The node's events with ``start <= at < end``, in the order they happened (and were
        written, for one instant)."""
        E = self._m.Event
        query = E.select().where((E.node_id == node_id) & (E.at >= start) & (E.at < end))
        return [EventRow(**row) for row in query.order_by(E.at, E.id).dicts()]

    def last_event(self, agent_id: str) -> EventRow | None:
        """The agent's latest event, whichever node it named."""
        E = self._m.Event
        row = (E.select().where(E.agent_id == agent_id).order_by(E.at.desc(), E.id.desc())
               .dicts().first())
        return EventRow(**row) if row is not None else None

    def agents_seen(self, node_id: str) -> list[str]:
        """Every agent that ever had an event on the node."""
        E = self._m.Event
        query = E.select(E.agent_id).where(E.node_id == node_id).distinct()
        return sorted(str(agent_id) for (agent_id,) in query.tuples())

    def agents_on_platform(self, ppid: str) -> list[str]:
        """Every agent that ever had an event from the platform (a scan of the events: only
        a platform's confirmation asks, which is rare)."""
        E = self._m.Event
        query = E.select(E.agent_id).where(E.ppid == ppid).distinct()
        return sorted(str(agent_id) for (agent_id,) in query.tuples())

    # -- observers --

    def observer(self, instance_id: str) -> ObserverRow | None:
        Obs = self._m.Observer
        row = Obs.select().where(Obs.instance_id == instance_id).dicts().first()
        return ObserverRow(**row) if row is not None else None

    def insert_observer(self, row: ObserverRow) -> bool:
        return self._insert_if_absent(self._m.Observer, dataclasses.asdict(row))

    def beat(self, instance_id: str, at: float, *, stop: bool = False) -> bool:
        """Move the instance's ``last_beat_at`` to ``at`` (never back), and with ``stop`` set
        its ``stopped_at``; False when it has no row or has stopped."""
        Obs = self._m.Observer
        # the larger of two values: MAX(a, b) on SQLite, GREATEST(a, b) on PostgreSQL
        larger = peewee.fn.GREATEST if self._locks else peewee.fn.MAX
        fields: dict[Any, Any] = {Obs.last_beat_at: larger(Obs.last_beat_at, at)}
        if stop:
            fields[Obs.stopped_at] = at
        changed = Obs.update(fields).where((Obs.instance_id == instance_id)
                                         & Obs.stopped_at.is_null()).execute()
        return bool(changed)

    def observers(self, start: float, end: float, beat_sec: float) -> list[ObserverRow]:
        """The instances whose coverage (``[started_at, stopped_at or last_beat_at + 2 ×
        beat)``) overlaps ``[start, end)``."""
        Obs = self._m.Observer
        covered_until = peewee.fn.COALESCE(Obs.stopped_at, Obs.last_beat_at + 2 * beat_sec)
        query = Obs.select().where((Obs.started_at < end) & (covered_until > start))
        return [ObserverRow(**row) for row in query.order_by(Obs.started_at).dicts()]


def _without(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in names}

"""What eecp observes, written for the ledger: availability events, observer heartbeats,
platform claims, and the endpoints that bind hardware to nodes (spec §7.1, §8.1, §8.2).

An agent is *on node N* while the platform (PPID) of its latest accepted quote is confirmed for
N. The sessions report each event with that PPID (:class:`SessionEvent`), and the node is
derived here, inside the transaction that writes the event, from ``node_platform``: nothing an
agent sends can put it on a node whose hardware it does not run on. When an agent's node
changes (its PPID moved to another node, or its platform was removed), a ``release`` ``moved``
is written for the old node first, so the old node stops expecting it.

Binding needs both sides: a TD naming node N on platform P leaves a claim
(:func:`claim_platform`, only for a P confirmed nowhere and an N that exists), and N's operator
or the admin confirms P (:func:`confirm_platform`), which needs that claim and a P no other
node owns.

Each eecp process (instance) beats into its ``observer`` row; the measurement counts a period
only where some instance was watching (§8.3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from eecp.core.clock import isoformat
from eecp.core.errors import LedgerConflictError, LedgerInputError, LedgerNotFoundError
from eecp.ledger import idempotency
from eecp.ledger.answers import Answer, check_node_principal, ok
from eecp.ledger.money import parse_json_body, reject_unknown_fields
from eecp.ledger.units import Request, Work
from eecp.store.ledger_records import ClaimRow, EventRow, ObserverRow, PlatformRow
from eecp.store.store import Tx

EventKind = Literal["up", "down", "release"]
PLATFORMS: Final = "/v1/nodes/{node_id}/platforms"
_PPID = re.compile(r"[0-9a-f]{32}")
#: the longest text kept from a session for an event's fields (ids, app names, reasons)
MAX_FIELD = 255


@dataclass(frozen=True)
class SessionEvent:
    """One thing an agent's session did (§8.2): ``kind`` ``up`` / ``down`` / ``release`` with
    its ``reason`` (``attested``, ``health_timeout``, ``disconnected:peer_closed``, ...), and the
    PPID of the session's latest accepted quote (None: none, or not a PPID)."""

    at: float
    agent_id: str
    app_name: str
    session_id: str
    kind: EventKind
    reason: str
    ppid: str | None = None


def parse_ppid(value: object, field: str = "ppid") -> str:
    """A PPID: 32 hex digits (16 bytes), kept lower-case; else 400 ``invalid_ppid``."""
    if type(value) is not str or not _PPID.fullmatch(value.lower()):
        raise LedgerInputError("invalid_ppid", field=field)
    return value.lower()


def record_events(tx: Tx, instance_id: str, events: Sequence[SessionEvent]) -> list[EventRow]:
    """Append ``events`` (oldest first), each with the node its PPID is confirmed for now."""
    written: list[EventRow] = []
    for event in events:
        if event.kind not in ("up", "down", "release"):
            raise ValueError(f"an event of kind {event.kind!r}")
        fields = (event.agent_id, event.app_name, event.session_id, event.reason)
        if not event.agent_id or any(len(f) > MAX_FIELD for f in fields):
            raise ValueError("an event without an agent, or with a field over 255 characters")
        ppid = event.ppid.lower() if event.ppid and _PPID.fullmatch(event.ppid.lower()) else None
        platform = tx.nodes.platform(ppid) if ppid is not None else None
        node_id = platform.node_id if platform is not None else None
        last = tx.nodes.last_event(event.agent_id)
        if (last is not None and last.node_id is not None and last.node_id != node_id
                and last.kind != "release"):
            written.append(_append(tx, EventRow(
                event.at, event.agent_id, last.app_name, last.session_id, instance_id,
                "release", "moved", last.node_id, last.ppid)))
        written.append(_append(tx, EventRow(
            event.at, event.agent_id, event.app_name, event.session_id, instance_id,
            event.kind, event.reason, node_id, ppid)))
    return written


def _append(tx: Tx, row: EventRow) -> EventRow:
    return replace(row, id=tx.nodes.append_event(row))


def claim_platform(tx: Tx, ppid: str, node_id: str, agent_id: str, audit_id: int | None,
                   at: float) -> bool:
    """A TD on ``ppid`` whose attestation was accepted named ``node_id``: keep (or refresh)
    the claim, unless the platform is confirmed somewhere already or there is no such node
    (a TD must not make rows for any name it likes), or the platform has no PPID (eecp's
    ``pck-…`` stand-in ids cannot be bound). True when a claim was written."""
    if not _PPID.fullmatch(ppid.lower()):
        return False
    ppid = ppid.lower()
    node = tx.nodes.node(node_id)
    if node is None or node.status == "banned" or tx.nodes.platform(ppid) is not None:
        return False
    tx.nodes.upsert_claim(ClaimRow(ppid, node_id, agent_id, at, at, audit_id))
    return True


def platform_banned(tx: Tx, ppid: str) -> bool:
    """Whether ``ppid`` belongs to a banned node (attestation answers ``platform_banned``)."""
    platform = tx.nodes.platform(ppid.lower())
    if platform is None:
        return False
    node = tx.nodes.node(platform.node_id)
    return node is not None and node.status == "banned"


def confirm_platform(principal: str, node_id: str, raw: bytes, keys: Sequence[str],
                     now: float) -> tuple[Request, Work]:
    """``POST /v1/nodes/{node_id}/platforms`` ``{"ppid": ...}`` (the node or the admin)."""
    check_node_principal(principal, node_id)
    body = parse_json_body(raw)
    reject_unknown_fields(body, frozenset({"ppid"}))
    ppid = parse_ppid(body.get("ppid"))
    key = idempotency.parse_key(keys, required=False)
    request = Request(idempotency.check_principal(principal), key, PLATFORMS,
                      idempotency.fingerprint("POST", PLATFORMS, {"node_id": node_id},
                                              {"ppid": ppid}))

    def work(tx: Tx, key_id: int | None) -> Answer:
        node = tx.nodes.node(node_id, lock=True)
        if node is None:
            raise LedgerNotFoundError("node_not_found")
        if node.status == "banned":
            raise LedgerConflictError("node_inactive")
        owned = tx.nodes.platform(ppid)
        if owned is None:
            if tx.nodes.claim(ppid, node_id) is None:
                raise LedgerConflictError("platform_not_claimed")
            row = PlatformRow(ppid, node_id, now, principal)
            if tx.nodes.insert_platform(row):
                _bind_live_agents(tx, node_id, ppid, now)
                return _platform_answer(row)
            owned = tx.nodes.platform(ppid)  # confirmed meanwhile by another transaction
        if owned is None or owned.node_id != node_id:
            raise LedgerConflictError("platform_taken")
        return _platform_answer(owned)  # confirmed already: the natural key replays

    return request, work


def _bind_live_agents(tx: Tx, node_id: str, ppid: str, now: float) -> None:
    """The platform was just confirmed for the node: an agent up on it now is on the node
    from now (§7.1: its latest accepted quote came from a platform of the node), without
    waiting for its next event. Its ``up`` is repeated naming the node, under the session and
    the instance that observed it (an instance that stopped covering cannot revive it)."""
    for agent_id in tx.nodes.agents_on_platform(ppid):
        last = tx.nodes.last_event(agent_id)
        if last is not None and last.kind == "up" and last.ppid == ppid \
                and last.node_id != node_id:
            tx.nodes.append_event(EventRow(now, agent_id, last.app_name, last.session_id,
                                           last.instance_id, "up", "platform_confirmed",
                                           node_id, ppid))


def _platform_answer(row: PlatformRow) -> Answer:
    return ok({"node_id": row.node_id, "ppid": row.ppid,
               "confirmed_at": isoformat(row.confirmed_at)})


def delete_platform(tx: Tx, instance_id: str, node_id: str, ppid_text: str,
                    now: float) -> Answer:
    """``DELETE /v1/nodes/{node_id}/platforms/{ppid}`` (admin): the platform leaves the node,
    and the node stops expecting the agents it carried (``release`` ``moved``)."""
    ppid = parse_ppid(ppid_text)
    node = tx.nodes.node(node_id, lock=True)
    if node is None:
        raise LedgerNotFoundError("node_not_found")
    if node.status == "banned":
        raise LedgerConflictError("node_inactive")  # a banned node's platforms stay banned
    owned = tx.nodes.platform(ppid)
    if owned is None or owned.node_id != node_id:
        raise LedgerNotFoundError("platform_not_found")
    tx.nodes.delete_platform(ppid)
    for agent_id in tx.nodes.agents_seen(node_id):
        last = tx.nodes.last_event(agent_id)
        if last is not None and last.node_id == node_id and last.ppid == ppid \
                and last.kind != "release":
            tx.nodes.append_event(EventRow(now, agent_id, last.app_name, last.session_id,
                                           instance_id, "release", "moved", node_id, ppid))
    return ok({"node_id": node_id, "ppid": ppid, "deleted_at": isoformat(now)})


def release_agent(tx: Tx, instance_id: str, node_id: str, agent_id: str,
                  now: float) -> Answer:
    """``POST /v1/nodes/{node_id}/agents/{agent_id}/release`` (launcher, admin): the node no
    longer expects the agent (a workload stopped on purpose). Releasing it again replays the
    first release; an agent not on the node is 404 ``agent_not_bound``."""
    if tx.nodes.node(node_id) is None:
        raise LedgerNotFoundError("node_not_found")
    last = tx.nodes.last_event(agent_id)
    if last is None or last.node_id != node_id:
        raise LedgerNotFoundError("agent_not_bound")
    at = last.at
    if last.kind != "release":
        at = now
        tx.nodes.append_event(EventRow(now, agent_id, last.app_name, last.session_id,
                                       instance_id, "release", "operator", node_id, last.ppid))
    return ok({"node_id": node_id, "agent_id": agent_id, "released_at": isoformat(at)})


def release_stale(tx: Tx, instance_id: str, now: float, stale_sec: float) -> dict[str, int]:
    """Release the agents their nodes should no longer expect (spec §8.4, §15): ``stale``,
    down for ``stale_sec`` or more (its downtime until now has counted), and ``app_gone``,
    its app's registration expired or deleted while no session of it was there to say so (a
    live session releases itself at expiry). How many were released, by reason.

    Every node's agents are read in one unit of work: fine for the hundreds of agents a node
    list holds; an index of open agents would replace the scan beyond that."""
    released: dict[str, int] = {}
    for node in tx.nodes.nodes():
        for agent_id in tx.nodes.agents_seen(node.node_id):
            last = tx.nodes.last_event(agent_id)
            if last is None or last.kind == "release" or last.node_id != node.node_id:
                continue
            reason = _release_reason(tx, last, now, stale_sec)
            if reason is None:
                continue
            tx.nodes.append_event(EventRow(now, agent_id, last.app_name, last.session_id,
                                           instance_id, "release", reason, node.node_id,
                                           last.ppid))
            released[reason] = released.get(reason, 0) + 1
    return released


def _release_reason(tx: Tx, last: EventRow, now: float, stale_sec: float) -> str | None:
    app = tx.app(last.app_name)
    if app is None or app.expires_at <= now:
        return "app_gone"
    if last.kind == "down" and now - last.at >= stale_sec:
        return "stale"
    return None


def bound_agents(tx: Tx, node_id: str) -> list[dict[str, object]]:
    """The agents on the node now (their latest event names it and is not a release)."""
    agents = []
    for agent_id in tx.nodes.agents_seen(node_id):
        last = tx.nodes.last_event(agent_id)
        if last is not None and last.node_id == node_id and last.kind != "release":
            agents.append({"agent_id": agent_id, "app": last.app_name, "up": last.kind == "up",
                           "since": isoformat(last.at)})
    return agents


def heartbeat(tx: Tx, instance_id: str, version: str, at: float) -> bool:
    """The instance is watching at ``at``: its row is made on the first beat and moved on by
    the next ones. False once it has stopped (a stopped instance covers nothing more)."""
    if tx.nodes.insert_observer(ObserverRow(instance_id, at, at, version)):
        return True
    return tx.nodes.beat(instance_id, at)


def stop_observing(tx: Tx, instance_id: str, at: float) -> bool:
    """A graceful stop: coverage ends at ``at`` exactly (not two beats later)."""
    return tx.nodes.beat(instance_id, at, stop=True)

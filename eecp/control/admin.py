"""Admin views: ``GET /v1/apps`` and ``GET /v1/apps/{app}``, on one blueprint whose every
route the admin guard checks (:mod:`eecp.control.auth`).

Each agent shows its ``ppid`` (the platform of its latest accepted quote, what an operator
confirms for a node) and ``node_id`` (the ledger node it is bound to; None when unbound or the
ledger is off). With the ledger on both come from the agent's latest availability event, so an
agent that has not reconnected since a restart shows them too; else the PPID is what this
process saw."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from quart import Blueprint, Response, jsonify, request

from eecp.agents.registry import AgentView, Registry
from eecp.control.auth import Guard, Role
from eecp.core.clock import Clock, isoformat
from eecp.core.errors import StoreError
from eecp.store.records import AgentRecord, AuditEntry
from eecp.store.store import Store

#: each agent's (node_id, ppid) as the ledger last recorded them
Bindings = Callable[[Sequence[str]], Awaitable[dict[str, tuple[str | None, str | None]]]]


def blueprint(guard: Guard, registry: Registry, clock: Clock, store: Store,
              audit_entries_shown: int, bindings: Bindings | None = None) -> Blueprint:
    """The admin routes, for the admin only (``EE_ADMIN_TOKEN``)."""
    admin = guard.protect(Blueprint("admin", __name__), Role.ADMIN)

    @admin.get("/v1/apps")
    async def list_apps_view() -> Response:
        return jsonify(list_apps(registry, clock.now()))

    @admin.get("/v1/apps/<app_name>")
    async def app_detail_view(app_name: str) -> Response | tuple[Response, int]:
        name = app_name.lower()
        # ?verdict=accepted: the last accepted ones, however many refusals came after them
        verdict = request.args.get("verdict")
        if verdict not in (None, "accepted", "refused"):
            return jsonify({"error": "invalid_query:verdict",
                            "detail": "expected accepted or refused"}), 400
        doc = await app_view(registry, clock, store, name, audit_entries_shown, bindings,
                             verdict)
        if doc is None:
            return jsonify({"error": "unknown_app", "app": name}), 404
        return jsonify(doc)

    return admin


async def app_view(registry: Registry, clock: Clock, store: Store, name: str,
                   audit_entries_shown: int, bindings: Bindings | None = None,
                   verdict: str | None = None) -> dict[str, Any] | None:
    """``GET /v1/apps/{app}``'s document (the dashboard's app page shows the same): the app,
    its agents with the ledger's bindings when it is on, its newest audit entries (of
    ``verdict`` when given); None if the app is unknown."""
    audit = await store.recent_audit(name, audit_entries_shown, verdict)
    doc = app_detail(registry, name, clock.now(), audit)
    if doc is None:
        return None
    if bindings is not None:
        try:
            bound = await bindings([a["agent_id"] for a in doc["agents"]])
        except StoreError:  # the view without the ledger's half, rather than none
            bound = {}
        for agent in doc["agents"]:
            node_id, ppid = bound.get(agent["agent_id"], (None, None))
            agent["node_id"] = node_id
            agent["ppid"] = agent["ppid"] or ppid
    return doc


def list_apps(registry: Registry, now: float) -> dict[str, Any]:
    """Every registered app with its resolve decision."""
    apps = [registry.resolve(name, now).document() for name in sorted(registry.apps)]
    return {"apps": apps, "count": len(apps)}


def app_detail(registry: Registry, name: str, now: float, audit: list[AuditEntry]
               ) -> dict[str, Any] | None:
    """One app: its decision, its agents and its latest audit entries; None if unknown."""
    view = registry.apps.get(name)
    if view is None:
        return None
    doc = registry.resolve(name, now).document()
    doc["registered_at"] = isoformat(view.record.registered_at)
    doc["agents"] = [agent_doc(a) for a in view.agents.values()]
    doc["audit"] = [audit_doc(e) for e in audit]
    return doc


def agent_doc(agent: AgentView) -> dict[str, Any]:
    """An agent as admins see it."""
    r: AgentRecord = agent.record
    return {
        "agent_id": r.agent_id, "repo": r.repo, "release_tag": r.release_tag,
        "network": r.network, "connected": agent.connected, "attested": agent.attested,
        "health": agent.health,
        "health_at": isoformat(agent.health_at) if agent.health_at else None,
        "sealed": r.sealed, "in_flight": agent.in_flight,
        "first_seen": isoformat(r.first_seen), "last_seen": isoformat(r.last_seen),
        "last_attested_at": isoformat(r.last_attested_at) if r.last_attested_at else None,
        "last_verdict": r.last_verdict, "last_reason": r.last_reason,
        "ppid": agent.ppid, "node_id": None,
    }


def audit_doc(entry: AuditEntry) -> dict[str, Any]:
    """An audit entry as JSON."""
    return {
        "id": entry.id, "at": isoformat(entry.at), "agent_id": entry.agent_id,
        "repo": entry.repo, "release_tag": entry.release_tag, "network": entry.network,
        "trigger": entry.trigger, "verdict": entry.verdict, "reason": entry.reason,
        "tcb_status": entry.tcb_status, "advisory_ids": list(entry.advisory_ids),
        "fmspc": entry.fmspc, "mrtd": entry.mrtd, "rtmrs": list(entry.rtmrs),
        "sealed": entry.sealed, "platform_id": entry.platform_id,
    }

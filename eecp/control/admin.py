"""Admin views: ``GET /v1/apps`` and ``GET /v1/apps/{app}``, and their bearer-token check."""

from __future__ import annotations

import hmac
from typing import Any

from eecp.agents.registry import AgentView, Registry
from eecp.core.clock import isoformat
from eecp.store.records import AgentRecord, AuditEntry


def authorized(expected: str | None, authorization: str | None) -> bool:
    """True when ``authorization`` is ``Bearer <expected>`` (constant time), or when no token
    is configured (admin open, as the seed has it; start-up warns)."""
    if not expected:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              expected.encode())


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

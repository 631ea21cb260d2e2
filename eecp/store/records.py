"""Plain records the store persists and the rest of eecp passes around (no peewee here).

Times are Unix seconds (UTC floats) from the injected clock; measurement registers are lower-case
hex strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AppRecord:
    """A registration: an app name bound to the repo that first registered it."""

    name: str
    repo: str
    release_tag: str
    network: str
    registered_at: float
    expires_at: float
    last_attested_at: float | None = None
    last_verdict: str | None = None  # "accepted" | "refused"
    last_reason: str | None = None


@dataclass(frozen=True)
class AgentRecord:
    """One agent (one TD) that serves an app. ``connected`` is never persisted: it is a fact of
    the running process, so after a restart every agent reads disconnected until it dials in."""

    agent_id: str
    app_name: str
    repo: str
    release_tag: str
    network: str
    first_seen: float
    last_seen: float
    sealed: bool | None = None
    last_attested_at: float | None = None
    last_verdict: str | None = None
    last_reason: str | None = None
    #: the admission the row was last written under (see :mod:`eecp.store.store`)
    epoch: int = 0


@dataclass(frozen=True)
class AuditEntry:
    """One attestation decision, appended and never changed."""

    at: float
    app_name: str
    agent_id: str
    repo: str
    release_tag: str
    network: str
    trigger: str  # "register" | "periodic" | "cli"
    verdict: str  # "accepted" | "refused"
    reason: str
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    fmspc: str | None = None
    mrtd: str | None = None
    rtmrs: tuple[str, ...] = ()  # rtmr0..rtmr3 when the quote was readable
    sealed: bool | None = None
    #: the platform of a quote that verified (:func:`eecp.attestation.quotes.platform_id`: its PPID)
    platform_id: str | None = None
    id: int | None = field(default=None, compare=False)

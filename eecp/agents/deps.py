"""What an agent session is built from: its settings and its collaborators, named one by one.

:mod:`eecp.wiring` builds one :class:`SessionDeps` per process;
:class:`~eecp.agents.tunnels.Tunnels` hands it to every :class:`~eecp.agents.session.AgentSession`
it runs. A session reads nothing
else: no ``Config`` (only the :class:`SessionConfig` values below), no bag of every component.
"""

from __future__ import annotations

from dataclasses import dataclass

from eecp.agents.ledger_hooks import SessionLedger
from eecp.agents.registry import Registry
from eecp.attestation.engine import AttestationEngine
from eecp.core.clock import Clock
from eecp.core.config import Config
from eecp.core.metrics import Metrics
from eecp.core.ratelimit import RefusedAuditLimit
from eecp.store.store import Store


@dataclass(frozen=True)
class SessionConfig:
    """The settings a session reads (each named as in :class:`~eecp.core.config.Config`)."""

    attest_deadline_sec: float
    attest_interval_sec: float
    health_timeout_sec: float
    registration_ttl_days: float
    registration_warn_days: float
    tunnel_max_message_bytes: int
    tunnel_max_streams: int
    stream_window_bytes: int

    @classmethod
    def from_config(cls, config: Config) -> SessionConfig:
        return cls(
            attest_deadline_sec=config.attest_deadline_sec,
            attest_interval_sec=config.attest_interval_sec,
            health_timeout_sec=config.health_timeout_sec,
            registration_ttl_days=config.registration_ttl_days,
            registration_warn_days=config.registration_warn_days,
            tunnel_max_message_bytes=config.tunnel_max_message_bytes,
            tunnel_max_streams=config.tunnel_max_streams,
            stream_window_bytes=config.stream_window_bytes,
        )


@dataclass(frozen=True)
class SessionDeps:
    """Everything a session uses, shared by every session of the process."""

    config: SessionConfig
    clock: Clock
    store: Store
    registry: Registry
    engine: AttestationEngine
    metrics: Metrics
    #: the budget of audit rows for refusals of attempts never admitted
    refused_audit: RefusedAuditLimit
    #: availability events and platform claims (None: the ledger is off, nothing is written)
    ledger: SessionLedger | None = None

"""What an agent session tells the ledger, behind one small interface the wiring fills.

With ``EE_LEDGER_ENABLED=true`` every session of the process holds one :class:`SessionLedger`
(:attr:`eecp.agents.deps.SessionDeps.ledger`); with the ledger off it holds None and a session
calls nothing, writes nothing, and behaves exactly as without the ledger. The session knows
*what* happened (spec §8.2's table: ``up`` on admission, ``down`` with its cause, ``release``)
and which platform its latest accepted quote came from; the ledger decides which node that
platform is on, when the event is written.

:meth:`SessionLedger.record` never blocks and never raises: it hands the event to a bounded
outbox (:class:`eecp.ledger.outbox.EventOutbox`) that a background task writes to the store, so
a slow or failing store never holds a session, and an event that does not fit is counted and
turns into an observer gap (§8.2) instead of vanishing. :meth:`SessionLedger.claim_platform`
is awaited after an accepted attestation; a store failure there is the ledger's to log (a claim
is refreshed by every later attestation anyway). :meth:`SessionLedger.fraud_signal` is awaited
after a refusal that is a fraud signal (spec §10.4) has been audited: the platform's node is
suspended, its agents leave routing.
"""

from __future__ import annotations

import re
from typing import Protocol

from eecp.ledger.observe import SessionEvent

__all__ = ["SessionEvent", "SessionLedger", "ppid_of"]

_PPID = re.compile(r"[0-9a-f]{32}")


class SessionLedger(Protocol):
    """The ledger as a session sees it."""

    def record(self, event: SessionEvent) -> None:
        """Queue ``event`` for the store; returns at once."""
        ...

    async def claim_platform(self, ppid: str, node_id: str, agent_id: str,
                             audit_id: int | None) -> None:
        """An accepted attestation from ``ppid`` whose register named ``node_id``."""
        ...

    async def fraud_signal(self, ppid: str, audit_id: int, reason: str) -> None:
        """A refusal ``reason`` of a quote from ``ppid``, audited as ``audit_id``."""
        ...


def ppid_of(platform_id: str | None) -> str | None:
    """The PPID an outcome's ``platform_id`` is (32 hex digits), or None: a quote that did not
    verify, or a leaf without a PPID (eecp's ``pck-…`` stand-in ids are never bound)."""
    if platform_id is None or not _PPID.fullmatch(platform_id):
        return None
    return platform_id

"""Admission: an attestation's outcome applied to the database first, to memory second.

Every decision about an agent that must hold across restarts and across eecp processes on one
PostgreSQL is taken here, inside one unit of work (:meth:`eecp.store.store.Store.atomic`), and
the session updates its memory (the registry, and so resolve's answers) only from what
committed:

* :func:`admit` — a register attestation that verified: the app name's claim (the first repo
  wins; the same repo may move its tag; no network move while the registration lives), the
  renewal (``expires_at``), the agent_id's binding to its app and repo, the agent's next epoch,
  and the audit row of the decision. A refused claim rolls its writes back and writes nothing:
  it returns the app row as it now stands (memory follows it), and the session audits the
  refusal within the audit budget (an attested TD can ask for refusals in bulk).
* :func:`record_verdict` — a later verdict about an admitted agent (a periodic attestation
  accepted or refused): its row, written only while it still holds its epoch, and the audit row.
  A session whose epoch was taken by a newer admission (here or on another process) learns
  that it was superseded: nothing of it is written any more.

The functions run in a store worker thread (they receive the unit of work's :class:`Tx`); they
are pure apart from ``tx`` and may be run again when PostgreSQL retries the transaction. Row
locks are taken in the store's documented order: the ``app`` row, then the ``agent`` row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from eecp.agents.registration import check_claim, renew
from eecp.core.errors import RegistrationError
from eecp.store.records import AgentRecord, AppRecord, AuditEntry
from eecp.store.store import Tx
from eecp.wire.protocol import Register


@dataclass(frozen=True)
class Admitted:
    """The agent is admitted: its app's registration and its own row as they committed, and
    the id of the audit row of the decision."""

    app: AppRecord
    agent: AgentRecord
    audit_id: int | None = None


@dataclass(frozen=True)
class Refused:
    """The admission was refused (``error``); ``app`` is the app's row as it stands."""

    error: RegistrationError
    app: AppRecord | None


def admit(tx: Tx, register: Register, agent: AgentRecord, entry: AuditEntry, now: float,
          ttl_sec: float) -> Admitted | Refused:
    """Admit the agent ``agent`` (its row as the session would write it) for ``register``,
    whose attestation at ``now`` was accepted (``entry``, its audit row). See the module
    docstring."""
    try:
        with tx.savepoint():  # a refusal keeps nothing of what was written before it
            app = _claim(tx, register, now, ttl_sec)
            bound = _bind(tx, agent)
    except RegistrationError as exc:
        return Refused(exc, tx.app(register.app_name))
    return Admitted(app, bound, tx.append_audit(entry))


def _claim(tx: Tx, register: Register, now: float, ttl_sec: float) -> AppRecord:
    """The app's renewed registration, written; ``RegistrationError`` for a claim the rules
    refuse (see :mod:`eecp.agents.registration`)."""
    existing = tx.app(register.app_name, lock=True)
    check_claim(existing, register, now)
    renewed = renew(existing, register, now, ttl_sec)
    if existing is not None:
        tx.update_app(renewed)
        return renewed
    if tx.insert_app(renewed):
        return renewed
    # another transaction registered the name since we looked (PostgreSQL: our insert waited
    # for it to commit, then did nothing): judge the claim against what it committed
    existing = tx.app(register.app_name, lock=True)
    check_claim(existing, register, now)
    renewed = renew(existing, register, now, ttl_sec)
    tx.update_app(renewed)
    return renewed


def _bind(tx: Tx, agent: AgentRecord) -> AgentRecord:
    """The agent's row at its next epoch, written; ``RegistrationError("agent_id_in_use")``
    when its agent_id is bound to another app or repo."""
    existing = tx.agent(agent.agent_id, lock=True)
    if existing is None:
        first = replace(agent, epoch=1)
        if tx.insert_agent(first):
            return first
        existing = tx.agent(agent.agent_id, lock=True)  # inserted meanwhile (see _claim)
        if existing is None:  # released again at once: an operator's race, nothing to fence
            raise RegistrationError("store_conflict", "the agent's row changed meanwhile")
    if (existing.app_name, existing.repo) != (agent.app_name, agent.repo):
        raise RegistrationError("agent_id_in_use",
                                f"agent {agent.agent_id} is bound to app {existing.app_name}")
    admitted = replace(agent, first_seen=existing.first_seen, epoch=existing.epoch + 1)
    if not tx.write_agent(admitted, epoch=existing.epoch):  # (locked: cannot miss)
        raise RegistrationError("store_conflict", "the agent's row changed meanwhile")
    return admitted


def record_verdict(tx: Tx, agent: AgentRecord, entry: AuditEntry) -> int | None:
    """Write ``agent`` (its row after a verdict, at the session's epoch) and ``entry`` (the
    verdict's audit row): the audit row's id; None, with the verdict audited as refused
    ``superseded``, when a newer admission holds the agent's row."""
    if tx.write_agent(agent):
        return tx.append_audit(entry)
    tx.append_audit(replace(entry, verdict="refused", reason="superseded"))
    return None

"""Registration rules, pure: who may hold an app name, and the TTL's states.

* An app name belongs to the repo that first registered it; another repo claiming it is refused
  (``app_name_taken``). The same repo may register any release tag: the latest successful
  registration takes over (upgrades and deliberate rollbacks alike — each tag still has to pass
  its own allowlist).
* An app stays on its network while its registration lives: moving a sealed app to an open
  network would let unsealed nodes serve it (``network_mismatch``). Once expired, it may move.
* A successful register handshake sets ``expires_at = now + TTL``; periodic re-attestation does
  not extend it. ``warning`` is the last ``warn`` seconds before expiry (still served);
  ``expired`` is never served until the agent registers again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from eecp.core.errors import RegistrationError
from eecp.store.records import AppRecord
from eecp.wire.protocol import Register

RegistrationState = Literal["active", "warning", "expired"]


def registration_state(expires_at: float, now: float, warn_sec: float) -> RegistrationState:
    """The state of a registration expiring at ``expires_at``, seen at ``now``."""
    if now >= expires_at:
        return "expired"
    if now >= expires_at - warn_sec:
        return "warning"
    return "active"


def check_claim(existing: AppRecord | None, register: Register, now: float) -> None:
    """Raise ``RegistrationError`` unless ``register`` may serve its app name."""
    if existing is None:
        return
    if existing.repo != register.repo:
        raise RegistrationError("app_name_taken",
                                f"{register.app_name} belongs to another repository")
    if existing.network != register.network and now < existing.expires_at:
        raise RegistrationError("network_mismatch",
                                f"{register.app_name} is registered on {existing.network}")


def renew(existing: AppRecord | None, register: Register, now: float, ttl_sec: float
          ) -> AppRecord:
    """The app record after a successful register handshake (claim already checked)."""
    if existing is None:
        return AppRecord(name=register.app_name, repo=register.repo,
                         release_tag=register.release_tag, network=register.network,
                         registered_at=now, expires_at=now + ttl_sec, last_attested_at=now,
                         last_verdict="accepted", last_reason="attested")
    return replace(existing, release_tag=register.release_tag, network=register.network,
                   registered_at=now, expires_at=now + ttl_sec, last_attested_at=now,
                   last_verdict="accepted", last_reason="attested")

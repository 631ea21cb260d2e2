"""The attestation engine: the thin async shell around the pure policy.

One call, :meth:`AttestationEngine.attest`, takes what an agent answered to a challenge and
returns an :class:`Outcome`: it fetches the collateral (PCCS, cached), verifies the quote in a
worker thread at the injected clock's time, fetches the allowlist (GitHub or a local dir; only
for a quote that verified, and GitHub's fetches limited per platform: the PPID of the verified
PCK leaf, on the outcome as ``platform_id``), then applies :mod:`eecp.attestation.policy`. It
never raises for a bad quote: every refusal is an outcome with a reason, ready for the audit log.

With the ledger on, the platform of a quote that verified is asked about right away, before
anything is fetched for it: a platform of a banned node is refused ``platform_banned`` (spec
§7.1; a banned provider cannot come back under another node id on the same hardware). The
question is a callable the wiring passes (:attr:`AttestationEngine.platform_banned`), since the
ledger is not this layer's to import; a store that cannot answer it raises ``StoreError``,
which the session turns into "try again later", as for any store failure on a verdict.

Two refusals that dcap-qvl itself reports come from a genuine platform all the same, and name
it on the outcome (:data:`CHAIN_REFUSALS`): ``debug_td`` is its last check, after every
signature; ``pck_revoked`` means the PCK chain is Intel's and its leaf revoked (checked before
the quote's signature, so the PPID is the revoked certificate's). The ledger takes both as
fraud signals (spec §10.4), which only suspend a node until its owner decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from eecp.attestation import policy
from eecp.attestation.allowlist import AllowlistSource
from eecp.attestation.allowlist_doc import Allowlist
from eecp.attestation.collateral import CollateralCache
from eecp.attestation.quotes import (
    QuoteFacts,
    VerifiedQuote,
    check_pck_chain,
    parse_quote,
    platform_id,
    verify_quote,
)
from eecp.core.blocking import Workers, run_blocking
from eecp.core.clock import Clock
from eecp.core.config import Network
from eecp.core.errors import AttestationError, PolicyError
from eecp.store.records import AuditEntry
from eecp.wire.measurements import Measurements, measurements_from_json

#: refusals of dcap-qvl that still name the quote's platform (see the module docstring)
CHAIN_REFUSALS: Final = frozenset({"debug_td", "pck_revoked"})

log = logging.getLogger("eecp.attestation")


@dataclass(frozen=True)
class Challenge:
    """What eecp asked and what the agent answered, decoded from the wire."""

    repo: str
    release_tag: str
    network: str
    nonce: bytes
    quote: bytes
    claimed_report_data: bytes
    measurements: Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    """The result of one attestation, accepted or refused, with what the quote showed."""

    verdict: policy.Verdict
    at: float
    facts: QuoteFacts | None = None
    #: the quote as verified; None when it did not verify
    verified: VerifiedQuote | None = None
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    measurements: Measurements | None = None
    duration_sec: float = 0.0
    #: the platform of a quote refused for one of :data:`CHAIN_REFUSALS`
    chain_platform_id: str | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict.accepted

    @property
    def reason(self) -> str:
        return self.verdict.reason

    @property
    def platform_id(self) -> str | None:
        """The platform (PPID) of a quote that verified, or of one refused for one of
        :data:`CHAIN_REFUSALS`; None otherwise."""
        return self.verified.platform_id if self.verified else self.chain_platform_id

    def audit_entry(self, *, challenge: Challenge, app_name: str, agent_id: str, trigger: str
                    ) -> AuditEntry:
        """The audit-log row for this outcome."""
        facts = self.facts
        return AuditEntry(
            at=self.at,
            app_name=app_name,
            agent_id=agent_id,
            repo=challenge.repo,
            release_tag=challenge.release_tag,
            network=challenge.network,
            trigger=trigger,
            verdict="accepted" if self.accepted else "refused",
            reason=self.reason,
            tcb_status=self.tcb_status,
            advisory_ids=self.advisory_ids,
            fmspc=facts.fmspc if facts else None,
            mrtd=facts.mrtd.hex() if facts and facts.mrtd else None,
            rtmrs=tuple(r.hex() for r in facts.rtmrs) if facts else (),
            sealed=self.measurements.sealed if self.measurements else None,
            platform_id=self.platform_id,
        )


class AttestationEngine:
    """Verifies challenges against allowlists and collateral. One per process."""

    def __init__(
        self,
        *,
        collateral: CollateralCache,
        allowlists: AllowlistSource,
        workers: Workers,
        clock: Clock,
        networks: Collection[Network],
        allowed_statuses: Collection[str],
        root_ca_der: bytes | None,
        platform_banned: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._collateral = collateral
        self._allowlists = allowlists
        self._workers = workers
        self._clock = clock
        self._networks = {n.name: n for n in networks}
        self._allowed = frozenset(allowed_statuses)
        self._root = root_ca_der
        self._known_cas: set[bytes] = set()  # see check_pck_chain
        #: whether a platform (its PPID) is a banned node's; None: the ledger is off
        self.platform_banned = platform_banned

    async def attest(self, challenge: Challenge) -> Outcome:
        """Judge ``challenge``; refusals come back as outcomes, never as exceptions."""
        started = time.perf_counter()
        state: dict[str, Any] = {}
        try:
            await self._attest(challenge, state)
            verdict = policy.Verdict.accept()
        except AttestationError as exc:
            verdict = policy.Verdict.refuse(exc)
        verified: VerifiedQuote | None = state.get("verified")
        facts: QuoteFacts | None = state.get("facts")
        chain_platform = None
        if verified is None and facts is not None and verdict.reason in CHAIN_REFUSALS:
            chain_platform = await run_blocking(self._workers.verify, platform_id,
                                                facts.pck_chain, facts.fmspc)
        outcome = Outcome(
            verdict=verdict,
            at=self._clock.now(),
            facts=verified.facts if verified else state.get("facts"),
            verified=verified,
            tcb_status=verified.tcb_status if verified else None,
            advisory_ids=verified.advisory_ids if verified else (),
            measurements=state.get("measurements"),
            duration_sec=time.perf_counter() - started,
            chain_platform_id=chain_platform,
        )
        log.info("attestation %s repo=%s tag=%s network=%s reason=%s tcb=%s",
                 "accepted" if outcome.accepted else "refused", challenge.repo,
                 challenge.release_tag, challenge.network, outcome.reason, outcome.tcb_status)
        return outcome

    async def _attest(self, challenge: Challenge, state: dict[str, Any]) -> None:
        network = self._networks.get(challenge.network)
        if network is None:
            raise PolicyError("network_unknown", f"network {challenge.network!r} is not served")
        # parsing is 0.3 ms of CPU: off the event loop, like the verification
        facts = await run_blocking(self._workers.verify, parse_quote, challenge.quote)
        state["facts"] = facts
        state["measurements"] = measurements = measurements_from_json(challenge.measurements)
        tee: Literal["tdx", "sgx"] = "tdx" if facts.tee_type == "TDX" else "sgx"
        # the FMSPC is read from the PCK leaf: only a chain issued under the root may make eecp
        # ask the PCCS for a new one, or any peer could have us fetch collateral for names it
        # makes up (for a platform already held, dcap-qvl's verification checks the chain)
        if not self._collateral.holds(facts.fmspc, facts.ca, tee):
            await run_blocking(self._workers.verify, check_pck_chain, facts.pck_chain,
                               self._root, self._known_cas, facts.fmspc)
        parts = await self._collateral.get(facts.fmspc, facts.ca, tee)
        now = self._clock.now()
        state["verified"] = verified = await run_blocking(
            self._workers.verify, verify_quote, challenge.quote, parts.to_dcap(), now, self._root,
            facts)
        if (self.platform_banned is not None and verified.platform_id is not None
                and await self.platform_banned(verified.platform_id)):
            raise PolicyError("platform_banned", "the platform belongs to a banned node")
        # only a quote that verified makes eecp ask GitHub: the repo and tag are the agent's
        # word, and any peer could otherwise spend the operator's API quota on names it picks;
        # and one genuine TD may still name any number, so its fetches count per platform
        allowlist: Allowlist = await self._allowlists.get(
            # a verified quote whose platform cannot be named shares one share of the limit
            challenge.repo, challenge.release_tag, platform=verified.platform_id or "unknown")
        policy.check(
            policy.Evidence(verified, challenge.claimed_report_data, measurements),
            nonce=challenge.nonce,
            allowlist=allowlist,
            sealed_network=network.sealed,
            allowed_statuses=self._allowed,
        )

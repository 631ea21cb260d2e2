"""Attestation policy: pure decisions over a verified quote, no I/O, no clock.

:func:`check` raises the first refusal as an :class:`~eecp.core.errors.AttestationError` with
a stable reason; :func:`decide` wraps it into a :class:`Verdict`. The order of checks is fixed, so a
quote that is wrong in several ways always gets the same reason:

1. ``tcb_status:<S>`` — the TCB status is not among the allowed ones;
2. ``debug_td`` — the TD attributes' DEBUG bit is set;
3. ``report_data_mismatch`` — the agent's claimed report_data is not the quote's;
4. ``nonce_mismatch`` — report_data[32:64] is not this challenge's nonce (freshness);
5. ``measurements_binding_mismatch`` — report_data[0:32] is not SHA-256 of the measurement
   material, so the reported measurements are not the ones the TD quoted;
6. ``measurement_mismatch:<key>`` — a code measurement differs from the allowlist;
7. ``quote_measurement_mismatch:<mrtd|rtmrN>`` — a register read from the quote differs;
8. ``sealed_required`` — an unsealed node on a sealed network;
9. ``allowlist_report_data_mismatch`` — the allowlist pins report_data[0:32] and it differs.

``sealed`` is a deployment mode, not code identity: it is judged by the network (8), not by the
allowlist's ``measurements`` (6), so one release can serve sealed and open networks. The
allowlist's pinned report_data (9) covers the material *with* its own ``sealed`` value, so it is
compared when the node's mode is the allowlist's; otherwise (5)+(6) already bind the code.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from dataclasses import dataclass

from eecp.attestation.allowlist_doc import Allowlist
from eecp.attestation.quotes import VerifiedQuote
from eecp.core.errors import AttestationError, PolicyError, QuoteError
from eecp.wire.measurements import CODE_KEYS, Measurements

NONCE_BYTES = 32
REPORT_DATA_BYTES = 64


@dataclass(frozen=True)
class Evidence:
    """Everything the agent sent in answer to one challenge, already decoded."""

    quote: VerifiedQuote
    claimed_report_data: bytes
    measurements: Measurements


@dataclass(frozen=True)
class Verdict:
    """The outcome of one attestation: ``reason`` is ``attested`` when accepted."""

    accepted: bool
    reason: str
    detail: str = ""

    @classmethod
    def accept(cls) -> Verdict:
        return cls(True, "attested")

    @classmethod
    def refuse(cls, error: AttestationError) -> Verdict:
        return cls(False, error.reason, error.detail)


def check(
    evidence: Evidence,
    *,
    nonce: bytes,
    allowlist: Allowlist,
    sealed_network: bool,
    allowed_statuses: Collection[str],
) -> None:
    """Raise the first refusal for ``evidence`` (see the module docstring for the order)."""
    check_tcb(evidence.quote, allowed_statuses)
    facts = evidence.quote.facts
    if facts.debug:
        raise QuoteError("debug_td", "TD attributes have the DEBUG bit set")
    quoted = facts.report_data
    if len(quoted) != REPORT_DATA_BYTES or not hmac.compare_digest(
        quoted, evidence.claimed_report_data
    ):
        raise PolicyError("report_data_mismatch", "claimed report_data is not the quote's")
    check_nonce(quoted, nonce)
    m = evidence.measurements
    if not hmac.compare_digest(quoted[:32], m.digest()):
        raise PolicyError("measurements_binding_mismatch",
                          "report_data[0:32] is not sha256 of the measurement material")
    check_measurements(m, allowlist)
    check_quote_measurements(evidence.quote, allowlist)
    if sealed_network and not m.sealed:
        raise PolicyError("sealed_required", "this network admits sealed nodes only")
    expected = allowlist.report_data
    if expected is not None and m.sealed == allowlist.sealed and not hmac.compare_digest(
        expected[:32], quoted[:32]
    ):
        raise PolicyError("allowlist_report_data_mismatch",
                          "report_data[0:32] differs from the allowlist's")


def decide(evidence: Evidence, *, nonce: bytes, allowlist: Allowlist, sealed_network: bool,
           allowed_statuses: Collection[str]) -> Verdict:
    """:func:`check` as a value: accepted, or refused with the first reason."""
    try:
        check(evidence, nonce=nonce, allowlist=allowlist, sealed_network=sealed_network,
              allowed_statuses=allowed_statuses)
    except AttestationError as exc:
        return Verdict.refuse(exc)
    return Verdict.accept()


def check_tcb(quote: VerifiedQuote, allowed_statuses: Collection[str]) -> None:
    """``tcb_status:<S>`` unless the quote's TCB status is allowed."""
    if quote.tcb_status not in allowed_statuses:
        advisories = ",".join(quote.advisory_ids)
        raise QuoteError(f"tcb_status:{quote.tcb_status}",
                         f"advisories {advisories}" if advisories else "")


def check_nonce(report_data: bytes, nonce: bytes) -> None:
    """``nonce_mismatch`` unless report_data[32:64] is exactly the 32-byte challenge nonce."""
    if len(nonce) != NONCE_BYTES or not hmac.compare_digest(report_data[32:64], nonce):
        raise PolicyError("nonce_mismatch", "report_data[32:64] is not the challenge nonce")


def check_measurements(measurements: Measurements, allowlist: Allowlist) -> None:
    """``measurement_mismatch:<key>`` for the first code measurement that differs."""
    for key in CODE_KEYS:
        if measurements.get(key) != allowlist.measurements.get(key):
            raise PolicyError(f"measurement_mismatch:{key}", f"{key} is not the allowlist's")


def check_quote_measurements(quote: VerifiedQuote, allowlist: Allowlist) -> None:
    """``quote_measurement_mismatch:<register>`` for MRTD (when pinned) and RTMR0-3, read from
    the verified quote."""
    facts = quote.facts
    if facts.tee_type != "TDX" or facts.mrtd is None or len(facts.rtmrs) != 4:
        raise QuoteError("tee_type_unsupported", f"{facts.tee_type} quotes cannot run agents")
    if allowlist.mrtd is not None and not hmac.compare_digest(facts.mrtd, allowlist.mrtd):
        raise PolicyError("quote_measurement_mismatch:mrtd", "MRTD is not the allowlist's")
    for index, (actual, expected) in enumerate(zip(facts.rtmrs, allowlist.rtmrs, strict=True)):
        if not hmac.compare_digest(actual, expected):
            raise PolicyError(f"quote_measurement_mismatch:rtmr{index}",
                              f"RTMR{index} is not the allowlist's")

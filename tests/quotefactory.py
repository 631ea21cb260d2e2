"""The test-suite's quote scenarios: quotes that verify one way or fail one way, minted under a
development PKI by :mod:`eecp.dev.mint` (the PKI itself is :mod:`eecp.dev.pki`).

The package holds what also runs outside the tests (the agent's ``dev`` quote provider,
``eecp demo``, the dev PCCS); the named failures only tests need live here.
"""

from __future__ import annotations

from typing import Any

from eecp.dev.mint import (
    DEBUG_BIT,
    DEFAULT_TD_ATTRIBUTES,
    OUTDATED_PCESVN,
    MintedQuote,
    mint_tdx_quote,
)
from eecp.dev.pccs import pccs_answer
from eecp.dev.pki import DevPki


def mint_uptodate(pki: DevPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """Verifies as ``UpToDate`` at ``minted.now_secs``."""
    return mint_tdx_quote(pki, now=now, **kwargs)


def mint_outofdate(pki: DevPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """Verifies as ``OutOfDate`` with advisory ``OUTDATED_ADVISORY``."""
    return mint_tdx_quote(pki, now=now, pcesvn=OUTDATED_PCESVN, **kwargs)


def mint_revoked_pck(pki: DevPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """PCK leaf serial is in the PCK CRL: verification fails with ``CertRevoked``."""
    return mint_tdx_quote(pki, now=now, revoke_pck=True, **kwargs)


def mint_bad_signature(pki: DevPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """Quote signature byte flipped: fails with "ISV enclave report signature is invalid"."""
    return mint_tdx_quote(pki, now=now, corrupt_signature=True, **kwargs)


def mint_debug_td(pki: DevPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """TD DEBUG attribute set: fails with "Debug mode is enabled"."""
    return mint_tdx_quote(pki, now=now, td_attributes=DEFAULT_TD_ATTRIBUTES | DEBUG_BIT, **kwargs)


def pccs_tcb_info_body(minted: MintedQuote) -> bytes:
    """PCS/PCCS ``/tdx/certification/v4/tcb`` response body, keeping ``tcb_info`` byte-exact
    (as the dev PCCS serves it)."""
    return pccs_answer(minted.parts, minted.fmspc, "GET", "/tdx/certification/v4/tcb",
                       {"fmspc": minted.fmspc}).body


def pccs_qe_identity_body(minted: MintedQuote) -> bytes:
    """PCS/PCCS ``/tdx/certification/v4/qe/identity`` response body, byte-exact identity."""
    return pccs_answer(minted.parts, minted.fmspc, "GET", "/tdx/certification/v4/qe/identity",
                       {}).body

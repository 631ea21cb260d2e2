"""eecp.quotes on Intel-signed vectors (real root) and on failure classification."""

from __future__ import annotations

import json

import dcap_qvl
import pytest

from eecp.clock import parse_isoformat
from eecp.errors import CollateralError, QuoteError
from eecp.quotes import classify_failure, parse_quote, verify_quote
from eecp.verify_quote import decode_quote
from tests.vectors import vector

INSIDE_WINDOW = parse_isoformat("2025-06-25T00:00:00Z")


def load(quote: str, collateral: str) -> tuple[bytes, object]:
    raw = vector(quote).read_bytes()
    return raw, dcap_qvl.QuoteCollateralV3.from_json(vector(collateral).read_text())


def test_intel_tdx_vector_verifies_at_its_time() -> None:
    raw, collateral = load("dcap/tdx_quote", "dcap/tdx_quote_collateral.json")
    verified = verify_quote(raw, collateral, INSIDE_WINDOW, None)
    facts = verified.facts
    assert verified.tcb_status == "UpToDate" and verified.advisory_ids == ()
    assert (facts.tee_type, facts.version, facts.fmspc, facts.ca) == (
        "TDX", 4, "B0C06F000000", "platform")
    assert facts.mrtd is not None and facts.mrtd.hex().startswith("91eb2b44d141d4ec")
    assert facts.rtmrs[0].hex().startswith("44c0197b39157fdd") and facts.rtmrs[3] == bytes(48)
    assert facts.report_data.hex().startswith("9a9d48e7f6799642")
    assert not facts.debug


def test_intel_vector_collateral_expires() -> None:
    raw, collateral = load("dcap/tdx_quote", "dcap/tdx_quote_collateral.json")
    with pytest.raises(CollateralError) as info:
        verify_quote(raw, collateral, parse_isoformat("2025-09-01T00:00:00Z"), None)
    assert info.value.reason == "collateral_expired"


def test_intel_vector_is_refused_under_another_root() -> None:
    raw, collateral = load("dcap/tdx_quote", "dcap/tdx_quote_collateral.json")
    chain = json.loads(vector("dcap/tdx_quote_collateral.json").read_text())[
        "tcb_info_issuer_chain"]
    # The TCB signing cert is not a root of the PCK chain: verification must fail.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    other = x509.load_pem_x509_certificates(chain.encode())[0].public_bytes(Encoding.DER)
    with pytest.raises(QuoteError):
        verify_quote(raw, collateral, INSIDE_WINDOW, other)


def test_sgx_vector_facts() -> None:
    raw, collateral = load("acceptance/sgx_quote", "acceptance/sgx_quote_collateral.json")
    verified = verify_quote(raw, collateral, parse_isoformat("2025-06-20T00:00:00Z"), None)
    assert verified.facts.tee_type == "SGX" and verified.facts.mrtd is None
    assert verified.facts.mr_enclave is not None and len(verified.facts.mr_enclave) == 32
    assert verified.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert "INTEL-SA-00615" in verified.advisory_ids


def test_outdated_vector_has_no_matching_level() -> None:
    raw, collateral = load("acceptance/tdx_quote_outdated",
                           "acceptance/tdx_quote_outdated_collateral.json")
    with pytest.raises(QuoteError) as info:
        verify_quote(raw, collateral, parse_isoformat("2026-02-20T00:00:00Z"), None)
    assert info.value.reason == "tcb_level_unmatched"


def test_hex_quote_file_decodes() -> None:
    raw = decode_quote(vector("acceptance/quote-from-tappd.hex").read_bytes())
    assert parse_quote(raw).tee_type == "TDX"


@pytest.mark.parametrize("data", [b"", b"\x04\x00" * 10, b"x" * 70000])
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(QuoteError) as info:
        parse_quote(data)
    assert info.value.reason == "quote_malformed"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Verification failed: CrlExpired { .. }", "collateral_expired"),
        ("Verification failed: TCBInfo expired", "collateral_expired"),
        ("Failed to verify certificate chain Caused by: CertRevoked", "pck_revoked"),
        ("TCB status is invalid: Revoked", "tcb_status:Revoked"),
        ("Debug mode is enabled", "debug_td"),
        ("ISV enclave report signature is invalid", "quote_invalid"),
    ],
)
def test_failures_are_classified(message: str, reason: str) -> None:
    assert classify_failure(message).reason == reason

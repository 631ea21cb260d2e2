"""eecp.quotes on Intel-signed vectors (real root) and on failure classification."""

from __future__ import annotations

import json
import struct

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from eecp.attestation.quotes import (
    check_pck_chain,
    classify_failure,
    parse_quote,
    platform_id,
    verify_quote,
)
from eecp.attestation.verify_cli import decode_quote
from eecp.core.clock import parse_isoformat
from eecp.core.errors import CollateralError, QuoteError
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
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
    # the PPID of Intel's PCK leaf: 16 bytes, the platform's id for eecp's rate limits
    assert verified.platform_id is not None and len(verified.platform_id) == 32
    assert verified.platform_id == platform_id(facts.pck_chain, facts.fmspc)


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


# ---- the PCK chain, checked before any collateral is fetched for it ---------------------------

def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def chain_of(pki: devpki.DevPki, **kwargs: object) -> list[x509.Certificate]:
    minted = devmint.mint_tdx_quote(pki, now=1_790_000_000.0, **kwargs)  # type: ignore[arg-type]
    return x509.load_pem_x509_certificates(parse_quote(minted.quote).pck_chain.rstrip(b"\0"))


@pytest.mark.parametrize("name", ["dcap/tdx_quote", "acceptance/sgx_quote",
                                  "acceptance/tdx_quote_outdated"])
def test_intel_vectors_chain_to_intels_root(name: str) -> None:
    check_pck_chain(parse_quote(vector(name).read_bytes()).pck_chain, None)


def test_an_intel_chain_is_untrusted_without_its_root_or_under_another() -> None:
    chain = parse_quote(vector("dcap/tdx_quote").read_bytes()).pck_chain
    leaf, ca, _root = x509.load_pem_x509_certificates(chain.rstrip(b"\0"))
    with pytest.raises(QuoteError, match="carry Intel's root") as info:
        check_pck_chain(pem(leaf, ca), None)  # dcap-qvl would accept it; we need the anchor
    assert info.value.reason == "pck_chain_untrusted"
    with pytest.raises(QuoteError, match="does not chain"):
        check_pck_chain(chain, devpki.make_pki(seed=5).root_der)


def test_minted_chains_under_the_configured_root() -> None:
    pki, foreign = devpki.make_pki(seed=7), devpki.make_pki(seed=8)
    check_pck_chain(pem(*chain_of(pki)), pki.root_der)
    check_pck_chain(pem(*chain_of(pki, include_root_in_chain=False)), pki.root_der)
    leaf, ca, root = chain_of(foreign)
    assert ca.subject == pki.pck_ca_cert.subject  # same names, other keys
    refused = {
        "another PKI": pem(leaf, ca, root),
        "another PKI with our CA and root appended": pem(leaf, ca, pki.pck_ca_cert,
                                                          pki.root_cert),
        "our CA, their leaf": pem(leaf, pki.pck_ca_cert, pki.root_cert),
        "the leaf alone": pem(chain_of(pki)[0]),
        "too many certificates": pem(*chain_of(pki), *[pki.pck_ca_cert] * 3),
        "not PEM": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "nothing": b"",
    }
    known: set[bytes] = set()
    check_pck_chain(pem(*chain_of(pki)), pki.root_der, known)
    assert len(known) == 2  # our PCK CA and root: not checked again for the next machine
    check_pck_chain(pem(*chain_of(pki)), pki.root_der, known)
    for what, chain in refused.items():
        for cache in (None, known):  # what is known never vouches for a leaf it did not sign
            with pytest.raises(QuoteError) as info:
                check_pck_chain(chain, pki.root_der, cache)
            assert info.value.reason == "pck_chain_untrusted", what


def test_the_leaf_checked_is_the_one_the_fmspc_comes_from() -> None:
    # dcap-qvl takes the leaf (and the FMSPC) from the first PEM block of any label, while
    # cryptography skips blocks of other labels: a made-up leaf hidden that way before a
    # genuine chain must not pass, or it could make eecp fetch collateral for its FMSPC
    pki, foreign = devpki.make_pki(seed=7), devpki.make_pki(seed=8)
    genuine = pem(*chain_of(pki))
    fake_leaf = pem(chain_of(foreign, fmspc="DEADBEEF0001")[0]).replace(b"CERTIFICATE", b"FOO")
    with pytest.raises(QuoteError, match="other kinds"):
        check_pck_chain(fake_leaf + genuine, pki.root_der)
    check_pck_chain(genuine, pki.root_der, fmspc=devmint.DEFAULT_FMSPC)
    with pytest.raises(QuoteError, match="not the PCK leaf's") as info:
        check_pck_chain(genuine, pki.root_der, fmspc="DEADBEEF0001")
    assert info.value.reason == "pck_chain_untrusted"


def with_a_der_leaf(quote: bytes) -> bytes:
    """``quote`` (a minted TDX v4 one) with its PEM chain (certification data type 5) replaced
    by the PCK leaf alone in DER (type 4), the sizes around it adjusted."""
    (size,) = struct.unpack_from("<I", quote, 1254)  # type 5 at 1252, its size, then the PEM
    chain = x509.load_pem_x509_certificates(quote[1258:1258 + size].rstrip(b"\0"))
    der = chain[0].public_bytes(Encoding.DER)
    out = bytearray(quote[:1252]) + struct.pack("<HI", 4, len(der)) + der
    for offset in (632, 766):  # the signature data's size, the type-6 data's size
        (value,) = struct.unpack_from("<I", out, offset)
        struct.pack_into("<I", out, offset, value + len(der) - size)
    return bytes(out)


def test_a_quote_without_a_pem_chain_parses_with_an_empty_one() -> None:
    # dcap-qvl reads the FMSPC from a DER leaf but has no PEM chain to give (None): that was a
    # TypeError out of the engine; now the (empty) chain is refused by the chain check
    minted = devmint.mint_tdx_quote(devpki.make_pki(seed=7), now=1_790_000_000.0)
    raw = with_a_der_leaf(minted.quote)
    facts = parse_quote(raw)
    assert (facts.fmspc, facts.pck_chain) == (devmint.DEFAULT_FMSPC.upper(), b"")
    with pytest.raises(QuoteError) as info:
        check_pck_chain(facts.pck_chain, None)
    assert info.value.reason == "pck_chain_untrusted"


def test_the_platform_id_is_the_pck_leafs_ppid_else_a_digest_of_its_key() -> None:
    pki = devpki.make_pki(seed=7)
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def platform(**kwargs: object) -> str | None:
        facts = parse_quote(devmint.mint_tdx_quote(pki, now=1_790_000_000.0, **kwargs).quote)
        return platform_id(facts.pck_chain, facts.fmspc)

    ppid = bytes(range(1, 17))
    assert platform(pck_key=key, ppid=ppid) == ppid.hex()
    assert platform(pck_key=key) == platform(pck_key=key) != platform(pck_key=other)
    no_ppid = platform(pck_key=key, ppid=bytes(16))  # a leaf naming no PPID
    assert no_ppid is not None and no_ppid.startswith("pck-") and len(no_ppid) == 36
    assert no_ppid == platform(pck_key=key, ppid=bytes(16))
    assert no_ppid != platform(pck_key=other, ppid=bytes(16))
    assert no_ppid != platform(pck_key=key, ppid=bytes(16), fmspc="00906ED50001")
    assert platform_id(b"", devmint.DEFAULT_FMSPC) is None  # no PEM chain, no platform


@pytest.mark.parametrize("prefix", [b"-----END CERTIFICATE-----\n",
                                    b"junk -----END CERTIFICATE-----\n",
                                    b"-----BEGIN X-----\nAAAA\n-----END X-----\n"])
def test_stray_pem_markers_before_the_chain_do_not_hide_the_platform(prefix: bytes) -> None:
    # the certification data lies outside what the quote's signature covers: bytes a TD puts
    # in front of its genuine chain (which dcap-qvl and the chain check still accept) must not
    # make its platform unknown, and so free of its share of the GitHub fetch limit
    pki = devpki.make_pki(seed=7)
    facts = parse_quote(devmint.mint_tdx_quote(pki, now=1_790_000_000.0,
                                          pck_key=ec.generate_private_key(ec.SECP256R1())).quote)
    plain = platform_id(facts.pck_chain, facts.fmspc)
    assert plain is not None
    assert platform_id(prefix + facts.pck_chain, facts.fmspc) == plain

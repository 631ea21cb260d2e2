"""The dev PKI's quotes and collateral (``eecp.dev.mint``) and the test scenarios
(``tests.quotefactory``), proven against the real ``dcap_qvl`` verifier (no mocks)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from tests import quotefactory as qf

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=7)


@pytest.fixture(scope="session")
def other_pki() -> devpki.DevPki:
    return devpki.make_pki(seed=8)


def verify(minted: devmint.MintedQuote, pki: devpki.DevPki, at: int | None = None) -> Any:
    """Run the real verifier against the test root."""
    when = minted.now_secs if at is None else at
    return dcap_qvl.verify_with_root_ca(minted.quote, minted.collateral, pki.root_der, when)


def test_default_quote_is_uptodate(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    report = dcap_qvl.verify_with_root_ca(minted.quote, minted.collateral, pki.root_der, int(NOW))
    assert report.status == "UpToDate"
    assert report.advisory_ids == []


def test_strict_policy_accepts_default(pki: devpki.DevPki) -> None:
    minted = qf.mint_uptodate(pki, now=NOW)
    verifier = dcap_qvl.QuoteVerifier(pki.root_der)
    claims = verifier.verify_with_policy(
        minted.quote, minted.collateral, minted.now_secs, dcap_qvl.QuotePolicy.strict(int(NOW))
    )
    assert json.loads(claims.to_json())["tcb"]["status"] == "UpToDate"


def test_outofdate_carries_advisory(pki: devpki.DevPki) -> None:
    minted = qf.mint_outofdate(pki, now=NOW)
    assert minted.pcesvn == devmint.OUTDATED_PCESVN < devmint.UPTODATE_PCESVN
    report = verify(minted, pki)
    assert report.status == "OutOfDate"
    assert report.advisory_ids == [devmint.OUTDATED_ADVISORY]


def test_outdated_tdx_module_is_outofdate(pki: devpki.DevPki) -> None:
    svn = bytes([devmint.TDX_MODULE_OUTDATED_ISVSVN]) + devmint.DEFAULT_TEE_TCB_SVN[1:]
    report = verify(devmint.mint_tdx_quote(pki, now=NOW, tee_tcb_svn=svn), pki)
    assert report.status == "OutOfDate"
    assert report.advisory_ids == [devmint.OUTDATED_MODULE_ADVISORY]


def test_revoked_tcb_level_fails(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW, pcesvn=devmint.REVOKED_PCESVN)
    with pytest.raises(ValueError, match="Revoked"):
        verify(minted, pki)


def test_revoked_pck_fails(pki: devpki.DevPki) -> None:
    minted = qf.mint_revoked_pck(pki, now=NOW)
    crl = x509.load_der_x509_crl(minted.parts.pck_crl)
    assert crl.get_revoked_certificate_by_serial_number(minted.pck_leaf_serial) is not None
    with pytest.raises(ValueError, match="CertRevoked"):
        verify(minted, pki)


def test_unrevoked_pck_crl_is_empty(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    crl = x509.load_der_x509_crl(minted.parts.pck_crl)
    assert len(list(crl)) == 0
    assert crl.issuer == x509.load_pem_x509_certificate(minted.pck_leaf_pem).issuer


def test_expired_collateral_fails(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW, collateral_days=10)
    assert minted.expired_secs == int(NOW + 11 * 86400)
    assert verify(minted, pki, at=int(NOW + 9 * 86400)).status == "UpToDate"
    with pytest.raises(ValueError, match="CrlExpired"):
        verify(minted, pki, at=minted.expired_secs)


def test_collateral_not_yet_issued_fails(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    with pytest.raises(ValueError, match="issue date is in the future"):
        verify(minted, pki, at=int(NOW - 2 * 86400))


def test_bad_signature_fails(pki: devpki.DevPki) -> None:
    minted = qf.mint_bad_signature(pki, now=NOW)
    with pytest.raises(ValueError, match="signature is invalid"):
        verify(minted, pki)


def test_tampered_report_data_fails(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    tampered = bytearray(minted.quote)
    tampered[568] ^= 0xFF  # first report_data byte
    with pytest.raises(ValueError, match="signature is invalid"):
        dcap_qvl.verify_with_root_ca(bytes(tampered), minted.collateral, pki.root_der, int(NOW))


def test_debug_td_fails(pki: devpki.DevPki) -> None:
    minted = qf.mint_debug_td(pki, now=NOW)
    assert minted.td_attributes & devmint.DEBUG_BIT
    with pytest.raises(ValueError, match="Debug"):
        verify(minted, pki)


def test_sept_ve_disable_is_required(pki: devpki.DevPki) -> None:
    with pytest.raises(ValueError, match="SEPT_VE_DISABLE"):
        verify(devmint.mint_tdx_quote(pki, now=NOW, td_attributes=0), pki)


def test_chosen_measurements_are_read_back(pki: devpki.DevPki) -> None:
    report_data = hashlib.sha512(b"nonce").digest()
    mrtd = bytes(range(48))
    rtmrs = (b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, b"\x04" * 48)
    minted = devmint.mint_tdx_quote(pki, now=NOW, report_data=report_data, mrtd=mrtd, rtmrs=rtmrs)
    assert verify(minted, pki).status == "UpToDate"
    parsed = dcap_qvl.parse_quote(minted.quote)
    report = parsed.report
    assert report.report_data == report_data
    assert report.mr_td == mrtd
    assert [report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3] == list(rtmrs)
    assert struct.unpack("<Q", report.td_attributes)[0] == devmint.SEPT_VE_DISABLE_BIT
    assert (minted.report_data, minted.mrtd, minted.rtmrs) == (report_data, mrtd, rtmrs)


def test_quote_metadata(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW, fmspc="b0c06f000000")
    parsed = dcap_qvl.parse_quote(minted.quote)
    assert parsed.is_tdx()
    assert parsed.ca() == "platform"
    assert parsed.fmspc() == "B0C06F000000" == minted.fmspc
    assert parsed.header.version == 4
    assert parsed.header.attestation_key_type == 2
    assert parsed.header.tee_type == 0x81
    assert parsed.header.qe_vendor_id == devmint.QE_VENDOR_ID
    ext = parsed.pck_extension()
    assert ext.pce_svn == devmint.UPTODATE_PCESVN
    assert ext.cpu_svn == devmint.DEFAULT_CPUSVN
    assert verify(minted, pki).status == "UpToDate"


def test_sgx_extension_is_non_critical(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    leaf = x509.load_pem_x509_certificate(minted.pck_leaf_pem)
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(devpki.SGX_EXTENSION_OID))
    assert ext.critical is False
    assert leaf.serial_number == minted.pck_leaf_serial


def test_collateral_json_round_trips(pki: devpki.DevPki) -> None:
    minted = qf.mint_outofdate(pki, now=NOW)
    fields = json.loads(minted.collateral_json)
    assert set(fields) == {
        "pck_crl_issuer_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info_issuer_chain",
        "tcb_info",
        "tcb_info_signature",
        "qe_identity_issuer_chain",
        "qe_identity",
        "qe_identity_signature",
        # eecp's own collateral document (CollateralParts.to_json), which dcap-qvl reads too
        "next_update",
        "fetched_at",
    }
    assert fields["next_update"] == minted.parts.next_update == int(minted.expires_at)
    assert fields["fetched_at"] == NOW
    assert bytes.fromhex(fields["pck_crl"]) == minted.parts.pck_crl
    assert json.loads(fields["tcb_info"])["id"] == "TDX"
    assert json.loads(fields["qe_identity"])["id"] == "TD_QE"
    collateral = dcap_qvl.QuoteCollateralV3.from_json(minted.collateral_json)
    report = dcap_qvl.verify_with_root_ca(minted.quote, collateral, pki.root_der, int(NOW))
    assert report.status == "OutOfDate"
    assert report.advisory_ids == [devmint.OUTDATED_ADVISORY]


def test_collateral_windows(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW, collateral_days=30)
    tcb_info = json.loads(minted.collateral.tcb_info)
    assert tcb_info["issueDate"] == devmint.rfc3339(NOW - 86400) == "2025-06-14T15:06:40Z"
    assert tcb_info["nextUpdate"] == devmint.rfc3339(NOW + 30 * 86400)
    assert minted.collateral.tcb_info == devmint.compact_json(tcb_info)
    crl = x509.load_der_x509_crl(minted.parts.root_ca_crl)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc.timestamp() == NOW + 30 * 86400


def test_other_pki_root_rejects(pki: devpki.DevPki, other_pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    with pytest.raises(ValueError, match="root CA CRL"):
        verify(minted, other_pki)
    # Collateral from the other PKI does not help: the quote's PCK chain is foreign. (Both PKIs
    # use the same DNs, so webpki finds a same-named issuer and the signature check fails.)
    foreign = devmint.mint_tdx_quote(other_pki, now=NOW)
    with pytest.raises(ValueError, match="Failed to verify certificate chain"):
        dcap_qvl.verify_with_root_ca(minted.quote, foreign.collateral, other_pki.root_der, int(NOW))


def test_production_root_rejects(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    with pytest.raises(ValueError, match="Verification failed"):
        dcap_qvl.verify(minted.quote, minted.collateral, int(NOW))


def test_seeded_pki_is_deterministic() -> None:
    a, b = devpki.make_pki(seed=42), devpki.make_pki(seed=42)
    assert a.root_cert.public_key() == b.root_cert.public_key()
    assert a.root_cert.serial_number == b.root_cert.serial_number
    assert a.root_cert.public_key() != devpki.make_pki(seed=43).root_cert.public_key()
    assert a.root_cert.public_key() != devpki.make_pki().root_cert.public_key()


def test_write_root(tmp_path: Path, pki: devpki.DevPki) -> None:
    pem_path = pki.write_root(tmp_path / "root.pem")
    der_path = pki.write_root(tmp_path / "root.der", der=True)
    assert pem_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    loaded = x509.load_pem_x509_certificate(pem_path.read_bytes())
    assert loaded.public_bytes(serialization.Encoding.DER) == pki.root_der
    assert der_path.read_bytes() == pki.root_der


def test_pccs_bodies_keep_signed_bytes(pki: devpki.DevPki) -> None:
    minted = devmint.mint_tdx_quote(pki, now=NOW)
    tcb = json.loads(qf.pccs_tcb_info_body(minted))
    assert devmint.compact_json(tcb["tcbInfo"]) == minted.collateral.tcb_info
    assert bytes.fromhex(tcb["signature"]) == minted.collateral.tcb_info_signature
    qe = json.loads(qf.pccs_qe_identity_body(minted))
    assert devmint.compact_json(qe["enclaveIdentity"]) == minted.collateral.qe_identity
    assert bytes.fromhex(qe["signature"]) == minted.collateral.qe_identity_signature


def test_wrong_input_sizes_rejected(pki: devpki.DevPki) -> None:
    with pytest.raises(ValueError, match="report_data must be 64 bytes"):
        devmint.mint_tdx_quote(pki, now=NOW, report_data=b"short")
    with pytest.raises(ValueError, match="mrtd must be 48 bytes"):
        devmint.mint_tdx_quote(pki, now=NOW, mrtd=bytes(32))

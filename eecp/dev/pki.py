"""A development PKI: mint Intel TDX DCAP quotes and matching collateral without Intel.

**Development and tests only.** Nothing minted here is trusted by Intel's production root
(``dcap_qvl.verify`` rejects all of it); it is accepted by the *unmodified* ``dcap_qvl``
verifier only when that is handed this PKI's root —
``dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_der, int(now))`` — which is what
eecp does when ``EE_DCAP_ROOT_CA`` points at the ``root.pem`` written by :func:`save_pki`.
The agent's ``dev`` quote provider and the test-suite both mint through this module.

Layout, encodings and the PKI profile (see ``shared/notes/dcap-test-pki-facts.md``):

* TDX **v4** quote, attestation key type 2 (ECDSA P-256), TEE type 0x81;
* quote signature (attestation key) and QE report signature (PCK leaf) are raw ``r||s``;
* QE report data = ``sha256(attest_pubkey || qe_auth_data)`` padded to 64 bytes;
* certification data type 6 wrapping type 5 (PEM chain, leaf first);
* TCB Info (``TDX`` v3) and QE Identity (``TD_QE`` v2) signed as served (compact JSON);
* CRLs are DER, v2, with CRLNumber + AKI extensions.

Typical use::

    pki = make_pki(seed=1)                  # or ensure_pki(Path("data/dev-pki"))
    minted = mint_tdx_quote(pki, now=NOW, report_data=nonce_hash)
    report = dcap_qvl.verify_with_root_ca(minted.quote, minted.collateral, pki.root_der,
                                          minted.now_secs)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

# --------------------------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------------------------

DEBUG_BIT = 1 << 0
"""TD attribute bit 0: DEBUG. The verifier rejects quotes with it set ("Debug mode")."""
SEPT_VE_DISABLE_BIT = 1 << 28
"""TD attribute bit 28: SEPT_VE_DISABLE. The verifier requires it set."""
DEFAULT_TD_ATTRIBUTES = SEPT_VE_DISABLE_BIT

UPTODATE_PCESVN = 13
"""PCESVN of the UpToDate TCB level (the default PCK pcesvn)."""
OUTDATED_PCESVN = 11
"""PCESVN of the OutOfDate TCB level (advisory ``OUTDATED_ADVISORY``)."""
REVOKED_PCESVN = 5
"""PCESVN of a TCB level whose status is Revoked (verification always fails)."""
OUTDATED_ADVISORY = "TEST-SA-00001"
REVOKED_ADVISORY = "TEST-SA-00002"
OUTDATED_MODULE_ADVISORY = "TEST-SA-00003"

DEFAULT_FMSPC = "00906ED50000"
QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TDX_TEE_TYPE = 0x81
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
QUOTE_VERSION = 4

DEFAULT_CPUSVN = bytes([3, 3, 2, 2, 4, 1, 0, 5] + [0] * 8)
"""CPUSVN in the PCK leaf; equals the sgxtcbcomponents of every TCB level."""
TDX_MODULE_ISVSVN = 6
TDX_MODULE_OUTDATED_ISVSVN = 3
TDX_MODULE_VERSION = 1
DEFAULT_TEE_TCB_SVN = bytes([TDX_MODULE_ISVSVN, TDX_MODULE_VERSION, 3] + [0] * 13)
"""tee_tcb_svn: [0] module ISVSVN, [1] module version (selects ``TDX_01``), [2..] components."""

QE_ISVSVN = 4
QE_ISVPRODID = 2
QE_MRSIGNER = hashlib.sha256(b"eecp test TD_QE signer").digest()
QE_MRENCLAVE = hashlib.sha256(b"eecp test TD_QE enclave").digest()
QE_ATTRIBUTES = bytes([0x11] + [0] * 15)
TDX_MODULE_MRSIGNER = bytes(48)
DEFAULT_XFAM = 0x0000_0000_0006_02E7
TCB_EVALUATION_DATA_NUMBER = 17

DEFAULT_MRTD = hashlib.sha384(b"eecp test mrtd").digest()
DEFAULT_RTMRS: tuple[bytes, bytes, bytes, bytes] = (
    hashlib.sha384(b"eecp test rtmr0").digest(),
    hashlib.sha384(b"eecp test rtmr1").digest(),
    hashlib.sha384(b"eecp test rtmr2").digest(),
    hashlib.sha384(b"eecp test rtmr3").digest(),
)

DAY = 86400.0
CERT_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
CERT_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

ROOT_CN = "Test SGX Root CA"
PCK_CA_CN = "Test SGX PCK Platform CA"
TCB_SIGNER_CN = "Test SGX TCB Signing"
PCK_LEAF_CN = "Test SGX PCK Certificate"

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

_CURVE = ec.SECP256R1()
_CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_QUOTE_SIGNED_LEN = 632  # 48-byte header + 584-byte TD report 1.0
_RAW_POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestPki:
    """A self-made Intel-like PKI: root CA, PCK Platform CA and TCB signing cert."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck_ca_cert: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    tcb_cert: x509.Certificate
    seed: int | None = None

    @property
    def root_der(self) -> bytes:
        """Root CA certificate, DER (what ``verify_with_root_ca`` takes)."""
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @property
    def root_pem(self) -> bytes:
        """Root CA certificate, PEM."""
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def pck_ca_pem(self) -> bytes:
        """PCK Platform CA certificate, PEM."""
        return self.pck_ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def tcb_pem(self) -> bytes:
        """TCB signing certificate, PEM."""
        return self.tcb_cert.public_bytes(serialization.Encoding.PEM)

    def write_root(self, path: str | Path, *, der: bool = False) -> Path:
        """Write the root CA to ``path`` (PEM unless ``der``) and return the path."""
        out = Path(path)
        out.write_bytes(self.root_der if der else self.root_pem)
        return out


def _key(seed: int | None, label: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key: random, or derived from ``seed`` and ``label`` when a seed is given."""
    if seed is None:
        return ec.generate_private_key(_CURVE)
    digest = hashlib.sha256(f"eecp-quotefactory:{seed}:{label}".encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_CURVE_ORDER - 1) + 1, _CURVE)


def _serial(seed: int | None, label: str) -> int:
    """A positive certificate serial number, deterministic when a seed is given."""
    if seed is None:
        return x509.random_serial_number()
    digest = hashlib.sha256(f"eecp-quotefactory-serial:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:19], "big") | 1


def _name(common_name: str) -> x509.Name:
    """An Intel-shaped distinguished name with the given CN."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EECP Test"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _ca_usage() -> x509.KeyUsage:
    """keyCertSign + cRLSign."""
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _signer_usage() -> x509.KeyUsage:
    """digitalSignature + nonRepudiation (Intel's profile for PCK leaves and TCB signers)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=True,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    path_length: int | None,
    is_ca: bool,
    extra: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """Build and sign (ecdsa-with-SHA256) one certificate with Intel-like extensions."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(CERT_NOT_BEFORE)
        .not_valid_after(CERT_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=is_ca)
        .add_extension(_ca_usage() if is_ca else _signer_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(seed: int | None = None) -> TestPki:
    """Create a root CA, a "Test SGX PCK Platform CA" and a TCB signing cert (all P-256).

    With a ``seed`` the keys and serials are deterministic (certificate signatures are not).
    """
    root_key = _key(seed, "root")
    pck_ca_key = _key(seed, "pck-ca")
    tcb_key = _key(seed, "tcb")
    root_name = _name(ROOT_CN)
    root_cert = _issue(
        subject=root_name,
        public_key=root_key.public_key(),
        issuer=root_name,
        issuer_key=root_key,
        serial=_serial(seed, "root"),
        path_length=1,
        is_ca=True,
    )
    pck_ca_cert = _issue(
        subject=_name(PCK_CA_CN),
        public_key=pck_ca_key.public_key(),
        issuer=root_name,
        issuer_key=root_key,
        serial=_serial(seed, "pck-ca"),
        path_length=0,
        is_ca=True,
    )
    tcb_cert = _issue(
        subject=_name(TCB_SIGNER_CN),
        public_key=tcb_key.public_key(),
        issuer=root_name,
        issuer_key=root_key,
        serial=_serial(seed, "tcb"),
        path_length=None,
        is_ca=False,
    )
    return TestPki(root_key, root_cert, pck_ca_key, pck_ca_cert, tcb_key, tcb_cert, seed)


# --------------------------------------------------------------------------------------------
# Minimal DER writer for the Intel SGX extension
# --------------------------------------------------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER tag-length-value."""
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_oid(dotted: str) -> bytes:
    """DER OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _der_int(value: int, tag: int = 0x02) -> bytes:
    """DER INTEGER (or ENUMERATED with ``tag=0x0A``) for a non-negative value."""
    return _tlv(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_seq(*items: bytes) -> bytes:
    """DER SEQUENCE of already-encoded items."""
    return _tlv(0x30, b"".join(items))


def _sgx_entry(suffix: str, value: bytes) -> bytes:
    """``SEQUENCE { OID 1.2.840.113741.1.13.1.<suffix>, value }``."""
    return _der_seq(_der_oid(f"{SGX_EXTENSION_OID}.{suffix}"), value)


def sgx_extension_der(
    *,
    ppid: bytes,
    cpusvn: bytes,
    pcesvn: int,
    fmspc: bytes,
    pce_id: bytes = b"\x00\x00",
    platform_instance_id: bytes = bytes(16),
) -> bytes:
    """Value of the Intel SGX extension (OID 1.2.840.113741.1.13.1) of a Platform-CA PCK leaf."""
    components = [_sgx_entry(f"2.{i + 1}", _der_int(svn)) for i, svn in enumerate(cpusvn)]
    tcb = _der_seq(
        *components,
        _sgx_entry("2.17", _der_int(pcesvn)),
        _sgx_entry("2.18", _tlv(0x04, cpusvn)),
    )
    false = _tlv(0x01, b"\x00")
    config = _der_seq(_sgx_entry("7.1", false), _sgx_entry("7.2", false), _sgx_entry("7.3", false))
    return _der_seq(
        _sgx_entry("1", _tlv(0x04, ppid)),
        _sgx_entry("2", tcb),
        _sgx_entry("3", _tlv(0x04, pce_id)),
        _sgx_entry("4", _tlv(0x04, fmspc)),
        _sgx_entry("5", _der_int(0, tag=0x0A)),
        _sgx_entry("6", _tlv(0x04, platform_instance_id)),
        _sgx_entry("7", config),
    )


def _issue_pck_leaf(
    pki: TestPki, key: ec.EllipticCurvePrivateKey, *, pcesvn: int, cpusvn: bytes, fmspc: str,
    ppid: bytes | None = None,
) -> x509.Certificate:
    """A PCK leaf under the PCK CA carrying the (non-critical) SGX extension; its PPID is
    derived from ``key`` unless given."""
    if ppid is None:
        ppid = platform_ppid(key)
    sgx = sgx_extension_der(ppid=ppid, cpusvn=cpusvn, pcesvn=pcesvn, fmspc=bytes.fromhex(fmspc))
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), sgx)
    return _issue(
        subject=_name(PCK_LEAF_CN),
        public_key=key.public_key(),
        issuer=pki.pck_ca_cert.subject,
        issuer_key=pki.pck_ca_key,
        serial=x509.random_serial_number(),
        path_length=None,
        is_ca=False,
        extra=(ext,),
    )


# --------------------------------------------------------------------------------------------
# Signatures and the quote body
# --------------------------------------------------------------------------------------------


def _raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 signature as raw ``r||s`` (64 bytes), as DCAP wants it."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_pubkey(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Uncompressed public point without the 0x04 prefix (x||y, 64 bytes)."""
    return key.public_key().public_bytes(*_RAW_POINT)[1:]


def _fixed(value: bytes, size: int, what: str) -> bytes:
    """Check that ``value`` has exactly ``size`` bytes."""
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
    return value


def _quote_header() -> bytes:
    """48-byte TDX v4 quote header."""
    header = struct.pack(
        "<HHIHH", QUOTE_VERSION, ATTESTATION_KEY_TYPE_ECDSA_P256, TDX_TEE_TYPE, 0, 0
    )
    user_data = hashlib.sha256(b"eecp test qe id").digest()[:16] + bytes(4)
    return header + QE_VENDOR_ID + user_data


def _td_report(
    *,
    tee_tcb_svn: bytes,
    td_attributes: int,
    mrtd: bytes,
    rtmrs: tuple[bytes, bytes, bytes, bytes],
    report_data: bytes,
) -> bytes:
    """584-byte TD report 1.0 body."""
    body = b"".join(
        [
            _fixed(tee_tcb_svn, 16, "tee_tcb_svn"),
            hashlib.sha384(b"eecp test mr_seam").digest(),
            TDX_MODULE_MRSIGNER,
            bytes(8),  # seam_attributes
            struct.pack("<Q", td_attributes),
            struct.pack("<Q", DEFAULT_XFAM),
            _fixed(mrtd, 48, "mrtd"),
            bytes(48 * 3),  # mr_config_id, mr_owner, mr_owner_config
            *(_fixed(r, 48, f"rtmr{i}") for i, r in enumerate(rtmrs)),
            _fixed(report_data, 64, "report_data"),
        ]
    )
    assert len(body) == 584
    return body


def _qe_report(*, qe_isvsvn: int, qe_report_data: bytes) -> bytes:
    """384-byte SGX enclave report of the quoting enclave."""
    report = b"".join(
        [
            DEFAULT_CPUSVN,
            struct.pack("<I", 0),  # miscselect
            bytes(28),
            QE_ATTRIBUTES,
            QE_MRENCLAVE,
            bytes(32),
            QE_MRSIGNER,
            bytes(96),
            struct.pack("<HH", QE_ISVPRODID, qe_isvsvn),
            bytes(60),
            _fixed(qe_report_data, 64, "qe report_data"),
        ]
    )
    assert len(report) == 384
    return report


def _signature_data(
    *,
    quote_signature: bytes,
    attest_key: ec.EllipticCurvePrivateKey,
    pck_key: ec.EllipticCurvePrivateKey,
    qe_isvsvn: int,
    qe_auth_data: bytes,
    chain_pem: bytes,
) -> bytes:
    """ECDSA quote signature data: signature, attestation key, type-6 certification data."""
    attest_pub = _raw_pubkey(attest_key)
    qe_hash = hashlib.sha256(attest_pub + qe_auth_data).digest()
    qe_report = _qe_report(qe_isvsvn=qe_isvsvn, qe_report_data=qe_hash + bytes(32))
    inner = b"".join(
        [
            qe_report,
            _raw_sign(pck_key, qe_report),
            struct.pack("<H", len(qe_auth_data)),
            qe_auth_data,
            struct.pack("<HI", 5, len(chain_pem)),
            chain_pem,
        ]
    )
    return quote_signature + attest_pub + struct.pack("<HI", 6, len(inner)) + inner


# --------------------------------------------------------------------------------------------
# Collateral
# --------------------------------------------------------------------------------------------


def rfc3339(timestamp: float) -> str:
    """UTC RFC 3339 with a ``Z`` suffix, whole seconds (floored)."""
    moment = dt.datetime.fromtimestamp(int(timestamp // 1), tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def compact_json(obj: Any) -> str:
    """The exact served form: compact, key order preserved, ASCII only."""
    return json.dumps(obj, separators=(",", ":"))


def _svns(values: bytes) -> list[dict[str, int]]:
    """TCB component list ``[{"svn": n}, ...]``."""
    return [{"svn": v} for v in values]


def _tcb_level(
    pcesvn: int, status: str, tcb_date: str, advisories: list[str] | None = None
) -> dict[str, Any]:
    """One platform tcbLevel with the default SGX and TDX components."""
    level: dict[str, Any] = {
        "tcb": {
            "sgxtcbcomponents": _svns(DEFAULT_CPUSVN),
            "pcesvn": pcesvn,
            "tdxtcbcomponents": _svns(DEFAULT_TEE_TCB_SVN),
        },
        "tcbDate": tcb_date,
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = advisories
    return level


def tcb_info_object(*, fmspc: str, issue: float, next_update: float) -> dict[str, Any]:
    """TDX TCB Info v3 (inner object, not the PCS envelope)."""
    module_identity = {
        "id": f"TDX_{TDX_MODULE_VERSION:02X}",
        "mrsigner": TDX_MODULE_MRSIGNER.hex().upper(),
        "attributes": "0000000000000000",
        "attributesMask": "FFFFFFFFFFFFFFFF",
        "tcbLevels": [
            {
                "tcb": {"isvsvn": TDX_MODULE_ISVSVN},
                "tcbDate": "2024-03-13T00:00:00Z",
                "tcbStatus": "UpToDate",
            },
            {
                "tcb": {"isvsvn": TDX_MODULE_OUTDATED_ISVSVN},
                "tcbDate": "2023-08-09T00:00:00Z",
                "tcbStatus": "OutOfDate",
                "advisoryIDs": [OUTDATED_MODULE_ADVISORY],
            },
        ],
    }
    return {
        "id": "TDX",
        "version": 3,
        "issueDate": rfc3339(issue),
        "nextUpdate": rfc3339(next_update),
        "fmspc": fmspc.upper(),
        "pceId": "0000",
        "tcbType": 0,
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "tdxModule": {
            "mrsigner": TDX_MODULE_MRSIGNER.hex().upper(),
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
        },
        "tdxModuleIdentities": [module_identity],
        "tcbLevels": [
            _tcb_level(UPTODATE_PCESVN, "UpToDate", "2024-03-13T00:00:00Z"),
            _tcb_level(OUTDATED_PCESVN, "OutOfDate", "2023-08-09T00:00:00Z", [OUTDATED_ADVISORY]),
            _tcb_level(REVOKED_PCESVN, "Revoked", "2018-01-04T00:00:00Z", [REVOKED_ADVISORY]),
        ],
    }


def qe_identity_object(*, issue: float, next_update: float) -> dict[str, Any]:
    """TD_QE identity v2 (inner object) matching the factory's QE report."""
    return {
        "id": "TD_QE",
        "version": 2,
        "issueDate": rfc3339(issue),
        "nextUpdate": rfc3339(next_update),
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": QE_ATTRIBUTES.hex().upper(),
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": QE_MRSIGNER.hex().upper(),
        "isvprodid": QE_ISVPRODID,
        "tcbLevels": [
            {
                "tcb": {"isvsvn": QE_ISVSVN},
                "tcbDate": "2024-03-13T00:00:00Z",
                "tcbStatus": "UpToDate",
            }
        ],
    }


def make_crl(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    this_update: float,
    next_update: float,
    revoked_serials: tuple[int, ...] = (),
    number: int = 1,
) -> bytes:
    """A DER CRL v2 with CRLNumber + AKI (webpki rejects CRLs without extensions)."""
    this_dt = dt.datetime.fromtimestamp(int(this_update // 1), tz=dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(this_dt)
        .next_update(dt.datetime.fromtimestamp(int(next_update // 1), tz=dt.UTC))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for serial in revoked_serials:
        entry = (
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_dt).build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class CollateralParts:
    """The nine collateral fields in their native types (bytes for CRLs and signatures)."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    def to_collateral(self) -> Any:
        """A ``dcap_qvl.QuoteCollateralV3``."""
        return dcap_qvl.QuoteCollateralV3(
            self.pck_crl_issuer_chain,
            self.root_ca_crl,
            self.pck_crl,
            self.tcb_info_issuer_chain,
            self.tcb_info,
            self.tcb_info_signature,
            self.qe_identity_issuer_chain,
            self.qe_identity,
            self.qe_identity_signature,
        )

    def to_json(self) -> str:
        """The JSON shape ``QuoteCollateralV3.from_json`` accepts (hex for byte fields)."""
        return json.dumps(
            {
                "pck_crl_issuer_chain": self.pck_crl_issuer_chain,
                "root_ca_crl": self.root_ca_crl.hex(),
                "pck_crl": self.pck_crl.hex(),
                "tcb_info_issuer_chain": self.tcb_info_issuer_chain,
                "tcb_info": self.tcb_info,
                "tcb_info_signature": self.tcb_info_signature.hex(),
                "qe_identity_issuer_chain": self.qe_identity_issuer_chain,
                "qe_identity": self.qe_identity,
                "qe_identity_signature": self.qe_identity_signature.hex(),
            }
        )


def make_collateral(
    pki: TestPki,
    *,
    now: float,
    fmspc: str = DEFAULT_FMSPC,
    collateral_days: float = 30,
    revoked_pck_serials: tuple[int, ...] = (),
) -> CollateralParts:
    """Collateral valid from ``now - 1 day`` until ``now + collateral_days``."""
    issue = now - DAY
    next_update = now + collateral_days * DAY
    tcb_info = compact_json(tcb_info_object(fmspc=fmspc, issue=issue, next_update=next_update))
    qe_identity = compact_json(qe_identity_object(issue=issue, next_update=next_update))
    tcb_chain = (pki.tcb_pem + pki.root_pem).decode()
    return CollateralParts(
        pck_crl_issuer_chain=(pki.pck_ca_pem + pki.root_pem).decode(),
        root_ca_crl=make_crl(
            pki.root_cert, pki.root_key, this_update=issue, next_update=next_update
        ),
        pck_crl=make_crl(
            pki.pck_ca_cert,
            pki.pck_ca_key,
            this_update=issue,
            next_update=next_update,
            revoked_serials=revoked_pck_serials,
        ),
        tcb_info_issuer_chain=tcb_chain,
        tcb_info=tcb_info,
        tcb_info_signature=_raw_sign(pki.tcb_key, tcb_info.encode()),
        qe_identity_issuer_chain=tcb_chain,
        qe_identity=qe_identity,
        qe_identity_signature=_raw_sign(pki.tcb_key, qe_identity.encode()),
    )


# --------------------------------------------------------------------------------------------
# Minting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MintedQuote:
    """A minted quote, its collateral and the inputs that went into it."""

    quote: bytes
    collateral: Any  # dcap_qvl.QuoteCollateralV3
    collateral_json: str
    parts: CollateralParts
    fmspc: str
    now: float
    collateral_days: float
    report_data: bytes
    mrtd: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    td_attributes: int
    pcesvn: int
    pck_leaf_serial: int
    pck_leaf_pem: bytes
    root_der: bytes = field(repr=False)

    @property
    def now_secs(self) -> int:
        """``int(now)``, the time argument the verifier takes."""
        return int(self.now)

    @property
    def expires_at(self) -> float:
        """nextUpdate of every CRL and JSON: verifying at or after this fails."""
        return self.now + self.collateral_days * DAY

    @property
    def expired_secs(self) -> int:
        """A verification time one day after the collateral expired."""
        return int(self.expires_at + DAY)


def mint_tdx_quote(
    pki: TestPki,
    *,
    now: float,
    report_data: bytes = bytes(64),
    mrtd: bytes = DEFAULT_MRTD,
    rtmrs: tuple[bytes, bytes, bytes, bytes] = DEFAULT_RTMRS,
    td_attributes: int = DEFAULT_TD_ATTRIBUTES,
    pcesvn: int = UPTODATE_PCESVN,
    fmspc: str = DEFAULT_FMSPC,
    collateral_days: float = 30,
    revoke_pck: bool = False,
    corrupt_signature: bool = False,
    tee_tcb_svn: bytes = DEFAULT_TEE_TCB_SVN,
    qe_isvsvn: int = QE_ISVSVN,
    qe_auth_data: bytes = bytes(range(32)),
    include_root_in_chain: bool = True,
    pck_key: ec.EllipticCurvePrivateKey | None = None,
    ppid: bytes | None = None,
) -> MintedQuote:
    """Mint a TDX v4 quote (fresh PCK leaf and attestation key) plus matching collateral.

    The PCK leaf is issued for ``pck_key`` (default: a fresh key, so every quote comes from a
    "new platform"); quotes minted with one key share the platform's PPID, derived from the
    key unless ``ppid`` sets it.

    ``revoke_pck`` lists the leaf serial in the PCK CRL; ``corrupt_signature`` flips one byte
    of the quote signature after signing. ``now`` is when the collateral was "fetched":
    verify at ``minted.now_secs`` (valid) or ``minted.expired_secs`` (expired).
    """
    if len(rtmrs) != 4:
        raise ValueError("rtmrs must hold exactly 4 entries")
    pck_key = pck_key if pck_key is not None else ec.generate_private_key(_CURVE)
    attest_key = ec.generate_private_key(_CURVE)
    leaf = _issue_pck_leaf(pki, pck_key, pcesvn=pcesvn, cpusvn=DEFAULT_CPUSVN, fmspc=fmspc,
                           ppid=ppid)
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    chain = leaf_pem + pki.pck_ca_pem + (pki.root_pem if include_root_in_chain else b"")

    signed = _quote_header() + _td_report(
        tee_tcb_svn=tee_tcb_svn,
        td_attributes=td_attributes,
        mrtd=mrtd,
        rtmrs=rtmrs,
        report_data=report_data,
    )
    assert len(signed) == _QUOTE_SIGNED_LEN
    signature = bytearray(_raw_sign(attest_key, signed))
    if corrupt_signature:
        signature[5] ^= 0x01
    sig_data = _signature_data(
        quote_signature=bytes(signature),
        attest_key=attest_key,
        pck_key=pck_key,
        qe_isvsvn=qe_isvsvn,
        qe_auth_data=qe_auth_data,
        chain_pem=chain,
    )
    quote = signed + struct.pack("<I", len(sig_data)) + sig_data

    parts = make_collateral(
        pki,
        now=now,
        fmspc=fmspc,
        collateral_days=collateral_days,
        revoked_pck_serials=(leaf.serial_number,) if revoke_pck else (),
    )
    return MintedQuote(
        quote=quote,
        collateral=parts.to_collateral(),
        collateral_json=parts.to_json(),
        parts=parts,
        fmspc=fmspc.upper(),
        now=now,
        collateral_days=collateral_days,
        report_data=report_data,
        mrtd=mrtd,
        rtmrs=rtmrs,
        td_attributes=td_attributes,
        pcesvn=pcesvn,
        pck_leaf_serial=leaf.serial_number,
        pck_leaf_pem=leaf_pem,
        root_der=pki.root_der,
    )


# --------------------------------------------------------------------------------------------
# Scenario conveniences
# --------------------------------------------------------------------------------------------


def mint_uptodate(pki: TestPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """Verifies as ``UpToDate`` at ``minted.now_secs``."""
    return mint_tdx_quote(pki, now=now, **kwargs)


def mint_outofdate(pki: TestPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """Verifies as ``OutOfDate`` with advisory ``OUTDATED_ADVISORY``."""
    return mint_tdx_quote(pki, now=now, pcesvn=OUTDATED_PCESVN, **kwargs)


def mint_revoked_pck(pki: TestPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """PCK leaf serial is in the PCK CRL: verification fails with ``CertRevoked``."""
    return mint_tdx_quote(pki, now=now, revoke_pck=True, **kwargs)


def mint_bad_signature(pki: TestPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """Quote signature byte flipped: fails with "ISV enclave report signature is invalid"."""
    return mint_tdx_quote(pki, now=now, corrupt_signature=True, **kwargs)


def mint_debug_td(pki: TestPki, *, now: float, **kwargs: Any) -> MintedQuote:
    """TD DEBUG attribute set: fails with "Debug mode is enabled"."""
    return mint_tdx_quote(pki, now=now, td_attributes=DEFAULT_TD_ATTRIBUTES | DEBUG_BIT, **kwargs)


def pccs_tcb_info_body(minted: MintedQuote) -> bytes:
    """PCS/PCCS ``/tdx/certification/v4/tcb`` response body, keeping ``tcb_info`` byte-exact."""
    parts = minted.parts
    return f'{{"tcbInfo":{parts.tcb_info},"signature":"{parts.tcb_info_signature.hex()}"}}'.encode()


def pccs_qe_identity_body(minted: MintedQuote) -> bytes:
    """PCS/PCCS ``/tdx/certification/v4/qe/identity`` response body, byte-exact identity."""
    parts = minted.parts
    sig = parts.qe_identity_signature.hex()
    return f'{{"enclaveIdentity":{parts.qe_identity},"signature":"{sig}"}}'.encode()


# --------------------------------------------------------------------------------------------
# Persistence: a PKI directory that the agent (minting) and eecp (EE_DCAP_ROOT_CA) share
# --------------------------------------------------------------------------------------------

DevPki = TestPki
"""The name run-time code uses for :class:`TestPki` (it is the same class)."""

ROOT_CERT_FILE = "root.pem"
"""The root CA certificate: point ``EE_DCAP_ROOT_CA`` at it."""

#: file names of every certificate and key in a PKI directory, keyed by ``TestPki`` field
PKI_FILES: dict[str, str] = {
    "root_cert": ROOT_CERT_FILE,
    "root_key": "root.key.pem",
    "pck_ca_cert": "pck-ca.pem",
    "pck_ca_key": "pck-ca.key.pem",
    "tcb_cert": "tcb.pem",
    "tcb_key": "tcb.key.pem",
}


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename) with permissions ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pki(pki: TestPki, directory: str | Path) -> Path:
    """Write ``pki`` to ``directory`` as PEM files (:data:`PKI_FILES`) and return the root's path.

    Keys are unencrypted PKCS#8 readable by the owner only: this is a development PKI.
    ``root.pem`` is written last, so its presence means the directory is complete.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("root_key", "pck_ca_key", "tcb_key"):
        key: ec.EllipticCurvePrivateKey = getattr(pki, name)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(out / PKI_FILES[name], pem, 0o600)
    for name in ("tcb_cert", "pck_ca_cert", "root_cert"):
        cert: x509.Certificate = getattr(pki, name)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_private(out / PKI_FILES[name], pem, 0o644)
    return out / ROOT_CERT_FILE


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key from an unencrypted PEM file."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return key


def load_pki(directory: str | Path) -> TestPki:
    """Read a PKI written by :func:`save_pki`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for unreadable PEM or a
    certificate that does not belong to its key (a half-replaced directory would otherwise mint
    quotes that fail verification far from the cause).
    """
    src = Path(directory)
    keys = {name: _load_key(src / PKI_FILES[name])
            for name in ("root_key", "pck_ca_key", "tcb_key")}
    certs = {name: x509.load_pem_x509_certificate((src / PKI_FILES[name]).read_bytes())
             for name in ("root_cert", "pck_ca_cert", "tcb_cert")}
    for cert_name, key_name in (("root_cert", "root_key"), ("pck_ca_cert", "pck_ca_key"),
                                ("tcb_cert", "tcb_key")):
        if certs[cert_name].public_key() != keys[key_name].public_key():
            raise ValueError(f"{src / PKI_FILES[cert_name]} does not match "
                             f"{src / PKI_FILES[key_name]}")
    return TestPki(
        root_key=keys["root_key"],
        root_cert=certs["root_cert"],
        pck_ca_key=keys["pck_ca_key"],
        pck_ca_cert=certs["pck_ca_cert"],
        tcb_key=keys["tcb_key"],
        tcb_cert=certs["tcb_cert"],
    )


PLATFORMS_DIR = "platforms"
"""Where a PKI directory keeps its dev platforms' PCK leaf keys (``<name>.key.pem``)."""
_PLATFORM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def platform_pck_key(directory: str | Path, platform: str = "default"
                     ) -> ec.EllipticCurvePrivateKey:
    """The PCK leaf key of the dev platform ``platform`` of the PKI in ``directory``, created
    (and kept under :data:`PLATFORMS_DIR`) on first use.

    A real TDX host presents one PCK leaf, so one PPID, in all its quotes; quotes minted with
    this key share the PPID derived from it, so a dev platform stays one platform across
    attestations and restarts, and eecp can bind it to a node (ledger spec §21.11). Two
    processes creating the same platform at once end up with one key: the file is linked into
    place only if it is still absent.
    """
    if not _PLATFORM_NAME.fullmatch(platform):
        raise ValueError(f"a dev platform name is a DNS label, not {platform!r}")
    path = Path(directory) / PLATFORMS_DIR / f"{platform}.key.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = ec.generate_private_key(_CURVE).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            os.chmod(tmp, 0o600)
            # fails if another process made it meanwhile: theirs is kept
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return _load_key(path)


def platform_ppid(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The PPID a PCK leaf issued for ``key`` carries (when no PPID is given)."""
    return hashlib.sha256(_raw_pubkey(key)).digest()[:16]


def ensure_pki(directory: str | Path) -> TestPki:
    """The PKI in ``directory``; a fresh random one is created and saved there if it has none."""
    path = Path(directory)
    if (path / ROOT_CERT_FILE).exists():
        return load_pki(path)
    pki = make_pki()
    save_pki(pki, path)
    return pki

"""Intel TDX DCAP quotes and matching collateral, minted under a development PKI
(:mod:`eecp.dev.pki`) without Intel.

**Development and tests only.** Nothing minted here is trusted by Intel's production root
(``dcap_qvl.verify`` rejects all of it); it is accepted by the *unmodified* ``dcap_qvl``
verifier only when that is handed the PKI's root —
``dcap_qvl.verify_with_root_ca(quote, collateral, pki.root_der, int(now))`` — which is what
eecp does when ``EE_DCAP_ROOT_CA`` points at the ``root.pem`` written by
:func:`eecp.dev.pki.save_pki`. The agent's ``dev`` quote provider, the dev PCCS and the
test-suite (whose failure scenarios are ``tests/quotefactory.py``) all mint through this module.

Layout, encodings and the PKI profile (see ``shared/notes/dcap-test-pki-facts.md``):

* TDX **v4** quote, attestation key type 2 (ECDSA P-256), TEE type 0x81;
* quote signature (attestation key) and QE report signature (PCK leaf) are raw ``r||s``;
* QE report data = ``sha256(attest_pubkey || qe_auth_data)`` padded to 64 bytes;
* certification data type 6 wrapping type 5 (PEM chain, leaf first);
* TCB Info (``TDX`` v3) and QE Identity (``TD_QE`` v2) signed as served (compact JSON);
* CRLs are DER, v2, with CRLNumber + AKI extensions;
* the collateral is eecp's own :class:`~eecp.attestation.collateral_doc.CollateralParts`.

Typical use::

    pki = make_pki(seed=1)                  # or ensure_pki(Path("data/dev-pki"))
    minted = mint_tdx_quote(pki, now=NOW, report_data=nonce_hash)
    report = dcap_qvl.verify_with_root_ca(minted.quote, minted.collateral, pki.root_der,
                                          minted.now_secs)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from eecp.attestation.collateral_doc import CollateralParts, parts_from_fields
from eecp.dev.pki import CURVE, DevPki, issue_pck_leaf, raw_pubkey

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

_QUOTE_SIGNED_LEN = 632  # 48-byte header + 584-byte TD report 1.0



# --------------------------------------------------------------------------------------------
# Signatures and the quote body
# --------------------------------------------------------------------------------------------


def _raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 signature as raw ``r||s`` (64 bytes), as DCAP wants it."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


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
    attest_pub = raw_pubkey(attest_key)
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


def make_collateral(
    pki: DevPki,
    *,
    now: float,
    fmspc: str = DEFAULT_FMSPC,
    collateral_days: float = 30,
    revoked_pck_serials: tuple[int, ...] = (),
) -> CollateralParts:
    """Collateral valid from ``now - 1 day`` until ``now + collateral_days``, as if fetched
    at ``now`` (eecp's own :class:`~eecp.attestation.collateral_doc.CollateralParts`)."""
    issue = now - DAY
    next_update = now + collateral_days * DAY
    tcb_info = compact_json(tcb_info_object(fmspc=fmspc, issue=issue, next_update=next_update))
    qe_identity = compact_json(qe_identity_object(issue=issue, next_update=next_update))
    tcb_chain = (pki.tcb_pem + pki.root_pem).decode()
    fields = {
        "pck_crl_issuer_chain": (pki.pck_ca_pem + pki.root_pem).decode(),
        "root_ca_crl": make_crl(
            pki.root_cert, pki.root_key, this_update=issue, next_update=next_update
        ),
        "pck_crl": make_crl(
            pki.pck_ca_cert,
            pki.pck_ca_key,
            this_update=issue,
            next_update=next_update,
            revoked_serials=revoked_pck_serials,
        ),
        "tcb_info_issuer_chain": tcb_chain,
        "tcb_info": tcb_info,
        "tcb_info_signature": _raw_sign(pki.tcb_key, tcb_info.encode()),
        "qe_identity_issuer_chain": tcb_chain,
        "qe_identity": qe_identity,
        "qe_identity_signature": _raw_sign(pki.tcb_key, qe_identity.encode()),
    }
    return parts_from_fields(fields, fetched_at=now)


# --------------------------------------------------------------------------------------------
# Minting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MintedQuote:
    """A minted quote, its collateral and the inputs that went into it."""

    quote: bytes
    collateral: Any  # dcap_qvl.QuoteCollateralV3
    collateral_json: str  #: dcap-qvl's collateral JSON (with next_update and fetched_at)
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
    pki: DevPki,
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
    pck_key = pck_key if pck_key is not None else ec.generate_private_key(CURVE)
    attest_key = ec.generate_private_key(CURVE)
    leaf = issue_pck_leaf(pki, pck_key, pcesvn=pcesvn, cpusvn=DEFAULT_CPUSVN, fmspc=fmspc,
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
        collateral=parts.to_dcap(),
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


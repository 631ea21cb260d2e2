"""DCAP quotes through ``dcap-qvl``: parse, verify at a given time under a given root, and return
typed facts.

Everything here is synchronous and CPU-bound (≈0.7 ms per verification, holding the GIL):
callers on the trio loop go through ``eecp.core.blocking.run_blocking(workers.verify, ...)``.

The facts that matter for policy (report_data, MRTD, RTMR0-3, TD attributes) are read from the
quote bytes that dcap-qvl has just verified — never from anything the agent claims.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from eecp.core.errors import CollateralError, InputError, QuoteError

MAX_QUOTE_BYTES = 64 * 1024
TD_ATTR_DEBUG = 1 << 0
#: SHA-256 of Intel's SGX Root CA certificate (DER): the anchor dcap-qvl verifies under when no
#: EE_DCAP_ROOT_CA replaces it. Every genuine quote carries that certificate at the end of its
#: PCK chain.
INTEL_ROOT_SHA256 = bytes.fromhex(
    "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")
#: at most this many certificates above the PCK leaf (as dcap-qvl)
MAX_CHAIN_ABOVE_LEAF = 4
#: bound of check_pck_chain's ``known_cas``
MAX_KNOWN_CAS = 64


@dataclass(frozen=True)
class QuoteFacts:
    """What a quote says about itself (not yet trusted until :func:`verify_quote` succeeds)."""

    tee_type: str  # "TDX" | "SGX"
    version: int
    fmspc: str  # upper-case hex, 12 characters
    ca: str  # "platform" | "processor": which PCK CRL applies
    report_data: bytes
    mrtd: bytes | None = None
    rtmrs: tuple[bytes, ...] = ()  # RTMR0..3 (TDX)
    td_attributes: int | None = None  # TDX TD attributes, little-endian u64
    mr_enclave: bytes | None = None  # SGX
    mr_signer: bytes | None = None  # SGX
    #: the PCK certificate chain the quote carries (PEM, leaf first), for :func:`check_pck_chain`
    pck_chain: bytes = field(default=b"", repr=False)

    @property
    def debug(self) -> bool:
        """True for a debug TD: its memory and state are readable by the host."""
        return self.td_attributes is not None and bool(self.td_attributes & TD_ATTR_DEBUG)


@dataclass(frozen=True)
class VerifiedQuote:
    """A quote that verified against collateral at ``verified_at``."""

    facts: QuoteFacts
    tcb_status: str
    advisory_ids: tuple[str, ...]
    verified_at: float
    #: the platform the quote came from (:func:`platform_id`); read from the PCK leaf that
    #: dcap-qvl has just verified, so a peer cannot pick it
    platform_id: str | None = None


def parse_quote(raw: bytes) -> QuoteFacts:
    """Parse ``raw`` into :class:`QuoteFacts`; ``QuoteError('quote_malformed')`` if it is not a
    DCAP quote."""
    if not raw or len(raw) > MAX_QUOTE_BYTES:
        raise QuoteError("quote_malformed", f"quote of {len(raw)} bytes")
    try:
        quote = dcap_qvl.parse_quote(raw)
        fmspc = quote.fmspc().upper()
        ca = quote.ca()
        report = quote.report
        is_tdx = quote.is_tdx()
        # None when the certification data is no PEM chain (type 4, a lone DER leaf)
        pem_chain = quote.cert_chain_pem_bytes()
        chain = bytes(pem_chain) if pem_chain is not None else b""
    except (ValueError, RuntimeError) as exc:
        raise QuoteError("quote_malformed", _short(exc)) from None
    if is_tdx:
        return QuoteFacts(
            tee_type="TDX",
            version=quote.header.version,
            fmspc=fmspc,
            ca=ca,
            report_data=bytes(report.report_data),
            mrtd=bytes(report.mr_td),
            rtmrs=tuple(bytes(r) for r in (report.rt_mr0, report.rt_mr1, report.rt_mr2,
                                            report.rt_mr3)),
            td_attributes=int.from_bytes(bytes(report.td_attributes), "little"),
            pck_chain=chain,
        )
    return QuoteFacts(
        tee_type="SGX",
        version=quote.header.version,
        fmspc=fmspc,
        ca=ca,
        report_data=bytes(report.report_data),
        mr_enclave=bytes(report.mr_enclave),
        mr_signer=bytes(report.mr_signer),
        pck_chain=chain,
    )


def check_pck_chain(pem: bytes, root_ca_der: bytes | None,
                    known_cas: set[bytes] | None = None, fmspc: str | None = None) -> None:
    """Check that a quote's PCK chain (``QuoteFacts.pck_chain``) is issued under the root —
    Intel's (pinned by :data:`INTEL_ROOT_SHA256`, and then carried in the chain, as every genuine
    quote does) or ``root_ca_der`` — before any collateral is fetched for the FMSPC that chain
    names. Signatures only: dates, revocation and all the rest are dcap-qvl's, with collateral.

    ``known_cas`` (SHA-256 digests of CA certificates already found under that root; the check
    adds to it) saves re-checking the few PCK CAs every machine's chain shares. ``fmspc``, when
    given, must be the one in the leaf checked (what the collateral would be fetched for).

    Raises ``QuoteError('pck_chain_untrusted')``.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem.rstrip(b"\0"))
    except ValueError:
        raise QuoteError("pck_chain_untrusted", "the PCK chain is not PEM certificates") from None
    # cryptography skips PEM blocks of other labels, dcap-qvl takes the leaf from the first
    # block of any label: both must see the same certificates
    if pem.count(b"-----BEGIN ") != len(certs):
        raise QuoteError("pck_chain_untrusted", "the PCK chain holds PEM blocks of other kinds")
    leaf, above = certs[0], certs[1:]
    if fmspc is not None and _leaf_fmspc(leaf) != fmspc.upper():
        raise QuoteError("pck_chain_untrusted", "the FMSPC is not the PCK leaf's")
    if len(above) > MAX_CHAIN_ABOVE_LEAF:
        raise QuoteError("pck_chain_untrusted", f"{len(above)} certificates above the PCK leaf")
    known = known_cas if known_cas is not None else set()
    root: x509.Certificate | None = None
    current, issuers = leaf, []
    for _ in range(len(above) + 1):
        issuer = next((c for c in above if c.subject == current.issuer and c != current), None)
        if issuer is not None and _issued_by(current, issuer):
            if issuer.fingerprint(hashes.SHA256()) in known:
                break
            issuers.append(issuer)
            current = issuer
            continue
        root = root or _anchor(above, root_ca_der)
        if not _issued_by(current, root):
            raise QuoteError("pck_chain_untrusted",
                             "the PCK leaf does not chain to the trusted root")
        break
    else:
        raise QuoteError("pck_chain_untrusted", "the PCK leaf does not chain to the trusted root")
    if len(known) >= MAX_KNOWN_CAS:
        known.clear()  # only a cache: a PKI has a handful of CAs
    known.update(c.fingerprint(hashes.SHA256()) for c in issuers)


def _leaf_fmspc(leaf: x509.Certificate) -> str | None:
    try:
        extension = dcap_qvl.parse_pck_extension_from_pem(leaf.public_bytes(Encoding.PEM))
        return bytes(extension.fmspc).hex().upper()
    except (ValueError, RuntimeError, TypeError):
        return None


def _anchor(chain: list[x509.Certificate], root_ca_der: bytes | None) -> x509.Certificate:
    if root_ca_der is not None:
        return x509.load_der_x509_certificate(root_ca_der)
    for cert in chain:
        if cert.fingerprint(hashes.SHA256()) == INTEL_ROOT_SHA256:
            return cert
    raise QuoteError("pck_chain_untrusted", "the PCK chain does not carry Intel's root")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def verify_quote(raw: bytes, collateral: Any, now: float, root_ca_der: bytes | None,
                 facts: QuoteFacts | None = None) -> VerifiedQuote:
    """Verify ``raw`` with dcap-qvl against ``collateral`` (a ``dcap_qvl.QuoteCollateralV3``) at
    Unix time ``now``; under Intel's root unless ``root_ca_der`` replaces it. ``facts`` are
    ``parse_quote(raw)``'s, when the caller has them.

    Raises ``QuoteError`` (``quote_malformed``, ``quote_invalid``, ``tcb_status:Revoked``,
    ``pck_revoked``, ``debug_td``) or ``CollateralError('collateral_expired')``.
    """
    if facts is None:  # (the engine parsed it already: a parse is 0.3 ms)
        facts = parse_quote(raw)
    try:
        if root_ca_der is None:
            report = dcap_qvl.verify(raw, collateral, int(now))
        else:
            report = dcap_qvl.verify_with_root_ca(raw, collateral, root_ca_der, int(now))
    except (ValueError, RuntimeError) as exc:
        raise classify_failure(str(exc)) from None
    return VerifiedQuote(
        facts=facts,
        tcb_status=str(report.status),
        advisory_ids=tuple(str(a) for a in report.advisory_ids),
        verified_at=now,
        platform_id=platform_id(facts.pck_chain, facts.fmspc),
    )


def platform_id(pck_chain: bytes, fmspc: str) -> str | None:
    """The platform a PCK chain's leaf was issued to: its PPID (OID 1.2.840.113741.1.13.1.1,
    lower-case hex), the same for every TD on one machine; else, for a leaf without one,
    ``pck-`` and the first 16 bytes of SHA-256 over the FMSPC and the leaf's public key, in
    hex. None when there is no certificate (certification data of another type).

    The leaf is the first *certificate* of the chain as :func:`check_pck_chain` reads it, never
    the first PEM-looking bytes: the certification data lies outside what the quote's
    signature covers, and stray PEM markers put in front of a genuine chain must not make the
    platform unknown (and so escape its share of a rate limit). Meaningful only for a chain
    that verified: rate limits are keyed by it."""
    try:
        leaf = x509.load_pem_x509_certificates(pck_chain.rstrip(b"\0"))[0]
    except (ValueError, UnsupportedAlgorithm, IndexError):
        return None
    try:
        ppid = bytes(dcap_qvl.parse_pck_extension_from_pem(
            leaf.public_bytes(Encoding.PEM)).ppid)
    except (ValueError, RuntimeError, TypeError):
        ppid = b""
    if any(ppid):
        return ppid.hex()
    key = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(fmspc.upper().encode() + b"\0" + key).digest()
    return "pck-" + digest[:16].hex()


# dcap-qvl reports failures as ValueError text; map the ones an operator acts on differently to
# stable reasons. Order matters: the first match wins.
_FAILURES: tuple[tuple[re.Pattern[str], type[QuoteError] | type[CollateralError], str], ...] = (
    (re.compile(r"CrlExpired|TCBInfo expired|QE Identity expired|CertExpired|"
                r"Collateral expired|issue date is in the future|CertNotValidYet"),
     CollateralError, "collateral_expired"),
    (re.compile(r"CertRevoked"), QuoteError, "pck_revoked"),
    (re.compile(r"TCB status is invalid: Revoked"), QuoteError, "tcb_status:Revoked"),
    (re.compile(r"Debug mode is enabled"), QuoteError, "debug_td"),
    (re.compile(r"No matching TCB level"), QuoteError, "tcb_level_unmatched"),
    (re.compile(r"[Ff]mspc mismatch"), CollateralError, "collateral_mismatch"),
)


def classify_failure(message: str) -> QuoteError | CollateralError:
    """Turn dcap-qvl's failure text into an error with a stable reason."""
    for pattern, kind, reason in _FAILURES:
        if pattern.search(message):
            return kind(reason, _short(message))
    return QuoteError("quote_invalid", _short(message))


def load_root_ca(path: Path) -> bytes:
    """Read a root CA certificate (PEM or DER) and return it as DER.

    Raises ``InputError('root_ca_unreadable')`` when the file is missing or not a certificate.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("root_ca_unreadable", f"{path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError:
        raise InputError("root_ca_unreadable", f"{path}: not a PEM or DER certificate") from None
    return cert.public_bytes(Encoding.DER)


def _short(exc: object, limit: int = 300) -> str:
    """One line of an error for logs and reasons' detail (dcap-qvl errors can be multi-line)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""A development PKI: certificates shaped like Intel's SGX/TDX PKI, without Intel.

**Development and tests only.** Nothing issued here is trusted by Intel's production root; a
quote under it (minted by :mod:`eecp.dev.mint`) is accepted by the *unmodified* ``dcap_qvl``
verifier only when that is handed this PKI's root (``verify_with_root_ca``), which is what eecp
does when ``EE_DCAP_ROOT_CA`` points at the ``root.pem`` written by :func:`save_pki`. The
agent's ``dev`` quote provider, ``eecp demo`` and the test-suite share it.

Here: the PKI itself (:class:`DevPki`, :func:`make_pki`: a root CA, a PCK Platform CA and a TCB
signing certificate, all P-256, deterministic from a seed), the PCK leaves a platform's quotes
carry (with the Intel SGX extension, written by a minimal DER writer) and a PKI directory on
disk (:func:`save_pki`, :func:`load_pki`, :func:`ensure_pki`). See
``shared/notes/dcap-test-pki-facts.md`` for the profile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
CERT_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

ROOT_CN = "Test SGX Root CA"
PCK_CA_CN = "Test SGX PCK Platform CA"
TCB_SIGNER_CN = "Test SGX TCB Signing"
PCK_LEAF_CN = "Test SGX PCK Certificate"

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

#: the curve of every key here (and of the quotes' attestation keys)
CURVE = ec.SECP256R1()
_CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_RAW_POINT = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevPki:
    """A self-made Intel-like PKI: root CA, PCK Platform CA and TCB signing cert."""

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
        return ec.generate_private_key(CURVE)
    digest = hashlib.sha256(f"eecp-quotefactory:{seed}:{label}".encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (_CURVE_ORDER - 1) + 1, CURVE)


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


def make_pki(seed: int | None = None) -> DevPki:
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
    return DevPki(root_key, root_cert, pck_ca_key, pck_ca_cert, tcb_key, tcb_cert, seed)



def raw_pubkey(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Uncompressed public point without the 0x04 prefix (x||y, 64 bytes), as DCAP has it."""
    return key.public_key().public_bytes(*_RAW_POINT)[1:]

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


def issue_pck_leaf(
    pki: DevPki, key: ec.EllipticCurvePrivateKey, *, pcesvn: int, cpusvn: bytes, fmspc: str,
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
# Persistence: a PKI directory that the agent (minting) and eecp (EE_DCAP_ROOT_CA) share
# --------------------------------------------------------------------------------------------

ROOT_CERT_FILE = "root.pem"
"""The root CA certificate: point ``EE_DCAP_ROOT_CA`` at it."""

#: file names of every certificate and key in a PKI directory, keyed by ``DevPki`` field
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


def save_pki(pki: DevPki, directory: str | Path) -> Path:
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


def load_pki(directory: str | Path) -> DevPki:
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
    return DevPki(
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
        pem = ec.generate_private_key(CURVE).private_bytes(
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
    return hashlib.sha256(raw_pubkey(key)).digest()[:16]


def ensure_pki(directory: str | Path) -> DevPki:
    """The PKI in ``directory``; a fresh random one is created and saved there if it has none."""
    path = Path(directory)
    if (path / ROOT_CERT_FILE).exists():
        return load_pki(path)
    pki = make_pki()
    save_pki(pki, path)
    return pki

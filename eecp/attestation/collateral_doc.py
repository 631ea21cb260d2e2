"""DCAP collateral as a value, and the PCS formats it is read from: pure, no I/O.

:class:`CollateralParts` holds the nine fields dcap-qvl needs and when they stop being valid
(``next_update``, always read from the documents, never trusted from a stored copy). It is
deliberately *not* a ``QuoteCollateralV3``: that object carries the PCK chain of the quote it
was fetched for, which verification then prefers over the chain inside any later quote (cache
it and every other machine's quote fails); :meth:`CollateralParts.to_dcap` builds a fresh one
per verification instead.

The PCS response readers (:func:`raw_json_members`, :func:`issuer_chain`, :func:`crl_der`,
:func:`signed_body`) refuse what cannot be used with :class:`UnusableResponse`. Fetching and
caching are :mod:`eecp.attestation.collateral`'s; the dev PKI (:mod:`eecp.dev.mint`) and the
dev PCCS (:mod:`eecp.dev.pccs`) build and serve these same parts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from eecp.core.clock import parse_isoformat

if TYPE_CHECKING:
    import httpx

#: Field names of dcap-qvl's ``QuoteCollateralV3.from_json``; the ``bytes`` ones are hex there.
_STR_FIELDS = (
    "pck_crl_issuer_chain",
    "tcb_info_issuer_chain",
    "tcb_info",
    "qe_identity_issuer_chain",
    "qe_identity",
)
_BYTES_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
_FIELD_ORDER = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
_HEX_BODY = re.compile(rb"^[0-9A-Fa-f]+$")
_JSON_WS = re.compile(r"[ \t\n\r]*")
#: A PCS signature over tcbInfo / enclaveIdentity is raw r‖s of P-256: dcap-qvl splits it at 32.
_SIGNATURE_LEN = 64



# ------------------------------------------------------------------------------------------------
# The cached value


@dataclass(frozen=True)
class CollateralParts:
    """The nine collateral fields dcap-qvl needs, plus when they stop being valid.

    Deliberately *not* a ``QuoteCollateralV3``: see the module docstring (the caching trap).
    ``next_update`` is the earliest of tcbInfo.nextUpdate, enclaveIdentity.nextUpdate and both
    CRLs' nextUpdate (Unix seconds); ``fetched_at`` is when eecp obtained the parts (Unix seconds,
    0 when unknown).
    """

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes
    next_update: float
    fetched_at: float

    def to_dcap(self) -> dcap_qvl.QuoteCollateralV3:
        """A fresh dcap-qvl collateral object (without any PCK chain) for one verification."""
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

    def is_valid_at(self, now: float) -> bool:
        """True while every part is still within its validity at ``now`` (Unix seconds).

        Strictly before ``next_update``: dcap-qvl already rejects a CRL at ``now == nextUpdate``.
        """
        return now < self.next_update

    def to_json(self) -> str:
        """dcap-qvl's collateral JSON (same names, bytes as hex) plus next_update and fetched_at.

        dcap-qvl's ``QuoteCollateralV3.from_json`` ignores the two extra fields, so the document
        can be handed to it (or to ``dcap-qvl`` tooling) as is.
        """
        doc: dict[str, Any] = {}
        for name in _FIELD_ORDER:
            value = getattr(self, name)
            doc[name] = value.hex() if isinstance(value, bytes) else value
        doc["next_update"] = self.next_update
        doc["fetched_at"] = self.fetched_at
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> CollateralParts:
        """Parse a document written by :meth:`to_json` (or a plain dcap-qvl collateral JSON).

        ``next_update`` is recomputed from the documents rather than trusted, so a tampered or
        stale stored value can never keep expired collateral alive. Raises ``ValueError``.
        """
        doc = _load_object(text)
        fetched_at = doc.get("fetched_at", 0.0)
        if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
            raise ValueError("collateral document: fetched_at is not a number")
        return _parts_from_mapping(doc, fetched_at=float(fetched_at))


def parts_from_dcap_json(text: str, *, fetched_at: float = 0.0) -> CollateralParts:
    """Build parts from a dcap-qvl collateral JSON (e.g. ``--collateral FILE``).

    ``next_update`` is computed from the contents (both JSON bodies and both CRLs). Extra fields
    are ignored. Raises ``ValueError`` when the document is not usable collateral.
    """
    return _parts_from_mapping(_load_object(text), fetched_at=fetched_at)


def _load_object(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"collateral document is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("collateral document is not a JSON object")
    return doc


def _parts_from_mapping(doc: Mapping[str, Any], *, fetched_at: float) -> CollateralParts:
    values: dict[str, Any] = {}
    for name in _STR_FIELDS:
        value = doc.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"collateral document: {name} missing or not a string")
        values[name] = value
    for name in _BYTES_FIELDS:
        value = doc.get(name)
        if not isinstance(value, str):
            raise ValueError(f"collateral document: {name} missing or not a hex string")
        try:
            values[name] = bytes.fromhex(value)
        except ValueError:
            raise ValueError(f"collateral document: {name} is not hex") from None
    return parts_from_fields(values, fetched_at=fetched_at)


def parts_from_fields(fields: Mapping[str, Any], *, fetched_at: float) -> CollateralParts:
    """Parts from the nine fields in their native types (``str``, and ``bytes`` for CRLs and
    signatures); ``next_update`` is read from the documents themselves (the earliest of both
    JSON bodies' and both CRLs' nextUpdate), never taken on trust. Raises ``ValueError`` when
    one of them has none or cannot be read."""
    next_update = _earliest_next_update(
        tcb_info=fields["tcb_info"],
        qe_identity=fields["qe_identity"],
        crls=(fields["root_ca_crl"], fields["pck_crl"]),
    )
    return CollateralParts(**fields, next_update=next_update, fetched_at=fetched_at)


def _json_next_update(text: str, what: str) -> float:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{what} is not JSON") from None
    stamp = body.get("nextUpdate") if isinstance(body, dict) else None
    if not isinstance(stamp, str):
        raise ValueError(f"{what} has no nextUpdate")
    return parse_isoformat(stamp)


def _crl_next_update(der: bytes, what: str) -> float:
    crl = x509.load_der_x509_crl(der)  # ValueError when not a DER CRL
    next_update = crl.next_update_utc
    if next_update is None:
        raise ValueError(f"{what} has no nextUpdate")
    return next_update.timestamp()


def _earliest_next_update(*, tcb_info: str, qe_identity: str, crls: tuple[bytes, bytes]) -> float:
    return min(
        _json_next_update(tcb_info, "tcbInfo"),
        _json_next_update(qe_identity, "enclaveIdentity"),
        _crl_next_update(crls[0], "root CA CRL"),
        _crl_next_update(crls[1], "PCK CRL"),
    )


# ------------------------------------------------------------------------------------------------
# Parsing PCS responses


class UnusableResponse(Exception):
    """A PCS response that cannot be used (status, headers or body); the message is the detail."""


def raw_json_members(text: str) -> dict[str, str]:
    """The members of a top-level JSON object as ``{name: raw value text}``, byte for byte.

    The PCS signs the exact text of ``tcbInfo`` / ``enclaveIdentity`` as served, so that text must
    be cut out of the envelope, never re-serialised. ``json.JSONDecoder.raw_decode`` is used to
    find where each value ends (it understands strings, escapes and nesting). Raises
    ``ValueError`` for anything but one JSON object (duplicate names included: which copy would
    the signature be over?).
    """
    decoder = json.JSONDecoder()

    def skip_ws(pos: int) -> int:
        match = _JSON_WS.match(text, pos)
        assert match is not None  # the pattern matches the empty string
        return match.end()

    pos = skip_ws(0)
    if text[pos : pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos = skip_ws(pos + 1)
    members: dict[str, str] = {}
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise ValueError(f"expected a member name at offset {pos}")
            name, pos = decoder.raw_decode(text, pos)
            pos = skip_ws(pos)
            if text[pos : pos + 1] != ":":
                raise ValueError(f"expected ':' at offset {pos}")
            start = skip_ws(pos + 1)
            _, pos = decoder.raw_decode(text, start)
            if name in members:
                raise ValueError(f"duplicate member {name!r}")
            members[name] = text[start:pos]
            pos = skip_ws(pos)
            sep = text[pos : pos + 1]
            pos += 1
            if sep == "}":
                break
            if sep != ",":
                raise ValueError(f"expected ',' or '}}' at offset {pos - 1}")
            pos = skip_ws(pos)
    if skip_ws(pos) != len(text):
        raise ValueError(f"trailing data at offset {pos}")
    return members


def issuer_chain(response: httpx.Response, *names: str) -> str:
    for name in names:
        value = response.headers.get(name)
        if value:
            chain = unquote(value)
            if "-----BEGIN CERTIFICATE-----" not in chain:
                raise UnusableResponse(f"{name} header is not a PEM certificate chain")
            return chain
    raise UnusableResponse(f"missing {' / '.join(names)} header")


def crl_der(body: bytes, what: str) -> bytes:
    """A CRL body as DER, whichever of the forms PCCS implementations serve it in.

    Intel's PCS serves DER; several PCCS serve the hex of the DER (that is what dcap-qvl's own
    fetcher expects for rootcacrl); without ``encoding=der`` the PCS serves PEM. DER itself can
    never be all hex digits (its first length byte is >= 0x80 for any real CRL).
    """
    stripped = body.strip()
    if stripped and _HEX_BODY.match(stripped) and len(stripped) % 2 == 0:
        der = bytes.fromhex(stripped.decode("ascii"))
    elif stripped.startswith(b"-----BEGIN X509 CRL-----"):
        try:
            der = x509.load_pem_x509_crl(stripped).public_bytes(Encoding.DER)
        except ValueError:
            raise UnusableResponse(f"{what}: PEM body is not a CRL") from None
    else:
        der = body
    try:
        _crl_next_update(der, what)
    except ValueError as exc:
        raise UnusableResponse(f"{what}: {exc}") from None
    return der


def signed_body(
    response: httpx.Response, member: str, what: str, *, fmspc: str | None = None
) -> tuple[str, bytes]:
    """``(raw text of member, signature bytes)`` from a ``{"<member>":{...},"signature":hex}``."""
    try:
        # Decode strictly as UTF-8 (the PCS's charset) rather than httpx's guess: the str handed to
        # dcap-qvl is re-encoded as UTF-8, and must give back exactly the signed bytes.
        text = response.content.decode("utf-8")
        members = raw_json_members(text)
    except ValueError as exc:
        raise UnusableResponse(f"{what}: malformed envelope: {exc}") from None
    raw = members.get(member)
    signature = members.get("signature")
    if raw is None or signature is None:
        raise UnusableResponse(f"{what}: envelope lacks {member!r} or 'signature'")
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise UnusableResponse(f"{what}: {member} is not an object")
    sig_hex = json.loads(signature)
    try:
        sig = bytes.fromhex(sig_hex) if isinstance(sig_hex, str) else b""
    except ValueError:
        sig = b""
    if len(sig) != _SIGNATURE_LEN:
        raise UnusableResponse(f"{what}: signature is not {_SIGNATURE_LEN} bytes of hex")
    if fmspc is not None and str(body.get("fmspc", "")).upper() != fmspc:
        # A PCCS answering for another platform would poison the cache for weeks.
        raise UnusableResponse(f"{what}: fmspc {body.get('fmspc')!r} is not the one asked for")
    return raw, sig

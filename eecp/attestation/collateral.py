"""DCAP collateral: fetched from a PCCS/PCS (Intel PCS API v4) with httpx under trio, and cached.

Why not ``dcap_qvl.get_collateral``: it is an asyncio coroutine (unusable from trio), and the
object it returns carries the PCK chain of the quote it was fetched for, which verification then
prefers over the chain inside any later quote — cache that object and every other machine's quote
fails. Here the cache holds only :class:`CollateralParts` (no PCK chain) and builds a fresh
``QuoteCollateralV3`` per verification with :meth:`CollateralParts.to_dcap`.

Caching rules (:class:`CollateralCache`): one entry per ``tee:FMSPC:ca``; memory first, then the
store (so a restart works while the PCCS is down); refetch when within the refresh margin of the
earliest ``nextUpdate``; on a failed fetch serve a copy that is still valid, never an expired one.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import unquote

import dcap_qvl
import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from eecp.core.clock import Clock, isoformat, parse_isoformat
from eecp.core.errors import CollateralError

log = logging.getLogger("eecp.collateral")

Tee = Literal["tdx", "sgx"]

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
_CAS = ("platform", "processor")
_TEES = ("tdx", "sgx")
_FMSPC = re.compile(r"^[0-9A-Fa-f]{12}$")
_HEX_BODY = re.compile(rb"^[0-9A-Fa-f]+$")
_JSON_WS = re.compile(r"[ \t\n\r]*")
#: A PCS signature over tcbInfo / enclaveIdentity is raw r‖s of P-256: dcap-qvl splits it at 32.
_SIGNATURE_LEN = 64


# ------------------------------------------------------------------------------------------------
# The cached value


@dataclass(frozen=True)
class CollateralParts:
    """The nine collateral fields dcap-qvl needs, plus when they stop being valid.

    Deliberately *not* a ``QuoteCollateralV3``: see the module docstring (caching trap).
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
    next_update = _earliest_next_update(
        tcb_info=values["tcb_info"],
        qe_identity=values["qe_identity"],
        crls=(values["root_ca_crl"], values["pck_crl"]),
    )
    return CollateralParts(**values, next_update=next_update, fetched_at=fetched_at)


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


class _FetchError(Exception):
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


def _issuer_chain(response: httpx.Response, *names: str) -> str:
    for name in names:
        value = response.headers.get(name)
        if value:
            chain = unquote(value)
            if "-----BEGIN CERTIFICATE-----" not in chain:
                raise _FetchError(f"{name} header is not a PEM certificate chain")
            return chain
    raise _FetchError(f"missing {' / '.join(names)} header")


def _crl_der(body: bytes, what: str) -> bytes:
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
            raise _FetchError(f"{what}: PEM body is not a CRL") from None
    else:
        der = body
    try:
        _crl_next_update(der, what)
    except ValueError as exc:
        raise _FetchError(f"{what}: {exc}") from None
    return der


def _signed_body(
    response: httpx.Response, member: str, what: str, *, fmspc: str | None = None
) -> tuple[str, bytes]:
    """``(raw text of member, signature bytes)`` from a ``{"<member>":{...},"signature":hex}``."""
    try:
        # Decode strictly as UTF-8 (the PCS's charset) rather than httpx's guess: the str handed to
        # dcap-qvl is re-encoded as UTF-8, and must give back exactly the signed bytes.
        text = response.content.decode("utf-8")
        members = raw_json_members(text)
    except ValueError as exc:
        raise _FetchError(f"{what}: malformed envelope: {exc}") from None
    raw = members.get(member)
    signature = members.get("signature")
    if raw is None or signature is None:
        raise _FetchError(f"{what}: envelope lacks {member!r} or 'signature'")
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise _FetchError(f"{what}: {member} is not an object")
    sig_hex = json.loads(signature)
    try:
        sig = bytes.fromhex(sig_hex) if isinstance(sig_hex, str) else b""
    except ValueError:
        sig = b""
    if len(sig) != _SIGNATURE_LEN:
        raise _FetchError(f"{what}: signature is not {_SIGNATURE_LEN} bytes of hex")
    if fmspc is not None and str(body.get("fmspc", "")).upper() != fmspc:
        # A PCCS answering for another platform would poison the cache for weeks.
        raise _FetchError(f"{what}: fmspc {body.get('fmspc')!r} is not the one asked for")
    return raw, sig


# ------------------------------------------------------------------------------------------------
# The cache


class CollateralPersistence(Protocol):
    """Where cached collateral survives restarts (implemented by the store)."""

    async def load_collateral(self, key: str) -> str | None:
        """The document saved under ``key`` (a :meth:`CollateralParts.to_json`), or None."""
        ...

    async def save_collateral(self, key: str, document: str, next_update: float) -> None:
        """Save (replace) the document for ``key``; ``next_update`` is for housekeeping."""
        ...


@dataclass
class _Entry:
    fmspc: str
    ca: str
    tee: Tee
    lock: trio.Lock = field(default_factory=trio.Lock)
    parts: CollateralParts | None = None
    #: persistence consulted successfully (only once: memory is authoritative afterwards)
    loaded: bool = False
    #: fetches started so far; a waiter that sees it move shares that fetch's outcome
    attempts: int = 0
    last_attempt: float = -math.inf
    last_error: CollateralError | None = None


#: entries kept that hold no collateral (only failures): the FMSPC comes from a quote not yet
#: verified, so any agent can name new ones; real fleets have a handful of platforms
MAX_EMPTY_ENTRIES = 256


class CollateralCache:
    """Collateral per ``tee:FMSPC:ca`` from a PCCS/PCS, cached in memory and in persistence.

    ``refresh_margin_sec``: refetch once ``now`` is this close to ``next_update``.
    ``retry_interval_sec``: while a valid copy is held, don't refetch more often than this — else
    a PCCS that is down (or serves collateral already inside the margin) would cost every
    verification a full fetch attempt.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        clock: Clock,
        persistence: CollateralPersistence | None,
        refresh_margin_sec: float,
        *,
        fetch_timeout_sec: float = 10.0,
        retry_interval_sec: float = 60.0,
    ) -> None:
        self._client = client
        self._base = _normalise_base(base_url)
        self._clock = clock
        self._persistence = persistence
        self._margin = refresh_margin_sec
        self._timeout = fetch_timeout_sec
        self._retry = retry_interval_sec
        self._entries: dict[str, _Entry] = {}

    @staticmethod
    def key(fmspc: str, ca: str, tee: Tee) -> str:
        """The cache (and persistence) key: ``tee:FMSPC:ca``."""
        return f"{tee}:{fmspc.upper()}:{ca}"

    def holds(self, fmspc: str, ca: str, tee: Tee) -> bool:
        """True when collateral for this platform is in memory (a :meth:`get` then fetches
        only to refresh it)."""
        entry = self._entries.get(self.key(fmspc, ca, tee))
        return entry is not None and entry.parts is not None

    async def get(self, fmspc: str, ca: str, tee: Tee) -> CollateralParts:
        """Valid collateral for this platform, from cache or freshly fetched.

        Raises ``CollateralError`` ``collateral_unavailable`` (nothing valid and the fetch failed)
        or ``collateral_expired`` (the only copy, cached or fetched, is expired). Concurrent calls
        for one key share a single fetch. ``ValueError`` for a malformed fmspc/ca/tee (a bug).
        """
        if not _FMSPC.match(fmspc) or ca not in _CAS or tee not in _TEES:
            raise ValueError(f"bad collateral key fmspc={fmspc!r} ca={ca!r} tee={tee!r}")
        key = self.key(fmspc, ca, tee)
        entry = self._entries.get(key)
        if entry is None:
            self._forget_empty()
            entry = self._entries[key] = _Entry(fmspc.upper(), ca, tee)
        seen_attempts = entry.attempts
        async with entry.lock:
            await self._load(key, entry)
            now = self._clock.now()
            cached = entry.parts
            valid = cached is not None and cached.is_valid_at(now)
            if cached is not None and valid and now < cached.next_update - self._margin:
                return cached
            if entry.attempts != seen_attempts:
                # Someone fetched while we queued on the lock: share that outcome, don't repeat it.
                if cached is not None and valid:
                    return cached
                if entry.last_error is not None:
                    raise CollateralError(entry.last_error.reason, entry.last_error.detail)
            if cached is not None and valid and now - entry.last_attempt < self._retry:
                return cached
            return await self._refresh(key, entry, now)

    def _forget_empty(self) -> None:
        """Drop the oldest idle entries without collateral beyond :data:`MAX_EMPTY_ENTRIES`."""
        empty = [k for k, e in self._entries.items() if e.parts is None and not e.lock.locked()
                 and not e.lock.statistics().tasks_waiting]
        for key in empty[:max(0, len(empty) - MAX_EMPTY_ENTRIES + 1)]:
            del self._entries[key]

    async def refresh_ahead(self) -> None:
        """Refetch every known key whose collateral is within the margin (errors are logged)."""
        now = self._clock.now()
        due = [
            e
            for e in self._entries.values()
            if e.parts is not None and now >= e.parts.next_update - self._margin
        ]
        for entry in due:
            try:
                await self.get(entry.fmspc, entry.ca, entry.tee)
            except CollateralError as exc:
                log.warning(
                    "collateral refresh failed key=%s reason=%s detail=%s",
                    self.key(entry.fmspc, entry.ca, entry.tee),
                    exc.reason,
                    exc.detail,
                )

    async def serve_refresher(
        self,
        *,
        interval_sec: float = 300,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run :meth:`refresh_ahead` every ``interval_sec`` forever (a root-nursery task)."""
        task_status.started()
        while True:
            await trio.sleep(interval_sec)
            try:
                await self.refresh_ahead()
            except Exception:  # keep refreshing: one bad round must not kill the service
                log.exception("collateral refresh round failed")

    # -- internals ------------------------------------------------------------------------------

    async def _load(self, key: str, entry: _Entry) -> None:
        if entry.loaded:
            return
        if self._persistence is None:
            entry.loaded = True
            return
        try:
            document = await self._persistence.load_collateral(key)
        except Exception as exc:  # the store is down: try again next time, carry on meanwhile
            log.warning("collateral load failed key=%s error=%s", key, exc)
            return
        entry.loaded = True
        if document is None:
            return
        try:
            parts = CollateralParts.from_json(document)
        except ValueError as exc:
            log.warning("stored collateral unusable key=%s error=%s", key, exc)
            return
        entry.parts = parts

    async def _refresh(self, key: str, entry: _Entry, now: float) -> CollateralParts:
        entry.attempts += 1
        entry.last_attempt = now
        entry.last_error = None
        cached = entry.parts
        try:
            with trio.fail_after(self._timeout):
                fresh = await self._fetch(entry.fmspc, entry.ca, entry.tee)
        except (_FetchError, httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
            detail = _describe(exc, self._timeout)
            fail_reason = "collateral_unavailable"
        else:
            now = self._clock.now()
            if fresh.is_valid_at(now):
                entry.parts = fresh
                log.info(
                    "collateral fetched key=%s next_update=%s", key, isoformat(fresh.next_update)
                )
                await self._save(key, fresh)
                return fresh
            detail = f"PCCS served collateral that expired at {isoformat(fresh.next_update)}"
            fail_reason = "collateral_expired"
        now = self._clock.now()
        if cached is not None and cached.is_valid_at(now):
            log.warning(
                "collateral fetch failed, serving cached copy key=%s valid_until=%s error=%s",
                key,
                isoformat(cached.next_update),
                detail,
            )
            return cached
        if cached is not None:
            reason = "collateral_expired"
            detail = f"cached copy expired at {isoformat(cached.next_update)}; fetch: {detail}"
        else:
            reason = fail_reason
        log.warning("collateral unavailable key=%s reason=%s detail=%s", key, reason, detail)
        entry.last_error = CollateralError(reason, detail)
        raise CollateralError(reason, detail)

    async def _save(self, key: str, parts: CollateralParts) -> None:
        if self._persistence is None:
            return
        try:
            await self._persistence.save_collateral(key, parts.to_json(), parts.next_update)
        except Exception as exc:  # memory still has it; the next fetch will save again
            log.warning("collateral save failed key=%s error=%s", key, exc)

    async def _fetch(self, fmspc: str, ca: str, tee: Tee) -> CollateralParts:
        """The four PCS requests, concurrently (the first quote after a start waits on them)."""
        got: dict[str, Any] = {}
        errors: list[str] = []
        sgx = f"{self._base}/sgx/certification/v4"
        tee_base = f"{self._base}/{tee}/certification/v4"

        async def pck_crl() -> None:
            resp = await self._get(f"{sgx}/pckcrl", {"ca": ca, "encoding": "der"})
            got["pck_crl_issuer_chain"] = _issuer_chain(resp, "SGX-PCK-CRL-Issuer-Chain")
            got["pck_crl"] = _crl_der(resp.content, "PCK CRL")

        async def root_crl() -> None:
            resp = await self._get(f"{sgx}/rootcacrl", None)
            got["root_ca_crl"] = _crl_der(resp.content, "root CA CRL")

        async def tcb_info() -> None:
            resp = await self._get(f"{tee_base}/tcb", {"fmspc": fmspc})
            got["tcb_info_issuer_chain"] = _issuer_chain(
                resp, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
            )
            got["tcb_info"], got["tcb_info_signature"] = _signed_body(
                resp, "tcbInfo", "TCB info", fmspc=fmspc
            )

        async def qe_identity() -> None:
            resp = await self._get(f"{tee_base}/qe/identity", None)
            got["qe_identity_issuer_chain"] = _issuer_chain(
                resp, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"
            )
            got["qe_identity"], got["qe_identity_signature"] = _signed_body(
                resp, "enclaveIdentity", "QE identity"
            )

        async def guarded(step: Callable[[], Awaitable[None]]) -> None:
            # Collect failures instead of letting one cancel the others: trio would wrap them in
            # an ExceptionGroup, and one readable detail is all the caller needs.
            try:
                await step()
            except (_FetchError, httpx.HTTPError, ValueError) as exc:
                errors.append(_describe(exc, self._timeout))

        async with trio.open_nursery() as nursery:
            for step in (pck_crl, root_crl, tcb_info, qe_identity):
                nursery.start_soon(guarded, step)
        if errors:
            raise _FetchError("; ".join(errors))
        try:
            next_update = _earliest_next_update(
                tcb_info=got["tcb_info"],
                qe_identity=got["qe_identity"],
                crls=(got["root_ca_crl"], got["pck_crl"]),
            )
        except ValueError as exc:
            raise _FetchError(f"collateral contents: {exc}") from None
        return CollateralParts(**got, next_update=next_update, fetched_at=self._clock.now())

    async def _get(self, url: str, params: dict[str, str] | None) -> httpx.Response:
        resp = await self._client.get(url, params=params)
        if resp.status_code != 200:
            path = url[len(self._base) :]
            raise _FetchError(f"{path}: HTTP {resp.status_code}")
        return resp


def _normalise_base(url: str) -> str:
    """Accept a bare PCS/PCCS URL or one ending in ``/{sgx,tdx}/certification/v4`` (as dcap-qvl)."""
    base = url.rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"PCCS did not answer within {timeout:g}s"
    if isinstance(exc, httpx.HTTPError):
        return f"PCCS unreachable: {type(exc).__name__}: {exc}"
    return str(exc) or type(exc).__name__

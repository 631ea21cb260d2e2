"""DCAP collateral: fetched from a PCCS/PCS (Intel PCS API v4) with httpx under trio, and cached.

Why not ``dcap_qvl.get_collateral``: it is an asyncio coroutine (unusable from trio), and the
object it returns carries the PCK chain of the quote it was fetched for, which verification then
prefers over the chain inside any later quote — cache that object and every other machine's quote
fails. Here the cache holds only :class:`~eecp.attestation.collateral_doc.CollateralParts` (no PCK
chain; the value, and the PCS formats it is read from, are :mod:`eecp.attestation.collateral_doc`)
and builds a fresh ``QuoteCollateralV3`` per verification with ``CollateralParts.to_dcap``.

Caching rules (:class:`CollateralCache`): one entry per ``tee:FMSPC:ca``; memory first, then the
store (so a restart works while the PCCS is down); refetch when within the refresh margin of the
earliest ``nextUpdate``; on a failed fetch serve a copy that is still valid, never an expired one.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
import trio

from eecp.attestation.collateral_doc import (
    CollateralParts,
    UnusableResponse,
    crl_der,
    issuer_chain,
    parts_from_fields,
    signed_body,
)
from eecp.core.clock import Clock, isoformat
from eecp.core.errors import CollateralError

log = logging.getLogger("eecp.collateral")

Tee = Literal["tdx", "sgx"]

_CAS = ("platform", "processor")
_TEES = ("tdx", "sgx")
_FMSPC = re.compile(r"^[0-9A-Fa-f]{12}$")


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

    def next_updates(self) -> dict[tuple[str, str, str], float]:
        """The ``nextUpdate`` (Unix seconds) of every collateral held in memory, by
        ``(tee, FMSPC, ca)``: what the metrics show, so an operator is warned before a PCCS
        that stopped serving locks the platform's agents out."""
        return {(e.tee, e.fmspc, e.ca): e.parts.next_update
                for e in self._entries.values() if e.parts is not None}

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
        except (UnusableResponse, httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
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
            got["pck_crl_issuer_chain"] = issuer_chain(resp, "SGX-PCK-CRL-Issuer-Chain")
            got["pck_crl"] = crl_der(resp.content, "PCK CRL")

        async def root_crl() -> None:
            resp = await self._get(f"{sgx}/rootcacrl", None)
            got["root_ca_crl"] = crl_der(resp.content, "root CA CRL")

        async def tcb_info() -> None:
            resp = await self._get(f"{tee_base}/tcb", {"fmspc": fmspc})
            got["tcb_info_issuer_chain"] = issuer_chain(
                resp, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
            )
            got["tcb_info"], got["tcb_info_signature"] = signed_body(
                resp, "tcbInfo", "TCB info", fmspc=fmspc
            )

        async def qe_identity() -> None:
            resp = await self._get(f"{tee_base}/qe/identity", None)
            got["qe_identity_issuer_chain"] = issuer_chain(
                resp, "SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"
            )
            got["qe_identity"], got["qe_identity_signature"] = signed_body(
                resp, "enclaveIdentity", "QE identity"
            )

        refused: dict[int, list[str]] = {}  # HTTP status -> the paths that answered it

        async def guarded(step: Callable[[], Awaitable[None]]) -> None:
            # Collect failures instead of letting one cancel the others: trio would wrap them in
            # an ExceptionGroup, and one readable detail is all the caller needs.
            try:
                await step()
            except _HttpStatus as exc:
                refused.setdefault(exc.status, []).append(exc.path)
            except (UnusableResponse, httpx.HTTPError, ValueError) as exc:
                errors.append(_describe(exc, self._timeout))

        async with trio.open_nursery() as nursery:
            for step in (pck_crl, root_crl, tcb_info, qe_identity):
                nursery.start_soon(guarded, step)
        # A PCCS that is down fails the four requests alike: say it once, not four times
        failures = [*(f"HTTP {status} from {', '.join(sorted(paths))}"
                      for status, paths in sorted(refused.items())),
                    *dict.fromkeys(errors)]
        if failures:
            raise UnusableResponse("; ".join(failures))
        try:
            return parts_from_fields(got, fetched_at=self._clock.now())
        except ValueError as exc:
            raise UnusableResponse(f"collateral contents: {exc}") from None

    async def _get(self, url: str, params: dict[str, str] | None) -> httpx.Response:
        resp = await self._client.get(url, params=params)
        if resp.status_code != 200:
            raise _HttpStatus(url[len(self._base) :], resp.status_code)
        return resp


class _HttpStatus(UnusableResponse):
    """A PCS request answered with another status than 200."""

    def __init__(self, path: str, status: int) -> None:
        super().__init__(f"{path}: HTTP {status}")
        self.path = path
        self.status = status


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

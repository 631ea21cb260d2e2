"""A development PCCS: serves a development PKI's collateral over the Intel PCS v4 API.

**Development only** (``eecp demo``, local experiments). Quotes minted under a dev PKI
(:mod:`eecp.dev.mint`, the agent's ``dev`` quote provider) verify only against collateral signed
by the same PKI; this serves exactly that, in the shapes Intel's PCS uses, so that eecp's
collateral client (:mod:`eecp.attestation.collateral`) talks to it as it would to the real one:

=================================================  ==========================================
``GET /sgx/certification/v4/pckcrl?ca=platform``   DER CRL, ``SGX-PCK-CRL-Issuer-Chain``
``GET /sgx/certification/v4/rootcacrl``            DER CRL
``GET /tdx/certification/v4/tcb?fmspc=<hex>``      ``{"tcbInfo":…,"signature":…}``,
                                                   ``TCB-Info-Issuer-Chain``; 404 for another
                                                   FMSPC, as Intel's PCS answers
``GET /tdx/certification/v4/qe/identity``          ``{"enclaveIdentity":…,"signature":…}``,
                                                   ``SGX-Enclave-Identity-Issuer-Chain``
=================================================  ==========================================

Issuer chains travel URL-encoded in headers, as Intel sends them. The collateral is minted on
first use and minted again once it is :data:`REISSUE_AFTER_SEC` old, so a long-running demo
never serves expired collateral.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from eecp.attestation.collateral_doc import CollateralParts
from eecp.dataplane.http import Request, Responder
from eecp.dev.mint import DAY, DEFAULT_FMSPC, make_collateral
from eecp.dev.pki import DevPki

#: minted collateral is valid this long ...
VALIDITY_DAYS = 30.0
#: ... and replaced by a fresh one after this long (well before eecp's refresh-ahead margin)
REISSUE_AFTER_SEC = DAY

_SGX = "/sgx/certification/v4"
_TDX = "/tdx/certification/v4"


@dataclass(frozen=True)
class PccsAnswer:
    """One PCS response: status, headers and body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def pccs_answer(parts: CollateralParts, fmspc: str, method: str, path: str,
                query: dict[str, str]) -> PccsAnswer:
    """What Intel's PCS would answer to ``method path?query`` for a platform ``fmspc`` whose
    collateral is ``parts`` (pure: no clock, no I/O)."""
    if method not in ("GET", "HEAD"):
        return PccsAnswer(405, [], b"")
    if path == f"{_SGX}/pckcrl":
        if query.get("ca") not in ("platform", "processor"):
            return PccsAnswer(400, [], b"")
        return PccsAnswer(200, [("content-type", "application/pkix-crl"),
                                ("SGX-PCK-CRL-Issuer-Chain", quote(parts.pck_crl_issuer_chain))],
                          parts.pck_crl)
    if path == f"{_SGX}/rootcacrl":
        return PccsAnswer(200, [("content-type", "application/pkix-crl")], parts.root_ca_crl)
    if path == f"{_TDX}/tcb":
        if query.get("fmspc", "").upper() != fmspc.upper():
            return PccsAnswer(404, [], b"")
        # the signed text goes in verbatim: re-serialising it would break the signature
        body = f'{{"tcbInfo":{parts.tcb_info},"signature":"{parts.tcb_info_signature.hex()}"}}'
        return PccsAnswer(200, [("content-type", "application/json"),
                                ("TCB-Info-Issuer-Chain", quote(parts.tcb_info_issuer_chain))],
                          body.encode())
    if path == f"{_TDX}/qe/identity":
        signature = parts.qe_identity_signature.hex()
        body = f'{{"enclaveIdentity":{parts.qe_identity},"signature":"{signature}"}}'
        return PccsAnswer(200, [("content-type", "application/json"),
                                ("SGX-Enclave-Identity-Issuer-Chain",
                                 quote(parts.qe_identity_issuer_chain))], body.encode())
    return PccsAnswer(404, [], b"")


class DevPccs:
    """An :mod:`eecp.dataplane.http` handler serving ``pki``'s collateral for platform
    ``fmspc``.

    Run it with ``serve_http(DevPccs(pki), "127.0.0.1", 0)`` and point ``EE_PCCS_URL`` at it.
    """

    def __init__(self, pki: DevPki, *, fmspc: str = DEFAULT_FMSPC,
                 now: Callable[[], float] = time.time) -> None:
        self._pki = pki
        self._fmspc = fmspc
        self._now = now
        self._parts: CollateralParts | None = None
        self._minted_at = 0.0

    def collateral(self) -> CollateralParts:
        """The collateral served now (minted again once it is a day old)."""
        now = self._now()
        if self._parts is None or now - self._minted_at >= REISSUE_AFTER_SEC:
            self._parts = make_collateral(self._pki, now=now, fmspc=self._fmspc,
                                          collateral_days=VALIDITY_DAYS)
            self._minted_at = now
        return self._parts

    async def __call__(self, request: Request, responder: Responder) -> None:
        answer = pccs_answer(self.collateral(), self._fmspc, request.method, request.path,
                             dict(parse_qsl(request.query)))
        await responder.respond(answer.status, answer.headers, answer.body)

"""A stand-in PCCS (Intel PCS API v4) on a real socket, serving one dcap-qvl collateral JSON.

Shapes are what Intel's PCS sends: DER CRLs, issuer chains as URL-encoded PEM in headers, and
``{"tcbInfo":<raw>,"signature":"<hex>"}`` envelopes with the signed text inserted verbatim.
Everything is switchable from a test: per-endpoint hit counters, forced statuses and bodies, a
dropped connection (``up = False``), a response delay, the root CRL as hex, envelope whitespace.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

import trio

from tests.fakehttp import FakeServer, Request, Response, open_fake_http

#: Endpoint names used by ``hits``, ``status`` and ``bodies``.
ENDPOINTS = ("pckcrl", "rootcacrl", "tcb", "qe_identity")


@dataclass
class FakePccs:
    """State of the stand-in PCCS; tests flip its fields while it runs."""

    server: FakeServer
    collateral: dict[str, str]
    #: requests answered per endpoint (a dropped connection, ``up = False``, is not counted)
    hits: Counter[str] = field(default_factory=Counter)
    #: endpoint -> status to answer with instead of 200 (``"*"`` for all)
    status: dict[str, int] = field(default_factory=dict)
    #: endpoint -> body to send instead of the real one (status stays 200 unless also set)
    bodies: dict[str, bytes] = field(default_factory=dict)
    #: ``"der"`` like Intel's PCS, or ``"hex"`` (hex of the DER) like several PCCS
    root_crl_encoding: Literal["der", "hex"] = "der"
    #: whitespace put around the envelope's tokens (the signed inner text is never touched)
    envelope_spacing: str = ""
    #: header carrying the TCB info issuer chain (v4 name; v3 PCCS use ``SGX-TCB-Info-...``)
    tcb_chain_header: str = "TCB-Info-Issuer-Chain"
    #: seconds to wait before answering (exercises timeouts and concurrent callers)
    delay_sec: float = 0.0

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def up(self) -> bool:
        return self.server.up

    @up.setter
    def up(self, value: bool) -> None:
        self.server.up = value

    @property
    def total_hits(self) -> int:
        return sum(self.hits[name] for name in ENDPOINTS)

    def fail(self, endpoint: str = "*", status: int = 500) -> None:
        """Answer ``endpoint`` (or every endpoint) with ``status``."""
        self.status[endpoint] = status

    def heal(self) -> None:
        """Undo ``fail``, ``bodies`` overrides and ``up = False``."""
        self.status.clear()
        self.bodies.clear()
        self.up = True

    def set_collateral(self, collateral_json: str) -> None:
        """Serve another collateral from now on."""
        self.collateral = _load(collateral_json)

    # -- serving --------------------------------------------------------------------------------

    def _tee(self) -> str:
        return "tdx" if json.loads(self.collateral["tcb_info"]).get("id") == "TDX" else "sgx"

    def _route(self, request: Request) -> str | None:
        tee = self._tee()
        return {
            "/sgx/certification/v4/pckcrl": "pckcrl",
            "/sgx/certification/v4/rootcacrl": "rootcacrl",
            f"/{tee}/certification/v4/tcb": "tcb",
            f"/{tee}/certification/v4/qe/identity": "qe_identity",
        }.get(request.path)

    def _envelope(self, member: str, raw: str, signature_hex: str) -> bytes:
        sp = self.envelope_spacing
        text = (
            f'{sp}{{{sp}"{member}"{sp}:{sp}{raw}{sp},{sp}"signature"{sp}:{sp}'
            f'"{signature_hex}"{sp}}}{sp}'
        )
        return text.encode("utf-8")

    def _real(self, endpoint: str, request: Request) -> Response:
        c = self.collateral
        if endpoint == "pckcrl":
            if request.query.get("ca") not in ("platform", "processor"):
                return Response(400, b"bad ca")
            return Response(
                200,
                bytes.fromhex(c["pck_crl"]),
                [
                    ("content-type", "application/pkix-crl"),
                    ("SGX-PCK-CRL-Issuer-Chain", quote(c["pck_crl_issuer_chain"])),
                ],
            )
        if endpoint == "rootcacrl":
            der = bytes.fromhex(c["root_ca_crl"])
            body = der.hex().encode() if self.root_crl_encoding == "hex" else der
            return Response(200, body, [("content-type", "application/pkix-crl")])
        if endpoint == "tcb":
            fmspc = str(json.loads(c["tcb_info"]).get("fmspc", ""))
            if request.query.get("fmspc", "").upper() != fmspc.upper():
                return Response(404, b"")  # what Intel's PCS does for an unknown FMSPC
            return Response(
                200,
                self._envelope("tcbInfo", c["tcb_info"], c["tcb_info_signature"]),
                [
                    ("content-type", "application/json"),
                    (self.tcb_chain_header, quote(c["tcb_info_issuer_chain"])),
                ],
            )
        return Response(
            200,
            self._envelope("enclaveIdentity", c["qe_identity"], c["qe_identity_signature"]),
            [
                ("content-type", "application/json"),
                ("SGX-Enclave-Identity-Issuer-Chain", quote(c["qe_identity_issuer_chain"])),
            ],
        )

    async def handle(self, request: Request) -> Response:
        endpoint = self._route(request)
        if endpoint is None or request.method != "GET":
            return Response(404, b"")
        self.hits[endpoint] += 1
        if self.delay_sec:
            await trio.sleep(self.delay_sec)
        status = self.status.get(endpoint, self.status.get("*"))
        if endpoint in self.bodies:
            return Response(
                status or 200, self.bodies[endpoint], self._real(endpoint, request).headers
            )
        if status is not None:
            return Response(status, b'{"error":"forced"}', [("content-type", "application/json")])
        return self._real(endpoint, request)


def _load(collateral_json: str) -> dict[str, str]:
    doc = json.loads(collateral_json)
    return {k: v for k, v in doc.items() if isinstance(v, str)}


@asynccontextmanager
async def open_fake_pccs(collateral_json: str) -> AsyncIterator[FakePccs]:
    """Serve ``collateral_json`` (dcap-qvl's collateral JSON) as a PCCS on 127.0.0.1:<port>."""
    pccs: FakePccs | None = None

    async def handler(request: Request) -> Response:
        assert pccs is not None
        return await pccs.handle(request)

    async with open_fake_http(handler) as server:
        pccs = FakePccs(server=server, collateral=_load(collateral_json))
        yield pccs

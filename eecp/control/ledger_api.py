"""The ledger's HTTP endpoints (spec §13): a blueprint mounted only with ``EE_LEDGER_ENABLED``.

Each route is one call of :class:`~eecp.ledger.service.Ledger`. What is decided here, before
it, is **who calls** (spec §5). The request's ``Authorization`` (:meth:`Guard.presented`) is
a role token, compared in constant time with every configured one, or a node's token
(``eecpn_…``), which the ledger looks up by its SHA-256 (:meth:`Ledger.node_for_token`) and
which names the principal ``node:<id>``. Then the route's admitted principals (:data:`ROUTES`)
decide:

* no ``Authorization`` at all: 401 ``token_required``; a header that names no one (another
  scheme, two headers, a wrong or unknown token): 401 ``token_invalid``; both with
  ``WWW-Authenticate: Bearer realm="eecp"``;
* a caller known but not admitted on the route (a launcher buying credits, a node filing
  abuse): 403 ``role_not_allowed``;
* the admin is admitted everywhere; an unset role token admits no one (fail closed);
* a node admitted on a route may act only on itself: the service answers 403
  ``not_your_node`` when the path or body names another node (or its accounts).

None of these is stored for idempotency: they are decided before the service runs.

Everything else is the service's: the body (read here up to its 16 KiB limit, else 413
``body_too_large``, and within :data:`BODY_TIMEOUT_SEC`), every ``Idempotency-Key`` value as
sent, and the exact answer, written as it comes (its bytes; ``Idempotent-Replayed: true`` on a
replay; 503 ``store_unavailable`` when the database fails).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio
from quart import Blueprint, Response, request
from werkzeug.datastructures import Headers

from eecp.control.auth import Guard, Role
from eecp.core.errors import BodyTooLargeError, StoreError
from eecp.core.metrics import LedgerMetrics
from eecp.ledger.answers import Answer, error_answer, node_principal, render
from eecp.ledger.money import MAX_BODY_BYTES
from eecp.ledger.service import Ledger

#: the time a ledger request body has to arrive whole
BODY_TIMEOUT_SEC: Final = 15
NODE: Final = "node"
Admits = frozenset[str]

ADMIN_ONLY: Final[Admits] = frozenset({Role.ADMIN})
#: who may call each route besides the admin (§5's table); ``node``: a node's own token
ROUTES: Final[dict[str, Admits]] = {
    "POST /v1/credits/purchase": ADMIN_ONLY,
    "POST /v1/credits/transfer": ADMIN_ONLY,
    "POST /v1/credits/redeem": ADMIN_ONLY,
    "GET /v1/balances/{account}": frozenset({Role.ADMIN, Role.LAUNCHER, NODE}),
    "POST /v1/usage/report": frozenset({Role.ADMIN, Role.UPTIME}),
    "POST /v1/settlements/{period}/finalize": ADMIN_ONLY,
    "GET /v1/settlements/{period}": ADMIN_ONLY,
    "POST /v1/abuse/reports": frozenset({Role.ADMIN, Role.LAUNCHER}),
    "POST /v1/abuse/reports/{report_id}/authorize": ADMIN_ONLY,
    "POST /v1/nodes/register": frozenset({Role.ADMIN, NODE}),
    "GET /v1/nodes/{node_id}": frozenset({Role.ADMIN, Role.LAUNCHER, NODE}),
    "POST /v1/nodes/{node_id}/platforms": frozenset({Role.ADMIN, NODE}),
    "DELETE /v1/nodes/{node_id}/platforms/{ppid}": ADMIN_ONLY,
    "POST /v1/nodes/{node_id}/agents/{agent_id}/release": frozenset({Role.ADMIN,
                                                                     Role.LAUNCHER}),
    "GET /v1/nodes": frozenset({Role.ADMIN, Role.LAUNCHER}),
    "POST /v1/nodes/{node_id}/unstake": frozenset({Role.ADMIN, NODE}),
    "POST /v1/nodes/{node_id}/status": ADMIN_ONLY,
    "POST /v1/nodes/{node_id}/fraud": ADMIN_ONLY,
    "GET /v1/ledger/check": ADMIN_ONLY,
}


@dataclass(frozen=True)
class _Call:
    """An authenticated request: its principal, body and keys, as the service takes them."""

    principal: str
    raw: bytes
    keys: list[str]


def blueprint(guard: Guard, ledger: Ledger, metrics: LedgerMetrics) -> Blueprint:
    """The routes of spec §13, over ``ledger``."""
    bp = Blueprint("ledger", __name__)

    async def call(route: str, run: Callable[[_Call], Awaitable[Answer]]) -> Response:
        answer = await _authenticated(guard, ledger, ROUTES[route])
        if isinstance(answer, str):
            raw = await _read_body() if request.method == "POST" else b""
            if isinstance(raw, Answer):
                answer = raw
            else:
                answer = await run(_Call(answer, raw, request.headers.getlist(
                    "Idempotency-Key")))
        if answer.replayed:
            metrics.replays.inc()
        return _response(answer)

    @bp.post("/v1/credits/purchase")
    async def purchase() -> Response:
        return await call("POST /v1/credits/purchase",
                          lambda c: ledger.purchase(c.principal, c.raw, c.keys))

    @bp.post("/v1/credits/transfer")
    async def transfer() -> Response:
        return await call("POST /v1/credits/transfer",
                          lambda c: ledger.transfer(c.principal, c.raw, c.keys))

    @bp.post("/v1/credits/redeem")
    async def redeem() -> Response:
        return await call("POST /v1/credits/redeem",
                          lambda c: ledger.redeem(c.principal, c.raw, c.keys))

    @bp.get("/v1/balances/<account>")
    async def balance(account: str) -> Response:
        return await call("GET /v1/balances/{account}",
                          lambda c: ledger.balance(c.principal, account))

    @bp.post("/v1/usage/report")
    async def report_usage() -> Response:
        return await call("POST /v1/usage/report",
                          lambda c: ledger.report_usage(c.principal, c.raw, c.keys))

    @bp.post("/v1/settlements/<period>/finalize")
    async def finalize(period: str) -> Response:
        return await call("POST /v1/settlements/{period}/finalize",
                          lambda c: ledger.finalize(c.principal, period, c.raw, c.keys))

    @bp.get("/v1/settlements/<period>")
    async def settlements(period: str) -> Response:
        node_ids = request.args.getlist("node_id")
        if len(node_ids) > 1:
            return _response(Answer(400, render({"error": "invalid_query:node_id",
                                                 "detail": "repeated"})))
        node_id = node_ids[0] if node_ids else None
        return await call("GET /v1/settlements/{period}",
                          lambda c: ledger.settlements(period, node_id))

    @bp.post("/v1/abuse/reports")
    async def file_abuse() -> Response:
        return await call("POST /v1/abuse/reports",
                          lambda c: ledger.file_abuse(c.principal, c.raw, c.keys))

    @bp.post("/v1/abuse/reports/<report_id>/authorize")
    async def decide_abuse(report_id: str) -> Response:
        return await call("POST /v1/abuse/reports/{report_id}/authorize",
                          lambda c: ledger.decide_abuse(c.principal, report_id, c.raw, c.keys))

    @bp.post("/v1/nodes/register")
    async def register_node() -> Response:
        return await call("POST /v1/nodes/register",
                          lambda c: ledger.register_node(c.principal, c.raw, c.keys))

    @bp.get("/v1/nodes/<node_id>")
    async def get_node(node_id: str) -> Response:
        return await call("GET /v1/nodes/{node_id}",
                          lambda c: ledger.get_node(c.principal, node_id))

    @bp.post("/v1/nodes/<node_id>/platforms")
    async def confirm_platform(node_id: str) -> Response:
        return await call("POST /v1/nodes/{node_id}/platforms",
                          lambda c: ledger.confirm_platform(c.principal, node_id, c.raw, c.keys))

    @bp.delete("/v1/nodes/<node_id>/platforms/<ppid>")
    async def delete_platform(node_id: str, ppid: str) -> Response:
        return await call("DELETE /v1/nodes/{node_id}/platforms/{ppid}",
                          lambda c: ledger.delete_platform(c.principal, node_id, ppid))

    @bp.post("/v1/nodes/<node_id>/agents/<agent_id>/release")
    async def release_agent(node_id: str, agent_id: str) -> Response:
        return await call("POST /v1/nodes/{node_id}/agents/{agent_id}/release",
                          lambda c: ledger.release_agent(c.principal, node_id, agent_id))

    @bp.get("/v1/nodes")
    async def placement() -> Response:
        query = list(request.args.items(multi=True))
        return await call("GET /v1/nodes", lambda c: ledger.list_nodes(query))

    @bp.post("/v1/nodes/<node_id>/unstake")
    async def unstake(node_id: str) -> Response:
        return await call("POST /v1/nodes/{node_id}/unstake",
                          lambda c: ledger.unstake(c.principal, node_id, c.raw, c.keys))

    @bp.post("/v1/nodes/<node_id>/status")
    async def set_status(node_id: str) -> Response:
        return await call("POST /v1/nodes/{node_id}/status",
                          lambda c: ledger.set_status(c.principal, node_id, c.raw, c.keys))

    @bp.post("/v1/nodes/<node_id>/fraud")
    async def fraud(node_id: str) -> Response:
        return await call("POST /v1/nodes/{node_id}/fraud",
                          lambda c: ledger.fraud(c.principal, node_id, c.raw, c.keys))

    @bp.get("/v1/ledger/check")
    async def check() -> Response:
        return await call("GET /v1/ledger/check", lambda c: ledger.check())

    return bp


async def _authenticated(guard: Guard, ledger: Ledger, admits: Admits) -> str | Answer:
    """The request's principal (``admin``, ``launcher``, ``uptime``, ``node:<id>``) when the
    route admits it; else the 401/403/503 answer (see the module docstring)."""
    who = guard.presented(request.headers.getlist("Authorization"))
    if who.refusal is not None:
        return _unauthorized(who.refusal)
    if who.role is not None:
        if who.role is Role.ADMIN or who.role in admits:
            return who.role.value
        return _forbidden("role_not_allowed")
    assert who.node_token is not None
    try:
        node_id = await ledger.node_for_token(who.node_token)
    except StoreError as exc:
        return error_answer(exc)
    if node_id is None:
        return _unauthorized("token_invalid")
    if NODE not in admits:
        return _forbidden("role_not_allowed")
    return node_principal(node_id)


async def _read_body() -> bytes | Answer:
    """The request body, at most :data:`MAX_BODY_BYTES` (a larger one is 413 as soon as it
    is known to be; nothing more is read)."""
    too_large = error_answer(BodyTooLargeError("body_too_large",
                                               extra={"limit_bytes": MAX_BODY_BYTES}))
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        return too_large
    raw = bytearray()
    with trio.move_on_after(BODY_TIMEOUT_SEC) as late:
        async for chunk in request.body:
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                return too_large
    if late.cancelled_caught:
        return Answer(408, render({"error": "body_timeout"}))
    return bytes(raw)


def _unauthorized(reason: str) -> Answer:
    return Answer(401, render({"error": "unauthorized", "reason": reason}))


def _forbidden(reason: str) -> Answer:
    return Answer(403, render({"error": "forbidden", "reason": reason}))


def _response(answer: Answer) -> Response:
    headers = answer.headers
    if answer.status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="eecp"'))
    return Response(answer.body, status=answer.status, headers=Headers(headers))

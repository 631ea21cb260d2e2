"""The control surface: a quart-trio app served by hypercorn on the control port.

| route | what |
| --- | --- |
| ``GET /health`` | liveness, version, whether the store answers, whether eecp drains |
| ``GET /ready`` | 200 once serving (store migrated, every listener bound), else 503 |
| ``GET /v1/tunnel`` | agents' WebSocket tunnel (:mod:`eecp.agents.tunnels`) |
| ``GET /v1/resolve/{app}``, ``GET /v1/resolve`` | may the app be served (``dataplane.resolve``) |
| ``GET /v1/apps``, ``GET /v1/apps/{app}`` | admin views (:mod:`eecp.control.admin`) |
| ``GET /admin``, ``/admin/…`` | the admin dashboard, HTML (:mod:`eecp.control.dashboard`) |
| ``POST /v1/proxy/{app}`` | one request to the app as JSON (:mod:`eecp.dataplane.jsonproxy`) |
| ``GET /metrics`` | Prometheus metrics (:mod:`eecp.core.metrics`) |
| ``/v1/credits/…``, ``/v1/nodes/…``, … | the ledger, only with ``EE_LEDGER_ENABLED=true``
  (:mod:`eecp.control.ledger_api`); without it these paths are 404 as any unknown one |

``POST /v1/proxy/{app}`` is open when ``EE_PROXY_API_TOKEN`` is unset, as the seed has it
("proxy use": anyone who may reach the control port may reach the apps through it, as through
the proxy listener; start-up warns). Set, it takes ``Authorization: Bearer <token>`` (constant
time), else 401 ``proxy_token_required``: the JSON proxy holds whole answers in memory, which
the streaming proxy listener never does, so a deployment may keep it for its own tools.

The app is built from :class:`ControlDeps`, exactly what its routes use (:mod:`eecp.wiring`
builds it); the admin routes are a blueprint behind the one guard of :mod:`eecp.control.auth`.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trio
from quart import Response, jsonify, request
from quart.wrappers.response import ResponseBody
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge

from eecp import __version__
from eecp.agents.registry import Registry
from eecp.control import admin, dashboard, ledger_api
from eecp.control.auth import Guard, bearer, matches, unauthorized
from eecp.core.clock import Clock
from eecp.core.config import Config
from eecp.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from eecp.core.metrics import Metrics
from eecp.core.readiness import Readiness
from eecp.dataplane.access import AccessLog, Tally, agent_headers
from eecp.dataplane.forwarded import (
    FORWARDED_HEADERS,
    TrustedProxies,
    client_address,
    forwarded_headers,
    forwarding_of,
)
from eecp.dataplane.jsonproxy import Budget, JsonAnswer, Share
from eecp.dataplane.proxy import (
    MAX_JSON_PROXY_BODY,
    Forwarder,
    ProxyCall,
    ProxyError,
    client_key,
    counted,
    parse_proxy_call,
    public_reason,
)
from eecp.dataplane.resolve import ResolveAnswer, resolve, resolve_by_host
from eecp.ledger.service import Ledger
from eecp.store.store import Store
from eecp.wire.httpmsg import RequestHead, strip_hop_by_hop
from eecp.wire.streams import StreamError

log = logging.getLogger("eecp.api")

#: the largest request body the control app reads (a ``POST /v1/proxy`` call's JSON)
MAX_REQUEST_BYTES = 1024 * 1024
#: the time a request body (a ``POST /v1/proxy`` call's JSON) has to arrive whole
BODY_TIMEOUT_SEC = 15
#: a JSON answer leaves in pieces of this size: the HTTP server copies each piece it writes,
#: so a piece, not the whole answer, is the extra copy
ANSWER_PIECE_BYTES = 256 * 1024
#: how long /metrics waits for the store's SELECT 1 before it reports eecp_store_up 0
STORE_PING_SEC = 2.0


@dataclass(frozen=True)
class ControlConfig:
    """The settings the control app reads (each named as in :class:`~eecp.core.config.Config`)."""

    proxy_api_token: str | None = field(repr=False)
    proxy_json_buffer_bytes: int
    proxy_max_body_bytes: int | None
    audit_entries_shown: int
    #: network name -> sealed, for /health
    networks: Mapping[str, bool]
    #: EE_ACCESS_LOG, EE_PROXY_EXPOSE_AGENT (POST /v1/proxy's access lines and agent headers)
    access_log: bool = True
    proxy_expose_agent: bool = False

    @classmethod
    def from_config(cls, config: Config) -> ControlConfig:
        return cls(
            proxy_api_token=config.proxy_api_token,
            proxy_json_buffer_bytes=config.proxy_json_buffer_bytes,
            proxy_max_body_bytes=config.proxy_max_body_bytes,
            audit_entries_shown=config.audit_entries_shown,
            networks={n.name: n.sealed for n in config.networks},
            access_log=config.access_log,
            proxy_expose_agent=config.proxy_expose_agent,
        )


@dataclass(frozen=True)
class ControlDeps:
    """Everything the control app's routes use."""

    config: ControlConfig
    clock: Clock
    store: Store
    registry: Registry
    metrics: Metrics
    forwarder: Forwarder
    trusted_proxies: TrustedProxies
    guard: Guard
    #: how many agents are admitted now (/health)
    agents_connected: Callable[[], int]
    #: EE_DCAP_ROOT_CA replaces Intel's root (/health says so)
    dev_root_ca: bool
    #: the ledger's service (None: EE_LEDGER_ENABLED is off, its routes are not mounted)
    ledger: Ledger | None = None
    #: eecp is draining (/health says so, 503: a load balancer stops sending)
    draining: Callable[[], bool] = lambda: False
    #: GET /ready (serve() makes it ready)
    readiness: Readiness = field(default_factory=Readiness)


def create_app(deps: ControlDeps) -> QuartTrio:
    """Build the quart-trio app over one process's components."""
    app = QuartTrio("eecp")
    app.config["JSON_SORT_KEYS"] = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    budget = Budget(deps.config.proxy_json_buffer_bytes)  # one app per process
    access = AccessLog("api", deps.config.access_log)
    deps.metrics.proxy_json_buffered.set_function(lambda: budget.used)
    if not deps.config.proxy_api_token:
        log.warning("EE_PROXY_API_TOKEN is unset: POST /v1/proxy/{app} is open to anyone who "
                    "can reach the control port")

    @app.get("/health")
    async def health() -> tuple[Response, int]:
        return await health_response(deps)

    @app.get("/v1/resolve/<app_name>")
    async def resolve_named(app_name: str) -> Response:
        return _render(resolve(deps.registry, app_name, deps.clock.now()))

    @app.get("/v1/resolve")
    async def resolve_host() -> Response:
        headers = [(k.lower(), v) for k, v in request.headers.items()]  # repeats kept
        return _render(resolve_by_host(deps.registry, headers, deps.clock.now()))

    bindings = deps.ledger.agent_bindings if deps.ledger is not None else None
    app.register_blueprint(admin.blueprint(deps.guard, deps.registry, deps.clock, deps.store,
                                           deps.config.audit_entries_shown, bindings))
    app.register_blueprint(dashboard.blueprint(dashboard.DashboardDeps(
        deps.guard, deps.registry, deps.clock, deps.store, deps.config.audit_entries_shown,
        deps.trusted_proxies, bindings, deps.ledger)))
    if deps.ledger is not None:
        app.register_blueprint(ledger_api.blueprint(deps.guard, deps.ledger,
                                                    deps.metrics.enable_ledger()))

    @app.get("/ready")
    async def ready() -> tuple[Response, int]:
        state = deps.readiness.state
        return jsonify({"ready": state == "ready", "state": state}), \
            200 if state == "ready" else 503

    @app.get("/metrics")
    async def metrics() -> Response:
        # a store that cannot answer within STORE_PING_SEC (its workers busy, or a server
        # that does not reply) is reported down, rather than failing the scrape
        with trio.move_on_after(STORE_PING_SEC):
            deps.metrics.store_up.set(0)
            deps.metrics.store_up.set(1 if await deps.store.ping() else 0)
        return Response(deps.metrics.render(), status=200,
                        headers={"content-type": METRICS_CONTENT_TYPE})

    @app.post("/v1/proxy/<app_name>")
    async def proxy_json(app_name: str) -> tuple[Response, int]:
        return await proxy_json_response(deps, budget, app_name.lower(), access)

    return app


async def proxy_json_response(deps: ControlDeps, budget: Budget, app: str,
                              access: AccessLog | None = None) -> tuple[Response, int]:
    """``POST /v1/proxy/{app}``: ``{"method","path","headers","body_b64"}`` in, the app's
    ``{"status","headers","body_b64"}`` out (whole bodies: use the proxy listener to stream).

    What the call buffers is taken from ``budget`` (its request, then its answer) and given
    back once the answer has been sent or dropped; 503 ``proxy_busy`` when it is spent. Each
    call, refused or answered, ends with its line in ``access`` (:mod:`eecp.dataplane.access`:
    the app's status, or the refusal's status and reason)."""
    started = time.perf_counter()
    # who calls: the address a trusted proxy (Caddy in front of the control port) vouches for
    inbound = {name: ", ".join(request.headers.getlist(name)) for name in FORWARDED_HEADERS}
    caller = client_address(forwarding_of(inbound, request.remote_addr or "", request.scheme,
                                          None, deps.trusted_proxies, proxied_host=False),
                            deps.trusted_proxies)
    tally = Tally(deps.metrics.proxy_bytes.labels("in"))
    call: ProxyCall | None = None
    status, reason = 0, ""
    try:
        token = deps.config.proxy_api_token
        if token and not matches(bearer(request.headers.getlist("Authorization")), [token]):
            status, reason = 401, "proxy_token_required"
            return unauthorized({"allowed": False, "reason": reason})
        share = budget.share(client_key(caller))
        body: _AnswerBody | None = None
        try:
            try:
                call = parse_proxy_call(await _read_call(share))
                answer = await _forward(deps, app, call, share, inbound, caller, tally)
            except ProxyError as exc:
                status, reason = exc.http_status, exc.reason
                if call is not None:  # (a call that did not parse reached no app)
                    deps.metrics.proxied(app, exc.http_status)
                return _proxy_error(exc)
            status = answer.status
            deps.metrics.proxied(app, answer.status)
            data = answer.finish()
            body = _AnswerBody(data, share)
            headers = [("Content-Length", str(len(data)))]
            if deps.config.proxy_expose_agent and tally.agent is not None:
                headers = agent_headers(headers, tally.agent)
            return Response(body, status=200, content_type="application/json",
                            headers=Headers(headers)), 200
        finally:
            if body is None:  # (else the answer gives the share back once it has left)
                share.release()
    except trio.Cancelled:  # the caller left (or eecp is stopping)
        reason = "cancelled"
        raise
    finally:
        if access is not None:
            access.line(caller, call.method if call else "", app,
                        call.path.partition("?")[0] if call else "", status, tally, started,
                        reason)


async def _read_call(share: Share) -> object:
    """The call's JSON document (None if it is not JSON). Each piece of the JSON, and the body
    it will decode to, is taken from ``share`` as it arrives, before it is held: a declared
    length that never comes costs nothing, a chunked JSON no more than what arrived."""
    declared = request.content_length
    if declared is not None and declared > MAX_REQUEST_BYTES:
        raise ProxyError(413, "body_too_large", f"over {MAX_REQUEST_BYTES} bytes")
    raw = bytearray()
    # a JSON that has not arrived whole within BODY_TIMEOUT_SEC is 408: a call's share of the
    # budget must not be held by a client trickling it (quart's get_data would wait 60 s)
    with trio.move_on_after(BODY_TIMEOUT_SEC) as late:
        try:
            async for chunk in request.body:
                share.take(2 * len(chunk))  # the JSON, and the body decoded from it
                raw += chunk
        except RequestEntityTooLarge:
            raise ProxyError(413, "body_too_large", f"over {MAX_REQUEST_BYTES} bytes") from None
    if late.cancelled_caught:
        raise ProxyError(408, "body_timeout",
                         f"the JSON did not arrive within {BODY_TIMEOUT_SEC} s")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _forward(deps: ControlDeps, app: str, call: ProxyCall, share: Share,
                   inbound: dict[str, str], caller: str, tally: Tally) -> JsonAnswer:
    """Send ``call`` to ``app`` for ``caller``; its answer, whole (raises :class:`ProxyError`).
    ``inbound``: the HTTP request's ``X-Forwarded-*`` (believed from a trusted proxy only);
    ``tally``: counts the body bytes (and the metric), names the agent that answered."""
    # the JSON's own X-Forwarded-* are the caller's claims: the HTTP request's count, and only
    # from a trusted proxy (Caddy in front of the control port)
    hosts = [v for n, v in call.headers if n.lower() == "host"]
    if len(hosts) > 1 or (hosts and "," in hosts[0]):  # as the proxy listener refuses it
        raise ProxyError(400, "ambiguous_host", "the call's Host names more than one host")
    forwarding = forwarding_of(inbound, request.remote_addr or "", request.scheme,
                               hosts[0] if hosts else None, deps.trusted_proxies,
                               proxied_host=False)
    head = RequestHead(call.method, call.path, forwarded_headers(call.headers, forwarding,
                                                                 from_proxy=False))
    limit = deps.config.proxy_max_body_bytes or MAX_JSON_PROXY_BODY
    metrics = deps.metrics
    started = time.perf_counter()
    # counted as the proxy listener counts: time to the head, body bytes as they pass
    answer: JsonAnswer | None = None
    body = call.body()
    try:
        async with deps.forwarder.open_upstream(
                app, head, None if body is None else counted(body, tally),
                client=caller) as upstream:
            tally.agent = upstream.agent
            metrics.proxy_seconds.observe(time.perf_counter() - started)
            answer = JsonAnswer(upstream.head.status, strip_hop_by_hop(upstream.head.headers),
                                share, limit)
            try:
                async for chunk in upstream.chunks():
                    answer.feed(chunk)
            except StreamError as exc:  # the agent reset the stream, or the tunnel died
                raise ProxyError(502, public_reason(exc.reason), exc.detail) from None
    finally:
        if answer is not None:
            metrics.proxy_bytes.labels("out").inc(answer.size)
            tally.bytes_out = answer.size
    return answer


def _proxy_error(exc: ProxyError) -> tuple[Response, int]:
    doc: dict[str, Any] = {"allowed": exc.allowed, "reason": exc.reason}
    if exc.http_status == 400:  # which field, and why
        doc["detail"] = exc.detail
    return jsonify(doc), exc.http_status


class _AnswerBody(ResponseBody):
    """A JSON answer in its one buffer, sent in pieces of :data:`ANSWER_PIECE_BYTES`. Its share
    of the budget goes back when it has been sent, or when it is dropped unsent (a client gone
    before the body: the finalizer)."""

    def __init__(self, data: bytearray, share: Share) -> None:
        self._data = data
        self._at = 0
        self._release = weakref.finalize(self, share.release)

    async def __aenter__(self) -> _AnswerBody:
        return self

    async def __aexit__(self, exc_type: type, exc_value: BaseException,
                        tb: TracebackType) -> None:
        self._data = bytearray()
        self._release()

    def __aiter__(self) -> _AnswerBody:
        return self

    async def __anext__(self) -> bytes:
        at = self._at
        if at >= len(self._data):
            raise StopAsyncIteration
        self._at = at + ANSWER_PIECE_BYTES
        with memoryview(self._data) as view:
            return bytes(view[at:at + ANSWER_PIECE_BYTES])


def _render(answer: ResolveAnswer) -> Response:
    return Response(answer.body, status=answer.status, headers=Headers(list(answer.headers)))


async def health_response(deps: ControlDeps) -> tuple[Response, int]:
    """``{"status":"ok"}`` (200) when the store answers, ``degraded`` (503) otherwise, and
    ``draining`` (503) while eecp stops (:mod:`eecp.core.drain`), whatever the store says."""
    store_ok = await deps.store.ping()
    draining = deps.draining()
    body: dict[str, Any] = {
        "status": "draining" if draining else "ok" if store_ok else "degraded",
        "version": __version__,
        "store": "ok" if store_ok else "unavailable",
        "store_backend": deps.store.describe().split(":", 1)[0],
        "dev_root_ca": deps.dev_root_ca,
        "networks": {name: "sealed" if sealed else "open"
                     for name, sealed in deps.config.networks.items()},
        "agents_connected": deps.agents_connected(),
    }
    if deps.dev_root_ca:
        body["warning"] = "EE_DCAP_ROOT_CA replaces Intel's root: development only"
    return jsonify(body), 200 if store_ok and not draining else 503

"""The control surface: a quart-trio app served by hypercorn on the control port.

| route | what |
| --- | --- |
| ``GET /health`` | liveness, version, whether the store answers |
| ``GET /v1/tunnel`` | agents' WebSocket tunnel (:mod:`eecp.agents.tunnels`) |
| ``GET /v1/resolve/{app}``, ``GET /v1/resolve`` | may the app be served (``dataplane.resolve``) |
| ``GET /v1/apps``, ``GET /v1/apps/{app}`` | admin views, bearer ``EE_ADMIN_TOKEN`` |
| ``POST /v1/proxy/{app}`` | one request to the app as JSON (:mod:`eecp.dataplane.jsonproxy`) |
| ``GET /metrics`` | Prometheus metrics (:mod:`eecp.core.metrics`) |

``POST /v1/proxy/{app}`` is open when ``EE_PROXY_API_TOKEN`` is unset, as the seed has it
("proxy use": anyone who may reach the control port may reach the apps through it, as through
the proxy listener; start-up warns). Set, it takes ``Authorization: Bearer <token>`` (constant
time), else 401 ``proxy_token_required``: the JSON proxy holds whole answers in memory, which
the streaming proxy listener never does, so a deployment may keep it for its own tools.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from quart import Response, jsonify, request
from quart.wrappers.response import ResponseBody
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge

from eecp import __version__
from eecp.control import admin
from eecp.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from eecp.dataplane.forwarded import FORWARDED_HEADERS, forwarded_headers, forwarding_of
from eecp.dataplane.jsonproxy import Budget, JsonAnswer, Share
from eecp.dataplane.proxy import (
    MAX_JSON_PROXY_BODY,
    ProxyCall,
    ProxyError,
    counted,
    open_upstream,
    parse_proxy_call,
    public_reason,
)
from eecp.dataplane.resolve import ResolveAnswer, resolve, resolve_by_host
from eecp.wire.httpmsg import RequestHead, strip_hop_by_hop
from eecp.wire.streams import StreamError

if TYPE_CHECKING:
    from eecp.service import Services

log = logging.getLogger("eecp.api")

#: the largest request body the control app reads (a ``POST /v1/proxy`` call's JSON)
MAX_REQUEST_BYTES = 1024 * 1024
#: a JSON answer leaves in pieces of this size: the HTTP server copies each piece it writes,
#: so a piece, not the whole answer, is the extra copy
ANSWER_PIECE_BYTES = 256 * 1024


def create_app(services: Services) -> QuartTrio:
    """Build the quart-trio app bound to one process's ``services``."""
    app = QuartTrio("eecp")
    app.config["JSON_SORT_KEYS"] = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    budget = Budget(services.config.proxy_json_buffer_bytes)  # one app per process
    services.metrics.proxy_json_buffered.set_function(lambda: budget.used)
    if not services.config.proxy_api_token:
        log.warning("EE_PROXY_API_TOKEN is unset: POST /v1/proxy/{app} is open to anyone who "
                    "can reach the control port")

    @app.get("/health")
    async def health() -> tuple[Response, int]:
        return await health_response(services)

    @app.get("/v1/resolve/<app_name>")
    async def resolve_named(app_name: str) -> Response:
        return _render(resolve(services.registry, app_name, services.clock.now()))

    @app.get("/v1/resolve")
    async def resolve_host() -> Response:
        headers = [(k.lower(), v) for k, v in request.headers.items()]  # repeats kept
        return _render(resolve_by_host(services.registry, headers, services.clock.now()))

    @app.get("/v1/apps")
    async def list_apps() -> Response | tuple[Response, int]:
        if not admin.authorized(services.config.admin_token,
                                request.headers.get("Authorization")):
            return _unauthorized()
        return jsonify(admin.list_apps(services.registry, services.clock.now()))

    @app.get("/v1/apps/<app_name>")
    async def app_detail(app_name: str) -> Response | tuple[Response, int]:
        name = app_name.lower()
        if not admin.authorized(services.config.admin_token,
                                request.headers.get("Authorization")):
            return _unauthorized()
        # ?verdict=accepted: the last accepted ones, however many refusals came after them
        verdict = request.args.get("verdict")
        if verdict not in (None, "accepted", "refused"):
            return jsonify({"error": "invalid_query:verdict",
                            "detail": "expected accepted or refused"}), 400
        audit = await services.store.recent_audit(name, services.config.audit_entries_shown,
                                                  verdict)
        doc = admin.app_detail(services.registry, name, services.clock.now(), audit)
        if doc is None:
            return jsonify({"error": "unknown_app", "app": name}), 404
        return jsonify(doc)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(services.metrics.render(), status=200,
                        headers={"content-type": METRICS_CONTENT_TYPE})

    @app.post("/v1/proxy/<app_name>")
    async def proxy_json(app_name: str) -> tuple[Response, int]:
        return await proxy_json_response(services, budget, app_name.lower())

    return app


async def proxy_json_response(services: Services, budget: Budget, app: str
                              ) -> tuple[Response, int]:
    """``POST /v1/proxy/{app}``: ``{"method","path","headers","body_b64"}`` in, the app's
    ``{"status","headers","body_b64"}`` out (whole bodies: use the proxy listener to stream).

    What the call buffers is taken from ``budget`` (its request, then its answer) and given
    back once the answer has been sent or dropped; 503 ``proxy_busy`` when it is spent."""
    if not admin.authorized(services.config.proxy_api_token,
                            request.headers.get("Authorization")):
        return _unauthorized({"allowed": False, "reason": "proxy_token_required"})
    share = budget.share()
    body: _AnswerBody | None = None
    try:
        try:
            call = parse_proxy_call(await _read_call(share))
        except ProxyError as exc:
            return _proxy_error(exc)
        try:
            answer = await _forward(services, app, call, share)
        except ProxyError as exc:
            services.metrics.proxied(app, exc.http_status)
            return _proxy_error(exc)
        services.metrics.proxied(app, answer.status)
        data = answer.finish()
        body = _AnswerBody(data, share)
        return Response(body, status=200, content_type="application/json",
                        headers={"Content-Length": str(len(data))}), 200
    finally:
        if body is None:  # (else the answer gives the share back once it has left)
            share.release()


async def _read_call(share: Share) -> object:
    """The call's JSON document (None if it is not JSON). The JSON and the body decoded from
    it are taken from ``share`` before they are held."""
    declared = request.content_length
    if declared is not None:
        if declared > MAX_REQUEST_BYTES:
            raise ProxyError(413, "body_too_large", f"over {MAX_REQUEST_BYTES} bytes")
        share.take(2 * declared)
    try:
        raw = await request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise ProxyError(413, "body_too_large", f"over {MAX_REQUEST_BYTES} bytes") from None
    if declared is None:
        share.take(2 * len(raw))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _forward(services: Services, app: str, call: ProxyCall, share: Share) -> JsonAnswer:
    """Send ``call`` to ``app``; its answer, whole (raises :class:`ProxyError`)."""
    # the JSON's own X-Forwarded-* are the caller's claims: the HTTP request's count, and only
    # from a trusted proxy (Caddy in front of the control port)
    host = next((v for n, v in call.headers if n.lower() == "host"), None)
    inbound = {name: ", ".join(request.headers.getlist(name)) for name in FORWARDED_HEADERS}
    forwarding = forwarding_of(inbound, request.remote_addr or "", request.scheme, host,
                               services.trusted_proxies, proxied_host=False)
    head = RequestHead(call.method, call.path, forwarded_headers(call.headers, forwarding,
                                                                 from_proxy=False))
    limit = services.config.proxy_max_body_bytes or MAX_JSON_PROXY_BODY
    metrics = services.metrics
    started = time.perf_counter()
    # counted as the proxy listener counts: time to the head, body bytes as they pass
    answer: JsonAnswer | None = None
    body = call.body()
    try:
        async with open_upstream(services, app, head, None if body is None else
                                 counted(body, metrics.proxy_bytes.labels("in"))) as upstream:
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


def _unauthorized(doc: dict[str, Any] | None = None) -> tuple[Response, int]:
    response = jsonify(doc or {"error": "unauthorized", "reason": "admin_token_required"})
    response.headers["WWW-Authenticate"] = 'Bearer realm="eecp"'
    return response, 401


async def health_response(services: Services) -> tuple[Response, int]:
    """``{"status":"ok"}`` (200) when the store answers, ``degraded`` (503) otherwise."""
    store_ok = await services.store.ping()
    body: dict[str, Any] = {
        "status": "ok" if store_ok else "degraded",
        "version": __version__,
        "store": "ok" if store_ok else "unavailable",
        "store_backend": services.store.describe().split(":", 1)[0],
        "dev_root_ca": services.dev_root_ca,
        "networks": {n.name: "sealed" if n.sealed else "open" for n in services.config.networks},
        "agents_connected": services.tunnels.connected,
    }
    if services.dev_root_ca:
        body["warning"] = "EE_DCAP_ROOT_CA replaces Intel's root: development only"
    return jsonify(body), 200 if store_ok else 503

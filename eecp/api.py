"""The control surface: a quart-trio app served by hypercorn on the control port.

| route | what |
| --- | --- |
| ``GET /health`` | liveness, version, whether the store answers |
| ``GET /v1/tunnel`` | agents' WebSocket tunnel (:mod:`eecp.tunnel`) |
| ``GET /v1/resolve/{app}``, ``GET /v1/resolve`` | may the app be served (:mod:`eecp.resolve`) |
| ``GET /v1/apps``, ``GET /v1/apps/{app}`` | admin views, bearer ``EE_ADMIN_TOKEN`` |
| ``POST /v1/proxy/{app}`` | one request to the app as JSON (:mod:`eecp.proxy`) |
| ``GET /metrics`` | Prometheus metrics (:mod:`eecp.metrics`) |
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from eecp import __version__, admin
from eecp.forwarded import FORWARDED_HEADERS, forwarded_headers, forwarding_of
from eecp.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from eecp.proxy import (
    MAX_JSON_PROXY_BODY,
    ProxyError,
    counted,
    open_upstream,
    parse_proxy_call,
    public_reason,
    strip_hop_by_hop,
)
from eecp.resolve import ResolveAnswer, app_from_host, resolve
from eecp.streams import RequestHead, StreamError

if TYPE_CHECKING:
    from eecp.service import Services


def create_app(services: Services) -> QuartTrio:
    """Build the quart-trio app bound to one process's ``services``."""
    app = QuartTrio("eecp")
    app.config["JSON_SORT_KEYS"] = False
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024

    @app.get("/health")
    async def health() -> tuple[Response, int]:
        return await health_response(services)

    @app.get("/v1/resolve/<app_name>")
    async def resolve_named(app_name: str) -> Response:
        return _render(resolve(services.registry, app_name, services.clock.now()))

    @app.get("/v1/resolve")
    async def resolve_by_host() -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return _render(resolve(services.registry, app_from_host(headers),
                               services.clock.now()))

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
        return await proxy_json_response(services, app_name)

    return app


async def proxy_json_response(services: Services, app_name: str) -> tuple[Response, int]:
    """``POST /v1/proxy/{app}``: ``{"method","path","headers","body_b64"}`` in, the app's
    ``{"status","headers","body_b64"}`` out (whole bodies: use the proxy listener to stream)."""
    doc = await request.get_json(force=True, silent=True)
    try:
        call = parse_proxy_call(doc)
    except ProxyError as exc:
        return jsonify({"allowed": False, "reason": exc.reason, "detail": exc.detail}), 400
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
    size = 0  # counted as the proxy listener counts: time to the head, body bytes as they pass
    try:
        body = call.body()
        async with open_upstream(services, app_name.lower(), head, None if body is None else
                                 counted(body, metrics.proxy_bytes.labels("in"))) as upstream:
            metrics.proxy_seconds.observe(time.perf_counter() - started)
            parts: list[bytes] = []
            try:
                async for chunk in upstream.chunks():
                    size += len(chunk)
                    if size > limit:
                        raise ProxyError(502, "response_too_large", f"over {limit} bytes")
                    parts.append(chunk)
            except StreamError as exc:  # the agent reset the stream, or the tunnel died
                raise ProxyError(502, public_reason(exc.reason), exc.detail) from None
    except ProxyError as exc:
        services.metrics.proxied(app_name.lower(), exc.http_status)
        return jsonify({"allowed": exc.allowed, "reason": exc.reason}), exc.http_status
    finally:
        metrics.proxy_bytes.labels("out").inc(size)
    services.metrics.proxied(app_name.lower(), upstream.head.status)
    return jsonify({"status": upstream.head.status,
                    "headers": [list(h) for h in strip_hop_by_hop(upstream.head.headers)],
                    "body_b64": base64.b64encode(b"".join(parts)).decode()}), 200


def _render(answer: ResolveAnswer) -> Response:
    return Response(answer.body, status=answer.status, headers=Headers(list(answer.headers)))


def _unauthorized() -> tuple[Response, int]:
    response = jsonify({"error": "unauthorized", "reason": "admin_token_required"})
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

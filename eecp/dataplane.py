"""The data plane: the proxy listener and the auth listener, on the lean httptools server.

* proxy listener (``EE_PROXY_BIND:EE_PROXY_PORT``): any method and path; the app is named by
  ``X-EE-App``, else by the first DNS label of the host asked for (a trusted proxy's
  ``X-Forwarded-Host``, else ``Host``). The same allow decision as resolve
  applies, then the request travels over the app's tunnel (:mod:`eecp.proxy`) and the response
  streams back chunk by chunk.
* auth listener (``EE_AUTH_BIND:EE_AUTH_PORT``): only ``GET /v1/resolve/{app}`` and
  ``GET /v1/resolve``, answered exactly like the control port's resolve, for nginx
  ``auth_request`` and Caddy ``forward_auth`` at full speed.

Each listener has its own connection cap (:mod:`eecp.capacity`): a flood of idle sockets on
the proxy listener closes its own oldest idle connections, and resolve still answers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from eecp.capacity import ListenerCaps
from eecp.forwarded import forwarded_headers, forwarding_of, inbound_forwarding
from eecp.frames import is_origin_form
from eecp.httpserver import Limits, Request, Responder, serve_http
from eecp.proxy import ProxyError, counted, open_upstream, strip_hop_by_hop
from eecp.resolve import app_from_host, host_label, resolve
from eecp.streams import RequestHead

if TYPE_CHECKING:
    from eecp.service import Services

log = logging.getLogger("eecp.dataplane")

_JSON = [("content-type", "application/json"), ("cache-control", "no-store")]
_RESOLVE_PREFIX = "/v1/resolve/"


def error_body(reason: str, allowed: bool = False) -> bytes:
    """The JSON every refusal carries."""
    return json.dumps({"allowed": allowed, "reason": reason}, separators=(",", ":")).encode()


class AuthHandler:
    """The auth listener: resolve answers, nothing else."""

    def __init__(self, services: Services) -> None:
        self._services = services

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.method not in ("GET", "HEAD"):
            await responder.respond(405, _JSON, error_body("method_not_allowed"))
            return
        path = request.path
        if path.startswith(_RESOLVE_PREFIX):
            app: str | None = path[len(_RESOLVE_PREFIX):]
        elif path == "/v1/resolve":
            app = app_from_host(dict(request.headers))
        else:
            await responder.respond(404, _JSON, error_body("not_found"))
            return
        answer = resolve(self._services.registry, app, self._services.clock.now())
        await responder.respond(answer.status, answer.headers, answer.body)


class ProxyHandler:
    """The proxy listener: every request forwarded to its app over a tunnel."""

    def __init__(self, services: Services) -> None:
        self._services = services
        metrics = services.metrics
        # metric children looked up once (labels() costs a lock and a lookup per call)
        self._bytes_in = metrics.proxy_bytes.labels("in")
        self._bytes_out = metrics.proxy_bytes.labels("out")

    async def __call__(self, request: Request, responder: Responder) -> None:
        headers = dict(request.headers)
        forwarding = forwarding_of(inbound_forwarding(request.headers),
                                   request.client[0] if request.client else "",
                                   "http", headers.get("host"), self._services.trusted_proxies)
        # the host the app is asked for names the app: a trusted proxy's X-Forwarded-Host,
        # else Host (a client's own X-Forwarded-Host picks nothing, as it reaches no app)
        app = headers.get("x-ee-app") or (host_label(forwarding.host) if forwarding.host
                                          else None)
        if not app:
            await responder.respond(400, _JSON, error_body("missing_app"))
            return
        if not is_origin_form(request.target):  # absolute-form, `*`, `//host`: no SSRF
            await responder.respond(400, _JSON, error_body("invalid_target"))
            return
        head = RequestHead(request.method, request.target, forwarded_headers(
            [(n, v) for n, v in request.headers if n != "x-ee-app"], forwarding))
        body = self._body(request)
        metrics = self._services.metrics
        started = time.perf_counter()
        status = 0
        try:
            async with open_upstream(self._services, app.lower(), head, body) as upstream:
                status = upstream.head.status
                metrics.proxy_seconds.observe(time.perf_counter() - started)
                # what is already here goes out with what follows: a small answer is one write,
                # and a stream (SSE) is flushed as soon as nothing more is waiting
                stream = upstream.stream
                await responder.send_head(status, strip_hop_by_hop(upstream.head.headers),
                                          hold=stream.ready)
                sent = 0
                try:
                    # (the stream itself, not upstream.chunks(): no generator per request)
                    while (chunk := await stream.receive()) is not None:
                        sent += len(chunk)
                        await responder.send(chunk, hold=stream.ready)
                finally:
                    self._bytes_out.inc(sent)
                await responder.end()
        except ProxyError as exc:
            if responder.head_sent:
                raise  # mid-body: the only honest signal left is closing the connection
            status = exc.http_status
            await responder.respond(exc.http_status, _JSON, error_body(exc.reason, exc.allowed))
        finally:
            metrics.proxied(app.lower(), status)

    def _body(self, request: Request) -> AsyncIterator[bytes] | None:
        chunked = (request.header("transfer-encoding") or "").lower().endswith("chunked")
        if not chunked and not request.content_length:
            return None
        return counted(request.body_chunks(), self._bytes_in)


async def serve_dataplane(services: Services, caps: ListenerCaps,
                          task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """Run the proxy and auth listeners; reports ``(proxy_port, auth_port)`` once both listen."""
    config = services.config
    limits = Limits(max_body_bytes=config.proxy_max_body_bytes,
                    send_timeout_sec=config.proxy_send_timeout_sec)
    async with trio.open_nursery() as nursery:
        proxy_port: int = await nursery.start(
            _serve, ProxyHandler(services), config.proxy_bind, config.proxy_port, limits,
            caps.proxy, "proxy listener")
        auth_port: int = await nursery.start(
            _serve, AuthHandler(services), config.auth_bind, config.auth_port, Limits(),
            caps.auth, "auth listener")
        log.info("data plane: proxy on %s:%d, auth on %s:%d", config.proxy_bind, proxy_port,
                 config.auth_bind, auth_port)
        task_status.started((proxy_port, auth_port))


async def _serve(handler: AuthHandler | ProxyHandler, host: str, port: int, limits: Limits,
                 max_connections: int, name: str,
                 task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    await serve_http(handler, host, port, limits=limits, max_connections=max_connections,
                     name=name, task_status=task_status)

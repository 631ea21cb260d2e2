"""The data plane: the proxy listener and the auth listener, on the lean httptools server.

* proxy listener (``EE_PROXY_BIND:EE_PROXY_PORT``): any method and path; the app is named by
  a trusted proxy's ``X-EE-App``, else by the first DNS label of the host asked for (a trusted
  proxy's ``X-Forwarded-Host``, else ``Host``). Anybody else names it by ``Host`` alone: what
  the app is told it was asked for is what chose it. A name given twice, or a list of hosts, is
  400 ``ambiguous_host`` (resolve refuses the same, :mod:`eecp.dataplane.resolve`). The same allow
  decision as resolve applies, then the request travels over the app's tunnel
  (:mod:`eecp.dataplane.proxy`) and the response streams back chunk by chunk.
* auth listener (``EE_AUTH_BIND:EE_AUTH_PORT``): only ``GET /v1/resolve/{app}`` and
  ``GET /v1/resolve``, answered exactly like the control port's resolve, for nginx
  ``auth_request`` and Caddy ``forward_auth`` at full speed.

While eecp drains (:mod:`eecp.core.drain`) the proxy listener keeps listening and lets the
requests in flight finish, but answers each new one 503 ``draining`` with ``Connection: close``:
a client (or a front proxy) holding a kept-alive connection learns at once to go elsewhere,
where a closed port would only say "refused". The auth listener answers as ever.

Each listener has its own connection cap (:mod:`eecp.core.capacity`): a flood of idle sockets on
the proxy listener closes its own oldest idle connections, and resolve still answers.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator

import trio

from eecp.agents.registry import Registry
from eecp.core.capacity import ConnectionGate, ListenerCaps
from eecp.core.clock import Clock
from eecp.core.config import Config
from eecp.core.errors import StartupError
from eecp.core.metrics import Metrics
from eecp.core.ratelimit import LogBudget
from eecp.dataplane.access import AccessLog, Tally, agent_headers
from eecp.dataplane.forwarded import (
    Forwarding,
    TrustedProxies,
    client_address,
    forwarded_headers,
    forwarding_of,
    inbound_forwarding,
)
from eecp.dataplane.http import (
    ClientDisconnected,
    Limits,
    Request,
    RequestError,
    Responder,
    serve_http_listeners,
)
from eecp.dataplane.proxy import (
    Forwarder,
    ProxyError,
    Upstream,
    check_response_head,
    counted,
    public_reason,
)
from eecp.dataplane.resolve import resolve, resolve_by_host
from eecp.dataplane.websocket import Relay
from eecp.wire.httpmsg import (
    WEBSOCKET,
    AmbiguousHost,
    RequestHead,
    host_label,
    is_origin_form,
    strip_hop_by_hop,
    websocket_upgrade,
)
from eecp.wire.streams import Stream, StreamError

log = logging.getLogger("eecp.dataplane")

_JSON = [("content-type", "application/json"), ("cache-control", "no-store")]
_RESOLVE_PREFIX = "/v1/resolve/"
#: a refusal while eecp drains: and this connection goes nowhere any more
_JSON_CLOSE = [*_JSON, ("connection", "close")]


#: log lines of failed proxied streams a minute, in all (each client gets a fifth of it)
FAILED_LINES_PER_MIN = 300


def error_body(reason: str, allowed: bool = False) -> bytes:
    """The JSON every refusal carries."""
    return json.dumps({"allowed": allowed, "reason": reason}, separators=(",", ":")).encode()


class AuthHandler:
    """The auth listener: resolve answers, nothing else."""

    def __init__(self, registry: Registry, clock: Clock) -> None:
        self._registry = registry
        self._clock = clock

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.method not in ("GET", "HEAD"):
            await responder.respond(405, _JSON, error_body("method_not_allowed"))
            return
        path = request.path
        if path.startswith(_RESOLVE_PREFIX):
            answer = resolve(self._registry, path[len(_RESOLVE_PREFIX):], self._clock.now())
        elif path == "/v1/resolve":
            answer = resolve_by_host(self._registry, request.headers, self._clock.now())
        else:
            await responder.respond(404, _JSON, error_body("not_found"))
            return
        await responder.respond(answer.status, answer.headers, answer.body)


class ProxyHandler:
    """The proxy listener: every request forwarded to its app over a tunnel."""

    def __init__(self, forwarder: Forwarder, trusted_proxies: TrustedProxies, metrics: Metrics,
                 *, ws_idle_sec: float = 600.0, send_timeout_sec: float = 60.0,
                 access_log: bool = True, expose_agent: bool = False) -> None:
        self._forwarder = forwarder
        self._ws_idle_sec = ws_idle_sec  # EE_PROXY_WS_IDLE_SEC
        self._send_timeout_sec = send_timeout_sec
        self._access = AccessLog("proxy", access_log)
        self._expose_agent = expose_agent
        self._trusted = trusted_proxies
        self._metrics = metrics
        # metric children looked up once (labels() costs a lock and a lookup per call)
        self._bytes_in = metrics.proxy_bytes.labels("in")
        self._bytes_out = metrics.proxy_bytes.labels("out")
        self._failed_lines = LogBudget(FAILED_LINES_PER_MIN)

    def _failed(self, request: Request, app: str, reason: str, client: str) -> None:
        """One line per proxied request that failed after it reached its agent (no traceback:
        a client or an agent failing its own stream is no bug of eecp's), within the client's
        share of :data:`FAILED_LINES_PER_MIN`."""
        now = trio.current_time()
        what = f"{app} {request.method} {request.path[:200]}: {reason}"
        if not self._failed_lines.allow(client, now, what):
            return
        left_out = self._failed_lines.due_summary(now)
        if left_out:
            log.info("proxy: %d lines of failed requests left out (the latest: %s)", left_out,
                     self._failed_lines.latest)
        log.info("proxy %s %s %s failed: %s", app, request.method, request.path[:200], reason)

    async def __call__(self, request: Request, responder: Responder) -> None:
        started = time.perf_counter()
        forwarding = forwarding_of(inbound_forwarding(request.headers),
                                   request.client[0] if request.client else "",
                                   "http", request.header("host"), self._trusted)
        try:
            app = app_named(request.headers, forwarding)
        except AmbiguousHost as exc:
            await self._refuse(request, responder, forwarding, "", exc.reason, started)
            return
        if not app:
            await self._refuse(request, responder, forwarding, "", "missing_app", started)
            return
        if not is_origin_form(request.target):  # absolute-form, `*`, `//host`: no SSRF
            await self._refuse(request, responder, forwarding, app.lower(), "invalid_target",
                               started)
            return
        head = RequestHead(request.method, request.target, forwarded_headers(
            [(n, v) for n, v in request.headers if n != "x-ee-app"], forwarding),
            WEBSOCKET if _websocket_request(request) else None)
        await self._forward(request, responder, app.lower(), head,
                            client_address(forwarding, self._trusted), started)

    async def _refuse(self, request: Request, responder: Responder, forwarding: Forwarding,
                      app: str, reason: str, started: float) -> None:
        """A 400 for a request that names no app it can be forwarded to (and its line)."""
        try:
            await responder.respond(400, _JSON, error_body(reason))
        finally:
            self._access.line(client_address(forwarding, self._trusted), request.method, app,
                              request.path, 400, Tally(None), started, reason)

    async def _forward(self, request: Request, responder: Responder, app: str,
                       head: RequestHead, client: str, started: float) -> None:
        tally = Tally(self._bytes_in)
        body = self._body(request, tally)
        metrics = self._metrics
        status = 0
        reason = ""
        try:
            async with self._forwarder.open_upstream(app, head, body,
                                                     client=client) as upstream:
                tally.agent = upstream.agent
                status = upstream.head.status
                metrics.proxy_seconds.observe(time.perf_counter() - started)
                await self._relay(upstream, responder, request, app, tally)
        except ProxyError as exc:
            status, reason = exc.http_status, exc.reason
            if responder.head_sent:  # mid-body: closing the connection is all that is left
                self._failed(request, app, exc.reason, client)
                raise RequestError(exc.http_status, exc.reason) from None
            await responder.respond(exc.http_status,
                                    _JSON_CLOSE if exc.reason == "draining" else _JSON,
                                    error_body(exc.reason, exc.allowed))
        except StreamError as exc:  # the agent reset the stream mid-body, or the tunnel died
            reason = public_reason(exc.reason)
            self._failed(request, app, f"{reason} ({exc.reason})", client)
            raise RequestError(502, reason) from None
        except RequestError as exc:  # the client's body: malformed, too large, too slow
            status, reason = exc.http_status, exc.reason
            self._failed(request, app, exc.reason, client)
            raise
        except ClientDisconnected:
            reason = "client_gone"
            self._failed(request, app, reason, client)
            raise
        except trio.Cancelled:  # the server saw the client leave (or eecp is stopping)
            reason = "cancelled"
            self._failed(request, app, reason, client)
            raise
        finally:
            metrics.proxied(app, status)
            self._access.line(client, request.method, app, request.path, status, tally,
                              started, reason)

    async def _relay(self, upstream: Upstream, responder: Responder, request: Request,
                     app: str, tally: Tally) -> None:
        # what is already here goes out with what follows: a small answer is one write, and a
        # stream (SSE) is flushed as soon as nothing more is waiting
        stream = upstream.stream
        head = upstream.head
        if head.status == 101 and isinstance(stream, Stream):  # (only ever to an upgrade)
            await self._websocket(upstream, stream, responder, app)
            return
        headers = strip_hop_by_hop(head.headers)
        if self._expose_agent:
            headers = agent_headers(headers, upstream.agent)
        await responder.send_head(head.status, headers, hold=stream.ready)
        # (checked by Forwarder.open_upstream: a plain number or none)
        length = check_response_head(head)
        sent = 0
        try:
            # (the stream itself, not upstream.chunks(): no generator per request)
            while (chunk := await stream.receive()) is not None:
                if length is not None and sent + len(chunk) > length:
                    # an agent's body longer than its head says: what is beyond is dropped
                    log.info("proxy %s %s %s: the agent sent more than its Content-Length of "
                             "%d; the rest is dropped", app, request.method,
                             request.path[:200], length)
                    chunk = chunk[:length - sent]
                    sent += len(chunk)
                    await responder.send(chunk)
                    break
                sent += len(chunk)
                await responder.send(chunk, hold=stream.ready)
        finally:
            self._bytes_out.inc(sent)
            tally.bytes_out = sent
        await responder.end()

    async def _websocket(self, upstream: Upstream, stream: Stream, responder: Responder,
                         app: str) -> None:
        """The app accepted the upgrade: its 101 to the client, then the bytes both ways
        (:mod:`eecp.dataplane.websocket`)."""
        headers = [*strip_hop_by_hop(upstream.head.headers), ("upgrade", WEBSOCKET)]
        client = await responder.switch_protocols(headers)
        agent = upstream.agent
        await Relay(client, stream, idle_sec=self._ws_idle_sec,
                    send_timeout_sec=self._send_timeout_sec,
                    revocation=lambda: self._forwarder.revocation(app, agent),
                    bytes_in=self._bytes_in, bytes_out=self._bytes_out).run()

    def _body(self, request: Request, tally: Tally) -> AsyncIterator[bytes] | None:
        chunked = (request.header("transfer-encoding") or "").lower().endswith("chunked")
        if not chunked and not request.content_length:
            return None
        return counted(request.body_chunks(), tally)  # (the tally counts the metric too)


def _websocket_request(request: Request) -> bool:
    """A WebSocket handshake the server can hand over: llhttp saw the upgrade, it is a GET
    asking for ``websocket``, and it has no body (its head is all of the request)."""
    return (request.upgrading and not request.content_length
            and request.header("transfer-encoding") is None
            and websocket_upgrade(request.method, request.headers))


def app_named(headers: list[tuple[str, str]], forwarding: Forwarding) -> str | None:
    """The app a proxy-listener request is for: a trusted proxy's ``X-EE-App``, else the first
    label of the host the app is asked for (a trusted proxy's ``X-Forwarded-Host``, else
    ``Host``; a client's own X-Forwarded-Host picks nothing, as it reaches no app).
    :class:`AmbiguousHost` when the one that counts names more than one. A host that is an
    IP address names no app (None: 400 ``missing_app``, not a 403 for an "app" called 127)."""
    host = host_label(forwarding.host) if forwarding.host and not _ip_literal(
        forwarding.host) else None
    if forwarding.trusted:
        named = [value for name, value in headers if name == "x-ee-app"]
        if len(named) > 1 or (named and "," in named[0]):
            raise AmbiguousHost("x-ee-app names more than one app")
        if named and named[0].strip():
            return named[0].strip()
    return host


def _ip_literal(host: str) -> bool:
    """Whether a Host value (port and all) is an IP address rather than a name."""
    value = host.strip()
    if value.startswith("["):  # [v6] or [v6]:port
        return True
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def serve_dataplane(proxy: ProxyHandler, auth: AuthHandler, config: Config,
                          caps: ListenerCaps,
                          task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """Run the proxy and auth listeners (binds, ports and limits from ``config``); reports
    ``(proxy_port, auth_port)`` once both listen."""
    limits = Limits(max_body_bytes=config.proxy_max_body_bytes,
                    send_timeout_sec=config.proxy_send_timeout_sec,
                    min_rate_bytes_sec=config.proxy_min_rate_bytes_sec,
                    rate_grace_sec=config.proxy_rate_grace_sec)
    async with trio.open_nursery() as nursery:
        proxy_port: int = await nursery.start(
            _serve, proxy, config.proxy_bind, config.proxy_port, limits,
            caps.proxy, "proxy listener", ("EE_PROXY_BIND", "EE_PROXY_PORT"))
        auth_port: int = await nursery.start(
            _serve, auth, config.auth_bind, config.auth_port, Limits(),
            caps.auth, "auth listener", ("EE_AUTH_BIND", "EE_AUTH_PORT"))
        log.info("data plane: proxy on %s:%d, auth on %s:%d", config.proxy_bind, proxy_port,
                 config.auth_bind, auth_port)
        task_status.started((proxy_port, auth_port))


async def _serve(handler: AuthHandler | ProxyHandler, host: str, port: int, limits: Limits,
                 max_connections: int, name: str, variables: tuple[str, str],
                 task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:  # one line naming the listener and its variable (eecp serve)
        raise StartupError.listen_failed(name, host, port, variables, exc) from exc
    await serve_http_listeners(handler, listeners, limits=limits, task_status=task_status,
                               gate=ConnectionGate(name, max_connections))

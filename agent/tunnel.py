"""The tunnel client: dial eecp, register, answer challenges, report health — forever.

Each connection runs in one nursery, and nothing outlives it::

    connection nursery
      ├─ receiver    (the body) attest_request → quote → attest_response;
      │              status → logged, and ttl_warning / registration_expired → register again
      │              binary → the connection's Mux (proxied requests' frames)
      ├─ health      probe the backend every EE_HEALTH_INTERVAL_SEC and send pass/fail
      ├─ keepalive   ping every EE_TUNNEL_PING_INTERVAL_SEC; no pong in time → drop the tunnel
      ├─ drain       once eecp says it is draining: wait until no request is in flight on
      │              this tunnel, then leave it (1001 ``draining``)
      └─ forward     accept the streams eecp opens and forward each to the backend
                     (agent.forward); when the connection ends its Mux is closed, which
                     fails every stream in flight and lets this task end

Whatever ends a connection — eecp closing it, the network going away, a message we cannot
decode, a quote we cannot produce — cancels that nursery; the reason is logged and the agent
dials again after an exponential backoff with full jitter (capped at EE_RECONNECT_MAX_SEC,
back to the start after a connection that lasted EE_RECONNECT_RESET_SEC). A tunnel that ends
after eecp said it is draining (status ``warning draining``: it is stopping, and lets the
requests in flight finish) is no failure: the agent leaves it as soon as its own requests on
it are done (or eecp closes it first, at the end of its grace) and dials again after the first
step's delay (a jitter below EE_RECONNECT_MIN_SEC, so a fleet does not arrive in one instant),
its failure count unchanged. With a load balancer in front of several eecp replicas, the one
URL then reaches another replica (the draining one answers ``/health`` 503 and refuses new
tunnels). Only the ``stop``
event (a graceful shutdown: the tunnel is closed with 1001 and the close handshake awaited) or
cancellation ends :func:`run_agent`.

The wire protocol is :mod:`eecp.wire.protocol`'s; report_data is :func:`eecp.wire.measurements.
report_data_for`'s; the binary data protocol (proxied requests) is :mod:`eecp.wire.frames`' and
:mod:`eecp.wire.streams`'.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from agent.backend import BackendPool
from agent.config import AgentConfig
from agent.forward import open_backend_pool, serve_forwarding
from agent.health import HealthStatus, probe_backend
from agent.providers import QuoteProvider, QuoteProviderError
from eecp.core.errors import EecpError, ProtocolError
from eecp.core.trioutil import leaf_error
from eecp.wire.measurements import Measurements, report_data_for
from eecp.wire.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    DRAINING,
    AttestRequest,
    AttestResponse,
    Health,
    Status,
    decode_server_message,
    encode_attest_response,
    encode_health,
    encode_register,
)
from eecp.wire.streams import Mux

log = logging.getLogger("agent.tunnel")

#: how long closing a tunnel may take (close handshake) before the socket is just dropped
CLOSE_TIMEOUT_SEC = 5.0
#: when the agent is cancelled outright, trio-websocket's reader is cancelled with it and the
#: close handshake can never complete (nor can it with a peer that went silent): only give
#: the close frame time to leave
CANCELLED_CLOSE_GRACE_SEC = 0.2
CLOSE_INTERNAL_ERROR = 1011
#: status reasons that ask the agent to register again on the same tunnel to renew its TTL
RENEW_REASONS = frozenset({"ttl_warning", "registration_expired"})
MAX_MESSAGE_BYTES = 1024 * 1024
#: bytes asked of each socket read: trio-websocket's 4 KiB took 17 reads per full DATA frame
RECEIVE_BYTES = 256 * 1024
_MAX_CLOSE_REASON = 120  # RFC 6455 allows 123 bytes of close reason


class TunnelError(EecpError):
    """This agent ended the tunnel itself: ``peer_unresponsive`` (no pong in time),
    ``agent_stopping`` (asked to stop), ``quote_unavailable`` (its quote provider failed),
    ``draining`` (eecp is stopping; requests done). ``close_reason`` is what the close frame
    tells eecp (by default ``reason``)."""

    def __init__(self, reason: str, detail: str = "", close_code: int = CLOSE_GOING_AWAY,
                 close_reason: str | None = None) -> None:
        super().__init__(reason, detail)
        self.close_code = close_code
        self.close_reason = close_reason or reason


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential from ``initial_sec``, capped at ``max_sec``, full jitter.

    Full jitter (a uniform pick below the exponential ceiling) keeps a fleet of agents that
    lost eecp at the same moment from all dialling back at the same moment.
    """

    initial_sec: float = 1.0
    max_sec: float = 60.0
    #: a connection that lasted this long counts as healthy: the next delay starts over
    reset_after_sec: float = 60.0

    def delay(self, failures: int, rng: random.Random) -> float:
        """The pause after ``failures`` consecutive failed or short-lived connections."""
        ceiling = min(self.max_sec, self.initial_sec * 2.0 ** min(failures, 64))
        return rng.uniform(0.0, ceiling)

    @classmethod
    def from_config(cls, config: AgentConfig) -> Backoff:
        """The policy ``EE_RECONNECT_MIN_SEC``/``_MAX_SEC``/``_RESET_SEC`` describe."""
        return cls(config.reconnect_min_sec, config.reconnect_max_sec,
                   config.reconnect_reset_sec)


@dataclass
class AgentState:
    """What the agent is doing, for logs, tests and (later) a local status page."""

    connected: bool = False
    #: dials started, tunnels opened, consecutive failures (what the backoff grows with)
    attempts: int = 0
    connections: int = 0
    failures: int = 0
    #: tunnels left (or closed) after eecp said it is draining: not failures
    drains: int = 0
    registrations: int = 0
    attestations: int = 0
    health_reports: int = 0
    last_health: HealthStatus | None = None
    last_status: Status | None = None
    #: why the last tunnel ended, and the most recent reconnect delays (newest last)
    last_error: str | None = None
    delays: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def touch(self) -> None:
        """Wake everything waiting in :meth:`wait_for`."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[AgentState], bool]) -> None:
        """Return once ``predicate(state)`` holds (checked after every change)."""
        while not predicate(self):
            await self._changed.wait()


async def run_agent(config: AgentConfig, provider: QuoteProvider, measurements: Measurements,
                    *, stop: trio.Event | None = None, state: AgentState | None = None,
                    backoff: Backoff | None = None, rng: random.Random | None = None,
                    task_status: trio.TaskStatus[AgentState] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
    """Keep a tunnel to eecp open until ``stop`` is set (forever without one).

    Reports its :class:`AgentState` through ``task_status``. ``backoff`` defaults to the
    config's; ``rng`` (the jitter) to a fresh ``random.Random``. Setting ``stop`` closes the
    open tunnel with 1001 ``agent_stopping`` (waiting up to ``CLOSE_TIMEOUT_SEC`` for eecp's
    answer) and returns; cancelling also sends that close, but cannot wait for the answer.
    The process installs :mod:`eecp.patches.wsproto` at its start (:func:`agent.agent.run`).
    """
    stop = stop if stop is not None else trio.Event()
    state = state if state is not None else AgentState()
    backoff = backoff if backoff is not None else Backoff.from_config(config)
    rng = rng if rng is not None else random.Random()
    # trust_env=False: a proxy configured for the VM's outbound traffic must not be asked to
    # reach a backend on the VM's own loopback
    async with (httpx.AsyncClient(trust_env=False) as http,
                open_backend_pool(config.backend_url, config.max_streams) as backend):
        tunnel = Tunnel(config, provider, measurements, state, http, stop, backend=backend)
        task_status.started(state)
        while not stop.is_set():
            started = trio.current_time()
            reason, opened = await tunnel.run_once()
            lasted = trio.current_time() - started
            if stop.is_set():
                log.info("tunnel to %s closed: agent stopping", config.control_ws)
                return
            if opened and lasted >= backoff.reset_after_sec:
                state.failures = 0
            if tunnel.drained:  # eecp asked us to move: not a failure, no growth
                delay = backoff.delay(0, rng)
                state.drains += 1
            else:
                delay = backoff.delay(state.failures, rng)
                state.failures += 1
            state.last_error = reason
            state.delays.append(delay)
            state.touch()
            if tunnel.drained:
                log.info("eecp at %s is draining: tunnel left after %.1fs (%s); dialling "
                         "again in %.2fs", config.control_ws, lasted, reason, delay)
            else:
                log.warning("tunnel to %s ended after %.1fs (%s); dialling again in %.2fs",
                            config.control_ws, lasted, reason, delay)
            with trio.move_on_after(delay):  # a backoff pause that a stop cuts short
                await stop.wait()


class Tunnel:
    """One agent's connections to eecp, one at a time (see :func:`run_agent`)."""

    def __init__(self, config: AgentConfig, provider: QuoteProvider,
                 measurements: Measurements, state: AgentState,
                 http: httpx.AsyncClient, stop: trio.Event, backend: BackendPool) -> None:
        self.config = config
        self.provider = provider
        self.measurements = measurements
        self.state = state
        self.http = http
        self.stop = stop
        #: proxied requests' connections to the backend (health probes use ``http``)
        self.backend = backend
        #: eecp said, on the current (or last) tunnel, that it is draining
        self.drained = False
        self._draining = trio.Event()

    async def run_once(self) -> tuple[str, bool]:
        """Dial and serve one tunnel until it ends: why it ended, and whether it had opened."""
        self.state.attempts += 1
        self.drained, self._draining = False, trio.Event()
        opened = False
        try:
            async with open_websocket_url(
                self.config.control_ws,
                connect_timeout=self.config.connect_timeout_sec,
                disconnect_timeout=CLOSE_TIMEOUT_SEC,
                max_message_size=MAX_MESSAGE_BYTES,
                receive_buffer_size=RECEIVE_BYTES,
            ) as ws:
                opened = True
                self._set_connected(True)
                await self.serve(ws)
        except Exception as exc:  # whatever ended this tunnel: the caller logs it and redials
            return _describe(leaf_error(exc)), opened
        finally:
            if opened:
                self._set_connected(False)
        return "closed", opened  # serve() only ends by raising; kept for the type checker

    def _set_connected(self, connected: bool) -> None:
        self.state.connected = connected
        if connected:
            self.state.connections += 1
        self.state.touch()

    async def serve(self, ws: WebSocketConnection) -> None:
        """Register, then run the connection's nursery until the tunnel ends (by raising)."""
        try:
            log.info("tunnel to %s open: registering %s (%s@%s on %s) as agent %s",
                     self.config.control_ws, self.config.app_name, self.config.repo,
                     self.config.release_tag, self.config.network, self.config.agent_id)
            await self.register(ws)
            mux = Mux(ws.send_message, opener=False, max_streams=self.config.max_streams,
                      skip_unknown=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._health_loop, ws, name="agent-health")
                if self.config.ping_interval_sec > 0:
                    nursery.start_soon(self._keepalive, ws, name="agent-keepalive")
                nursery.start_soon(self._stop_watch, name="agent-stop")
                nursery.start_soon(self._drain_watch, mux, name="agent-drain")
                nursery.start_soon(partial(
                    serve_forwarding, mux, self.backend,
                    timeout_sec=self.config.backend_timeout_sec), name="agent-forward")
                try:
                    await self._receive_loop(ws, mux)
                finally:
                    # here, not after the nursery: closing is what lets the forwarding task
                    # (and any frame write in progress) end, so the nursery can
                    mux.close()
        except BaseException as exc:
            await _close_for(ws, leaf_error(exc))
            raise

    async def register(self, ws: WebSocketConnection) -> None:
        """Send ``register`` (first on every tunnel, and again to renew)."""
        await ws.send_message(encode_register(self.config.register))
        self.state.registrations += 1
        self.state.touch()

    # ---- receiving ------------------------------------------------------------------------

    async def _receive_loop(self, ws: WebSocketConnection, mux: Mux) -> None:
        while True:
            data = await ws.get_message()
            if isinstance(data, bytes):
                await self.on_binary(mux, data)
                continue
            message = _decode(data)
            if isinstance(message, AttestRequest):
                await self._on_attest_request(ws, message)
            elif isinstance(message, Status):
                await self._on_status(ws, message)

    async def on_binary(self, mux: Mux, data: bytes) -> None:
        """A binary message holds frames of proxied requests: the mux routes them to their
        streams.

        A frame type this agent does not know is dropped by the mux (``skip_unknown``: a newer
        eecp must not be able to break an older agent by sending one), like an unknown JSON
        message; any other malformed frame ends the tunnel with the ``ProtocolError``'s close
        code.
        """
        await mux.feed(data)

    async def _on_attest_request(self, ws: WebSocketConnection, request: AttestRequest
                                 ) -> None:
        report_data = report_data_for(self.measurements, request.nonce)
        quote: bytes | None = None
        try:
            with trio.move_on_after(request.deadline_s):
                quote = await self.provider.quote(report_data)
            if quote is None:  # eecp stops waiting at the deadline: an answer now would be late
                raise QuoteProviderError("quote_timeout",
                                         f"no quote within {request.deadline_s}s")
        except QuoteProviderError as exc:
            raise quote_unavailable(exc) from exc
        answer = AttestResponse(request.nonce, quote, report_data, self.measurements.as_dict())
        await ws.send_message(encode_attest_response(answer))
        self.state.attestations += 1
        self.state.touch()
        log.info("answered a %s challenge (%d-byte quote)", request.reason, len(quote))

    async def _on_status(self, ws: WebSocketConnection, status: Status) -> None:
        self.state.last_status = status
        self.state.touch()
        level = {"ok": logging.INFO, "warning": logging.WARNING}.get(status.state, logging.ERROR)
        extra = "".join(f" {k}={v}" for k, v in status.extra.items())
        log.log(level, "eecp: %s %s%s", status.state, status.reason, extra)
        if status.reason == DRAINING and not self.drained:
            log.info("eecp is draining: leaving the tunnel once its requests in flight end")
            self.drained = True
            self._draining.set()
        if status.reason in RENEW_REASONS:
            log.info("renewing the registration of %s", self.config.app_name)
            await self.register(ws)

    # ---- health and liveness --------------------------------------------------------------

    async def _health_loop(self, ws: WebSocketConnection) -> None:
        """Probe and report right away (just after register), then every interval."""
        try:
            while True:
                next_probe = trio.current_time() + self.config.health_interval_sec
                status = await probe_backend(self.http, self.config.health_url,
                                             self.config.health_probe_timeout_sec)
                await ws.send_message(encode_health(Health(status)))
                self._record_health(status)
                await trio.sleep_until(next_probe)
        except ConnectionClosed:
            return  # the receiver sees the close too, and reports it

    def _record_health(self, status: HealthStatus) -> None:
        if status != self.state.last_health:
            log.log(logging.INFO if status == "pass" else logging.WARNING,
                    "backend %s: health %s", self.config.health_url, status)
        self.state.last_health = status
        self.state.health_reports += 1
        self.state.touch()

    async def _drain_watch(self, mux: Mux) -> None:
        """Leave the tunnel once eecp said it is draining and no request is in flight on it
        (eecp opens no new one by then)."""
        await self._draining.wait()
        await mux.wait_idle()
        raise TunnelError(DRAINING, "eecp is draining; requests done", CLOSE_GOING_AWAY)

    async def _stop_watch(self) -> None:
        """End the tunnel (like any other reason to end it) once the agent is asked to stop."""
        await self.stop.wait()
        raise TunnelError("agent_stopping", "the agent is stopping", CLOSE_GOING_AWAY)

    async def _keepalive(self, ws: WebSocketConnection) -> None:
        """Detect a silently vanished eecp (no FIN, no RST): a ping that is never answered."""
        try:
            while True:
                await trio.sleep(self.config.ping_interval_sec)
                with trio.move_on_after(self.config.dead_peer_sec) as scope:
                    await ws.ping()
                if scope.cancelled_caught:
                    raise TunnelError("peer_unresponsive",
                                      f"no pong within {self.config.dead_peer_sec:g}s")
        except ConnectionClosed:
            return


#: what the agent's own log adds when it cannot quote: the development way out
DEV_PROVIDER_HINT = ("without TDX, for development only: EE_QUOTE_PROVIDER=dev, with eecp "
                     "trusting the dev PKI's root.pem (EE_DCAP_ROOT_CA)")


def quote_unavailable(exc: QuoteProviderError) -> TunnelError:
    """The tunnel's end when no quote can be had: logged here with the way out for
    development, and told to eecp in the close frame (``quote_unavailable: <provider's
    reason>``), which eecp logs — else all eecp would see is an agent that left."""
    log.error("cannot answer eecp's challenge: no quote (%s); %s", exc, DEV_PROVIDER_HINT)
    return TunnelError("quote_unavailable", str(exc), CLOSE_INTERNAL_ERROR,
                       close_reason=f"quote_unavailable: {exc.reason}")


def _decode(data: str) -> AttestRequest | Status | None:
    """A server message; None for a type this agent does not know (a newer eecp's)."""
    try:
        return decode_server_message(data)
    except ProtocolError as exc:
        if exc.reason == "unknown_type":
            log.warning("ignoring a message eecp sent: %s", exc.detail)
            return None
        raise
    except RecursionError:  # json.loads on absurdly nested input
        raise ProtocolError("invalid_json", "message nests too deeply",
                            CLOSE_INVALID_PAYLOAD) from None


def _close_code(exc: BaseException) -> tuple[int, str]:
    """The close code and reason this agent ends a tunnel with, given why it ends it."""
    if isinstance(exc, trio.Cancelled):
        return CLOSE_GOING_AWAY, "agent_stopping"
    if isinstance(exc, TunnelError):
        return exc.close_code, exc.close_reason
    if isinstance(exc, ProtocolError):
        return exc.close_code, exc.reason
    if isinstance(exc, EecpError):
        return CLOSE_INTERNAL_ERROR, exc.reason
    return CLOSE_INTERNAL_ERROR, "internal_error"


async def _close_for(ws: WebSocketConnection, exc: BaseException) -> None:
    """Close the tunnel with a code that says why, unless it is closed already."""
    if isinstance(exc, ConnectionClosed) or ws.closed is not None:
        return
    code, reason = _close_code(exc)
    # no answer will come from a peer that stopped answering pings, nor reach a cancelled reader
    hopeless = isinstance(exc, trio.Cancelled) or (
        isinstance(exc, TunnelError) and exc.reason == "peer_unresponsive")
    grace = CANCELLED_CLOSE_GRACE_SEC if hopeless else CLOSE_TIMEOUT_SEC
    # shielded: a cancelled agent still says goodbye; bounded: a dead peer cannot hold us
    with (trio.CancelScope(shield=True), trio.move_on_after(grace),
          contextlib.suppress(ConnectionClosed)):  # eecp closed it meanwhile: fine
        await ws.aclose(code, reason[:_MAX_CLOSE_REASON])


def _describe(exc: BaseException) -> str:
    """A one-line, stable-prefixed account of why a tunnel ended."""
    if isinstance(exc, ConnectionClosed):
        close = exc.reason
        if close is None:
            return "closed"
        text = f" {close.reason}" if close.reason else ""
        return f"closed:{close.code}{text}"
    if isinstance(exc, ConnectionRejected):
        return f"rejected:{exc.status_code}"
    if isinstance(exc, ConnectionTimeout):
        return "connect_timeout"
    if isinstance(exc, HandshakeError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # trio-websocket wraps "connection refused" and friends
    if isinstance(exc, OSError):
        return f"unreachable:{exc.strerror or exc}"
    if isinstance(exc, HandshakeError):
        return f"handshake_failed:{type(exc).__name__}"
    if isinstance(exc, EecpError):
        return str(exc)
    log.error("tunnel failed unexpectedly", exc_info=exc)
    return f"internal_error:{type(exc).__name__}"

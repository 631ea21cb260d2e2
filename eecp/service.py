"""``serve()``: the daemon root. Read it top to bottom.

Before anything opens, the file limit is raised to the hard limit and shared out into one
connection cap per listener (:mod:`eecp.core.capacity`); caps that do not fit are a ``ConfigError``.
Resources are opened first, with ``async with``, so they outlive every task: the store, the HTTP
client, and every component built over them (:func:`eecp.wiring.open_services`, the one place
that sees them all). Then one root nursery starts the servers in dependency order,
each reporting readiness through ``task_status``; ``serve`` reports the bound addresses when all
are up. A shutdown (SIGINT/SIGTERM or the ``shutdown`` event) stops background work at once,
then *drains* (:mod:`eecp.core.drain`) for at most ``EE_SHUTDOWN_GRACE_SEC``: every listener
stays open, but new tunnels and new proxied requests are refused (503 ``draining``),
``/health`` answers 503 ``draining``, each agent is told (status ``warning draining``) and
moves once its own requests end, and the drain is over as soon as no proxied request is in
flight. Only then are the remaining tunnels closed (1001 ``server_shutdown``), the data plane
stopped and the control server given ``min(grace, CLOSE_SEC)`` to close; so a stop takes at
most grace + min(grace, CLOSE_SEC) + 1 s, plus the ledger's flush. The ledger's jobs stop last,
in order: the settler and the counts once the drain is over, then, once the sessions have
ended (and queued their last events), the outbox is flushed, and only then does the observer
record its stop — an instance whose events did not all reach the store records none, so its
coverage ends with its last beat instead of claiming the time it could not account for.
Sessions that end during the drain (agents leaving as asked) write ``down observer_shutdown``
like those closed after it, and the outbox writes them as they come::

    serve(config)
      async with open_services(config):        store, http client, every component (eecp.wiring)
        root nursery
          ├─ background nursery
          │    ├─ signal watcher               SIGINT/SIGTERM → shutdown
          │    ├─ collateral refresher         refresh-ahead before nextUpdate
          │    └─ audit summaries              refusals left out of the audit log, a minute's
          ├─ ledger nursery (EE_LEDGER_ENABLED) its jobs (eecp.ledger.jobs, spec §15)
          │    ├─ observer                     a heartbeat every EE_OBSERVER_BEAT_SEC
          │    ├─ event outbox                 the sessions' availability events to the store
          │    ├─ node views                   the proxy's pick: node status and price (§12)
          │    ├─ settler                      due node-periods, unstakes, key pruning
          │    └─ counts                       the ledger's metrics, the invariant check
          ├─ data plane (httptools)            proxy EE_PROXY_PORT, auth EE_AUTH_PORT
          ├─ hypercorn (quart-trio app)        EE_CONTROL_BIND:EE_CONTROL_PORT
          │    └─ per tunnel: session nursery  (eecp.agents.session)
          └─ readiness                         /ready, systemd READY=1, WATCHDOG=1 until
                                               shutdown, then STOPPING=1 (eecp.core.readiness)

The process-wide library patches (:mod:`eecp.patches`) are not applied here but once, at the
process's start (``eecp serve``, ``eecp demo``; the tests' conftest): ``serve`` may run many
times in one process, a patch once.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve

from eecp import __version__
from eecp.agents.session import serve_audit_summaries
from eecp.core import capacity
from eecp.core.capacity import ConnectionGate, ListenerCaps
from eecp.core.clock import Clock
from eecp.core.config import Config
from eecp.core.errors import StartupError
from eecp.core.readiness import run_readiness
from eecp.core.sdnotify import Notifier
from eecp.dataplane.http import DEFAULT_LIMITS
from eecp.dataplane.listeners import serve_dataplane
from eecp.ledger import jobs as ledger_jobs
from eecp.wiring import Components, LedgerParts, open_services

log = logging.getLogger("eecp.service")

#: how long the sessions' last availability events may take to reach the store at shutdown
FLUSH_SEC = 5.0
#: how long, after the drain, closing may take at most (the tunnels' close handshakes, the
#: sessions' cleanup, the control server's connections); less when the grace is shorter
CLOSE_SEC = 2.0
#: how long a request head may take on the control port: as on the data plane (hypercorn's
#: own timers do not bound it: eecp.patches.hypercorn, fix 4)
CONTROL_HEAD_TIMEOUT_SEC = DEFAULT_LIMITS.header_timeout_sec


@dataclass(frozen=True)
class Bound:
    """Where a running eecp listens (what ``serve`` reports through ``task_status``)."""

    control_host: str
    control_port: int
    proxy_port: int = 0
    auth_port: int = 0

    @property
    def control_url(self) -> str:
        return f"http://{self.control_host}:{self.control_port}"


def warn_about(config: Config) -> None:
    """Say loudly, once at start-up, what an operator must not miss."""
    if config.dcap_root_ca is not None:
        log.warning(
            "EE_DCAP_ROOT_CA is set: quotes are verified under %s INSTEAD OF INTEL'S ROOT. "
            "Development and tests only; never in production.", config.dcap_root_ca
        )
    if not config.admin_token:
        log.warning("EE_ADMIN_TOKEN is unset: admin endpoints are open to anyone who can reach "
                    "the control port")


async def serve(
    config: Config,
    *,
    clock: Clock | None = None,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run eecp until SIGINT/SIGTERM (or ``shutdown`` is set); report :class:`Bound` once
    listening."""
    shutdown = trio.Event() if shutdown is None else shutdown
    # every connection holds a descriptor: as many as the operator allows, shared out so that
    # no listener's flood can take the others' (eecp.capacity)
    file_limit = capacity.raise_file_limit()
    caps = capacity.listener_caps(config, file_limit.soft)
    capacity.log_capacity(file_limit, caps)
    capacity.quiet_accept_errors()
    async with open_services(config, clock) as components:
        warn_about(config)
        async with trio.open_nursery() as root:
            background = await root.start(run_background, components, shutdown, handle_signals)
            ledger_stop, closing = trio.Event(), trio.Event()
            close_sec = min(config.shutdown_grace_sec, CLOSE_SEC)
            if components.ledger is not None:
                await root.start(run_ledger, components.ledger, components, ledger_stop,
                                 close_sec)
            dataplane, (proxy_port, auth_port) = await root.start(run_dataplane, components,
                                                                  config, caps)
            binds = await root.start(serve_control, components, config, closing, caps.control,
                                     close_sec)
            bound = replace(_bound_from(binds), proxy_port=proxy_port, auth_port=auth_port)
            log.info("eecp %s serving control on %s (store %s)", __version__, bound.control_url,
                     components.store.describe())
            # /ready and systemd's READY=1 from here until shutdown (eecp.core.readiness)
            await root.start(run_readiness, components.readiness, Notifier.create(
                config.notify_socket, config.watchdog_usec, config.watchdog_pid),
                f"serving control on {bound.control_url}", shutdown)
            task_status.started(bound)
            await shutdown.wait()
            background.cancel()
            await drain(components, config.shutdown_grace_sec)
            components.tunnels.end_all("server_shutdown")  # requests in flight: tunnel_closed
            dataplane.cancel()
            ledger_stop.set()
            closing.set()
            root.cancel_scope.deadline = trio.current_time() + close_sec + 1
    log.info("stopped")


async def drain(components: Components, grace_sec: float) -> None:
    """Refuse what is new, tell the agents, and wait (at most ``grace_sec``) until no proxied
    request is in flight (see the module docstring)."""
    requests = components.drain
    log.info("shutting down: draining %d requests in flight, %d agents (grace %.1fs)",
             requests.in_flight, components.tunnels.connected, grace_sec)
    components.tunnels.drain()
    with trio.move_on_after(grace_sec) as late:
        await requests.wait_idle()
    if late.cancelled_caught:
        log.warning("the grace is over with %d requests in flight: they fail now",
                    requests.in_flight)


async def run_background(components: Components, shutdown: trio.Event, handle_signals: bool,
                         task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """Signals and maintenance; reports its cancel scope so ``serve`` can stop it first (after
    that a second Ctrl-C interrupts at once)."""
    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(watch_signals, shutdown, name="signals")
        nursery.start_soon(components.collateral.serve_refresher, name="collateral-refresher")
        nursery.start_soon(serve_audit_summaries, components.refused_audit, components.clock,
                           name="audit-summaries")
        task_status.started(nursery.cancel_scope)


async def run_ledger(parts: LedgerParts, components: Components, stop: trio.Event,
                     close_sec: float,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The ledger's jobs until ``stop``, then their orderly end (see the module docstring).
    The observer's first beat is written before this reports started, so the first session
    is covered."""
    outbox = parts.outbox
    watching, writing, jobs = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        await nursery.start(_within, watching, partial(
            ledger_jobs.serve_observer, parts.ledger, outbox=outbox))
        await nursery.start(_within, writing, outbox.serve)
        await nursery.start(_within, jobs, partial(_periodic_jobs, parts, components))
        task_status.started()
        try:
            await stop.wait()
            jobs.cancel()
            with trio.move_on_after(close_sec):  # (the sessions were ended with the stop)
                await components.tunnels.wait_idle()
            writing.cancel()  # the writer stops; what is queued is flushed below, alone
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_SEC):
                await outbox.flush()
        finally:
            outbox.close()  # what is still queued, or comes later, is counted lost
            watching.cancel()  # the observer records its stop only if nothing was lost
            jobs.cancel()
            writing.cancel()


async def _periodic_jobs(parts: LedgerParts, components: Components,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The settler (with ``EE_SETTLEMENT_AUTO``), the metrics' counts and the proxy's node
    views (read once before this reports started)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger_jobs.serve_node_views, parts.ledger, partial(
            components.registry.set_node_views,
            band_pct=parts.ledger.settings.route_price_band_pct))
        if parts.settle_auto:
            await nursery.start(ledger_jobs.serve_settler, parts.ledger)
        await nursery.start(ledger_jobs.serve_counts, parts.ledger, parts.metrics)
        task_status.started()


async def _within(scope: trio.CancelScope, job: Callable[..., Awaitable[None]], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``job`` (which reports when it has started) in ``scope``, to be stopped alone."""
    with scope:
        await job(task_status=task_status)


async def run_dataplane(
        components: Components, config: Config, caps: ListenerCaps,
        task_status: trio.TaskStatus[tuple[trio.CancelScope, tuple[int, int]]]
        = trio.TASK_STATUS_IGNORED) -> None:
    """The proxy and auth listeners, in a scope ``serve`` cancels at shutdown."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(serve_dataplane, components.proxy, components.auth,
                                        config, caps)
            task_status.started((scope, ports))


async def serve_control(components: Components, config: Config, closing: trio.Event,
                        max_connections: int, close_sec: float,
                        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Hypercorn serving the control app (tunnels, then quart); graceful stop within
    ``close_sec`` once ``closing`` is set (after the drain: /health answers through it). The
    process applied :func:`eecp.patches.apply_all` at its start."""
    cfg = _HypercornConfig(config.tunnel_dead_peer_sec)
    cfg.bind = [f"{_bracket(config.control_bind)}:{config.control_port}"]
    cfg.graceful_timeout = close_sec
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    # Between requests a connection may wait 75 s for the next one (clients reusing theirs
    # between API calls); a head, once begun (or after the accept), must be complete within
    # CONTROL_HEAD_TIMEOUT_SEC. Neither applies to a tunnel: pings and TCP_USER_TIMEOUT decide
    # its liveness (eecp.patches.hypercorn).
    cfg.keep_alive_timeout = 75
    cfg.eecp_head_timeout_sec = CONTROL_HEAD_TIMEOUT_SEC
    # every tunnel is one of these connections (eecp.capacity)
    cfg.eecp_gate = ConnectionGate("control port", max_connections)
    cfg.websocket_ping_interval = config.tunnel_ping_interval_sec or None  # 0: off
    # Twice our own limit, so that a message just over it still reaches the session, which
    # answers with a reason before closing; anything larger hypercorn closes with 1009 itself.
    cfg.websocket_max_message_size = 2 * config.tunnel_max_message_bytes
    await hypercorn_serve(components.control_app, cfg, shutdown_trigger=closing.wait,
                          task_status=task_status)


async def watch_signals(shutdown: trio.Event) -> None:
    """Turn the first SIGINT/SIGTERM into a graceful shutdown; a second one is not needed."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            shutdown.set()


class _HypercornConfig(HypercornConfig):
    """Hypercorn's config, with TCP_USER_TIMEOUT on the listening sockets (inherited by every
    accepted connection): when a peer vanishes, the pings hypercorn sends stay unacknowledged
    and the kernel drops the connection after ``dead_peer_sec`` instead of after minutes of
    retransmissions."""

    def __init__(self, dead_peer_sec: float) -> None:
        super().__init__()
        self._dead_peer_ms = int(dead_peer_sec * 1000)
        # read by eecp.patches.hypercorn (None: hypercorn's own behaviour)
        self.eecp_head_timeout_sec: float | None = None
        self.eecp_gate: ConnectionGate | None = None

    def create_sockets(self) -> Sockets:
        try:
            sockets = super().create_sockets()
        except OSError as exc:  # one line naming the port and its variable (eecp serve)
            host, _, port = self.bind[0].rpartition(":")
            raise StartupError.listen_failed(
                "control port", host.strip("[]"), int(port),
                ("EE_CONTROL_BIND", "EE_CONTROL_PORT"), exc) from exc
        for sock in (*sockets.insecure_sockets, *sockets.secure_sockets):
            if hasattr(socket, "TCP_USER_TIMEOUT") and sock.family in (socket.AF_INET,
                                                                       socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self._dead_peer_ms)
        return sockets


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bound_from(binds: list[str]) -> Bound:
    host, _, port = binds[0].removeprefix("http://").rpartition(":")
    return Bound(host.strip("[]"), int(port))

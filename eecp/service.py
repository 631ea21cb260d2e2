"""``serve()``: the daemon root. Read it top to bottom.

Before anything opens, the file limit is raised to the hard limit and shared out into one
connection cap per listener (:mod:`eecp.core.capacity`); caps that do not fit are a ``ConfigError``.
Resources are opened first, with ``async with``, so they outlive every task (store, HTTP client,
caches, the attestation engine). Then one root nursery starts the servers in dependency order,
each reporting readiness through ``task_status``; ``serve`` reports the bound addresses when all
are up. A shutdown (SIGINT/SIGTERM or the ``shutdown`` event) stops background work at once and
gives the control server ``EE_SHUTDOWN_GRACE_SEC`` to finish what it is doing::

    serve(config)
      async with open_services(config):        store, http client, caches, engine
        root nursery
          ├─ background nursery
          │    ├─ signal watcher               SIGINT/SIGTERM → shutdown
          │    ├─ collateral refresher         refresh-ahead before nextUpdate
          │    └─ audit summaries              refusals left out of the audit log, a minute's
          ├─ data plane (httptools)            proxy EE_PROXY_PORT, auth EE_AUTH_PORT
          └─ hypercorn (quart-trio app)        EE_CONTROL_BIND:EE_CONTROL_PORT
               └─ per tunnel: session nursery  (eecp.session)
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve

from eecp import __version__
from eecp.agents.registry import Registry
from eecp.agents.session import serve_audit_summaries
from eecp.agents.tunnels import TunnelRouter, Tunnels
from eecp.attestation.allowlist import AllowlistSource
from eecp.attestation.collateral import CollateralCache
from eecp.attestation.engine import AttestationEngine
from eecp.attestation.quotes import load_root_ca
from eecp.control.app import create_app
from eecp.core import capacity
from eecp.core.blocking import Workers
from eecp.core.capacity import ConnectionGate, ListenerCaps
from eecp.core.clock import Clock, SystemClock
from eecp.core.config import Config
from eecp.core.errors import ConfigError, InputError
from eecp.core.metrics import Metrics
from eecp.core.ratelimit import RefusedAuditLimit
from eecp.dataplane.forwarded import TrustedProxies
from eecp.dataplane.listeners import serve_dataplane
from eecp.patches import hypercorn as hypercorn_fixes
from eecp.patches import wsproto as wsproto_speedups
from eecp.store.store import Store, open_store

log = logging.getLogger("eecp.service")


@dataclass
class Services:
    """Everything the tasks of one eecp process share. Built by :func:`open_services`."""

    config: Config
    clock: Clock
    workers: Workers
    store: Store
    http: httpx.AsyncClient
    collateral: CollateralCache
    allowlists: AllowlistSource
    engine: AttestationEngine
    root_ca_der: bytes | None
    registry: Registry
    tunnels: Tunnels = field(init=False)
    metrics: Metrics = field(init=False)
    trusted_proxies: TrustedProxies = field(init=False)
    refused_audit: RefusedAuditLimit = field(init=False)

    def __post_init__(self) -> None:
        self.tunnels = Tunnels(self)
        self.trusted_proxies = TrustedProxies(self.config.trusted_proxies)
        self.metrics = Metrics(self.registry, self.clock.now)
        self.refused_audit = RefusedAuditLimit(self.config.audit_refusals_per_min)

    @property
    def dev_root_ca(self) -> bool:
        """True when Intel's root is replaced (development and tests only)."""
        return self.root_ca_der is not None


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


def root_ca_from_config(config: Config) -> bytes | None:
    """The replacement root CA as DER, or None for Intel's; a bad file is a ``ConfigError``."""
    if config.dcap_root_ca is None:
        return None
    try:
        return load_root_ca(config.dcap_root_ca)
    except InputError as exc:
        raise ConfigError("EE_DCAP_ROOT_CA", exc.detail) from None


@asynccontextmanager
async def open_services(config: Config, clock: Clock | None = None) -> AsyncIterator[Services]:
    """Open the store and the HTTP client and build the engine; close them on exit."""
    clock = clock or SystemClock()
    root = root_ca_from_config(config)
    workers = Workers(store=config.store_threads, verify=config.verify_workers)
    async with open_store(config, workers, clock) as store, httpx.AsyncClient(
        headers={"User-Agent": f"eecp/{__version__}"}, follow_redirects=True
    ) as http:
        collateral = CollateralCache(
            client=http,
            base_url=config.pccs_url,
            clock=clock,
            persistence=store,
            refresh_margin_sec=config.collateral_refresh_margin_sec,
            fetch_timeout_sec=config.pccs_timeout_sec,
        )
        allowlists = AllowlistSource.from_config(config, http, clock)
        engine = AttestationEngine(
            collateral=collateral,
            allowlists=allowlists,
            workers=workers,
            clock=clock,
            networks=config.networks,
            allowed_statuses=config.allowed_tcb_statuses,
            root_ca_der=root,
        )
        registry = Registry(config.networks, config.registration_warn_days * 86400)
        registry.load(await store.list_apps(), await store.list_agents())
        yield Services(config, clock, workers, store, http, collateral, allowlists, engine, root,
                       registry)


def warn_about(services: Services) -> None:
    """Say loudly, once at start-up, what an operator must not miss."""
    if services.dev_root_ca:
        log.warning(
            "EE_DCAP_ROOT_CA is set: quotes are verified under %s INSTEAD OF INTEL'S ROOT. "
            "Development and tests only; never in production.", services.config.dcap_root_ca
        )
    if not services.config.admin_token:
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
    async with open_services(config, clock) as services:
        warn_about(services)
        async with trio.open_nursery() as root:
            background = await root.start(run_background, services, shutdown, handle_signals)
            dataplane, (proxy_port, auth_port) = await root.start(run_dataplane, services, caps)
            binds = await root.start(serve_control, services, shutdown, caps.control)
            bound = replace(_bound_from(binds), proxy_port=proxy_port, auth_port=auth_port)
            log.info("eecp %s serving control on %s (store %s)", __version__, bound.control_url,
                     services.store.describe())
            task_status.started(bound)
            await shutdown.wait()
            log.info("shutting down (grace %.1fs)", config.shutdown_grace_sec)
            background.cancel()
            services.tunnels.end_all("server_shutdown")  # requests in flight end: tunnel_closed
            dataplane.cancel()
            root.cancel_scope.deadline = trio.current_time() + config.shutdown_grace_sec + 1
    log.info("stopped")


async def run_background(services: Services, shutdown: trio.Event, handle_signals: bool,
                         task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """Signals and maintenance; reports its cancel scope so ``serve`` can stop it first (after
    that a second Ctrl-C interrupts at once)."""
    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(watch_signals, shutdown, name="signals")
        nursery.start_soon(services.collateral.serve_refresher, name="collateral-refresher")
        nursery.start_soon(serve_audit_summaries, services.refused_audit, services.clock,
                           name="audit-summaries")
        task_status.started(nursery.cancel_scope)


async def run_dataplane(
        services: Services, caps: ListenerCaps,
        task_status: trio.TaskStatus[tuple[trio.CancelScope, tuple[int, int]]]
        = trio.TASK_STATUS_IGNORED) -> None:
    """The proxy and auth listeners, in a scope ``serve`` cancels at shutdown."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(serve_dataplane, services, caps)
            task_status.started((scope, ports))


async def serve_control(services: Services, shutdown: trio.Event, max_connections: int,
                        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Hypercorn serving the quart-trio app; graceful stop when ``shutdown`` is set."""
    hypercorn_fixes.apply()
    wsproto_speedups.install()  # unmasking agents' uploads in C (eecp.wsproto_speedups)
    cfg = _HypercornConfig(services.config.tunnel_dead_peer_sec)
    cfg.bind = [f"{_bracket(services.config.control_bind)}:{services.config.control_port}"]
    cfg.graceful_timeout = services.config.shutdown_grace_sec
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    # Between requests a connection may wait 75 s for the next one (clients reusing theirs
    # between API calls); a head, once begun (or after the accept), must be complete within
    # HEAD_TIMEOUT_SEC. Neither applies to a tunnel: pings and TCP_USER_TIMEOUT decide its
    # liveness (eecp.hypercorn_fixes).
    cfg.keep_alive_timeout = 75
    cfg.eecp_head_timeout_sec = hypercorn_fixes.HEAD_TIMEOUT_SEC
    # every tunnel is one of these connections (eecp.capacity)
    cfg.eecp_gate = ConnectionGate("control port", max_connections)
    cfg.websocket_ping_interval = services.config.tunnel_ping_interval_sec or None  # 0: off
    # Twice our own limit, so that a message just over it still reaches the session, which
    # answers with a reason before closing; anything larger hypercorn closes with 1009 itself.
    cfg.websocket_max_message_size = 2 * services.config.tunnel_max_message_bytes
    app = TunnelRouter(create_app(services), services.tunnels)  # tunnels skip quart
    await hypercorn_serve(app, cfg, shutdown_trigger=shutdown.wait,
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
        # read by eecp.hypercorn_fixes (None: hypercorn's own behaviour)
        self.eecp_head_timeout_sec: float | None = None
        self.eecp_gate: ConnectionGate | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
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

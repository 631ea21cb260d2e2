"""``open_services()``: every component of one eecp process, built from ``Config``. Read it top to
bottom, as ``serve()``.

This is the one module that sees all the components. Each takes exactly its collaborators as
arguments (a component with a long list takes a small frozen dataclass of them:
:class:`~eecp.agents.deps.SessionDeps`, :class:`~eecp.control.app.ControlDeps`), and none
imports this module or :mod:`eecp.service` (``lint-imports`` holds the layers). The order
is the order of dependency::

    store, HTTP client                      opened here, closed on exit
    the ledger (EE_LEDGER_ENABLED only)     its service over the store
    attestation: collateral, allowlists, engine (asks the ledger about banned platforms)
    registry (loaded from the store), metrics over it, the refused-audit budget
    the ledger's event outbox and metrics
    tunnels (their sessions' deps; with the ledger, its session writer)
    the data: one forwarder, trusted proxies; the proxy and auth listeners' handlers
    the control app: the guard, quart, the tunnel router in front of it

What :func:`serve` runs is handed back as :class:`Components`, and nothing else. With the
ledger off nothing of it is built: no route, no hook, no job, no metric.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from eecp import __version__
from eecp.agents.deps import SessionConfig, SessionDeps
from eecp.agents.registry import Registry
from eecp.agents.tunnels import TunnelRouter, Tunnels
from eecp.attestation.allowlist import AllowlistSource
from eecp.attestation.collateral import CollateralCache
from eecp.attestation.engine import AttestationEngine
from eecp.attestation.quotes import load_root_ca
from eecp.control.app import ControlConfig, ControlDeps, create_app
from eecp.control.auth import Guard, Tokens
from eecp.core.blocking import Workers
from eecp.core.clock import Clock, SystemClock
from eecp.core.config import Config
from eecp.core.drain import Drain
from eecp.core.errors import ConfigError, InputError
from eecp.core.metrics import LedgerMetrics, Metrics
from eecp.core.ratelimit import RefusedAuditLimit
from eecp.core.readiness import Readiness
from eecp.dataplane.forwarded import TrustedProxies
from eecp.dataplane.listeners import AuthHandler, ProxyHandler
from eecp.dataplane.proxy import Forwarder
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.outbox import EventOutbox, SessionWriter
from eecp.ledger.service import Ledger
from eecp.store.store import Store, open_store

log = logging.getLogger("eecp.wiring")


@dataclass(frozen=True)
class LedgerParts:
    """What :func:`eecp.service.serve` runs for the ledger (spec §15)."""

    ledger: Ledger
    outbox: EventOutbox  # drained in the background, flushed at shutdown
    metrics: LedgerMetrics  # its counts refreshed in the background
    settle_auto: bool  # EE_SETTLEMENT_AUTO: run the settler


@dataclass(frozen=True)
class Components:
    """What :func:`eecp.service.serve` runs."""

    clock: Clock
    store: Store  # (named in the start-up line)
    collateral: CollateralCache  # its refresher runs in the background
    refused_audit: RefusedAuditLimit  # its summaries run in the background
    tunnels: Tunnels  # ended at shutdown
    control_app: TunnelRouter  # what hypercorn serves on the control port
    proxy: ProxyHandler  # the proxy listener's handler
    auth: AuthHandler  # the auth listener's handler
    registry: Registry  # with the ledger, its node views route the proxy's pick
    drain: Drain  # begun at shutdown (through tunnels.drain()); its requests waited for
    ledger: LedgerParts | None = None  # EE_LEDGER_ENABLED
    readiness: Readiness = field(default_factory=Readiness)  # GET /ready; serve() sets it


def root_ca_from_config(config: Config) -> bytes | None:
    """The replacement root CA as DER, or None for Intel's; a bad file is a ``ConfigError``."""
    if config.dcap_root_ca is None:
        return None
    try:
        return load_root_ca(config.dcap_root_ca)
    except InputError as exc:
        raise ConfigError("EE_DCAP_ROOT_CA", exc.detail) from None


@asynccontextmanager
async def open_services(config: Config, clock: Clock | None = None
                        ) -> AsyncIterator[Components]:
    """Open the store and the HTTP client, build every component over them; close on exit."""
    clock = clock or SystemClock()
    root_ca = root_ca_from_config(config)
    # the ledger's own grammars, checked before anything opens (ConfigError: exit 2)
    ledger_settings = LedgerSettings.from_config(config) if config.ledger_enabled else None
    workers = Workers(store=config.store_threads, verify=config.verify_workers)
    async with open_store(config, workers, clock) as store, httpx.AsyncClient(
        headers={"User-Agent": f"eecp/{__version__}"}, follow_redirects=True
    ) as http:
        ledger = (Ledger(store, ledger_settings, clock, version=__version__)
                  if ledger_settings is not None else None)
        collateral = CollateralCache(
            client=http,
            base_url=config.pccs_url,
            clock=clock,
            persistence=store,
            refresh_margin_sec=config.collateral_refresh_margin_sec,
            fetch_timeout_sec=config.pccs_timeout_sec,
        )
        engine = AttestationEngine(
            collateral=collateral,
            allowlists=AllowlistSource.from_config(config, http, clock),
            workers=workers,
            clock=clock,
            networks=config.networks,
            allowed_statuses=config.allowed_tcb_statuses,
            root_ca_der=root_ca,
            platform_banned=ledger.platform_banned if ledger is not None else None,
        )

        registry = Registry(config.networks, config.registration_warn_days * 86400)
        registry.load(await store.list_apps(), await store.list_agents())
        metrics = Metrics(state=lambda: registry.gauges(clock.now()),
                          known_app=lambda name: registry.app(name) is not None,
                          version=__version__, collateral=collateral.next_updates)
        readiness = Readiness()  # serve() makes it ready
        refused_audit = RefusedAuditLimit(config.audit_refusals_per_min)
        parts = None
        if ledger is not None and ledger_settings is not None:
            log.info("ledger on: periods of %s, settlement %g s after their end%s, instance %s",
                     ledger_settings.period.setting, ledger_settings.settlement_delay_sec,
                     " by the settler" if config.settlement_auto else " by hand only",
                     ledger.instance_id)
            ledger_metrics = metrics.enable_ledger()
            outbox = EventOutbox(ledger, on_drop=ledger_metrics.events_dropped.inc)
            parts = LedgerParts(ledger, outbox, ledger_metrics, config.settlement_auto)

        # one drain for the tunnels, both entry points' requests and /health
        drain = Drain()
        tunnels = Tunnels(SessionDeps(
            config=SessionConfig.from_config(config), clock=clock, store=store,
            registry=registry, engine=engine, metrics=metrics, refused_audit=refused_audit,
            ledger=SessionWriter(parts.ledger, parts.outbox) if parts is not None else None),
            drain)

        # one forwarder for both entry points: the proxy listener and POST /v1/proxy
        forwarder = Forwarder(registry, clock, config.proxy_timeout_sec,
                              max_streams_per_client=config.proxy_max_streams_per_client,
                              slot_reserve=config.proxy_slot_reserve,
                              tunnel_max_streams=config.tunnel_max_streams, drain=drain)
        trusted_proxies = TrustedProxies(config.trusted_proxies)
        proxy = ProxyHandler(forwarder, trusted_proxies, metrics,
                             ws_idle_sec=config.proxy_ws_idle_sec,
                             send_timeout_sec=config.proxy_send_timeout_sec,
                             access_log=config.access_log,
                             expose_agent=config.proxy_expose_agent)
        auth = AuthHandler(registry, clock)

        control = create_app(ControlDeps(
            config=ControlConfig.from_config(config), clock=clock, store=store,
            registry=registry, metrics=metrics, forwarder=forwarder,
            trusted_proxies=trusted_proxies,
            guard=Guard(Tokens.from_config(config), fail_closed=config.ledger_enabled),
            agents_connected=lambda: tunnels.connected, dev_root_ca=root_ca is not None,
            ledger=ledger, draining=lambda: drain.started, readiness=readiness))

        yield Components(
            clock=clock, store=store, collateral=collateral, refused_audit=refused_audit,
            tunnels=tunnels, control_app=TunnelRouter(control, tunnels),  # tunnels skip quart
            proxy=proxy, auth=auth, registry=registry, drain=drain, ledger=parts,
            readiness=readiness)

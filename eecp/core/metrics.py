"""Prometheus metrics (``GET /metrics`` on the control port), one registry per process.

Counters and histograms are updated where things happen (sessions, the proxy); gauges that
describe state (connected agents, apps by state, streams in flight) are read from the live
registry at scrape time, so they can never drift from it. The core knows no registry: wiring
hands :class:`Metrics` two callables over it (``state``, a :class:`StateGauges` snapshot, and
``known_app``), so the metrics sit below every component that counts into them.

The ledger's metrics (spec §15) exist only with the ledger on (:meth:`Metrics.enable_ledger`;
off, ``/metrics`` is what it was). Replays and dropped availability events are counted where
they happen, in this process. Transfers by code, settlements by outcome and held node-periods
are the database's own counts (:class:`LedgerCounts`, refreshed by a background job): the
journal is append-only, so its counts only grow and are honest counters, and every replica
reports the same totals instead of its own share.

For alerting (``examples/alerts.yml``): ``eecp_build_info{version}``; the next update of every
cached collateral (a collateral past it refuses every agent on that platform), read from the
cache at scrape time (``collateral``, a callable wiring hands in: the core does not know the
cache); per app, the seconds since its best agent's last accepted attestation (``+Inf`` when it
has none: an app whose agents never attested is as unserved as one whose attestations stopped);
registrations by state (``warning``: expiring within ``EE_REGISTRATION_WARN_DAYS``); and
``eecp_store_up``, set by the ``/metrics`` route from one ``SELECT 1`` per scrape — the cheapest
honest answer: no background task, and as fresh as the scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the ``app`` label of proxied requests for names no app is registered under
UNKNOWN_APP = "_unknown"
#: the ``state`` label of ``eecp_apps``: every resolve reason an app can be in
APP_STATES = ("ok", "registration_expired", "not_connected", "not_attested", "health_fail",
              "sealed_required")
#: the ``state`` label of ``eecp_registrations``
REGISTRATION_STATES = ("active", "warning", "expired")

#: the next update (Unix seconds) of each cached collateral, by (tee, fmspc, ca)
CollateralTimes = Callable[[], Mapping[tuple[str, str, str], float]]


@dataclass(frozen=True)
class StateGauges:
    """What the state gauges show at one scrape."""

    agents_connected: int
    streams_in_flight: int
    #: registered apps by resolve reason (``ok`` = served)
    apps_by_state: Mapping[str, int]
    #: registered apps by registration state (active, warning, expired)
    registrations_by_state: Mapping[str, int] = field(default_factory=dict)
    #: app -> seconds since its best agent's last accepted attestation (inf: none)
    attestation_age_by_app: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerCounts:
    """The ledger's counts at the last refresh (see the module docstring)."""

    transfers_by_code: Mapping[str, int]
    settlements_by_outcome: Mapping[str, int]
    held_by_reason: Mapping[str, int]
    #: the last invariant check (GET /v1/ledger/check); None before the first
    invariant_ok: bool | None = None
    #: stake (spec §10, §15): slashes that moved money by kind (availability, fraud), those
    #: due with nothing staked, Σ posted stake, Σ pending unstakes, nodes by status, active
    #: nodes below their minimum stake
    slashes_by_kind: Mapping[str, int] = field(default_factory=dict)
    slashes_skipped: int = 0
    stake_posted_micros: int = 0
    unstake_pending_micros: int = 0
    nodes_by_status: Mapping[str, int] = field(default_factory=dict)
    nodes_below_minimum: int = 0


class LedgerMetrics:
    """The ledger's metrics (spec §15)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.replays = Counter(
            "eecp_ledger_idempotent_replays", "Ledger requests answered from a stored answer "
            "(Idempotent-Replayed: true)", registry=registry)
        self.events_dropped = Counter(
            "eecp_availability_events_dropped", "Availability events this process could not "
            "queue or write (it stops beating: its periods are held as observer gaps)",
            registry=registry)
        #: set by the ledger's metrics job
        self.counts: LedgerCounts | None = None
        registry.register(_LedgerCollector(lambda: self.counts))


class Metrics:
    """eecp's metrics; ``render()`` is the scrape body."""

    def __init__(self, state: Callable[[], StateGauges], known_app: Callable[[str], bool],
                 *, version: str = "", collateral: CollateralTimes | None = None) -> None:
        self.prometheus = CollectorRegistry()
        Gauge("eecp_build_info", "Always 1; the running eecp's version", ["version"],
              registry=self.prometheus).labels(version).set(1)
        self.store_up = Gauge(
            "eecp_store_up", "1 when the store answered SELECT 1 at this scrape",
            registry=self.prometheus)
        self.attestations = Counter(
            "eecp_attestations", "Attestation decisions", ["result", "reason"],
            registry=self.prometheus)
        self.attestation_seconds = Histogram(
            "eecp_attestation_seconds", "Time to judge one answer (allowlist, collateral, "
            "verification, policy)", registry=self.prometheus,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.audit_suppressed = Counter(
            "eecp_audit_suppressed", "Refusals of not yet admitted attempts left out of the "
            "audit log by EE_AUDIT_REFUSALS_PER_MIN", ["reason"], registry=self.prometheus)
        self.proxy_requests = Counter(
            "eecp_proxy_requests", "Proxied requests by app and status", ["app", "status"],
            registry=self.prometheus)
        self.proxy_seconds = Histogram(
            "eecp_proxy_seconds", "Time to the response head of proxied requests",
            registry=self.prometheus,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60))
        self.proxy_bytes = Counter(
            "eecp_proxy_bytes", "Body bytes carried by the proxy", ["direction"],
            registry=self.prometheus)
        self.unknown_responses = Counter(
            "eecp_tunnel_unknown_responses", "proxy_response messages of seed-protocol agents "
            "for no request in flight (late after a timeout, repeated, or made up): dropped",
            registry=self.prometheus)
        self.proxy_json_buffered = Gauge(
            "eecp_proxy_json_buffered_bytes", "Bytes POST /v1/proxy calls hold now (requests "
            "and answers; EE_PROXY_JSON_BUFFER_BYTES bounds them)", registry=self.prometheus)
        self.prometheus.register(_StateCollector(state))
        if collateral is not None:
            self.prometheus.register(_CollateralCollector(collateral))
        self._known_app = known_app
        self._proxied: dict[tuple[str, int], Any] = {}  # metric children, looked up once
        #: the ledger's metrics, once enabled
        self.ledger: LedgerMetrics | None = None

    def enable_ledger(self) -> LedgerMetrics:
        """Register the ledger's metrics (once; the ledger is on)."""
        if self.ledger is None:
            self.ledger = LedgerMetrics(self.prometheus)
        return self.ledger

    def proxied(self, app: str, status: int) -> None:
        """Count one proxied request (either entry point). An app name is the client's choice
        (its Host, or the URL): only registered apps get a series of their own, or random
        names would grow the metrics, and the process, without bound."""
        if not self._known_app(app):
            app = UNKNOWN_APP
        counter = self._proxied.get((app, status))
        if counter is None:
            counter = self.proxy_requests.labels(app, str(status))
            self._proxied[(app, status)] = counter
        counter.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.prometheus)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], StateGauges]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        connected = GaugeMetricFamily("eecp_agents_connected", "Agents with an open tunnel")
        connected.add_metric([], state.agents_connected)
        yield connected
        streams = GaugeMetricFamily("eecp_streams_in_flight", "Proxied requests in flight")
        streams.add_metric([], state.streams_in_flight)
        yield streams
        apps = GaugeMetricFamily("eecp_apps", "Apps by resolve state (ok = served)",
                                 labels=["state"])
        for name in APP_STATES:
            apps.add_metric([name], state.apps_by_state.get(name, 0))
        yield apps
        registrations = GaugeMetricFamily(
            "eecp_registrations", "Registered apps by registration state (warning: expiring "
            "within EE_REGISTRATION_WARN_DAYS)", labels=["state"])
        for name in REGISTRATION_STATES:
            registrations.add_metric([name], state.registrations_by_state.get(name, 0))
        yield registrations
        age = GaugeMetricFamily(
            "eecp_app_attestation_age_seconds", "Seconds since the last accepted attestation "
            "of the app's best agent (+Inf: none)", labels=["app"])
        for app, seconds in sorted(state.attestation_age_by_app.items()):
            age.add_metric([app], seconds)
        yield age


class _CollateralCollector(Collector):
    def __init__(self, times: CollateralTimes) -> None:
        self._times = times

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "eecp_collateral_next_update_timestamp_seconds", "When cached DCAP collateral "
            "(TCB info, QE identity, CRLs) reaches its nextUpdate, Unix seconds; past it every "
            "agent on the platform is refused", labels=["tee", "fmspc", "ca"])
        for (tee, fmspc, ca), at in sorted(self._times().items()):
            family.add_metric([tee, fmspc, ca], at)
        yield family


class _LedgerCollector(Collector):
    def __init__(self, counts: Callable[[], LedgerCounts | None]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        if counts is None:
            return
        transfers = CounterMetricFamily("eecp_ledger_transfers", "Journal rows by code",
                                        labels=["code"])
        for code, n in sorted(counts.transfers_by_code.items()):
            transfers.add_metric([code], n)
        yield transfers
        settled = CounterMetricFamily("eecp_settlements", "Settled node-periods by outcome",
                                      labels=["outcome"])
        for outcome, n in sorted(counts.settlements_by_outcome.items()):
            settled.add_metric([outcome], n)
        yield settled
        held = GaugeMetricFamily("eecp_node_periods_held", "Node-periods held for the owner "
                                 "by reason", labels=["reason"])
        for reason, n in sorted(counts.held_by_reason.items()):
            held.add_metric([reason], n)
        yield held
        yield from _stake_metrics(counts)
        if counts.invariant_ok is not None:
            ok = GaugeMetricFamily("eecp_ledger_invariant_ok", "1 when the last ledger check "
                                   "(GET /v1/ledger/check) found every invariant holding")
            ok.add_metric([], 1 if counts.invariant_ok else 0)
            yield ok


def _stake_metrics(counts: LedgerCounts) -> Iterator[Metric]:
    slashes = CounterMetricFamily("eecp_slashes", "Slashes that moved stake, by kind",
                                  labels=["kind"])
    for kind in ("availability", "fraud"):
        slashes.add_metric([kind], counts.slashes_by_kind.get(kind, 0))
    yield slashes
    skipped = CounterMetricFamily("eecp_slashes_skipped", "Availability slashes due on a node "
                                  "with nothing staked")
    skipped.add_metric([], counts.slashes_skipped)
    yield skipped
    for name, text, value in (
            ("eecp_stake_posted_micros", "Stake held, pending unstakes included (micro-USD)",
             counts.stake_posted_micros),
            ("eecp_unstake_pending_micros", "Unstakes waiting for their cooldown (micro-USD)",
             counts.unstake_pending_micros),
            ("eecp_nodes_below_minimum_stake", "Active nodes whose stake does not cover their "
             "minimum (their periods fail)", counts.nodes_below_minimum)):
        gauge = GaugeMetricFamily(name, text)
        gauge.add_metric([], value)
        yield gauge
    nodes = GaugeMetricFamily("eecp_nodes", "Nodes by status", labels=["status"])
    for status, n in sorted(counts.nodes_by_status.items()):
        nodes.add_metric([status], n)
    yield nodes

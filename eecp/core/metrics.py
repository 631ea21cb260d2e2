"""Prometheus metrics (``GET /metrics`` on the control port), one registry per process.

Counters and histograms are updated where things happen (sessions, the proxy); gauges that
describe state (connected agents, apps by state, streams in flight) are read from the live
registry at scrape time, so they can never drift from it.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from eecp.agents.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the ``app`` label of proxied requests for names no app is registered under
UNKNOWN_APP = "_unknown"


class Metrics:
    """eecp's metrics; ``render()`` is the scrape body."""

    def __init__(self, registry: Registry, now: Callable[[], float]) -> None:
        self.prometheus = CollectorRegistry()
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
        self.proxy_json_buffered = Gauge(
            "eecp_proxy_json_buffered_bytes", "Bytes POST /v1/proxy calls hold now (requests "
            "and answers; EE_PROXY_JSON_BUFFER_BYTES bounds them)", registry=self.prometheus)
        self.prometheus.register(_StateCollector(registry, now))
        self._registry = registry
        self._proxied: dict[tuple[str, int], Any] = {}  # metric children, looked up once

    def proxied(self, app: str, status: int) -> None:
        """Count one proxied request (either entry point). An app name is the client's choice
        (its Host, or the URL): only registered apps get a series of their own, or random
        names would grow the metrics, and the process, without bound."""
        if self._registry.app(app) is None:
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
    def __init__(self, registry: Registry, now: Callable[[], float]) -> None:
        self._registry = registry
        self._now = now

    def collect(self) -> Iterator[Metric]:
        agents = [a for view in self._registry.apps.values() for a in view.agents.values()]
        connected = GaugeMetricFamily("eecp_agents_connected", "Agents with an open tunnel")
        connected.add_metric([], sum(a.connected for a in agents))
        yield connected
        streams = GaugeMetricFamily("eecp_streams_in_flight", "Proxied requests in flight")
        streams.add_metric([], sum(a.in_flight for a in agents))
        yield streams
        now = self._now()
        states = Tally(self._registry.resolve(name, now).reason
                       for name in list(self._registry.apps))
        apps = GaugeMetricFamily("eecp_apps", "Apps by resolve state (ok = served)",
                                 labels=["state"])
        for state in ("ok", "registration_expired", "not_connected", "not_attested",
                      "health_fail", "sealed_required"):
            apps.add_metric([state], states.get(state, 0))
        yield apps

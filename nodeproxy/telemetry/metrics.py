"""Prometheus metrics with Istio's names and labels, so existing dashboards work.

Names and labels follow ztunnel's ``src/proxy/metrics.rs``; the L7 ones follow Envoy/Istio,
with Linkerd's latency buckets. Each :class:`ProxyMetrics` owns its own
``CollectorRegistry`` (not the process-global one) so that several proxies or tests in one
process stay independent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-export)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nodeproxy.model import Service, Workload
from nodeproxy.telemetry.server import Handler, Request, Response

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
SOURCE = "source"
DESTINATION = "destination"
MUTUAL_TLS = "mutual_tls"

# Linkerd's response latency buckets, in milliseconds
LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)  # fmt: skip


@dataclass(frozen=True)
class ConnectionLabels:
    """Istio's connection labels; the field order is the label order."""

    reporter: str = UNKNOWN
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN

    @classmethod
    def from_workloads(
        cls,
        reporter: str,
        *,
        source: Workload | None = None,
        destination: Workload | None = None,
        service: Service | None = None,
        source_identity: str | None = None,
        destination_identity: str | None = None,
        mtls: bool = False,
        request_protocol: str = "tcp",
        response_flags: str = "-",
    ) -> ConnectionLabels:
        """Labels for a connection between model objects.

        ``source_identity`` / ``destination_identity`` are SPIFFE URIs (the authenticated
        ones, when known); without them, a meshed workload's own identity is used.
        """
        # The same arguments come for every connection between the same two workloads:
        # remembered by the objects' identity (model objects are frozen; the entry keeps
        # them alive, so an id is not reused while it is cached).
        key = (reporter, id(source), id(destination), id(service), source_identity,
               destination_identity, mtls, request_protocol, response_flags)
        hit = _BY_ARGS.get(key)
        if (hit is not None and hit[0] is source and hit[1] is destination
                and hit[2] is service):
            return hit[3]
        labels = cls._build(reporter, source, destination, service, source_identity,
                            destination_identity, mtls, request_protocol, response_flags)
        if len(_BY_ARGS) >= _CHILD_CACHE_MAX:
            _BY_ARGS.clear()
        _BY_ARGS[key] = (source, destination, service, labels)
        return labels

    @classmethod
    def _build(cls, reporter: str, source: Workload | None, destination: Workload | None,
               service: Service | None, source_identity: str | None,
               destination_identity: str | None, mtls: bool, request_protocol: str,
               response_flags: str) -> ConnectionLabels:

        def ident(explicit: str | None, wl: Workload | None) -> str:
            if explicit:
                return explicit
            if wl is not None and wl.meshed:
                return wl.identity
            return UNKNOWN

        labels = cls(
            reporter=reporter or UNKNOWN,
            source_workload=_or_unknown(source and source.name),
            source_workload_namespace=_or_unknown(source and source.namespace),
            source_principal=ident(source_identity, source),
            source_app=_or_unknown(source and source.canonical_name),
            source_version=_or_unknown(source and source.canonical_revision),
            destination_service=_or_unknown(service and service.hostname),
            destination_service_namespace=_or_unknown(service and service.namespace),
            destination_service_name=_or_unknown(service and service.name),
            destination_workload=_or_unknown(destination and destination.name),
            destination_workload_namespace=_or_unknown(destination and destination.namespace),
            destination_principal=ident(destination_identity, destination),
            destination_app=_or_unknown(destination and destination.canonical_name),
            destination_version=_or_unknown(destination and destination.canonical_revision),
            request_protocol=request_protocol or UNKNOWN,
            response_flags=response_flags or "-",
            connection_security_policy=MUTUAL_TLS if mtls else UNKNOWN,
        )
        # One shared (immutable) object per distinct label set: every live connection holds
        # its labels, and a fresh object with its own dict is ~1 KB per connection.
        shared = _INTERNED.get(labels)
        if shared is not None:
            return shared
        if len(_INTERNED) >= _CHILD_CACHE_MAX:
            _INTERNED.clear()
        _INTERNED[labels] = labels
        return labels

    def values(self) -> tuple[str, ...]:
        # memoised: the labels of a connection are looked up at open, close and byte count
        cached = self.__dict__.get("_values")
        if cached is None:
            cached = tuple(getattr(self, n) or UNKNOWN for n in LABEL_NAMES)
            object.__setattr__(self, "_values", cached)
        return cached


def _or_unknown(value: str | None) -> str:
    return value or UNKNOWN


_CHILD_CACHE_MAX = 10_000
_INTERNED: dict[ConnectionLabels, ConnectionLabels] = {}
_BY_ARGS: dict[
    tuple[object, ...],
    tuple[Workload | None, Workload | None, Service | None, ConnectionLabels],
] = {}

LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ConnectionLabels))
REQUEST_LABEL_NAMES: tuple[str, ...] = (*LABEL_NAMES, "response_code")


class ProxyMetrics:
    """The node proxy's (and gateway's) metrics in a registry of their own."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        component: str = "ztunnel",
        tag: str = "unknown",
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        r = self.registry
        # prometheus-client appends _total to counters itself
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            LABEL_NAMES,
            registry=r,
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            LABEL_NAMES,
            registry=r,
        )
        self.tcp_received = Counter(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            LABEL_NAMES,
            registry=r,
        )
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            LABEL_NAMES,
            registry=r,
        )
        self.tcp_failed = Counter(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            LABEL_NAMES,
            registry=r,
        )
        self.build = Gauge(
            "istio_build", "Istio component build info", ("component", "tag"), registry=r
        )
        self.build.labels(component, tag).set(1)
        self.requests = Counter(
            "istio_requests",
            "The total number of requests",
            REQUEST_LABEL_NAMES,
            registry=r,
        )
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds",
            "Duration of requests in milliseconds",
            REQUEST_LABEL_NAMES,
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )

    def _child(self, metric: Counter, values: tuple[str, ...]) -> Counter:
        """``metric.labels(*values)``, cached: prometheus-client validates and locks on every
        ``labels()`` call, and a connection's label set repeats for every connection."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= _CHILD_CACHE_MAX:
                self._children.clear()  # label churn (pods come and go): start over
            child = self._children[key] = metric.labels(*values)
        return child

    # -- L4 ------------------------------------------------------------------------------
    def opened(self, labels: ConnectionLabels) -> None:
        self._child(self.tcp_opened, labels.values()).inc()

    def closed(self, labels: ConnectionLabels, response_flags: str = "-") -> None:
        self._child(self.tcp_closed, _flags(labels, response_flags).values()).inc()

    def failed(self, labels: ConnectionLabels, flags: str) -> None:
        self._child(self.tcp_failed, _flags(labels, flags).values()).inc()

    def bytes(self, labels: ConnectionLabels, received: int, sent: int) -> None:
        """Add byte counts (client→server ``received``, server→client ``sent``).

        Call it with the bytes moved since the last call: per chunk batch or at close.
        """
        values = labels.values()
        if received > 0:
            self._child(self.tcp_received, values).inc(received)
        if sent > 0:
            self._child(self.tcp_sent, values).inc(sent)
        if received < 0 or sent < 0:
            log.error("negative byte count ignored: received=%d sent=%d", received, sent)

    # -- L7 ------------------------------------------------------------------------------
    def request(self, labels: ConnectionLabels, response_code: int, duration_ms: float) -> None:
        """Count one HTTP request and observe its duration."""
        values = (*labels.values(), str(response_code))
        self.requests.labels(*values).inc()
        self.request_duration.labels(*values).observe(max(0.0, duration_ms))

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


class _WithoutCreated:
    """A view of a registry without the ``*_created`` series, which Istio does not export.

    (``prometheus_client.disable_created_metrics()`` would do it for the whole process.)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):  # type: ignore[no-untyped-def]
        for family in self._registry.collect():
            # collect() builds fresh families on every call, so trimming them is safe
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _flags(labels: ConnectionLabels, flags: str) -> ConnectionLabels:
    flags = flags or "-"
    if flags == labels.response_flags:
        return labels
    return replace(labels, response_flags=flags)


def metrics_route(metrics: ProxyMetrics) -> Handler:
    """A :func:`nodeproxy.telemetry.server.serve_http` handler for ``/metrics``."""

    async def handler(_: Request) -> Response:
        return Response(200, metrics.exposition(), CONTENT_TYPE)

    return handler

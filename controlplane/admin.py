"""The control plane's metrics and admin endpoints (port 15014, plain HTTP).

``/metrics`` (Prometheus), ``/debug/state`` (the current mesh state, JSON), ``/debug/errors``
(resource files that failed to parse, JSON). Served by the shared small HTTP server in
:mod:`nodeproxy.telemetry.server`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from nodeproxy import model
from nodeproxy.telemetry.server import Request, Response, json_response, serve_http


class ControlPlaneMetrics:
    """A few counters, in a registry of their own (several control planes per test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected = Gauge(
            "nodeproxy_controlplane_connected_proxies",
            "Clients currently subscribed to the mesh state",
            registry=r,
        )
        self.signed = Counter(
            "nodeproxy_controlplane_certificates_signed",
            "Certificates signed",
            registry=r,
        )
        self.refused = Counter(
            "nodeproxy_controlplane_certificates_refused",
            "Certificate requests refused",
            ["reason"],
            registry=r,
        )
        self.unauthenticated = Counter(
            "nodeproxy_controlplane_unauthenticated_requests",
            "Requests refused for a missing or unknown token",
            registry=r,
        )
        self.pushes = Counter(
            "nodeproxy_controlplane_pushes",
            "Snapshots and deltas sent to subscribers",
            ["type"],
            registry=r,
        )
        self.dropped = Counter(
            "nodeproxy_controlplane_slow_subscribers_dropped",
            "Subscribers dropped because they did not read in time",
            registry=r,
        )
        self.resources = Gauge(
            "nodeproxy_controlplane_resources",
            "Mesh state objects, by kind",
            ["kind"],
            registry=r,
        )
        self.version = Gauge(
            "nodeproxy_controlplane_state_version", "Version of the mesh state", registry=r
        )
        self.errors = Gauge(
            "nodeproxy_controlplane_resource_errors",
            "Resource files that currently fail to parse",
            registry=r,
        )

    def observe_state(self, state: model.MeshState) -> None:
        for kind in model.KINDS:
            self.resources.labels(kind).set(len(getattr(state, kind)))
        self.version.set(state.version)

    def exposition(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


class _WithoutCreated:
    """The registry without ``*_created`` series (noise for a handful of counters)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):  # type: ignore[no-untyped-def]
        for family in self._registry.collect():
            # collect() builds fresh families each call, so trimming them is safe
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def routes(
    metrics: ControlPlaneMetrics,
    state: Callable[[], model.MeshState],
    errors: Callable[[], Mapping[str, str]],
) -> dict[str, Any]:
    async def metrics_handler(_: Request) -> Response:
        metrics.errors.set(len(errors()))
        return Response(200, metrics.exposition(), CONTENT_TYPE_LATEST)

    async def state_handler(_: Request) -> Response:
        return json_response(state().to_json())

    async def errors_handler(_: Request) -> Response:
        return json_response(dict(errors()))

    return {
        "/metrics": metrics_handler,
        "/debug/state": state_handler,
        "/debug/errors": errors_handler,
    }


async def serve_admin(
    address: str,
    metrics: ControlPlaneMetrics,
    state: Callable[[], model.MeshState],
    errors: Callable[[], Mapping[str, str]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints on ``address``; ``started`` receives the bound port."""
    await serve_http(address, routes(metrics, state, errors), task_status=task_status)

"""One HTTP request through the gateway, shared by the HTTP/1.1 and HTTP/2 front ends.

The front ends turn what they parse into an :class:`HttpRequest` and give a
:class:`ResponseSink` to write the answer to; :meth:`Forwarder.handle` does the rest:

route (RouteTable: 404 when a routed service has no match) → filters (redirect answered here;
header modifiers, URLRewrite, mirrors) → weighted backendRef → endpoint (P2C/EWMA balancer with
ejection, preferring one not tried yet) → L7 authorization with the original caller's identity
(403) → attempt (HTTP/1.1 or HTTP/2 upstream) → retry per :mod:`l7gateway.retry` (budget,
jittered back-off, idempotency, body replay buffer) → response (header modifiers) → metrics
and one access-log line.

``timeouts.request`` bounds the whole exchange (504 before the response started, a reset
after); ``timeouts.backendRequest`` bounds each attempt.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from l7gateway import filters as flt
from l7gateway.authz import authorize_request
from l7gateway.balancer import Balancer, is_failure, pick_backend
from l7gateway.matching import RouteTable, normalize_path, split_target
from l7gateway.retry import (
    CONNECT_FAILURE,
    DEFAULT_BODY_LIMIT,
    REFUSED_STREAM,
    RESET,
    TIMEOUT,
    BodyBuffer,
    Deadline,
    RetryBudget,
    backoff_delay,
    policy_backoff,
    should_retry,
)
from l7gateway.upstream import AttemptError, Exchange, RequestHead, ResponseHead, Upstreams
from nodeproxy import identity as spiffe
from nodeproxy.model import MeshState, Service, ServicePort, Workload
from nodeproxy.routes import BackendRef, HeaderModifier, RetryPolicy
from nodeproxy.telemetry import accesslog
from nodeproxy.telemetry.metrics import ConnectionLabels, ProxyMetrics
from ztunnel.endpoints import Endpoint, candidates
from ztunnel.hbone.protocol import format_authority
from ztunnel.policy import Connection

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
    "trailer", "http2-settings", "host", "expect",
})
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
MIRROR_TIMEOUT = 5.0
_INF = float("inf")
# trace span ids and request ids need to be unique, not secret: a PRNG seeded from the OS
# saves two getrandom(2) calls per request
_ids = random.Random()
_CACHE_MAX = 10_000


class ClientGone(Exception):
    """The downstream client went away (reset, closed) in the middle of a request."""


class RequestBody(Protocol):
    """A request body as the front end reads it; ``receive`` raises :class:`ClientGone`."""

    trailers: Headers | None

    async def receive(self) -> bytes: ...  # b"" at the end


class ResponseSink(Protocol):
    """Where the response goes; methods raise :class:`ClientGone` if the client is gone."""

    started: bool

    async def start(self, status: int, headers: Headers, end: bool) -> None: ...
    async def data(self, data: bytes) -> None: ...
    async def end(self, trailers: Headers | None) -> None: ...
    async def upgrade(self, status: int, headers: Headers, upstream: trio.abc.Stream,
                      leftover: bytes) -> None: ...
    async def abort(self) -> None: ...


@dataclass
class HttpRequest:
    method: str
    scheme: str
    authority: str
    target: str
    headers: Headers  # lower-case names, hop-by-hop ones removed
    body: RequestBody | None  # None: the request has no body
    upgrade: str | None = None  # HTTP/1.1 Upgrade token(s), e.g. "websocket"


@dataclass
class Downstream:
    """The tunnelled client connection a request came on."""

    service: Service
    port: int  # the service port (from the CONNECT authority)
    caller: str | None  # the caller's SPIFFE id (TLS peer)
    src_ip: str
    src_port: int = 0
    protocol: str = "http/1.1"  # "http/1.1" | "h2"
    source: Workload | None = None
    # the access log's source fields, formatted once per tunnel
    _log_src: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def consumer_namespace(self) -> str | None:
        if self.caller is None:
            return None
        try:
            return spiffe.parse(self.caller).namespace
        except spiffe.IdentityError:
            return None


@dataclass
class ForwardConfig:
    body_replay_limit: int = DEFAULT_BODY_LIMIT
    budget_ratio: float = 0.2
    budget_min_concurrent: int = 3
    # balancer: consecutive failures before ejection, and the first ejection's length
    consecutive_failures: int = 5
    base_ejection: float = 1.0
    max_ejection: float = 60.0


def clean_headers(headers: Headers, *, keep_te_trailers: bool = True) -> Headers:
    """Lower-case names, without hop-by-hop headers (and those ``Connection`` names)."""
    named: set[str] = set()
    for n, v in headers:
        if n.lower() == "connection":
            named |= {t.strip().lower() for t in v.split(",") if t.strip()}
    out: Headers = []
    for n, v in headers:
        low = n.lower()
        if low == "te" and keep_te_trailers and v.strip().lower() == "trailers":
            out.append(("te", "trailers"))
        elif low not in HOP_BY_HOP and low not in named and not low.startswith(":"):
            out.append((low, v))
    return out


def _span_id() -> str:
    return f"{_ids.getrandbits(64) or 1:016x}"


def propagate_traceparent(value: str | None) -> str:
    """Continue the caller's trace with a new span id, or start one (W3C trace context)."""
    m = _TRACEPARENT.match(value.strip().lower()) if value else None
    if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
        return f"00-{m.group(1)}-{_span_id()}-{m.group(3)}"
    return f"00-{_ids.getrandbits(128) or 1:032x}-{_span_id()}-01"


def _request_id() -> str:
    """A random (version 4) UUID, formatted directly (uuid.UUID costs ~1 % of a request)."""
    h = f"{_ids.getrandbits(124):031x}"
    variant = "89ab"[int(h[15], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{variant}{h[16:19]}-{h[19:31]}"


def port_speaks_h2(port: ServicePort) -> bool:
    """Istio's protocol selection by port name / protocol: grpc*, http2*, h2c* are HTTP/2."""
    name = (port.name or "").lower()
    proto = (port.protocol or "").upper()
    return name.startswith(("grpc", "http2", "h2c")) or proto in ("GRPC", "HTTP2", "H2C")


class _BodySource:
    """The client's body, read once, kept (up to the limit) for replays on retries."""

    def __init__(self, body: RequestBody | None, limit: int) -> None:
        self.body = body
        self.buffer = BodyBuffer(limit)
        self.done = body is None
        self.read = 0
        self.trailers: Headers | None = None

    @property
    def can_replay(self) -> bool:
        return self.read == 0 or self.buffer.replayable

    def cursor(self) -> _Cursor:
        return _Cursor(self)


class _Cursor:
    def __init__(self, src: _BodySource) -> None:
        self.src = src
        self._replay = list(src.buffer.replay()) if src.read else []

    @property
    def trailers(self) -> Headers | None:
        return self.src.trailers

    async def next(self) -> bytes | None:
        if self._replay:
            return self._replay.pop(0)
        src = self.src
        if src.done or src.body is None:
            return None
        chunk = await src.body.receive()
        if not chunk:
            src.done = True
            src.trailers = src.body.trailers
            return None
        src.read += len(chunk)
        src.buffer.feed(chunk)
        return chunk


@dataclass
class _Log:
    """What one request's metrics and access-log line need."""

    code: int = 0
    flags: str = "-"
    backend: Service | None = None
    endpoint: Endpoint | None = None
    attempts: int = 0
    retry_slots: int = 0  # retry budget slots this request holds
    route: str | None = None
    error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class GatewayMetrics(ProxyMetrics):
    """The shared Istio metrics plus the gateway's retry counter."""

    def __init__(self) -> None:
        super().__init__(component="waypoint")
        from prometheus_client import Counter

        self.retries = Counter(
            "nodeproxy_gateway_retries", "Retries made by the L7 gateway, by reason",
            ("reason",), registry=self.registry,
        )

        self.budget_exhausted = Counter(
            "nodeproxy_gateway_retry_budget_exhausted",
            "Retries not made because the retry budget was used up", registry=self.registry,
        )

    def retry(self, reason: str) -> None:
        self._child(self.retries, (reason,)).inc()

    def request(self, labels: ConnectionLabels, response_code: int, duration_ms: float) -> None:
        """As :meth:`ProxyMetrics.request`, with the labelled children cached."""
        values = (*labels.values(), str(response_code))
        self._child(self.requests, values).inc()
        self._child(self.request_duration, values).observe(  # type: ignore[attr-defined]
            max(0.0, duration_ms))


def _outcome_reason(outcome: int | str) -> str:
    return str(outcome) if isinstance(outcome, str) else f"status-{outcome}"


class Forwarder:
    """Per-request logic; the gateway makes one and hands it every request."""

    def __init__(
        self,
        state: Callable[[], MeshState],
        upstreams: Upstreams,
        metrics: GatewayMetrics,
        *,
        config: ForwardConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._state = state
        self.upstreams = upstreams
        self.metrics = metrics
        self.config = config or ForwardConfig()
        self.rng = rng or random.Random()
        self.budget = RetryBudget(self.config.budget_ratio, self.config.budget_min_concurrent)
        self._tables: dict[tuple[str, int, str | None], RouteTable] = {}
        self._tables_state: MeshState | None = None
        self._balancers: dict[tuple[str, int], tuple[Balancer, dict[str, Endpoint]]] = {}
        self._balancers_state: dict[tuple[str, int], MeshState] = {}
        # per mesh state: the policies of a workload (by uid)
        self._policies: dict[str, list] = {}  # type: ignore[type-arg]
        self._policies_state: MeshState | None = None
        self._dst_log: dict[tuple, tuple] = {}  # type: ignore[type-arg]
        self.nursery: trio.Nursery | None = None  # for mirrors (fire and forget)

    # -- state-derived tables ------------------------------------------------------------
    def route_table(self, service: Service, port: int, consumer_ns: str | None) -> RouteTable:
        state = self._state()
        if self._tables_state is not state:
            self._tables = {}
            self._tables_state = state
        key = (service.key, port, consumer_ns)
        table = self._tables.get(key)
        if table is None:
            table = RouteTable.build(state.routes_for(service), service.namespace, service.name,
                                     port, consumer_ns)
            self._tables[key] = table
        return table

    def policies(self, state: MeshState, workload: Workload) -> list:  # type: ignore[type-arg]
        """``state.policies_for(workload)``, cached per state (it scans every policy)."""
        if self._policies_state is not state:
            self._policies = {}
            self._policies_state = state
        pols = self._policies.get(workload.uid)
        if pols is None:
            pols = self._policies[workload.uid] = state.policies_for(workload)
        return pols

    def balancer(self, service: Service, port: int) -> tuple[Balancer, dict[str, Endpoint]]:
        """The balancer of one backend service port, its endpoints refreshed with the state."""
        state = self._state()
        key = (service.key, port)
        entry = self._balancers.get(key)
        if entry is None or self._balancers_state.get(key) is not state:
            eps = {Upstreams.key(ep): ep for ep in candidates(state, service, port)}
            if entry is None:
                c = self.config
                bal = Balancer(eps, self.rng, trio.current_time,
                               consecutive_failures=c.consecutive_failures,
                               base_ejection=c.base_ejection, max_ejection=c.max_ejection)
            else:
                bal = entry[0]
                bal.update(eps)
            entry = (bal, eps)
            self._balancers[key] = entry
            self._balancers_state[key] = state
        return entry

    # -- a request -----------------------------------------------------------------------
    async def handle(self, down: Downstream, req: HttpRequest, sink: ResponseSink) -> None:
        """Serve one request; never raises except :class:`ClientGone` and cancellation."""
        started = time.monotonic()
        info = _Log()
        try:
            await self._handle(down, req, sink, info)
        except ClientGone as e:
            info.flags = "DC"
            info.error = f"client gone: {e}"
            raise
        except Exception as e:
            log.exception("request %s %s failed", req.method, req.target)
            info.code, info.flags, info.error = 500, "-", f"internal error: {e!r}"
            if not sink.started:
                await self._simple(sink, 500, "internal error\n")
            else:
                await sink.abort()
        finally:
            self._record(down, req, info, (time.monotonic() - started) * 1000)

    def _record(self, down: Downstream, req: HttpRequest, info: _Log, ms: float) -> None:
        ep = info.endpoint
        svc = info.backend or down.service
        grpc = False
        for n, v in req.headers:
            if n == "content-type" and v.startswith("application/grpc"):
                grpc = True
                break
        try:
            self.metrics.request(self._labels_for(down, ep, svc, grpc, info.flags), info.code,
                                 ms)
        except Exception:  # noqa: BLE001 - telemetry never breaks a request
            log.exception("metrics update failed")
        self._access_log(down, req, info, ms, ep, svc)

    def _labels_for(self, down: Downstream, ep: Endpoint | None, svc: Service, grpc: bool,
                    flags: str) -> ConnectionLabels:
        """The request's metric labels (built once per source, caller, destination, service,
        protocol and flags: ConnectionLabels.from_workloads remembers them)."""
        return ConnectionLabels.from_workloads(
            "waypoint",
            source=down.source,
            source_identity=down.caller,
            destination=ep.workload if ep else None,
            service=svc,
            mtls=down.caller is not None,
            request_protocol="grpc" if grpc else "http",
            response_flags=flags,
        )

    def _access_log(self, down: Downstream, req: HttpRequest, info: _Log, ms: float,
                    ep: Endpoint | None, svc: Service) -> None:
        """One access-log line, as :func:`nodeproxy.telemetry.accesslog.log_connection`
        writes it (same fields, order and quoting); the parts that stay the same for a
        tunnel (source) and for a destination are formatted once."""
        logger = accesslog.logger
        try:
            if not logger.isEnabledFor(logging.INFO):
                return
            src = down._log_src
            if src is None:
                src = down._log_src = _fields((
                    ("src.addr", format_authority(down.src_ip, down.src_port)
                     if down.src_port else down.src_ip),
                    ("src.workload", down.source.name if down.source else None),
                    ("src.namespace", down.source.namespace if down.source else None),
                    ("src.identity", down.caller),
                ))
            key = (id(ep), id(svc))
            hit = self._dst_log.get(key)
            if hit is not None and hit[0] is ep and hit[1] is svc:
                dst = hit[2]
            else:
                dst = _fields((
                    ("dst.addr", format_authority(ep.address, ep.port) if ep else None),
                    ("dst.service", svc.hostname),
                    ("dst.workload", ep.workload.name if ep else None),
                    ("dst.namespace", ep.workload.namespace if ep else None),
                    ("dst.identity", ep.workload.identity if ep else None),
                    ("direction", "waypoint"),
                ))
                if len(self._dst_log) >= _CACHE_MAX:
                    self._dst_log.clear()
                self._dst_log[key] = (ep, svc, dst)
            # the per-request fields, as accesslog._value writes them: ints need no quoting
            value = accesslog._value
            words = [src, dst, f"duration={round(ms)}ms",
                     f"response_flags={value('response_flags', info.flags)}"]
            if info.error is not None:
                words.append(f"error={value('error', info.error)}")
            words += (f"protocol={value('protocol', down.protocol)}",
                      f"method={value('method', req.method)}",
                      f"path={value('path', req.target)}",
                      f"status={info.code}")
            if info.route is not None:
                words.append(f"route={value('route', info.route)}")
            words.append(f"attempts={info.attempts}")
            if info.extra:
                words.append(_fields(info.extra.items()))
            line = " ".join([w for w in words if w])
            # the message joined here (no args): the same text, without a %-format per line
            record = logger.makeRecord(logger.name, logging.INFO, accesslog.__file__, 0,
                                       f"{accesslog.MESSAGE} {line}", None, None)
            logger.handle(record)
        except Exception:  # noqa: BLE001 - the access log never breaks a request
            log.exception("access log entry dropped")

    async def _simple(self, sink: ResponseSink, status: int, body: str,
                      headers: Headers = (), info: _Log | None = None) -> None:  # type: ignore
        data = body.encode()
        hdrs = [("content-type", "text/plain"), ("content-length", str(len(data))),
                *headers]
        if info is not None:
            info.code = status
        if sink.started:
            await sink.abort()
            return
        await sink.start(status, hdrs, end=not data)
        if data:
            await sink.data(data)
            await sink.end(None)

    async def _handle(self, down: Downstream, req: HttpRequest, sink: ResponseSink,
                      info: _Log) -> None:
        state = self._state()
        raw_path, query = split_target(req.target)
        if not raw_path.startswith("/"):
            info.error = f"bad request target {req.target!r}"
            await self._simple(sink, 400, "bad request target\n", info=info)
            return
        path = normalize_path(raw_path)
        target = path + ("?" + query if query else "")
        table = self.route_table(down.service, down.port, down.consumer_namespace)
        m = table.match(req.method, path, query, req.headers)
        if m is None:
            info.flags, info.error = "NR", "no route matched"
            await self._simple(sink, 404, "no route\n", info=info)
            return
        info.route = m.route.key if not m.default else None
        rule = m.rule
        freq = flt.Request(req.method, req.scheme, req.authority or down.service.hostname,
                           target, tuple(req.headers))
        fr = flt.apply_request_filters(rule.filters, freq, m.match, down.port)
        if fr.redirect is not None:
            await self._simple(sink, fr.redirect.status, "",
                               [("location", fr.redirect.location)], info=info)
            return
        backend = pick_backend(rule.backend_refs, self.rng)
        if backend is None:
            info.error = "no backend (all weights 0)"
            await self._simple(sink, 500, "no backend\n", info=info)
            return
        bsvc, bport = self._backend_service(state, backend, down.port)
        if bsvc is None:
            info.error = f"backend {backend.key} unknown or without port {bport}"
            await self._simple(sink, 500, "invalid backend\n", info=info)
            return
        info.backend = bsvc
        freq2 = fr.request
        mirrors = list(fr.mirrors)
        resp_mods = list(fr.response_modifiers)
        if backend.filters:
            fr2 = flt.apply_request_filters(backend.filters, freq2, m.match, down.port)
            freq2 = fr2.request
            mirrors += fr2.mirrors
            resp_mods += fr2.response_modifiers
        headers = list(freq2.headers)
        tp = flt.get_header(headers, "traceparent")
        headers = [(n, v) for n, v in headers if n.lower() != "traceparent"]
        headers.append(("traceparent", propagate_traceparent(tp)))
        if flt.get_header(headers, "x-request-id") is None:
            headers.append(("x-request-id", _request_id()))
        info.extra["request_id"] = flt.get_header(headers, "x-request-id") or ""
        head = RequestHead(
            method=freq2.method, scheme=freq2.scheme, authority=freq2.authority,
            target=freq2.target, headers=[(n.lower(), v) for n, v in headers],
            has_body=req.body is not None, upgrade=req.upgrade,
        )
        svc_port = bsvc.port(bport)
        assert svc_port is not None
        use_h2 = down.protocol == "h2" and port_speaks_h2(svc_port) and not req.upgrade
        policy = rule.retry
        timeouts = rule.timeouts
        if req.upgrade:
            # an upgraded connection is long-lived: no timeouts; retry only unprocessed ones
            policy, timeouts = RetryPolicy(codes=(), attempts=2), None
        body = _BodySource(req.body, self.config.body_replay_limit)
        upgraded = await self._exchange(
            down, req, sink, info, state, bsvc, bport, head, body, use_h2, policy, timeouts,
            resp_mods)
        if upgraded is not None:
            await upgraded()
        if mirrors and body.done and body.buffer.replayable:
            for mirror in mirrors:
                if flt.should_mirror(mirror, self.rng.random()):
                    self._start_mirror(state, mirror.backend, bport, head, body)

    def _backend_service(self, state: MeshState, b: BackendRef,
                         port: int) -> tuple[Service | None, int]:
        bport = b.port or port
        svc = state.services.get(b.key)
        if svc is None or svc.port(bport) is None:
            return None, bport
        return svc, bport

    async def _exchange(self, down, req, sink, info, state, bsvc, bport, head, body, use_h2,
                        policy, timeouts, resp_mods):  # type: ignore[no-untyped-def]
        """The attempt loop. Returns a coroutine function to run an upgrade relay, or None."""
        now = trio.current_time()
        deadline = Deadline.start(now, timeouts)
        self.budget.start_request()
        try:
            if not deadline.request:
                # no request timeout: no cancel scope to enter and leave per request
                return await self._attempts(down, req, sink, info, state, bsvc, bport, head,
                                            body, use_h2, policy, deadline, resp_mods)
            with trio.move_on_at(now + deadline.request) as whole:
                return await self._attempts(down, req, sink, info, state, bsvc, bport, head,
                                            body, use_h2, policy, deadline, resp_mods)
            if whole.cancelled_caught:
                info.flags, info.error = "UT", "request timeout"
                await self._simple(sink, 504, "upstream request timeout\n", info=info)
        finally:
            for _ in range(info.retry_slots):
                self.budget.finish_retry()
            info.retry_slots = 0
            self.budget.finish_request()
        return None

    async def _attempts(self, down, req, sink, info, state, bsvc, bport, head, body, use_h2,
                        policy, deadline, resp_mods):  # type: ignore[no-untyped-def]
        bal, eps = self.balancer(bsvc, bport)
        tried: set[str] = set()
        retries = 0
        while True:
            key = bal.pick(exclude=tried)
            if key is None:
                info.flags, info.error = "UH", "no healthy upstream"
                await self._simple(sink, 503, "no healthy upstream\n", info=info)
                return None
            ep = eps[key]
            tried.add(key)
            info.endpoint = ep
            info.attempts += 1
            policies = self.policies(state, ep.workload)
            if policies:  # none: allowed (no ALLOW policy applies), nothing to evaluate
                decision = authorize_request(
                    policies, Connection(down.caller, down.src_ip, ep.address, ep.port),
                    req.method, _path_for_authz(req), req.headers,
                )
                if not decision.allowed:
                    info.flags, info.error = "RBAC", decision.reason
                    await self._simple(sink, 403, "RBAC: access denied\n", info=info)
                    return None
            covering = info.retry_slots  # slots taken for this (retry) attempt
            result = await self._attempt(ep, bal, key, head, body, use_h2, deadline,
                                         policy, retries, sink, info, resp_mods)
            for _ in range(covering):
                self.budget.finish_retry()
            info.retry_slots -= covering
            if result.committed:
                return result.upgrade
            self.metrics.retry(_outcome_reason(result.outcome))
            await trio.sleep(result.delay)
            retries += 1

    async def _attempt(self, ep, bal, key, head, body, use_h2, deadline, policy, retries,
                       sink, info, resp_mods) -> _Attempt:  # type: ignore[no-untyped-def]
        """One try: connect, send, and either decide to retry or answer the client."""
        now = trio.current_time()
        per_try = deadline.attempt_timeout(now)
        st = _AttemptState(bal.start(key))
        failure: BaseException | None = None
        result = _Attempt(True, 0)
        try:
            if per_try is None and not head.has_body:
                # the common case: no body to send alongside, no per-try timeout: neither a
                # nursery nor a cancel scope is needed
                try:
                    result = await self._try(ep, bal, head, body, use_h2, deadline, policy,
                                             retries, sink, info, resp_mods, st, None)
                except (ClientGone, Exception) as e:
                    failure = e
                    result = _Attempt(True, 0)
            else:
                try_at = now + per_try if per_try is not None else _INF
                async with trio.open_nursery() as nursery:
                    try:
                        with trio.move_on_at(try_at) as scope:
                            result = await self._try(ep, bal, head, body, use_h2, deadline,
                                                     policy, retries, sink, info, resp_mods,
                                                     st, nursery)
                        if scope.cancelled_caught:
                            result = await self._per_try_timeout(bal, head, body, deadline,
                                                                 policy, retries, sink, info,
                                                                 st)
                    except (ClientGone, Exception) as e:  # re-raised outside the nursery
                        failure = e
                        result = _Attempt(True, 0)
                    nursery.cancel_scope.cancel()  # the request body sender, if still going
            if st.client_gone is not None:
                raise ClientGone(str(st.client_gone))
            if failure is not None:
                raise failure
            return result
        finally:
            if st.token is not None:
                upstream_broke = (
                    isinstance(failure, Exception)
                    and not isinstance(failure, ClientGone)
                    and st.client_gone is None
                )
                if upstream_broke:
                    bal.finish(st.token, ok=False)
                else:
                    # the client left or the request was cancelled from outside: that says
                    # nothing about the endpoint, so it must not count toward an ejection
                    bal.release(st.token)
            ex = st.exchange
            if ex is not None:
                # a connection going back to its pool needs no IO (nor a shielded scope)
                nowait = getattr(ex, "finish_nowait", None)
                if nowait is None or not nowait(st.ok):
                    with trio.CancelScope(shield=True):
                        await ex.finish(st.ok)

    async def _try(self, ep, bal, head, body, use_h2, deadline, policy, retries, sink, info,
                   resp_mods, st, nursery) -> _Attempt:  # type: ignore[no-untyped-def]
        try:
            if use_h2:
                st.exchange = await self.upstreams.start_h2(ep, head)
            else:
                st.exchange = await self.upstreams.start_h1(ep, head)
            if nursery is not None:
                nursery.start_soon(_send_body, st, body.cursor(), nursery.cancel_scope)
            resp = await st.exchange.response()
            outcome: int | str = resp.status
        except AttemptError as e:
            outcome = e.outcome
            info.error = str(e)
        delay = self._retry_delay(policy, outcome, head.method, retries, body, deadline, info)
        failed = is_failure(_status(outcome))
        if delay is not None:
            bal.finish(st.take_token(), ok=not failed)
            return _Attempt(False, outcome, delay)
        st.committed = True
        bal.finish(st.take_token(), ok=not failed)
        if isinstance(outcome, str):
            code, info.flags = _failure_status(outcome)
            await self._simple(sink, code, f"upstream {outcome}\n", info=info)
            return _Attempt(True, outcome)
        assert st.exchange is not None
        info.code, info.error = resp.status, None
        upgrade = await self._respond(st.exchange, resp, sink, resp_mods)
        st.ok = True
        return _Attempt(True, outcome, 0.0, upgrade)

    async def _per_try_timeout(self, bal, head, body, deadline, policy, retries, sink, info,
                               st) -> _Attempt:  # type: ignore[no-untyped-def]
        if st.token is not None:
            bal.finish(st.take_token(), ok=False)
        if st.committed:
            # the response had started: all that is left is to reset it
            info.flags, info.error = "UT", "backend request timeout mid-response"
            await sink.abort()
            return _Attempt(True, TIMEOUT)
        info.error = "backend request timeout"
        delay = self._retry_delay(policy, TIMEOUT, head.method, retries, body, deadline, info)
        if delay is not None:
            return _Attempt(False, TIMEOUT, delay)
        info.flags = "UT"
        await self._simple(sink, 504, "upstream request timeout\n", info=info)
        return _Attempt(True, TIMEOUT)

    def _retry_delay(self, policy, outcome, method, retries, body, deadline,
                     info) -> float | None:  # type: ignore[no-untyped-def]
        """The back-off before a retry, or None when this outcome is final."""
        if outcome is None:
            return None
        verdict = should_retry(policy, outcome, method, retries, body.can_replay)
        if not verdict.retry:
            return None
        delay = backoff_delay(retries + 1, policy_backoff(policy), self.rng)
        if not deadline.allows(trio.current_time(), delay):
            return None
        if not self.budget.try_start_retry():
            log.info("retry budget exhausted; not retrying %s", outcome)
            self.metrics.budget_exhausted.inc()
            return None
        info.retry_slots += 1
        return delay

    async def _respond(self, ex: Exchange, resp: ResponseHead, sink: ResponseSink,
                       mods: list[HeaderModifier]) -> Callable | None:  # type: ignore[type-arg]
        headers = flt.apply_response_filters(clean_headers(resp.headers), mods)
        if ex.upgraded is not None:
            stream, leftover = ex.upgraded

            async def relay() -> None:
                await sink.upgrade(resp.status, headers, stream, leftover)

            return relay
        await sink.start(resp.status, headers, end=resp.ended)
        if resp.ended:
            return None
        # body already received is passed on at once; before waiting on the upstream, the
        # sink sends what it holds back (a front end may hold the head to write it with the
        # first body bytes)
        poll = getattr(ex, "poll_data", None)
        flush = getattr(sink, "flush", None)
        while True:
            try:
                data = poll() if poll is not None else None
                if data is None:
                    if flush is not None:
                        await flush()
                    data = await ex.receive_data()
            except AttemptError as e:
                log.info("upstream broke mid-response: %s", e)
                await sink.abort()
                return None
            if not data:
                break
            await sink.data(data)
        await sink.end(ex.trailers)
        return None

    # -- mirrors -------------------------------------------------------------------------
    def _start_mirror(self, state: MeshState, backend: BackendRef, port: int,
                      head: RequestHead, body: _BodySource) -> None:
        if self.nursery is None:
            return
        svc, bport = self._backend_service(state, backend, port)
        if svc is None:
            log.info("mirror backend %s unknown; not mirrored", backend.key)
            return
        chunks = list(body.buffer.replay())
        host, _, p = head.authority.rpartition(":") if ":" in head.authority else (
            head.authority, "", "")
        shadow = f"{host}-shadow:{p}" if p else f"{head.authority}-shadow"
        mhead = RequestHead(head.method, head.scheme, shadow, head.target, list(head.headers),
                            bool(chunks) or head.has_body)
        self.nursery.start_soon(self._mirror, svc, bport, mhead, chunks)

    async def _mirror(self, svc: Service, port: int, head: RequestHead,
                      chunks: list[bytes]) -> None:
        bal, eps = self.balancer(svc, port)
        key = bal.pick()
        if key is None:
            return
        ex = None
        with trio.move_on_after(MIRROR_TIMEOUT):
            try:
                ex = await self.upstreams.start_h1(eps[key], head)
                await ex.send_body(_ListCursor(chunks))
                await ex.response()
                while await ex.receive_data():
                    pass
            except AttemptError as e:
                log.info("mirror to %s failed: %s", svc.key, e)
        if ex is not None:
            await ex.finish(False)


def _fields(pairs) -> str:  # type: ignore[no-untyped-def]
    """``key=value`` words as the access log writes them (``None`` left out)."""
    value = accesslog._value
    return " ".join([f"{k}={value(k, v)}" for k, v in pairs if v is not None])


@dataclass
class _Attempt:
    committed: bool  # the client got (or is getting) an answer
    outcome: int | str
    delay: float = 0.0
    upgrade: Callable | None = None  # type: ignore[type-arg]


class _ListCursor:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)
        self.trailers: Headers | None = None

    async def next(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._chunks.pop(0) if self._chunks else None


def _path_for_authz(req: HttpRequest) -> str:
    raw, _ = split_target(req.target)
    return normalize_path(raw) if raw.startswith("/") else raw


def _status(outcome: int | str | None) -> int | None:
    return outcome if isinstance(outcome, int) else None


def _failure_status(outcome: str) -> tuple[int, str]:
    if outcome == CONNECT_FAILURE:
        return 503, "UF"
    if outcome == REFUSED_STREAM:
        return 503, "UF"
    if outcome == RESET:
        return 502, "UC"
    if outcome == TIMEOUT:
        return 504, "UT"
    return 502, "UC"


@dataclass
class _AttemptState:
    token: object | None
    exchange: Exchange | None = None
    committed: bool = False
    ok: bool = False
    client_gone: ClientGone | None = None

    def take_token(self):  # type: ignore[no-untyped-def]
        token, self.token = self.token, None
        return token


async def _send_body(st: _AttemptState, cursor: _Cursor, scope: trio.CancelScope) -> None:
    """Stream the request body upstream; a client that goes away ends the whole attempt."""
    assert st.exchange is not None
    try:
        await st.exchange.send_body(cursor)
    except ClientGone as e:
        st.client_gone = e
        scope.cancel()

"""Gateway API ``HTTPRoute`` (v1, GAMMA mesh profile): the data model and its parser.

Shared by the control plane (which parses the resources and ships them) and the L7 gateway
(which matches requests against them). Pure: no IO.

``parse_httproute`` takes the Kubernetes-shaped dict (as read from YAML or the API server),
fills in the spec's defaults, validates everything the gateway relies on and raises
:class:`RouteError` naming the offending field (``spec.rules[0].matches[1].path.value``).
``HTTPRoute.to_json`` gives back a normalized Kubernetes-shaped dict and ``from_json`` parses
it again, so what crosses the wire is plain JSON and is validated on both sides.

Durations are float seconds in the model; ``None`` means "not set" (the implementation's
default applies) and ``0.0`` means "disabled", as GEP-1742 says for ``timeouts``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

API_VERSION = "gateway.networking.k8s.io/v1"
GROUP = "gateway.networking.k8s.io"

EXACT = "Exact"
PATH_PREFIX = "PathPrefix"
REGEX = "RegularExpression"
REPLACE_FULL_PATH = "ReplaceFullPath"
REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_WEIGHT = 1_000_000

_DURATION_RE = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_MAX_DURATION_MS = ((99999 * 60 + 59) * 60 + 59) * 1000 + 999  # so it can be written back
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# RFC 9110 token characters: what a header name may hold
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class RouteError(ValueError):
    """An HTTPRoute (or one of its values) that cannot be used; ``field`` names where."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}" if field_path else message)
        self.field = field_path
        self.message = message


# -- durations (GEP-2257) ------------------------------------------------------------------


def parse_duration(s: str) -> float:
    """A GEP-2257 duration (``10s``, ``500ms``, ``1h30m``) in seconds; RouteError if invalid."""
    if not isinstance(s, str) or not _DURATION_RE.match(s):
        raise RouteError("", f"invalid duration {s!r} (want e.g. '10s', '500ms', '1h30m')")
    # Go's time.ParseDuration semantics: components add up (a repeated unit is allowed)
    total_ms = sum(
        int(n) * int(_UNIT_SECONDS[u] * 1000) for n, u in _DURATION_PART.findall(s)
    )
    if total_ms > _MAX_DURATION_MS:
        raise RouteError("", f"duration {s!r} is longer than 99999h59m59s999ms")
    return total_ms / 1000.0


def format_duration(seconds: float) -> str:
    """The GEP-2257 canonical form: greatest unit first, each unit once, ``0s`` for zero."""
    ms = round(seconds * 1000)
    if ms < 0:
        raise RouteError("", f"negative duration {seconds!r}")
    if ms == 0:
        return "0s"
    out = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParentRef:
    """What a route attaches to. For the mesh (GAMMA): group ``""``/``core``, kind Service."""

    name: str
    namespace: str
    group: str = GROUP
    kind: str = "Gateway"
    port: int | None = None
    section_name: str | None = None

    @property
    def is_service(self) -> bool:
        return self.kind == "Service" and self.group in ("", "core")


@dataclass(frozen=True)
class PathMatch:
    type: str = PATH_PREFIX  # Exact | PathPrefix | RegularExpression
    value: str = "/"


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str
    type: str = EXACT  # Exact | RegularExpression


@dataclass(frozen=True)
class QueryMatch:
    name: str
    value: str
    type: str = EXACT  # Exact | RegularExpression


@dataclass(frozen=True)
class RouteMatch:
    """All conditions AND. The default (no fields) is PathPrefix ``/``: everything."""

    path: PathMatch = field(default_factory=PathMatch)
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class BackendRef:
    name: str
    namespace: str
    port: int | None = None
    weight: int = 1
    group: str = ""
    kind: str = "Service"
    filters: tuple[Filter, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class HeaderModifier:
    """``set`` replaces (or adds), ``add`` appends, ``remove`` drops; names case-insensitive."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestHeaderModifier(HeaderModifier):
    pass


@dataclass(frozen=True)
class ResponseHeaderModifier(HeaderModifier):
    pass


@dataclass(frozen=True)
class PathModifier:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str


@dataclass(frozen=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class RequestMirror:
    backend: BackendRef
    percent: int | None = None  # None: mirror every request


Filter = (
    RequestHeaderModifier | ResponseHeaderModifier | RequestRedirect | URLRewrite | RequestMirror
)


@dataclass(frozen=True)
class Timeouts:
    request: float | None = None  # the whole exchange, retries included; 0 = no timeout
    backend_request: float | None = None  # one attempt; 0 = no timeout


@dataclass(frozen=True)
class RetryPolicy:
    """GEP-1731. ``attempts`` is the number of retries (not counting the first try)."""

    codes: tuple[int, ...] = ()
    attempts: int | None = None
    backoff: float | None = None


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    filters: tuple[Filter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: Timeouts | None = None
    retry: RetryPolicy | None = None
    name: str | None = None


@dataclass(frozen=True)
class HTTPRoute:
    name: str
    namespace: str
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = (RouteRule(),)
    creation_timestamp: str = ""  # RFC 3339 as the API server writes it; "" when unknown

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def created(self) -> float:
        """Seconds since the epoch; +inf when unknown (sorts as the newest route)."""
        if not self.creation_timestamp:
            return float("inf")
        return _parse_time(self.creation_timestamp).timestamp()

    def to_json(self) -> dict[str, Any]:
        return _route_to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HTTPRoute:
        return parse_httproute(data)


# -- parsing -------------------------------------------------------------------------------


def _parse_time(value: str) -> datetime:
    # Python 3.11's fromisoformat reads RFC 3339 including the trailing "Z"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        raise ValueError("no time zone")
    return dt


class _P:
    """Field accessors that raise RouteError with the path of the field."""

    @staticmethod
    def obj(v: Any, path: str) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise RouteError(path, f"must be an object, not {type(v).__name__}")
        return v

    @staticmethod
    def lst(v: Any, path: str) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            raise RouteError(path, f"must be a list, not {type(v).__name__}")
        return v

    @staticmethod
    def string(v: Any, path: str, *, required: bool = False) -> str | None:
        if v is None:
            if required:
                raise RouteError(path, "is required")
            return None
        if not isinstance(v, str):
            raise RouteError(path, f"must be a string, not {type(v).__name__}")
        if required and not v:
            raise RouteError(path, "must not be empty")
        return v

    @staticmethod
    def integer(v: Any, path: str, lo: int, hi: int) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise RouteError(path, f"must be an integer, not {v!r}")
        if not lo <= v <= hi:
            raise RouteError(path, f"{v} is out of range [{lo}, {hi}]")
        return v

    @staticmethod
    def duration(v: Any, path: str) -> float | None:
        if v is None:
            return None
        try:
            return parse_duration(v)
        except RouteError as e:
            raise RouteError(path, e.message) from None

    @staticmethod
    def regex(v: str, path: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise RouteError(path, f"invalid regular expression {v!r}: {e}") from None
        return v


def parse_httproute(doc: dict[str, Any]) -> HTTPRoute:
    """Parse and validate a Kubernetes-shaped HTTPRoute. Raises :class:`RouteError`."""
    if not isinstance(doc, dict):
        raise RouteError("", "an HTTPRoute must be an object")
    kind = doc.get("kind", "HTTPRoute")
    if kind != "HTTPRoute":
        raise RouteError("kind", f"expected HTTPRoute, got {kind!r}")
    meta = _P.obj(doc.get("metadata"), "metadata")
    name = _P.string(meta.get("name"), "metadata.name", required=True)
    namespace = _P.string(meta.get("namespace"), "metadata.namespace") or "default"
    assert name is not None
    ts = _P.string(meta.get("creationTimestamp"), "metadata.creationTimestamp") or ""
    if ts:
        try:
            _parse_time(ts)
        except ValueError:
            raise RouteError(
                f"HTTPRoute {namespace}/{name}: metadata.creationTimestamp",
                f"not an RFC 3339 time: {ts!r}",
            ) from None
    try:
        spec = _P.obj(doc.get("spec"), "spec")
        parents = tuple(
            _parent_ref(r, f"spec.parentRefs[{i}]", namespace)
            for i, r in enumerate(_P.lst(spec.get("parentRefs"), "spec.parentRefs"))
        )
        hostnames = tuple(
            _P.string(h, f"spec.hostnames[{i}]", required=True) or ""
            for i, h in enumerate(_P.lst(spec.get("hostnames"), "spec.hostnames"))
        )
        raw_rules = _P.lst(spec.get("rules"), "spec.rules")
        rules = tuple(
            _rule(r, f"spec.rules[{i}]", namespace) for i, r in enumerate(raw_rules)
        ) or (RouteRule(),)
    except RouteError as e:
        raise RouteError(f"HTTPRoute {namespace}/{name}: {e.field}", e.message) from None
    return HTTPRoute(name, namespace, parents, hostnames, rules, ts)


def parse_httproutes(docs: Iterable[Any]) -> tuple[list[HTTPRoute], list[RouteError]]:
    """Parse many routes; a bad one is logged and left out (the others still apply)."""
    good: list[HTTPRoute] = []
    bad: list[RouteError] = []
    for doc in docs:
        try:
            good.append(parse_httproute(doc))
        except RouteError as e:
            log.error("HTTPRoute rejected: %s", e)
            bad.append(e)
    return good, bad


def _parent_ref(raw: Any, path: str, route_ns: str) -> ParentRef:
    r = _P.obj(raw, path)
    group = _P.string(r.get("group"), f"{path}.group")
    kind = _P.string(r.get("kind"), f"{path}.kind")
    return ParentRef(
        name=_P.string(r.get("name"), f"{path}.name", required=True) or "",
        namespace=_P.string(r.get("namespace"), f"{path}.namespace") or route_ns,
        # the spec's defaults: a parentRef without group/kind names a Gateway
        group=GROUP if group is None else group,
        kind="Gateway" if kind is None else kind,
        port=_P.integer(r.get("port"), f"{path}.port", 1, 65535),
        section_name=_P.string(r.get("sectionName"), f"{path}.sectionName"),
    )


def _path_match(raw: Any, path: str) -> PathMatch:
    r = _P.obj(raw, path)
    typ = _P.string(r.get("type"), f"{path}.type") or PATH_PREFIX
    value = _P.string(r.get("value"), f"{path}.value")
    if value is None:
        value = "/"
    if typ in (EXACT, PATH_PREFIX):
        if not value.startswith("/"):
            raise RouteError(f"{path}.value", f"must start with '/': {value!r}")
        if "//" in value or "?" in value or "#" in value:
            raise RouteError(f"{path}.value", f"must not contain '//', '?' or '#': {value!r}")
    elif typ == REGEX:
        _P.regex(value, f"{path}.value")
    else:
        raise RouteError(f"{path}.type", f"unknown path match type {typ!r}")
    return PathMatch(typ, value)


def _kv_matches(raw: Any, path: str, what: str, case_insensitive: bool) -> list[Any]:
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for i, h in enumerate(_P.lst(raw, path)):
        p = f"{path}[{i}]"
        h = _P.obj(h, p)
        name = _P.string(h.get("name"), f"{p}.name", required=True) or ""
        if what == "header" and not _TOKEN_RE.match(name):
            raise RouteError(f"{p}.name", f"invalid header name {name!r}")
        value = _P.string(h.get("value"), f"{p}.value", required=True)
        typ = _P.string(h.get("type"), f"{p}.type") or EXACT
        if typ == REGEX:
            _P.regex(value or "", f"{p}.value")
        elif typ != EXACT:
            raise RouteError(f"{p}.type", f"unknown {what} match type {typ!r}")
        k = name.lower() if case_insensitive else name
        if k in seen:
            # the spec: only the first entry with an equivalent name is considered
            log.warning("%s: duplicate %s match %r ignored", p, what, name)
            continue
        seen.add(k)
        out.append((name, value or "", typ))
    return out


def _match(raw: Any, path: str) -> RouteMatch:
    r = _P.obj(raw, path)
    method = _P.string(r.get("method"), f"{path}.method")
    if method is not None and method not in METHODS:
        raise RouteError(f"{path}.method", f"unknown method {method!r}")
    return RouteMatch(
        path=_path_match(r.get("path"), f"{path}.path"),
        headers=tuple(
            HeaderMatch(n, v, t)
            for n, v, t in _kv_matches(r.get("headers"), f"{path}.headers", "header", True)
        ),
        query_params=tuple(
            QueryMatch(n, v, t)
            for n, v, t in _kv_matches(
                r.get("queryParams"), f"{path}.queryParams", "query param", False
            )
        ),
        method=method,
    )


def _backend_ref(raw: Any, path: str, route_ns: str, *, weighted: bool) -> BackendRef:
    r = _P.obj(raw, path)
    group = _P.string(r.get("group"), f"{path}.group") or ""
    kind = _P.string(r.get("kind"), f"{path}.kind") or "Service"
    if group not in ("", "core") or kind != "Service":
        raise RouteError(path, f"unsupported backend {group or 'core'}/{kind} (only Service)")
    port = _P.integer(r.get("port"), f"{path}.port", 1, 65535)
    if port is None:
        raise RouteError(f"{path}.port", "is required for a Service backend")
    weight = 1
    if weighted:
        w = _P.integer(r.get("weight"), f"{path}.weight", 0, MAX_WEIGHT)
        weight = 1 if w is None else w
    filters = _filters(r.get("filters"), f"{path}.filters", route_ns, ()) if weighted else ()
    return BackendRef(
        name=_P.string(r.get("name"), f"{path}.name", required=True) or "",
        namespace=_P.string(r.get("namespace"), f"{path}.namespace") or route_ns,
        port=port,
        weight=weight,
        group=group,
        kind=kind,
        filters=filters,
    )


def _header_modifier(raw: Any, path: str, cls: type[HeaderModifier]) -> HeaderModifier:
    r = _P.obj(raw, path)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, h in enumerate(_P.lst(r.get(key), f"{path}.{key}")):
            p = f"{path}.{key}[{i}]"
            h = _P.obj(h, p)
            name = _P.string(h.get("name"), f"{p}.name", required=True) or ""
            if not _TOKEN_RE.match(name):
                raise RouteError(f"{p}.name", f"invalid header name {name!r}")
            if name.lower() in seen:
                raise RouteError(f"{p}.name", f"duplicate header {name!r}")
            seen.add(name.lower())
            value = _P.string(h.get("value"), f"{p}.value")
            if value is None:
                raise RouteError(f"{p}.value", "is required")
            if "\r" in value or "\n" in value or "\0" in value:
                raise RouteError(f"{p}.value", "must not contain CR, LF or NUL")
            out.append((name, value))
        return tuple(out)

    remove: list[str] = []
    for i, n in enumerate(_P.lst(r.get("remove"), f"{path}.remove")):
        name = _P.string(n, f"{path}.remove[{i}]", required=True) or ""
        if not _TOKEN_RE.match(name):
            raise RouteError(f"{path}.remove[{i}]", f"invalid header name {name!r}")
        remove.append(name)
    return cls(set=pairs("set"), add=pairs("add"), remove=tuple(remove))


def _path_modifier(raw: Any, path: str) -> PathModifier | None:
    if raw is None:
        return None
    r = _P.obj(raw, path)
    typ = _P.string(r.get("type"), f"{path}.type", required=True)
    if typ == REPLACE_FULL_PATH:
        value = _P.string(r.get("replaceFullPath"), f"{path}.replaceFullPath", required=True)
    elif typ == REPLACE_PREFIX_MATCH:
        # an empty replacement is allowed: /foo/bar with prefix /foo becomes /bar
        value = _P.string(r.get("replacePrefixMatch"), f"{path}.replacePrefixMatch")
        if value is None:
            raise RouteError(f"{path}.replacePrefixMatch", "is required")
    else:
        raise RouteError(f"{path}.type", f"unknown path modifier type {typ!r}")
    assert value is not None
    if value and not value.startswith("/"):
        raise RouteError(path, f"replacement path must start with '/': {value!r}")
    if any(c in value for c in "?#\r\n\0 "):
        raise RouteError(path, f"replacement path holds a forbidden character: {value!r}")
    return PathModifier(typ, value)


def _hostname(v: Any, path: str) -> str | None:
    h = _P.string(v, path)
    if h is not None and (not h or any(c in h for c in "/?#@ \r\n\0")):
        raise RouteError(path, f"invalid hostname {h!r}")
    return h


_FILTER_KEYS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}


def _filter(raw: Any, path: str, route_ns: str) -> Filter:
    r = _P.obj(raw, path)
    typ = _P.string(r.get("type"), f"{path}.type", required=True) or ""
    key = _FILTER_KEYS.get(typ)
    if key is None:
        raise RouteError(f"{path}.type", f"unsupported filter type {typ!r}")
    if r.get(key) is None:
        raise RouteError(f"{path}.{key}", f"is required for a {typ} filter")
    p = f"{path}.{key}"
    cfg = _P.obj(r[key], p)
    if typ == "RequestHeaderModifier":
        return _header_modifier(cfg, p, RequestHeaderModifier)  # type: ignore[return-value]
    if typ == "ResponseHeaderModifier":
        return _header_modifier(cfg, p, ResponseHeaderModifier)  # type: ignore[return-value]
    if typ == "RequestRedirect":
        scheme = _P.string(cfg.get("scheme"), f"{p}.scheme")
        if scheme is not None and scheme not in ("http", "https"):
            raise RouteError(f"{p}.scheme", f"must be http or https, not {scheme!r}")
        code = _P.integer(cfg.get("statusCode"), f"{p}.statusCode", 0, 999)
        if code is not None and code not in REDIRECT_CODES:
            raise RouteError(f"{p}.statusCode", f"must be one of {REDIRECT_CODES}, not {code}")
        return RequestRedirect(
            scheme=scheme,
            hostname=_hostname(cfg.get("hostname"), f"{p}.hostname"),
            path=_path_modifier(cfg.get("path"), f"{p}.path"),
            port=_P.integer(cfg.get("port"), f"{p}.port", 1, 65535),
            status_code=302 if code is None else code,
        )
    if typ == "URLRewrite":
        return URLRewrite(
            hostname=_hostname(cfg.get("hostname"), f"{p}.hostname"),
            path=_path_modifier(cfg.get("path"), f"{p}.path"),
        )
    # RequestMirror
    if cfg.get("backendRef") is None:
        raise RouteError(f"{p}.backendRef", "is required")
    return RequestMirror(
        backend=_backend_ref(cfg["backendRef"], f"{p}.backendRef", route_ns, weighted=False),
        percent=_P.integer(cfg.get("percent"), f"{p}.percent", 0, 100),
    )


def _filters(
    raw: Any, path: str, route_ns: str, matches: tuple[RouteMatch, ...]
) -> tuple[Filter, ...]:
    out: list[Filter] = []
    seen: set[type] = set()
    for i, f in enumerate(_P.lst(raw, path)):
        flt = _filter(f, f"{path}[{i}]", route_ns)
        if type(flt) in seen and not isinstance(flt, RequestMirror):
            raise RouteError(f"{path}[{i}]", f"{type(flt).__name__} may appear only once")
        seen.add(type(flt))
        out.append(flt)
    if RequestRedirect in seen and URLRewrite in seen:
        raise RouteError(path, "RequestRedirect and URLRewrite cannot be used together")
    for i, flt in enumerate(out):
        pm = getattr(flt, "path", None)
        if isinstance(pm, PathModifier) and pm.type == REPLACE_PREFIX_MATCH:
            # the spec: ReplacePrefixMatch is only compatible with PathPrefix matches
            for j, m in enumerate(matches):
                if m.path.type != PATH_PREFIX:
                    raise RouteError(
                        f"{path}[{i}]",
                        f"ReplacePrefixMatch needs PathPrefix matches, "
                        f"but matches[{j}] is {m.path.type}",
                    )
    return tuple(out)


def _rule(raw: Any, path: str, route_ns: str) -> RouteRule:
    r = _P.obj(raw, path)
    matches = tuple(
        _match(m, f"{path}.matches[{i}]")
        for i, m in enumerate(_P.lst(r.get("matches"), f"{path}.matches"))
    ) or (RouteMatch(),)
    timeouts = None
    if r.get("timeouts") is not None:
        t = _P.obj(r["timeouts"], f"{path}.timeouts")
        req = _P.duration(t.get("request"), f"{path}.timeouts.request")
        be = _P.duration(t.get("backendRequest"), f"{path}.timeouts.backendRequest")
        if req and be is not None and be > req:
            raise RouteError(
                f"{path}.timeouts.backendRequest",
                f"must not exceed timeouts.request ({t.get('backendRequest')} > "
                f"{t.get('request')})",
            )
        timeouts = Timeouts(req, be)
    retry = None
    if r.get("retry") is not None:
        rp = f"{path}.retry"
        t = _P.obj(r["retry"], rp)
        codes = tuple(
            _P.integer(c, f"{rp}.codes[{i}]", 400, 599) or 0
            for i, c in enumerate(_P.lst(t.get("codes"), f"{rp}.codes"))
        )
        retry = RetryPolicy(
            codes=codes,
            attempts=_P.integer(t.get("attempts"), f"{rp}.attempts", 0, 1000),
            backoff=_P.duration(t.get("backoff"), f"{rp}.backoff"),
        )
    return RouteRule(
        matches=matches,
        filters=_filters(r.get("filters"), f"{path}.filters", route_ns, matches),
        backend_refs=tuple(
            _backend_ref(b, f"{path}.backendRefs[{i}]", route_ns, weighted=True)
            for i, b in enumerate(_P.lst(r.get("backendRefs"), f"{path}.backendRefs"))
        ),
        timeouts=timeouts,
        retry=retry,
        name=_P.string(r.get("name"), f"{path}.name"),
    )


# -- back to the Kubernetes shape ----------------------------------------------------------


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _backend_json(b: BackendRef, weighted: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "group": b.group,
        "kind": b.kind,
        "name": b.name,
        "namespace": b.namespace,
        "port": b.port,
    }
    if weighted:
        out["weight"] = b.weight
        if b.filters:
            out["filters"] = [_filter_json(f) for f in b.filters]
    return _drop_none(out)


def _path_mod_json(p: PathModifier | None) -> dict[str, Any] | None:
    if p is None:
        return None
    key = "replaceFullPath" if p.type == REPLACE_FULL_PATH else "replacePrefixMatch"
    return {"type": p.type, key: p.value}


def _filter_json(f: Filter) -> dict[str, Any]:
    if isinstance(f, HeaderModifier):
        typ = type(f).__name__
        cfg: dict[str, Any] = {
            "set": [{"name": n, "value": v} for n, v in f.set],
            "add": [{"name": n, "value": v} for n, v in f.add],
            "remove": list(f.remove),
        }
    elif isinstance(f, RequestRedirect):
        typ = "RequestRedirect"
        cfg = _drop_none(
            {
                "scheme": f.scheme,
                "hostname": f.hostname,
                "path": _path_mod_json(f.path),
                "port": f.port,
                "statusCode": f.status_code,
            }
        )
    elif isinstance(f, URLRewrite):
        typ = "URLRewrite"
        cfg = _drop_none({"hostname": f.hostname, "path": _path_mod_json(f.path)})
    else:
        typ = "RequestMirror"
        cfg = _drop_none({"backendRef": _backend_json(f.backend, False), "percent": f.percent})
    return {"type": typ, _FILTER_KEYS[typ]: cfg}


def _rule_json(r: RouteRule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "matches": [
            _drop_none(
                {
                    "path": {"type": m.path.type, "value": m.path.value},
                    "headers": [
                        {"type": h.type, "name": h.name, "value": h.value} for h in m.headers
                    ],
                    "queryParams": [
                        {"type": q.type, "name": q.name, "value": q.value}
                        for q in m.query_params
                    ],
                    "method": m.method,
                }
            )
            for m in r.matches
        ],
        "filters": [_filter_json(f) for f in r.filters],
        "backendRefs": [_backend_json(b) for b in r.backend_refs],
    }
    if r.name is not None:
        out["name"] = r.name
    if r.timeouts is not None:
        out["timeouts"] = _drop_none(
            {
                "request": None if r.timeouts.request is None
                else format_duration(r.timeouts.request),
                "backendRequest": None if r.timeouts.backend_request is None
                else format_duration(r.timeouts.backend_request),
            }
        )
    if r.retry is not None:
        out["retry"] = _drop_none(
            {
                "codes": list(r.retry.codes),
                "attempts": r.retry.attempts,
                "backoff": None if r.retry.backoff is None else format_duration(r.retry.backoff),
            }
        )
    return out


def _route_to_json(route: HTTPRoute) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": route.name, "namespace": route.namespace}
    if route.creation_timestamp:
        meta["creationTimestamp"] = route.creation_timestamp
    return {
        "apiVersion": API_VERSION,
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {
            "parentRefs": [
                _drop_none(
                    {
                        "group": p.group,
                        "kind": p.kind,
                        "name": p.name,
                        "namespace": p.namespace,
                        "port": p.port,
                        "sectionName": p.section_name,
                    }
                )
                for p in route.parent_refs
            ],
            "hostnames": list(route.hostnames),
            "rules": [_rule_json(r) for r in route.rules],
        },
    }

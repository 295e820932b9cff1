"""HTTPRoute selection for one Service port (GAMMA mesh semantics). Pure: no IO.

Build a :class:`RouteTable` once per (service, port) whenever the routes change, then call
:meth:`RouteTable.match` per request. Every match of every rule of every attached route is
flattened into one entry and the entries are sorted once by the Gateway API's precedence:

1. Exact path, then PathPrefix (longest value first), then RegularExpression (the spec
   leaves regex precedence open; this is Istio's and Envoy Gateway's order, so even a
   catch-all PathPrefix ``/`` outranks a regex);
2. a method match; 3. more header matches; 4. more query-param matches;
5. the oldest route (``creationTimestamp``); 6. ``namespace/name`` alphabetically;
7. rule order (then match order inside the rule).

The first entry that matches wins. A service without any route gets a table holding one
default rule that sends everything to the service itself on the same port; a service with
routes answers 404 (``match`` returns None) when none matches.

Paths given to :meth:`RouteTable.match` should already be normalized with
:func:`normalize_path` (the L7 authorization check must see the same path).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from nodeproxy.routes import (
    EXACT,
    PATH_PREFIX,
    REGEX,
    BackendRef,
    HTTPRoute,
    RouteMatch,
    RouteRule,
)

log = logging.getLogger(__name__)

Headers = Mapping[str, str] | Sequence[tuple[str, str]]

_PATH_RANK = {EXACT: 0, PATH_PREFIX: 1, REGEX: 2}


@dataclass(frozen=True)
class Match:
    """The outcome of a successful lookup: the rule to apply and the match that hit."""

    route: HTTPRoute
    rule_index: int
    rule: RouteRule
    match_index: int
    match: RouteMatch
    default: bool = False  # the implicit "route to itself" of a service without routes


@dataclass(frozen=True)
class _Entry:
    route: HTTPRoute
    rule_index: int
    match_index: int
    match: RouteMatch
    test: Callable[[str, str, dict[str, list[str]], dict[str, str]], bool]

    def sort_key(self) -> tuple:
        m = self.match
        return (
            _PATH_RANK[m.path.type],
            -len(m.path.value) if m.path.type != EXACT else 0,
            0 if m.method else 1,
            -len(m.headers),
            -len(m.query_params),
            self.route.created,
            self.route.key,
            self.rule_index,
            self.match_index,
        )


def prefix_matches(prefix: str, path: str) -> bool:
    """PathPrefix by whole segments: ``/abc`` matches ``/abc``, ``/abc/``, ``/abc/def``.

    A trailing slash on the prefix is ignored (``/abc/`` also matches ``/abc``).
    """
    p = prefix.rstrip("/")
    if not p:
        return True
    return path == p or path.startswith(p + "/")


def _value_test(typ: str, value: str) -> Callable[[str], bool]:
    if typ == REGEX:
        rx = re.compile(value)
        return lambda v: rx.fullmatch(v) is not None
    return lambda v: v == value


def _compile(m: RouteMatch) -> Callable[[str, str, dict[str, list[str]], dict[str, str]], bool]:
    pm = m.path
    if pm.type == EXACT:
        want = pm.value

        def path_ok(p: str) -> bool:
            return p == want

    elif pm.type == PATH_PREFIX:

        def path_ok(p: str, _v: str = pm.value) -> bool:
            return prefix_matches(_v, p)

    else:
        rx = re.compile(pm.value)

        def path_ok(p: str) -> bool:
            return rx.fullmatch(p) is not None

    headers = [(h.name.lower(), _value_test(h.type, h.value)) for h in m.headers]
    queries = [(q.name, _value_test(q.type, q.value)) for q in m.query_params]
    method = m.method

    def test(meth: str, path: str, hdrs: dict[str, list[str]], qs: dict[str, str]) -> bool:
        if method is not None and meth != method:
            return False
        if not path_ok(path):
            return False
        for name, ok in headers:
            values = hdrs.get(name)
            # a repeated header matches when one of its values (or all joined, as Envoy
            # sees them) does
            if not values or not (any(ok(v) for v in values) or ok(",".join(values))):
                return False
        for name, ok in queries:
            v = qs.get(name)
            if v is None or not ok(v):
                return False
        return True

    return test


def _selects(route: HTTPRoute, ns: str, name: str, port: int) -> bool:
    return any(
        p.is_service and p.namespace == ns and p.name == name and p.port in (None, port)
        for p in route.parent_refs
    )


def default_route(service_ns: str, service_name: str, port: int) -> HTTPRoute:
    """The implicit route of a service without routes: everything to itself, same port."""
    return HTTPRoute(
        name=f"default-{service_name}-{port}",
        namespace=service_ns,
        rules=(
            RouteRule(
                backend_refs=(BackendRef(name=service_name, namespace=service_ns, port=port),)
            ),
        ),
    )


class RouteTable:
    """The sorted match entries for one service port. Build with :meth:`build`."""

    def __init__(self, entries: list[_Entry], default: bool) -> None:
        self._entries = entries
        self.default = default

    @property
    def routes(self) -> list[HTTPRoute]:
        seen: dict[str, HTTPRoute] = {}
        for e in self._entries:
            seen.setdefault(e.route.key, e.route)
        return list(seen.values())

    @classmethod
    def build(
        cls,
        routes: Iterable[HTTPRoute],
        service_ns: str,
        service_name: str,
        port: int,
        consumer_ns: str | None = None,
    ) -> RouteTable:
        """Select the routes attached to ``service_ns/service_name`` (and ``port``) and sort.

        Routes in the service's namespace are producer routes. A route in another namespace
        is a consumer route: it applies only to callers from its own namespace
        (``consumer_ns``), and when any applies it replaces the producer routes (GAMMA).
        Routes whose regular expressions do not compile are skipped and logged.
        """
        producer: list[HTTPRoute] = []
        consumer: list[HTTPRoute] = []
        for r in routes:
            if not _selects(r, service_ns, service_name, port):
                continue
            if r.namespace == service_ns:
                producer.append(r)
            elif consumer_ns is not None and r.namespace == consumer_ns:
                consumer.append(r)
        chosen = consumer or producer
        if not chosen:
            return cls(_entries_of(default_route(service_ns, service_name, port)), True)
        entries: list[_Entry] = []
        for r in chosen:
            try:
                entries.extend(_entries_of(r))
            except re.error as e:  # parse_httproute checked; only hand-built routes get here
                log.error("route %s: bad regular expression (%s); route ignored", r.key, e)
        entries.sort(key=_Entry.sort_key)
        return cls(entries, False)

    def match(self, method: str, path: str, query: str, headers: Headers) -> Match | None:
        """The rule for a request, or None (the caller answers 404).

        ``path`` excludes the query; ``query`` is the raw query string (no ``?``).
        """
        hdrs = _header_index(headers)
        qs: dict[str, str] = {}
        if query:
            # the first occurrence of a repeated parameter counts, as in Envoy
            for k, v in parse_qsl(query, keep_blank_values=True):
                qs.setdefault(k, v)
        for e in self._entries:
            if e.test(method, path, hdrs, qs):
                return Match(
                    e.route,
                    e.rule_index,
                    e.route.rules[e.rule_index],
                    e.match_index,
                    e.match,
                    self.default,
                )
        return None


def _entries_of(route: HTTPRoute) -> list[_Entry]:
    return [
        _Entry(route, ri, mi, m, _compile(m))
        for ri, rule in enumerate(route.rules)
        for mi, m in enumerate(rule.matches)
    ]


def _header_index(headers: Headers) -> dict[str, list[str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, list[str]] = {}
    for k, v in items:
        out.setdefault(k.lower(), []).append(v)
    return out


# -- path normalization --------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def split_target(target: str) -> tuple[str, str]:
    """``/a/b?x=1`` → (``/a/b``, ``x=1``). A fragment, if a client sent one, is dropped."""
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    return path, query


def normalize_path(path: str) -> str:
    """RFC 3986 normalization (Istio's ``BASE``): decode percent-encoded unreserved
    characters, upper-case the other escapes, remove ``.`` and ``..`` segments.

    Routing and authorization must both see this form, or ``/admin/../x`` and ``/%61dmin``
    could be routed one way and authorized another.
    """

    def fix(m: re.Match[str]) -> str:
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else "%" + m.group(1).upper()

    path = _PCT.sub(fix, path)
    if not path.startswith("/"):
        path = "/" + path
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)

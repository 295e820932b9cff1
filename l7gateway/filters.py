"""HTTPRoute filters as pure functions over requests and header lists. No IO.

Headers are lists of ``(name, value)`` pairs in wire order; names compare case-insensitively
and keep the case they arrived with (HTTP/2 names are lower case anyway).

The gateway calls :func:`apply_request_filters` once per request with the rule that matched;
the result says whether to answer with a redirect, which request to forward, what to mirror
and which response header modifiers to apply on the way back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from nodeproxy.routes import (
    PATH_PREFIX,
    REPLACE_FULL_PATH,
    Filter,
    HeaderModifier,
    PathModifier,
    RequestHeaderModifier,
    RequestMirror,
    RequestRedirect,
    ResponseHeaderModifier,
    RouteMatch,
    URLRewrite,
)

log = logging.getLogger(__name__)

HeaderList = list[tuple[str, str]]
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Request:
    """The parts of a request the filters read and rewrite.

    ``target`` is the path with its query (``/a?b=1``); ``authority`` is the Host header or
    ``:authority`` (``host`` or ``host:port``).
    """

    method: str
    scheme: str
    authority: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Redirect:
    status: int
    location: str


@dataclass(frozen=True)
class FilterResult:
    request: Request  # what to forward (unchanged when there is a redirect)
    redirect: Redirect | None = None  # answer with this instead of forwarding
    # fire-and-forget copies of ``request`` (check each with should_mirror)
    mirrors: tuple[RequestMirror, ...] = ()
    response_modifiers: tuple[HeaderModifier, ...] = ()  # apply with modify_headers


# -- headers -------------------------------------------------------------------------------


def modify_headers(headers: Iterable[tuple[str, str]], mod: HeaderModifier) -> HeaderList:
    """Apply ``remove``, then ``set``, then ``add`` (Envoy's order), preserving order.

    ``set`` replaces the first header of that name in place and drops its repeats, or
    appends when absent; ``add`` appends another value.
    """
    remove = {n.lower() for n in mod.remove}
    out: HeaderList = [(n, v) for n, v in headers if n.lower() not in remove]
    for name, value in mod.set:
        low = name.lower()
        replaced = False
        kept: HeaderList = []
        for n, v in out:
            if n.lower() == low:
                if not replaced:
                    kept.append((n, value))
                    replaced = True
            else:
                kept.append((n, v))
        if not replaced:
            kept.append((name, value))
        out = kept
    for name, value in mod.add:
        out.append((name, value))
    return out


def get_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    low = name.lower()
    for n, v in headers:
        if n.lower() == low:
            return v
    return None


# -- paths ---------------------------------------------------------------------------------


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """The spec's ReplacePrefixMatch: swap the matched prefix, keeping segment boundaries.

    ``/foo/bar`` with prefix ``/foo`` (or ``/foo/``) and replacement ``/xyz`` (or ``/xyz/``)
    → ``/xyz/bar``; ``/foo`` → ``/xyz``; ``/foo/`` → ``/xyz/``; replacement ``""`` or ``/``
    → ``/bar``, and never an empty path.
    """
    p = prefix.rstrip("/")
    if not (path == p or path.startswith(p + "/")) and p:
        # not ours to rewrite; matching guarantees this does not happen
        log.warning("path %r does not start with prefix %r; not rewritten", path, prefix)
        return path
    rest = path[len(p) :]  # "" or starts with "/"
    out = replacement.rstrip("/") + rest
    return out or "/"


def modify_path(path: str, mod: PathModifier, match: RouteMatch | None) -> str:
    """Rewrite a path (no query) per a ReplaceFullPath or ReplacePrefixMatch modifier."""
    if mod.type == REPLACE_FULL_PATH:
        return mod.value or "/"
    if match is None or match.path.type != PATH_PREFIX:
        log.warning("ReplacePrefixMatch without a PathPrefix match; path left as is")
        return path
    return replace_prefix(path, match.path.value, mod.value)


def _split(target: str) -> tuple[str, str]:
    path, sep, query = target.partition("?")
    return path, sep + query


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host:port`` → (host, port); IPv6 literals stay bracketed. Bad port → None."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            host, rest = authority[: end + 1], authority[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                return host, int(rest[1:])
            return host, None
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return authority, None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# -- redirect and rewrite ------------------------------------------------------------------


def redirect_response(
    rd: RequestRedirect, req: Request, match: RouteMatch | None, listener_port: int
) -> Redirect:
    """The response for a RequestRedirect filter.

    Port rules (Gateway API): an explicit port wins; else when the filter sets a scheme the
    well-known port of that scheme; else the port the request came in on
    (``listener_port``, the service port). The port is left out of ``Location`` when it is
    the default for the scheme (80 for http, 443 for https). The query string is kept.
    """
    scheme = rd.scheme or req.scheme
    req_host, _ = split_authority(req.authority)
    host = _bracket(rd.hostname) if rd.hostname else req_host
    if rd.port is not None:
        port = rd.port
    elif rd.scheme is not None:
        port = _DEFAULT_PORTS.get(rd.scheme, listener_port)
    else:
        port = listener_port
    path, query = _split(req.target)
    if rd.path is not None:
        path = modify_path(path, rd.path, match)
    netloc = host if _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    return Redirect(rd.status_code, f"{scheme}://{netloc}{path}{query}")


def rewrite_request(rw: URLRewrite, req: Request, match: RouteMatch | None) -> Request:
    """Apply URLRewrite: a new authority (Host) and/or path; the query is kept."""
    out = req
    if rw.hostname is not None:
        out = replace(out, authority=rw.hostname)
    if rw.path is not None:
        path, query = _split(req.target)
        out = replace(out, target=modify_path(path, rw.path, match) + query)
    return out


def apply_request_filters(
    filters: Sequence[Filter], req: Request, match: RouteMatch | None, listener_port: int
) -> FilterResult:
    """Run a rule's filters in order; a redirect ends processing (the request is answered)."""
    mirrors: list[RequestMirror] = []
    resp_mods: list[HeaderModifier] = []
    cur = req
    for f in filters:
        if isinstance(f, RequestHeaderModifier):
            cur = replace(cur, headers=tuple(modify_headers(cur.headers, f)))
        elif isinstance(f, ResponseHeaderModifier):
            resp_mods.append(f)
        elif isinstance(f, RequestRedirect):
            return FilterResult(
                cur,
                redirect_response(f, cur, match, listener_port),
                (),
                tuple(resp_mods),
            )
        elif isinstance(f, URLRewrite):
            cur = rewrite_request(f, cur, match)
        elif isinstance(f, RequestMirror):
            mirrors.append(f)
    return FilterResult(cur, None, tuple(mirrors), tuple(resp_mods))


def apply_response_filters(
    headers: Iterable[tuple[str, str]], modifiers: Iterable[HeaderModifier]
) -> HeaderList:
    out = list(headers)
    for m in modifiers:
        out = modify_headers(out, m)
    return out


def should_mirror(mirror: RequestMirror, rng_value: float) -> bool:
    """Whether to mirror this request; ``rng_value`` is uniform in [0, 1)."""
    return mirror.percent is None or rng_value * 100 < mirror.percent

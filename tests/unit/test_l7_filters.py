"""Filters: header modifiers, path/host rewrites, redirects, mirrors, and their order."""

from __future__ import annotations

import random

import pytest

from l7gateway.filters import (
    Request,
    apply_request_filters,
    apply_response_filters,
    modify_headers,
    redirect_response,
    replace_prefix,
    rewrite_request,
    should_mirror,
    split_authority,
)
from nodeproxy.routes import (
    BackendRef,
    PathMatch,
    PathModifier,
    RequestHeaderModifier,
    RequestMirror,
    RequestRedirect,
    ResponseHeaderModifier,
    RouteMatch,
    URLRewrite,
    parse_httproute,
)


def req(target="/", authority="echo.shop:8080", scheme="http", method="GET", headers=()):
    return Request(method, scheme, authority, target, tuple(headers))


def prefix(value):
    return RouteMatch(path=PathMatch("PathPrefix", value))


# -- MeshHTTPRouteRequestHeaderModifier ---------------------------------------------------

HEADERS = [("Host", "echo"), ("X-Keep", "k"), ("X-Set", "old1"), ("x-set", "old2"),
           ("X-Remove", "r"), ("x-remove", "r2")]


@pytest.mark.parametrize(
    "mod,want",
    [
        # set replaces in place (case-insensitively) and drops repeats
        (RequestHeaderModifier(set=(("x-SET", "new"),)),
         [("Host", "echo"), ("X-Keep", "k"), ("X-Set", "new"), ("X-Remove", "r"),
          ("x-remove", "r2")]),
        # set of an absent header appends it
        (RequestHeaderModifier(set=(("X-New", "n"),)), HEADERS + [("X-New", "n")]),
        # add appends another value even when present
        (RequestHeaderModifier(add=(("X-Keep", "k2"),)), HEADERS + [("X-Keep", "k2")]),
        # remove drops every occurrence, case-insensitively
        (RequestHeaderModifier(remove=("X-REMOVE",)),
         [h for h in HEADERS if h[0].lower() != "x-remove"]),
        # remove of an absent header is a no-op
        (RequestHeaderModifier(remove=("X-Absent",)), HEADERS),
        # all three together
        (RequestHeaderModifier(set=(("X-Set", "s"),), add=(("X-Add", "a"),),
                               remove=("x-keep", "X-Remove")),
         [("Host", "echo"), ("X-Set", "s"), ("X-Add", "a")]),
    ],
)
def test_request_header_modifier(mod, want):
    assert modify_headers(HEADERS, mod) == want


def test_response_header_modifiers_apply_in_order():
    mods = [
        ResponseHeaderModifier(set=(("X-A", "1"),)),
        ResponseHeaderModifier(add=(("X-A", "2"),)),
    ]
    out = apply_response_filters([("content-type", "text/plain"), ("x-a", "0")], mods)
    assert out == [("content-type", "text/plain"), ("x-a", "1"), ("X-A", "2")]


# -- MeshHTTPRouteRewritePath --------------------------------------------------------------


@pytest.mark.parametrize(
    "path,pfx,repl,want",
    [  # the table of the Gateway API HTTPPathModifier documentation
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        # and around it
        ("/anything", "/", "/prefix", "/prefix/anything"),
        # prefix "/" is the empty prefix: "/" keeps its slash, like "/foo/" above
        ("/", "/", "/prefix", "/prefix/"),
        ("/foo/bar/baz", "/foo/bar", "/one", "/one/baz"),
    ],
)
def test_replace_prefix_match(path, pfx, repl, want):
    assert replace_prefix(path, pfx, repl) == want


@pytest.mark.parametrize(
    "target,mod,match,want",
    [
        ("/original/x?q=1", PathModifier("ReplaceFullPath", "/full"), prefix("/original"),
         "/full?q=1"),
        ("/prefix/one/two", PathModifier("ReplacePrefixMatch", "/one"), prefix("/prefix/one"),
         "/one/two"),
        ("/strip/me?x", PathModifier("ReplacePrefixMatch", ""), prefix("/strip"), "/me?x"),
    ],
)
def test_url_rewrite_path(target, mod, match, want):
    out = rewrite_request(URLRewrite(path=mod), req(target), match)
    assert out.target == want
    assert out.authority == "echo.shop:8080"


def test_url_rewrite_hostname():
    out = rewrite_request(URLRewrite(hostname="mydomain.example.com"), req("/a"), prefix("/"))
    assert out.authority == "mydomain.example.com" and out.target == "/a"


# -- MeshHTTPRouteRedirect* ---------------------------------------------------------------


@pytest.mark.parametrize(
    "rd,request_,want_status,want_location",
    [
        (RequestRedirect(), req("/a?x=1"), 302, "http://echo.shop:8080/a?x=1"),
        (RequestRedirect(status_code=301), req("/"), 301, "http://echo.shop:8080/"),
        (RequestRedirect(status_code=303), req("/"), 303, "http://echo.shop:8080/"),
        (RequestRedirect(status_code=307), req("/"), 307, "http://echo.shop:8080/"),
        (RequestRedirect(status_code=308), req("/"), 308, "http://echo.shop:8080/"),
        # scheme: the port becomes the scheme's well-known one, and is then left out
        (RequestRedirect(scheme="https"), req("/s"), 302, "https://echo.shop/s"),
        (RequestRedirect(scheme="http"), req("/s", scheme="https"), 302, "http://echo.shop/s"),
        # hostname: keeps the listener port
        (RequestRedirect(hostname="example.org"), req("/h"), 302, "http://example.org:8080/h"),
        # port
        (RequestRedirect(port=8443), req("/p"), 302, "http://echo.shop:8443/p"),
        (RequestRedirect(port=80), req("/p"), 302, "http://echo.shop/p"),
        (RequestRedirect(scheme="https", port=443), req("/"), 302, "https://echo.shop/"),
        (RequestRedirect(scheme="https", port=8443), req("/"), 302, "https://echo.shop:8443/"),
        # path
        (RequestRedirect(path=PathModifier("ReplaceFullPath", "/full")), req("/x/y?q"), 302,
         "http://echo.shop:8080/full?q"),
        (RequestRedirect(path=PathModifier("ReplacePrefixMatch", "/new")), req("/old/x"), 302,
         "http://echo.shop:8080/new/x"),
        # everything at once
        (RequestRedirect(scheme="https", hostname="example.com", port=9443,
                         path=PathModifier("ReplaceFullPath", "/"), status_code=301),
         req("/old"), 301, "https://example.com:9443/"),
        # IPv6 host literals keep their brackets
        (RequestRedirect(), req("/", authority="[fd00::1]:8080"), 302, "http://[fd00::1]:8080/"),
        (RequestRedirect(hostname="fd00::2"), req("/"), 302, "http://[fd00::2]:8080/"),
    ],
)
def test_redirect(rd, request_, want_status, want_location):
    r = redirect_response(rd, request_, prefix("/old"), listener_port=8080)
    assert (r.status, r.location) == (want_status, want_location)


def test_redirect_on_default_port_listener_leaves_port_out():
    r = redirect_response(RequestRedirect(hostname="x.example"), req("/", authority="echo"),
                          prefix("/"), listener_port=80)
    assert r.location == "http://x.example/"


@pytest.mark.parametrize(
    "authority,want",
    [("h", ("h", None)), ("h:80", ("h", 80)), ("[::1]:8", ("[::1]", 8)), ("[::1]", ("[::1]", None)),
     ("h:x", ("h:x", None))],
)
def test_split_authority(authority, want):
    assert split_authority(authority) == want


# -- a rule's filters together -------------------------------------------------------------


def rule_of(filters, path="/api"):
    return parse_httproute({
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {"rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": path}}],
            "filters": filters,
        }]},
    }).rules[0]


def test_apply_request_filters_in_order():
    rule = rule_of([
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{"name": "x-env", "value": "canary"}], "remove": ["x-secret"]}},
        {"type": "URLRewrite", "urlRewrite": {
            "hostname": "backend",
            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}},
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
            "add": [{"name": "x-served-by", "value": "gw"}]}},
    ])
    res = apply_request_filters(
        rule.filters, req("/api/items?id=3", headers=[("x-secret", "s"), ("x-env", "prod")]),
        rule.matches[0], 8080,
    )
    assert res.redirect is None
    assert res.request.target == "/v2/items?id=3"
    assert res.request.authority == "backend"
    assert res.request.headers == (("x-env", "canary"),)
    (mirror,) = res.mirrors
    assert mirror.backend.key == "shop/shadow"
    assert apply_response_filters([], res.response_modifiers) == [("x-served-by", "gw")]


def test_redirect_ends_filter_processing():
    rule = rule_of([
        {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}},
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}},
    ])
    res = apply_request_filters(rule.filters, req("/api"), rule.matches[0], 8080)
    assert res.redirect is not None and res.redirect.location == "https://echo.shop/api"
    assert res.mirrors == ()


def test_no_filters_is_identity():
    r = req("/a?b", headers=[("a", "1")])
    res = apply_request_filters((), r, prefix("/"), 8080)
    assert res.request == r and res.redirect is None and res.mirrors == ()


def test_mirror_percent():
    rng = random.Random(7)
    shadow = BackendRef("shadow", "shop", 80)
    half = RequestMirror(backend=shadow, percent=50)
    hits = sum(should_mirror(half, rng.random()) for _ in range(10_000))
    assert 4_500 < hits < 5_500
    assert should_mirror(RequestMirror(backend=shadow, percent=None), 0.999)
    assert not should_mirror(RequestMirror(backend=shadow, percent=0), 0.0)

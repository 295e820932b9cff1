"""HTTPRoute parsing: defaults, validation with field paths, durations, JSON round trip."""

from __future__ import annotations

import copy
import json

import pytest

from nodeproxy.routes import (
    EXACT,
    PATH_PREFIX,
    REGEX,
    HTTPRoute,
    ParentRef,
    PathMatch,
    RequestHeaderModifier,
    RequestMirror,
    RequestRedirect,
    ResponseHeaderModifier,
    RouteError,
    RouteMatch,
    URLRewrite,
    format_duration,
    parse_duration,
    parse_httproute,
    parse_httproutes,
)

FULL = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {
        "name": "echo-route",
        "namespace": "shop",
        "creationTimestamp": "2024-05-01T10:00:00Z",
    },
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 8080}],
        "rules": [
            {
                "name": "canary",
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/api"},
                        "headers": [
                            {"name": "X-Env", "value": "canary"},
                            {"type": "RegularExpression", "name": "x-v", "value": "v[0-9]+"},
                        ],
                        "queryParams": [{"name": "debug", "value": "1"}],
                        "method": "GET",
                    }
                ],
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "X-A", "value": "1"}],
                            "add": [{"name": "X-B", "value": "2"}],
                            "remove": ["X-C"],
                        },
                    },
                    {
                        "type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {"add": [{"name": "X-R", "value": "r"}]},
                    },
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {
                            "hostname": "internal.example",
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"},
                        },
                    },
                    {
                        "type": "RequestMirror",
                        "requestMirror": {"backendRef": {"name": "shadow", "port": 80}},
                    },
                ],
                "backendRefs": [
                    {"name": "echo-v1", "port": 8080, "weight": 70},
                    {"name": "echo-v2", "namespace": "other", "port": 8080, "weight": 30},
                ],
                "timeouts": {"request": "10s", "backendRequest": "500ms"},
                "retry": {"codes": [500, 503], "attempts": 3, "backoff": "100ms"},
            },
            {
                "filters": [
                    {
                        "type": "RequestRedirect",
                        "requestRedirect": {
                            "scheme": "https",
                            "hostname": "example.com",
                            "port": 8443,
                            "statusCode": 301,
                            "path": {"type": "ReplaceFullPath", "replaceFullPath": "/moved"},
                        },
                    }
                ]
            },
        ],
    },
}


def route_doc(**spec_rule) -> dict:
    """A minimal route with one rule holding ``spec_rule``."""
    return {
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "svc"}],
            "rules": [spec_rule],
        },
    }


def test_full_route_parses_into_the_model():
    r = parse_httproute(FULL)
    assert r.key == "shop/echo-route"
    assert r.parent_refs == (ParentRef("echo", "shop", "", "Service", 8080),)
    assert r.parent_refs[0].is_service
    canary, redirect = r.rules
    assert canary.name == "canary"
    (m,) = canary.matches
    assert m.path == PathMatch(PATH_PREFIX, "/api")
    assert [(h.name, h.value, h.type) for h in m.headers] == [
        ("X-Env", "canary", EXACT),
        ("x-v", "v[0-9]+", REGEX),
    ]
    assert m.query_params[0].name == "debug" and m.method == "GET"
    rhm, resp, rw, mirror = canary.filters
    assert isinstance(rhm, RequestHeaderModifier)
    assert rhm.set == (("X-A", "1"),) and rhm.add == (("X-B", "2"),) and rhm.remove == ("X-C",)
    assert isinstance(resp, ResponseHeaderModifier) and resp.add == (("X-R", "r"),)
    assert isinstance(rw, URLRewrite) and rw.hostname == "internal.example"
    assert isinstance(mirror, RequestMirror) and mirror.backend.key == "shop/shadow"
    b1, b2 = canary.backend_refs
    assert (b1.key, b1.port, b1.weight) == ("shop/echo-v1", 8080, 70)
    assert (b2.key, b2.weight) == ("other/echo-v2", 30)
    assert canary.timeouts.request == 10.0 and canary.timeouts.backend_request == 0.5
    assert canary.retry.codes == (500, 503)
    assert canary.retry.attempts == 3 and canary.retry.backoff == 0.1
    # a rule without matches matches everything (PathPrefix "/")
    assert redirect.matches == (RouteMatch(),)
    (rd,) = redirect.filters
    assert isinstance(rd, RequestRedirect)
    assert (rd.scheme, rd.hostname, rd.port, rd.status_code) == ("https", "example.com", 8443, 301)
    assert rd.path.value == "/moved"


def test_defaults():
    r = parse_httproute({"metadata": {"name": "r"}, "spec": {"parentRefs": [{"name": "gw"}]}})
    assert r.namespace == "default"
    # the spec's parentRef defaults name a Gateway, which a mesh route does not attach to
    assert not r.parent_refs[0].is_service
    assert r.rules[0].matches == (RouteMatch(),)
    assert r.created == float("inf")
    rd = parse_httproute(
        route_doc(filters=[{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}])
    ).rules[0].filters[0]
    assert rd.status_code == 302
    b = parse_httproute(route_doc(backendRefs=[{"name": "x", "port": 1}])).rules[0].backend_refs[0]
    assert b.weight == 1 and b.namespace == "ns"


def test_json_round_trip_is_plain_and_lossless():
    r = parse_httproute(FULL)
    wire = json.dumps(r.to_json())
    back = HTTPRoute.from_json(json.loads(wire))
    assert back == r


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1h30m30s500ms", 5430.5),
        ("0s", 0.0),
        ("00060m", 3600.0),
        ("1s1s", 2.0),  # Go's ParseDuration adds repeated units
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "10", "1.5s", "-1s", "1d", "123456s", "1h1m1s1ms1h", "1 s", "10us", None, 5]
)
def test_parse_duration_rejects(text):
    with pytest.raises(RouteError):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds,text", [(0, "0s"), (0.5, "500ms"), (5430.5, "1h30m30s500ms"), (60, "1m")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


BAD = [
    # (mutation of the minimal doc, expected field path fragment, message fragment)
    (dict(matches=[{"path": {"type": "PathPrefix", "value": "api"}}]), "matches[0].path.value",
     "start with '/'"),
    (dict(matches=[{"path": {"type": "RegularExpression", "value": "(["}}]),
     "matches[0].path.value", "regular expression"),
    (dict(matches=[{"path": {"type": "Glob", "value": "/x"}}]), "matches[0].path.type",
     "unknown"),
    (dict(matches=[{"headers": [{"name": "bad name", "value": "x"}]}]),
     "matches[0].headers[0].name", "invalid header name"),
    (dict(matches=[{"headers": [{"type": "RegularExpression", "name": "x", "value": "*"}]}]),
     "matches[0].headers[0].value", "regular expression"),
    (dict(matches=[{"queryParams": [{"name": "q", "value": "1", "type": "Prefix"}]}]),
     "matches[0].queryParams[0].type", "unknown"),
    (dict(matches=[{"method": "FETCH"}]), "matches[0].method", "unknown method"),
    (dict(backendRefs=[{"name": "x", "port": 80, "weight": 1_000_001}]),
     "backendRefs[0].weight", "out of range"),
    (dict(backendRefs=[{"name": "x", "port": 80, "weight": -1}]), "backendRefs[0].weight",
     "out of range"),
    (dict(backendRefs=[{"name": "x", "port": 80, "weight": "5"}]), "backendRefs[0].weight",
     "integer"),
    (dict(backendRefs=[{"name": "x"}]), "backendRefs[0].port", "required"),
    (dict(backendRefs=[{"name": "x", "port": 80, "kind": "Pod"}]), "backendRefs[0]",
     "unsupported backend"),
    (dict(filters=[{"type": "ExtensionRef", "extensionRef": {}}]), "filters[0].type",
     "unsupported filter"),
    (dict(filters=[{"type": "URLRewrite"}]), "filters[0].urlRewrite", "required"),
    (dict(filters=[{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]),
     "filters[0].requestRedirect.statusCode", "must be one of"),
    (dict(filters=[{"type": "RequestRedirect", "requestRedirect": {"scheme": "ftp"}}]),
     "filters[0].requestRedirect.scheme", "http or https"),
    (dict(filters=[{"type": "RequestRedirect", "requestRedirect": {}},
                   {"type": "URLRewrite", "urlRewrite": {}}]),
     "filters", "cannot be used together"),
    (dict(filters=[{"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                   {"type": "RequestHeaderModifier", "requestHeaderModifier": {}}]),
     "filters[1]", "only once"),
    (dict(filters=[{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "A", "value": "1"}, {"name": "a", "value": "2"}]}}]),
     "requestHeaderModifier.set[1].name", "duplicate"),
    (dict(filters=[{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "add": [{"name": "A", "value": "x\r\nInjected: 1"}]}}]),
     "requestHeaderModifier.add[0].value", "CR, LF"),
    (dict(matches=[{"path": {"type": "Exact", "value": "/x"}}],
          filters=[{"type": "URLRewrite", "urlRewrite": {"path": {
              "type": "ReplacePrefixMatch", "replacePrefixMatch": "/y"}}}]),
     "filters[0]", "needs PathPrefix"),
    (dict(filters=[{"type": "URLRewrite", "urlRewrite": {"path": {
        "type": "ReplaceFullPath", "replaceFullPath": "noslash"}}}]),
     "urlRewrite.path", "start with '/'"),
    (dict(timeouts={"request": "10"}), "timeouts.request", "invalid duration"),
    (dict(timeouts={"request": "1s", "backendRequest": "2s"}), "timeouts.backendRequest",
     "must not exceed"),
    (dict(retry={"codes": [200]}), "retry.codes[0]", "out of range"),
    (dict(retry={"attempts": -1}), "retry.attempts", "out of range"),
    (dict(retry={"backoff": "fast"}), "retry.backoff", "invalid duration"),
    (dict(matches="everything"), "matches", "must be a list"),
]


@pytest.mark.parametrize("rule,where,what", BAD)
def test_bad_input_names_the_field(rule, where, what):
    with pytest.raises(RouteError) as ei:
        parse_httproute(route_doc(**rule))
    msg = str(ei.value)
    assert "HTTPRoute ns/r" in msg
    assert f"spec.rules[0].{where}" in msg or where in msg, msg
    assert what in msg, msg
    assert isinstance(ei.value, ValueError)


def test_bad_metadata_and_parents():
    with pytest.raises(RouteError, match="metadata.name"):
        parse_httproute({"spec": {}})
    with pytest.raises(RouteError, match="creationTimestamp"):
        parse_httproute({"metadata": {"name": "r", "creationTimestamp": "yesterday"}})
    with pytest.raises(RouteError, match=r"spec.parentRefs\[0\].port"):
        parse_httproute({"metadata": {"name": "r"}, "spec": {"parentRefs": [
            {"kind": "Service", "group": "", "name": "s", "port": 70000}]}})
    with pytest.raises(RouteError, match="expected HTTPRoute"):
        parse_httproute({"kind": "GRPCRoute", "metadata": {"name": "r"}})
    with pytest.raises(RouteError):
        parse_httproute(["not", "a", "dict"])  # type: ignore[arg-type]


def test_timeouts_zero_means_disabled_and_is_allowed():
    r = parse_httproute(route_doc(timeouts={"request": "0s", "backendRequest": "5s"}))
    assert r.rules[0].timeouts.request == 0.0
    r = parse_httproute(route_doc(timeouts={"request": "1s", "backendRequest": "0s"}))
    assert r.rules[0].timeouts.backend_request == 0.0


def test_duplicate_header_match_keeps_the_first():
    r = parse_httproute(route_doc(matches=[{"headers": [
        {"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}]))
    assert [(h.name, h.value) for h in r.rules[0].matches[0].headers] == [("X-A", "1")]


def test_parsing_does_not_mutate_the_input():
    doc = copy.deepcopy(FULL)
    parse_httproute(doc)
    assert doc == FULL


def test_parse_many_skips_and_logs_bad_routes(caplog):
    bad = route_doc(matches=[{"method": "FETCH"}])
    good, errors = parse_httproutes([FULL, bad, "junk"])
    assert [r.key for r in good] == ["shop/echo-route"]
    assert len(errors) == 2
    assert "unknown method" in caplog.text

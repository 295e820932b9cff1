"""Route selection for a service port: attachment, match semantics, precedence, defaults."""

from __future__ import annotations

import pytest

from l7gateway.matching import RouteTable, normalize_path, prefix_matches, split_target
from nodeproxy.routes import parse_httproute

SVC = {"group": "", "kind": "Service", "name": "echo"}


def route(name, rules, *, ns="shop", created="2024-01-01T00:00:00Z", parents=None):
    return parse_httproute(
        {
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": {"parentRefs": parents or [SVC], "rules": rules},
        }
    )


def to(backend, **match):
    """A rule sending ``match`` to ``backend`` (the backend name identifies the rule)."""
    return {"matches": [match] if match else [], "backendRefs": [{"name": backend, "port": 80}]}


def chosen(table, method="GET", path="/", query="", headers=()):
    m = table.match(method, path, query, list(headers))
    return None if m is None else m.rule.backend_refs[0].name


def build(*routes, port=80, consumer_ns=None):
    return RouteTable.build(routes, "shop", "echo", port, consumer_ns=consumer_ns)


# -- MeshHTTPRouteMatching (the conformance suite's route and requests) -------------------

MESH_MATCHING = route(
    "mesh-matching",
    [
        to("v1", path={"type": "PathPrefix", "value": "/"},
           headers=[{"name": "version", "value": "one"}]),
        to("v2", path={"type": "PathPrefix", "value": "/v2"}),
        to("v2b", path={"type": "PathPrefix", "value": "/v2"},
           headers=[{"name": "version", "value": "two"}]),
        to("v3", path={"type": "Exact", "value": "/exact"}),
        to("v4", path={"type": "RegularExpression", "value": "/re/[0-9]+"}),
        to("v5", method="POST", path={"type": "PathPrefix", "value": "/m"}),
        to("v6", path={"type": "PathPrefix", "value": "/m"}),
    ],
)


@pytest.mark.parametrize(
    "method,path,headers,want",
    [
        ("GET", "/", [("version", "one")], "v1"),
        ("GET", "/", [("Version", "one")], "v1"),  # header names are case-insensitive
        ("GET", "/", [("version", "ONE")], None),  # values are not
        ("GET", "/", [], None),  # routes exist, none matches → 404
        ("GET", "/v2", [], "v2"),
        ("GET", "/v2/example", [], "v2"),
        ("GET", "/v2", [("version", "two")], "v2b"),  # more headers win within one prefix
        ("GET", "/v2", [("version", "one")], "v2"),  # longer prefix beats headers
        ("GET", "/v2example", [], None),  # prefix is by whole segments
        ("GET", "/v2example", [("version", "one")], "v1"),
        ("GET", "/exact", [], "v3"),
        ("GET", "/exact/", [], None),
        ("GET", "/re/42", [], "v4"),
        ("GET", "/re/42x", [], None),  # regex matches the whole path
        ("POST", "/m/x", [], "v5"),  # method wins over none
        ("GET", "/m/x", [], "v6"),
    ],
)
def test_mesh_http_route_matching(method, path, headers, want):
    assert chosen(build(MESH_MATCHING), method, path, headers=headers) == want


@pytest.mark.parametrize(
    "prefix,path,ok",
    [
        ("/abc", "/abc", True),
        ("/abc", "/abc/", True),
        ("/abc", "/abc/def", True),
        ("/abc", "/abcd", False),
        ("/abc/", "/abc", True),  # trailing slash on the prefix is ignored
        ("/abc/", "/abc/def", True),
        ("/abc/", "/abcd", False),
        ("/", "/anything", True),
        ("/", "/", True),
    ],
)
def test_prefix_by_segments(prefix, path, ok):
    assert prefix_matches(prefix, path) is ok


# -- MeshHTTPRouteQueryParamMatching ------------------------------------------------------

QUERY = route(
    "query",
    [
        to("q1", queryParams=[{"name": "animal", "value": "whale"}]),
        to("q2", queryParams=[{"name": "animal", "value": "dolphin"}]),
        to("q3", queryParams=[{"name": "animal", "value": "dolphin"},
                              {"name": "color", "value": "blue"}]),
        to("q4", queryParams=[{"name": "ANIMAL", "value": "Whale"}]),
        to("q5", queryParams=[{"type": "RegularExpression", "name": "id", "value": "[0-9]{3}"}]),
    ],
)


@pytest.mark.parametrize(
    "query,want",
    [
        ("animal=whale", "q1"),
        ("animal=dolphin", "q2"),
        ("animal=dolphin&color=blue", "q3"),  # more query params win
        ("color=blue&animal=dolphin", "q3"),
        ("animal=dolphin&color=red", "q2"),
        ("ANIMAL=Whale", "q4"),  # names and values are case-sensitive
        ("animal=Whale", None),
        ("id=123", "q5"),
        ("id=1234", None),
        ("animal=whale&animal=dolphin", "q1"),  # the first of a repeated param counts
        ("animal=wh%61le", "q1"),  # percent-decoded
        ("", None),
    ],
)
def test_mesh_query_param_matching(query, want):
    assert chosen(build(QUERY), query=query) == want


# -- precedence and its ties ---------------------------------------------------------------


def test_exact_beats_longer_prefix():
    r = route("r", [to("prefix", path={"type": "PathPrefix", "value": "/a/b/c/d"}),
                    to("exact", path={"type": "Exact", "value": "/a/b/c/d"})])
    assert chosen(build(r), path="/a/b/c/d") == "exact"


def test_any_prefix_beats_regex_as_in_istio():
    r = route("r", [to("re", path={"type": "RegularExpression", "value": "/[ab]/.*"}),
                    to("prefix", path={"type": "PathPrefix", "value": "/a"})])
    assert chosen(build(r), path="/a/x") == "prefix"
    assert chosen(build(r), path="/b/x") == "re"
    # even the catch-all "/" (a rule without matches) outranks a regex
    r = route("r", [to("re", path={"type": "RegularExpression", "value": "/b/.*"}), to("all")])
    assert chosen(build(r), path="/b/x") == "all"


def test_header_count_then_query_count():
    r = route("r", [
        to("q2", queryParams=[{"name": "a", "value": "1"}, {"name": "b", "value": "1"}]),
        to("h1", headers=[{"name": "x", "value": "1"}]),
    ])
    assert chosen(build(r), query="a=1&b=1", headers=[("x", "1")]) == "h1"
    assert chosen(build(r), query="a=1&b=1") == "q2"


def test_method_beats_headers():
    r = route("r", [to("headers", headers=[{"name": "x", "value": "1"},
                                           {"name": "y", "value": "1"}]),
                    to("method", method="GET")])
    assert chosen(build(r), headers=[("x", "1"), ("y", "1")]) == "method"


def test_tie_oldest_route_wins_then_name_then_rule_order():
    newer = route("aaa", [to("newer")], created="2024-06-01T00:00:00Z")
    older = route("zzz", [to("older")], created="2024-01-01T00:00:00Z")
    assert chosen(build(newer, older)) == "older"
    assert chosen(build(older, newer)) == "older"
    # same age: namespace/name alphabetically
    b = route("b", [to("from-b")])
    a = route("a", [to("from-a")])
    assert chosen(build(b, a)) == "from-a"
    # same route: rule order
    r = route("r", [to("first"), to("second")])
    assert chosen(build(r)) == "first"


def test_match_reports_which_match_hit():
    r = route("r", [{"matches": [{"path": {"type": "PathPrefix", "value": "/x"}},
                                 {"path": {"type": "PathPrefix", "value": "/y/z"}}],
                     "backendRefs": [{"name": "b", "port": 80}]}])
    m = build(r).match("GET", "/y/z/1", "", {})
    assert m.rule_index == 0 and m.match_index == 1 and m.match.path.value == "/y/z"
    assert m.route is r and not m.default


def test_mapping_headers_accepted():
    r = route("r", [to("h", headers=[{"name": "x-a", "value": "1"}])])
    assert build(r).match("GET", "/", "", {"X-A": "1"}) is not None


def test_repeated_request_header_any_value_matches():
    r = route("r", [to("h", headers=[{"name": "x-a", "value": "2"}])])
    assert chosen(build(r), headers=[("x-a", "1"), ("X-A", "2")]) == "h"


# -- attachment and the default route -----------------------------------------------------


def test_no_route_routes_to_itself():
    t = build()
    assert t.default
    m = t.match("DELETE", "/anything", "x=1", [])
    assert m is not None and m.default
    (b,) = m.rule.backend_refs
    assert (b.namespace, b.name, b.port, b.weight) == ("shop", "echo", 80, 1)


def test_only_routes_for_this_service_and_port_attach():
    other_svc = route("other", [to("x")], parents=[{**SVC, "name": "other"}])
    gateway = route("gw", [to("x")], parents=[{"name": "echo"}])  # kind Gateway by default
    port_8080 = route("p8080", [to("p")], parents=[{**SVC, "port": 8080}])
    other_ns = route("elsewhere", [to("x")], parents=[{**SVC, "namespace": "billing"}])
    t = build(other_svc, gateway, port_8080, other_ns, port=80)
    assert t.default
    t = build(other_svc, gateway, port_8080, other_ns, port=8080)
    assert not t.default and chosen(t) == "p"
    core = route("core", [to("c")], parents=[{**SVC, "group": "core"}])
    assert chosen(build(core)) == "c"


def test_consumer_route_applies_only_to_its_namespace_and_overrides_producer():
    producer = route("prod", [to("producer")])
    consumer = route("cons", [to("consumer")], ns="client",
                     parents=[{**SVC, "namespace": "shop"}])
    assert chosen(build(producer, consumer)) == "producer"
    assert chosen(build(producer, consumer, consumer_ns="other")) == "producer"
    assert chosen(build(producer, consumer, consumer_ns="client")) == "consumer"
    # a consumer route alone still leaves other callers with the default route
    assert build(consumer, consumer_ns="other").default


# -- path helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,want",
    [
        ("/a/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/../../x", "/x"),
        ("/%61dmin", "/admin"),  # unreserved escapes are decoded
        ("/a%2fb", "/a%2Fb"),  # reserved ones kept, upper-cased
        ("/a//b", "/a//b"),  # slashes are not merged (Istio's BASE)
        ("", "/"),
    ],
)
def test_normalize_path(raw, want):
    assert normalize_path(raw) == want


def test_split_target():
    assert split_target("/a/b?x=1&y=2#frag") == ("/a/b", "x=1&y=2")
    assert split_target("/a") == ("/a", "")

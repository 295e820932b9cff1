"""L7 authorization at the gateway: methods, paths, headers, with the L4 fields and order."""

from __future__ import annotations

import pytest

from l7gateway.authz import authorize_request
from nodeproxy.model import Clause, Match, Policy, Rule
from ztunnel.policy import Connection, authorize

ALICE = "spiffe://cluster.local/ns/shop/sa/alice"
BOB = "spiffe://cluster.local/ns/billing/sa/bob"


def conn(identity=ALICE, src="10.0.1.5", dst="10.0.2.7", port=8080):
    return Connection(src_identity=identity, src_ip=src, dst_ip=dst, dst_port=port)


def policy(*matches, action="ALLOW", name="p"):
    return Policy(name=name, namespace="shop", action=action,
                  rules=(Rule(clauses=(Clause(matches=matches),)),))


def ok(policies, method="GET", path="/", headers=(), c=None):
    return authorize_request(policies, c or conn(), method, path, list(headers)).allowed


ALLOW_CASES = [
    # (match, method, path, headers, allowed)
    (Match(methods=("GET", "HEAD")), "GET", "/", (), True),
    (Match(methods=("GET", "HEAD")), "POST", "/", (), False),
    (Match(methods=("GET",)), "get", "/", (), False),  # methods are case-sensitive
    (Match(not_methods=("DELETE",)), "GET", "/", (), True),
    (Match(not_methods=("DELETE",)), "DELETE", "/", (), False),
    (Match(paths=("/api/v1",)), "GET", "/api/v1", (), True),
    (Match(paths=("/api/v1",)), "GET", "/api/v1/x", (), False),  # exact
    (Match(paths=("/api/v1",)), "GET", "/api/v1?q=1", (), True),  # the query is ignored
    (Match(paths=("/api/*",)), "GET", "/api/anything/here", (), True),  # prefix wildcard
    (Match(paths=("/api/*",)), "GET", "/apix", (), False),
    (Match(paths=("*.png",)), "GET", "/img/a.png", (), True),  # suffix wildcard
    (Match(paths=("*.png",)), "GET", "/img/a.jpg", (), False),
    (Match(paths=("*",)), "GET", "/whatever", (), True),
    (Match(paths=("/public/*",), not_paths=("/public/secret*",)), "GET", "/public/a", (), True),
    (Match(paths=("/public/*",), not_paths=("/public/secret*",)), "GET", "/public/secret/x",
     (), False),
    (Match(headers={"x-token": ("abc",)}), "GET", "/", [("X-Token", "abc")], True),
    (Match(headers={"X-Token": ("abc",)}), "GET", "/", [("x-token", "abd")], False),
    (Match(headers={"x-token": ("abc",)}), "GET", "/", [], False),
    (Match(headers={"x-token": ("ab*",)}), "GET", "/", [("x-token", "abzzz")], True),
    (Match(headers={"x-token": ("*zz",)}), "GET", "/", [("x-token", "abzz")], True),
    (Match(headers={"x-token": ("*",)}), "GET", "/", [("x-token", "v")], True),
    (Match(headers={"x-token": ("*",)}), "GET", "/", [("x-token", "")], False),
    # a repeated header: any value counts
    (Match(headers={"x-a": ("2",)}), "GET", "/", [("x-a", "1"), ("x-a", "2")], True),
    # two headers: both required
    (Match(headers={"x-a": ("1",), "x-b": ("2",)}), "GET", "/", [("x-a", "1")], False),
    # fields AND: method and path
    (Match(methods=("GET",), paths=("/a",)), "GET", "/a", (), True),
    (Match(methods=("GET",), paths=("/a",)), "GET", "/b", (), False),
    (Match(methods=("GET",), paths=("/a",)), "PUT", "/a", (), False),
]


@pytest.mark.parametrize("match,method,path,headers,allowed", ALLOW_CASES)
def test_allow_policy_l7_fields(match, method, path, headers, allowed):
    assert ok([policy(match)], method, path, headers) is allowed


@pytest.mark.parametrize("match,method,path,headers,allowed", ALLOW_CASES)
def test_deny_policy_is_the_mirror_image(match, method, path, headers, allowed):
    # a DENY with the same match denies exactly what the ALLOW allowed
    assert ok([policy(match, action="DENY")], method, path, headers) is (not allowed)


def test_l7_allow_combined_with_principals():
    p = policy(Match(principals=("cluster.local/ns/shop/sa/alice",), methods=("GET",)))
    assert ok([p], "GET")
    assert not ok([p], "POST")
    assert not ok([p], "GET", c=conn(BOB))
    assert not ok([p], "GET", c=conn(None))  # plaintext caller has no principal


def test_l7_combined_with_namespaces_ports_and_ips():
    p = policy(Match(namespaces=("billing",), destination_ports=(8080,),
                     source_ips=("10.0.0.0/16",), paths=("/pay/*",)))
    assert ok([p], path="/pay/now", c=conn(BOB))
    assert not ok([p], path="/pay/now", c=conn(ALICE))
    assert not ok([p], path="/pay/now", c=conn(BOB, port=9090))
    assert not ok([p], path="/pay/now", c=conn(BOB, src="192.168.1.1"))
    assert not ok([p], path="/other", c=conn(BOB))


def test_clauses_and_rules_compose_like_l4():
    # from: bob, to: GET /x (two clauses AND) — one rule; a second rule lets alice do anything
    rule1 = Rule(clauses=(
        Clause(matches=(Match(principals=("cluster.local/ns/billing/sa/bob",)),)),
        Clause(matches=(Match(methods=("GET",), paths=("/x",)),)),
    ))
    rule2 = Rule(clauses=(Clause(matches=(Match(principals=("*/sa/alice",)),)),))
    p = Policy(name="p", namespace="shop", rules=(rule1, rule2))
    assert ok([p], "GET", "/x", c=conn(BOB))
    assert not ok([p], "POST", "/x", c=conn(BOB))
    assert ok([p], "DELETE", "/anything", c=conn(ALICE))


def test_deny_wins_over_allow_and_names_the_policy():
    allow = policy(Match(principals=("*",)), name="everyone")
    deny = policy(Match(paths=("/admin*",)), action="DENY", name="no-admin")
    d = authorize_request([allow, deny], conn(), "GET", "/admin/users", [])
    assert not d.allowed and d.policy == "shop/no-admin"
    d = authorize_request([allow, deny], conn(), "GET", "/home", [])
    assert d.allowed and d.policy == "shop/everyone"


def test_evaluation_order():
    assert authorize_request([], conn(), "GET", "/", []).allowed  # no policy
    only_deny = policy(Match(methods=("DELETE",)), action="DENY")
    assert ok([only_deny], "GET")  # only DENY policies, none matches
    allow_other = policy(Match(methods=("POST",)))
    d = authorize_request([allow_other], conn(), "GET", "/", [])
    assert not d.allowed and d.policy is None  # an ALLOW exists and none matched


def test_gateway_enforces_what_the_node_proxy_fails_closed_on():
    # the same policy: the node proxy cannot see the method, so it denies; the gateway can
    p = policy(Match(principals=("cluster.local/ns/shop/sa/alice",), methods=("GET",)))
    assert not authorize([p], conn()).allowed
    assert ok([p], "GET")


def test_l4_only_policies_behave_as_at_the_node_proxy():
    p = policy(Match(principals=("cluster.local/ns/shop/sa/alice",)))
    for c in (conn(ALICE), conn(BOB), conn(None)):
        assert ok([p], c=c) is authorize([p], c).allowed


def test_empty_match_matches_nothing():
    assert not ok([policy(Match())])
    assert ok([policy(Match(), action="DENY")])


def test_bad_values_fail_closed():
    bad_ip = Match(source_ips=("not-an-ip",), methods=("GET",))
    assert not ok([policy(bad_ip)], "GET")  # an ALLOW never widens
    # a DENY never narrows: the unreadable part counts as matched
    assert not ok([policy(bad_ip, action="DENY")], "GET")
    assert ok([policy(bad_ip, action="DENY")], "POST")
    assert not ok([Policy(name="x", namespace="shop", action="AUDIT",
                          rules=(Rule(clauses=(Clause(matches=(Match(),)),)),))])


def test_mapping_headers_accepted():
    p = policy(Match(headers={"x-user": ("admin",)}))
    assert authorize_request([p], conn(), "GET", "/", {"X-User": "admin"}).allowed

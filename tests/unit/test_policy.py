"""L4 authorization: ztunnel's evaluation order and match semantics."""

from __future__ import annotations

import pytest

from nodeproxy.model import Clause, Match, MeshState, Policy, Rule
from ztunnel.policy import Connection, authorize

ALICE = "spiffe://cluster.local/ns/shop/sa/alice"
BOB = "spiffe://cluster.local/ns/billing/sa/bob"


def conn(
    identity: str | None = ALICE,
    src: str = "10.0.1.5",
    dst: str = "10.0.2.7",
    port: int = 8080,
) -> Connection:
    return Connection(src_identity=identity, src_ip=src, dst_ip=dst, dst_port=port)


def policy(*matches: Match, action: str = "ALLOW", name: str = "p", ns: str = "shop") -> Policy:
    """One rule with one clause holding ``matches`` (OR)."""
    return Policy(
        name=name,
        namespace=ns,
        action=action,
        rules=(Rule(clauses=(Clause(matches=matches),)),),
    )


def allowed(p: Policy, c: Connection) -> bool:
    return authorize([p], c).allowed


# -- evaluation order ------------------------------------------------------------------


def test_no_policy_allows():
    d = authorize([], conn())
    assert d.allowed and d.policy is None


def test_only_deny_policies_that_do_not_match_allow():
    deny = policy(Match(principals=("cluster.local/ns/other/sa/x",)), action="DENY")
    assert authorize([deny], conn()).allowed


def test_allow_present_but_not_matching_denies():
    p = policy(Match(principals=("cluster.local/ns/other/sa/x",)), name="only-x")
    d = authorize([p], conn())
    assert not d.allowed
    assert d.policy is None


def test_allow_match_names_the_policy():
    p = policy(Match(principals=("cluster.local/ns/shop/sa/alice",)), name="alice-in")
    d = authorize([p], conn())
    assert d.allowed and d.policy == "shop/alice-in"


def test_deny_wins_over_allow_regardless_of_order():
    allow = policy(Match(namespaces=("shop",)), name="allow-shop")
    deny = policy(Match(destination_ports=(8080,)), action="DENY", name="no-8080")
    for order in ([allow, deny], [deny, allow]):
        d = authorize(order, conn())
        assert not d.allowed
        assert d.policy == "shop/no-8080"
    assert authorize([allow, deny], conn(port=9090)).allowed


def test_allow_without_rules_matches_nothing():
    p = Policy(name="empty", namespace="shop", action="ALLOW", rules=())
    assert not authorize([p], conn()).allowed


def test_allow_with_empty_rule_matches_everything():
    # Istio's "rules: [{}]" = allow all
    p = Policy(name="all", namespace="shop", action="ALLOW", rules=(Rule(),))
    assert authorize([p], conn(identity=None)).allowed


def test_unknown_action_fails_closed():
    p = Policy(name="odd", namespace="shop", action="AUDIT", rules=(Rule(),))
    assert not authorize([p], conn()).allowed


# -- fields and their not_ twins --------------------------------------------------------


def test_principals_and_not_principals():
    assert allowed(policy(Match(principals=("cluster.local/ns/shop/sa/alice",))), conn())
    assert not allowed(policy(Match(principals=("cluster.local/ns/shop/sa/alice",))), conn(BOB))
    assert not allowed(policy(Match(not_principals=("cluster.local/ns/shop/sa/alice",))), conn())
    assert allowed(policy(Match(not_principals=("cluster.local/ns/shop/sa/alice",))), conn(BOB))


def test_principal_wildcards():
    assert allowed(policy(Match(principals=("*",))), conn())
    assert allowed(policy(Match(principals=("cluster.local/ns/shop/*",))), conn())
    assert not allowed(policy(Match(principals=("cluster.local/ns/shop/*",))), conn(BOB))
    assert allowed(policy(Match(principals=("*/sa/bob",))), conn(BOB))
    assert not allowed(policy(Match(principals=("*/sa/bob",))), conn())
    # the spiffe:// scheme is not part of an Istio principal
    assert not allowed(
        policy(Match(principals=("spiffe://cluster.local/ns/shop/sa/alice",))), conn()
    )


def test_principal_values_or():
    p = policy(Match(principals=("cluster.local/ns/x/sa/y", "cluster.local/ns/billing/sa/bob")))
    assert allowed(p, conn(BOB))
    assert not allowed(p, conn())


def test_namespaces_and_not_namespaces_with_wildcards():
    assert allowed(policy(Match(namespaces=("shop",))), conn())
    assert not allowed(policy(Match(namespaces=("shop",))), conn(BOB))
    assert allowed(policy(Match(namespaces=("bill*",))), conn(BOB))
    assert allowed(policy(Match(namespaces=("*ing",))), conn(BOB))
    assert allowed(policy(Match(namespaces=("*",))), conn(BOB))
    assert not allowed(policy(Match(not_namespaces=("shop",))), conn())
    assert allowed(policy(Match(not_namespaces=("shop",))), conn(BOB))


def test_plaintext_caller_vs_identity_fields():
    plain = conn(identity=None)
    assert not allowed(policy(Match(principals=("*",))), plain)
    assert not allowed(policy(Match(namespaces=("*",))), plain)
    assert allowed(policy(Match(not_principals=("*",))), plain)
    assert allowed(policy(Match(not_namespaces=("shop",))), plain)
    # DENY "requests without identity" the Istio way: notPrincipals ["*"]
    deny_plain = policy(Match(not_principals=("*",)), action="DENY")
    assert not allowed(deny_plain, plain)
    assert allowed(deny_plain, conn())


def test_source_ips_cidr_and_plain_v4():
    assert allowed(policy(Match(source_ips=("10.0.1.0/24",))), conn())
    assert allowed(policy(Match(source_ips=("10.0.1.5",))), conn())
    assert not allowed(policy(Match(source_ips=("10.0.9.0/24",))), conn())
    assert not allowed(policy(Match(not_source_ips=("10.0.0.0/16",))), conn())
    assert allowed(policy(Match(not_source_ips=("10.9.0.0/16",))), conn())


def test_ips_v6_and_family_mismatch():
    c = conn(src="fd00:1::5", dst="fd00:2::7")
    assert allowed(policy(Match(source_ips=("fd00:1::/64",))), c)
    assert not allowed(policy(Match(source_ips=("fd00:9::/64",))), c)
    assert allowed(policy(Match(destination_ips=("fd00:2::7",))), c)
    # a v4 caller never falls inside a v6 range (::/0 must not swallow 10.0.1.5)
    assert not allowed(policy(Match(source_ips=("::/0",))), conn())
    # an IPv4-mapped caller address is compared as IPv4
    assert allowed(policy(Match(source_ips=("10.0.1.0/24",))), conn(src="::ffff:10.0.1.5"))


def test_destination_ips_and_not():
    assert allowed(policy(Match(destination_ips=("10.0.2.0/24",))), conn())
    assert not allowed(policy(Match(destination_ips=("10.0.3.0/24",))), conn())
    assert not allowed(policy(Match(not_destination_ips=("10.0.2.7",))), conn())


def test_destination_ports_and_not():
    assert allowed(policy(Match(destination_ports=(80, 8080))), conn())
    assert not allowed(policy(Match(destination_ports=(80,))), conn())
    assert not allowed(policy(Match(not_destination_ports=(8080,))), conn())
    assert allowed(policy(Match(not_destination_ports=(80,))), conn())


def test_fields_within_a_match_and_together():
    m = Match(namespaces=("shop",), destination_ports=(8080,))
    assert allowed(policy(m), conn())
    assert not allowed(policy(m), conn(port=9090))
    assert not allowed(policy(m), conn(BOB))


def test_positive_and_negative_of_one_field_together():
    m = Match(
        principals=("cluster.local/ns/shop/*",), not_principals=("cluster.local/ns/shop/sa/alice",)
    )
    assert not allowed(policy(m), conn())
    assert allowed(policy(m), conn("spiffe://cluster.local/ns/shop/sa/carol"))


# -- structure: rules OR, clauses AND, matches OR ----------------------------------------


def test_rules_or():
    p = Policy(
        name="two",
        namespace="shop",
        rules=(
            Rule(clauses=(Clause(matches=(Match(namespaces=("billing",)),)),)),
            Rule(clauses=(Clause(matches=(Match(destination_ports=(8080,)),)),)),
        ),
    )
    assert allowed(p, conn(BOB, port=1))
    assert allowed(p, conn(port=8080))
    assert not allowed(p, conn(port=1))


def test_clauses_and():
    # Istio: from (namespaces) AND to (ports)
    p = Policy(
        name="from-to",
        namespace="shop",
        rules=(
            Rule(
                clauses=(
                    Clause(matches=(Match(namespaces=("shop",)),)),
                    Clause(matches=(Match(destination_ports=(8080,)),)),
                )
            ),
        ),
    )
    assert allowed(p, conn())
    assert not allowed(p, conn(port=9090))
    assert not allowed(p, conn(BOB))


def test_matches_in_a_clause_or():
    # Istio: from: [{namespaces: [billing]}, {ipBlocks: [10.0.1.0/24]}]
    p = policy(Match(namespaces=("billing",)), Match(source_ips=("10.0.1.0/24",)))
    assert allowed(p, conn(BOB, src="192.168.0.1"))
    assert allowed(p, conn(ALICE, src="10.0.1.9"))
    assert not allowed(p, conn(ALICE, src="192.168.0.1"))


# -- L7 fields at L4 --------------------------------------------------------------------


def test_l7_in_allow_never_matches():
    p = policy(Match(namespaces=("shop",), methods=("GET",)))
    assert not allowed(p, conn())
    # the same L4 match without the L7 part allows
    assert allowed(policy(Match(namespaces=("shop",))), conn())


def test_l7_in_allow_leaves_other_matches_usable():
    p = policy(Match(paths=("/admin",)), Match(namespaces=("shop",)))
    assert allowed(p, conn())
    assert not allowed(p, conn(BOB))


def test_l7_in_deny_is_ignored_so_it_denies_more():
    deny = policy(Match(namespaces=("billing",), paths=("/admin",)), action="DENY")
    assert not allowed(deny, conn(BOB))  # denied at L4, whatever the path
    assert allowed(deny, conn())  # the L4 part still has to match
    deny_all_get = policy(Match(methods=("GET",)), action="DENY")
    assert not allowed(deny_all_get, conn())
    assert not allowed(deny_all_get, conn(identity=None))


def test_l7_headers_count_as_l7():
    p = policy(Match(namespaces=("shop",), headers={"x-user": ("a",)}))
    assert not allowed(p, conn())


# -- robustness --------------------------------------------------------------------------


def test_invalid_cidr_fails_closed(caplog):
    bad_allow = policy(Match(source_ips=("not-an-ip",)), name="bad-allow")
    assert not authorize([bad_allow], conn()).allowed
    bad_deny = policy(Match(source_ips=("10.0.0.300/8",)), action="DENY", name="bad-deny")
    assert not authorize([bad_deny], conn()).allowed
    assert "invalid match value" in caplog.text


def test_non_spiffe_identity_is_treated_as_none():
    assert not allowed(policy(Match(principals=("*",))), conn(identity="bogus"))


def test_policy_from_json_round_trip_evaluates_the_same():
    # policies arrive as JSON from the control plane; the dict-valued fields must not
    # break caching
    p = policy(Match(namespaces=("shop",), headers={"x": ("1",)}), Match(namespaces=("shop",)))
    state = MeshState(policies={p.key: p})
    again = MeshState.from_json(state.to_json()).policies[p.key]
    for c in (conn(), conn(BOB)):
        assert authorize([p], c) == authorize([again], c)


@pytest.mark.parametrize("n", [1, 50])
def test_many_policies(n):
    ps = [policy(Match(namespaces=(f"ns{i}",)), name=f"p{i}") for i in range(n)]
    assert not authorize(ps, conn()).allowed
    ps.append(policy(Match(namespaces=("shop",)), name="last"))
    assert authorize(ps, conn()).policy == "shop/last"

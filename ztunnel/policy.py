"""L4 authorization with ztunnel's semantics (``src/rbac.rs``). Pure: no IO.

Evaluation of the policies that apply to a destination workload:

1. any DENY policy matches → deny;
2. no ALLOW policy → allow;
3. an ALLOW policy matches → allow;
4. otherwise → deny.

A policy matches when any of its rules matches (rules OR). A rule matches when all of its
clauses match (clauses AND; a rule without clauses matches everything). A clause matches when
any of its matches matches (matches OR, as in ztunnel: "ns=A,sa=B or ns=C"). A match matches
when every field it sets matches (fields AND); a field matches when any of its values matches
(values OR) and none of the values of its ``not_`` twin does.

L7 fields (methods, paths, headers) cannot be checked on a byte stream, so the node proxy fails
closed on them, as ztunnel does: in an ALLOW policy a match carrying L7 fields never matches;
in a DENY policy the L7 fields are ignored, so the match denies more than it says.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nodeproxy.model import Match, Policy

log = logging.getLogger(__name__)

ALLOW = "ALLOW"
DENY = "DENY"
_SPIFFE = "spiffe://"


@dataclass(frozen=True)
class Connection:
    """What the node proxy knows about a connection when it decides."""

    src_identity: str | None  # SPIFFE URI of the authenticated caller; None for plaintext
    src_ip: str
    dst_ip: str
    dst_port: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None  # ns/name of the deciding policy, None when no policy decided
    reason: str


# -- compilation ---------------------------------------------------------------------------
# A compiled match is a predicate over the connection's facts, built once per Match object.

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
# (principal without spiffe://, caller namespace, source ip, destination ip, destination port)
Facts = tuple[str | None, str | None, _IP | None, _IP | None, int]
_Pred = Callable[[Facts], bool]


def string_matcher(pattern: str) -> Callable[[str | None], bool]:
    """Istio's string match: ``*`` any non-empty, ``pre*`` prefix, ``*suf`` suffix, else exact.

    ``None`` (no identity) never matches.
    """
    if pattern == "*":
        return lambda v: bool(v)
    if pattern.endswith("*"):
        pre = pattern[:-1]
        return lambda v: v is not None and v.startswith(pre)
    if pattern.startswith("*"):
        suf = pattern[1:]
        return lambda v: v is not None and v.endswith(suf)
    return lambda v: v is not None and v == pattern


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(value.strip(), strict=False)


def _any_net(nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], ip: _IP | None) -> bool:
    if ip is None:
        return False
    return any(ip.version == n.version and ip in n for n in nets)


def _field(
    positive: list[Callable[[object], bool]] | None,
    negative: list[Callable[[object], bool]] | None,
    get: Callable[[Facts], object],
) -> _Pred | None:
    """A field predicate: any positive value matches and no negative value does."""
    if not positive and not negative:
        return None
    pos = positive or []
    neg = negative or []

    def pred(facts: Facts) -> bool:
        v = get(facts)
        if pos and not any(p(v) for p in pos):
            return False
        return not any(n(v) for n in neg)

    return pred


def always(_: Facts) -> bool:
    return True


def never(_: Facts) -> bool:
    return False


def compile_l4_match(m: Match, action: str, policy_key: str) -> _Pred:
    if action == ALLOW and m.has_l7:
        # fail closed: an allow that depends on HTTP attributes cannot be proven at L4
        return never
    try:
        preds: list[_Pred] = []

        def strings(values: tuple[str, ...]) -> list[Callable[[object], bool]]:
            return [string_matcher(v) for v in values]  # type: ignore[misc]

        def nets(values: tuple[str, ...]) -> list[Callable[[object], bool]]:
            parsed = [_network(v) for v in values]
            return [lambda ip, ns=parsed: _any_net(ns, ip)] if parsed else []

        def ports(values: tuple[int, ...]) -> list[Callable[[object], bool]]:
            s = frozenset(int(p) for p in values)
            return [lambda p, s=s: p in s] if s else []

        for pos, neg, get in (
            (strings(m.principals), strings(m.not_principals), lambda f: f[0]),
            (strings(m.namespaces), strings(m.not_namespaces), lambda f: f[1]),
            (nets(m.source_ips), nets(m.not_source_ips), lambda f: f[2]),
            (nets(m.destination_ips), nets(m.not_destination_ips), lambda f: f[3]),
            (ports(m.destination_ports), ports(m.not_destination_ports), lambda f: f[4]),
        ):
            p = _field(pos, neg, get)
            if p is not None:
                preds.append(p)
    except (ValueError, TypeError) as e:
        # A value we cannot understand: an ALLOW must not widen, a DENY must not narrow.
        log.error("policy %s: invalid match value (%s); failing closed", policy_key, e)
        return never if action == ALLOW else always

    if not preds:
        if m.has_l7:
            # DENY with only L7 fields: ignoring them leaves a match that covers everything
            return always
        # ztunnel skips an empty match: it matches nothing
        return never
    if len(preds) == 1:
        return preds[0]
    return lambda facts: all(p(facts) for p in preds)


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy turned into predicates over "facts" (L4 facts here, a request at L7)."""

    key: str
    action: str  # ALLOW | DENY
    rules: tuple[tuple[tuple[Callable[[Any], bool], ...], ...], ...]  # rules → clauses → matches

    def matches(self, facts: Any) -> bool:
        for rule in self.rules:
            # all clauses must hold; a clause holds when any of its matches does
            if all(any(m(facts) for m in clause) for clause in rule):
                return True
        return False


MatchCompiler = Callable[[Match, str, str], Callable[[Any], bool]]


def compile_policy(policy: Policy, compile_match: MatchCompiler) -> CompiledPolicy:
    action = policy.action.upper() if isinstance(policy.action, str) else ""
    if action not in (ALLOW, DENY):
        # unknown action: treat as a DENY of everything rather than silently ignore it
        log.error("policy %s: unsupported action %r; denying", policy.key, policy.action)
        return CompiledPolicy(policy.key, DENY, (((always,),),))
    rules = tuple(
        tuple(
            tuple(compile_match(m, action, policy.key) for m in clause.matches)
            for clause in rule.clauses
        )
        for rule in policy.rules
    )
    return CompiledPolicy(policy.key, action, rules)


# Policies hold dicts, so they are not hashable: cache by object id, keeping the object
# alive in the entry so the id cannot be reused while the entry exists.
_CACHE_MAX = 4096
_cache: dict[tuple[int, MatchCompiler], tuple[Policy, CompiledPolicy]] = {}


def compiled(policy: Policy, compile_match: MatchCompiler | None = None) -> CompiledPolicy:
    compile_match = compile_match or compile_l4_match
    key = (id(policy), compile_match)
    entry = _cache.get(key)
    if entry is not None and entry[0] is policy:
        return entry[1]
    c = compile_policy(policy, compile_match)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()  # state churn: start over rather than track recency
    _cache[key] = (policy, c)
    return c


def evaluate(policies: Iterable[Policy], facts: Any, compile_match: MatchCompiler) -> Decision:
    """ztunnel's order: any DENY match denies; no ALLOW policy allows; an ALLOW match allows;
    otherwise deny."""
    allow_seen = False
    allow_match: str | None = None
    for policy in policies:
        c = compiled(policy, compile_match)
        if c.action == DENY:
            if c.matches(facts):
                return Decision(False, c.key, f"denied by DENY policy {c.key}")
        else:
            allow_seen = True
            if allow_match is None and c.matches(facts):
                allow_match = c.key
    if not allow_seen:
        return Decision(True, None, "no ALLOW policy applies")
    if allow_match is not None:
        return Decision(True, allow_match, f"allowed by policy {allow_match}")
    return Decision(False, None, "no ALLOW policy matched")


# -- evaluation ----------------------------------------------------------------------------


def _ip(value: str) -> _IP | None:
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])
    except (ValueError, AttributeError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def facts(conn: Connection) -> Facts:
    principal: str | None = None
    namespace: str | None = None
    ident = conn.src_identity
    if ident:
        if ident.startswith(_SPIFFE):
            principal = ident[len(_SPIFFE) :]
            parts = principal.split("/")
            if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2]:
                namespace = parts[2]
        else:
            log.warning("caller identity %r is not a SPIFFE id; treating as none", ident)
    return (principal, namespace, _ip(conn.src_ip), _ip(conn.dst_ip), int(conn.dst_port))


def authorize(policies: Iterable[Policy], conn: Connection) -> Decision:
    """Decide whether ``conn`` may reach its destination under ``policies``.

    ``policies`` are those that apply to the destination workload
    (``MeshState.policies_for``). Never raises on bad policy content: it fails closed.
    """
    return evaluate(policies, facts(conn), compile_l4_match)

"""L7 authorization at the gateway: AuthorizationPolicy with methods, paths and headers.

The evaluation order and the L4 fields are exactly the node proxy's
(:mod:`ztunnel.policy`, reused here rather than copied): any DENY match denies; no ALLOW
policy allows; an ALLOW match allows; otherwise deny. The difference is that the gateway can
see the HTTP request, so the L7 fields are checked for real instead of failing closed:

- ``methods`` / ``not_methods``: exact (HTTP methods are case-sensitive);
- ``paths`` / ``not_paths``: Istio string match on the path without its query — exact,
  ``prefix*``, ``*suffix`` or ``*``;
- ``headers``: name → values, the name case-insensitive, each value an Istio string match
  (``*`` = present and non-empty); a repeated header matches when any of its values does.

Give it the path :func:`l7gateway.matching.normalize_path` produced, the same one routing
used. Never raises on bad policy content: it fails closed (an ALLOW never widens, a DENY
never narrows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from nodeproxy.model import Match, Policy
from ztunnel.policy import (
    ALLOW,
    Connection,
    Decision,
    Facts,
    always,
    compile_l4_match,
    evaluate,
    facts,
    never,
    string_matcher,
)

log = logging.getLogger(__name__)

Headers = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class _Request:
    facts: Facts  # the L4 facts, in ztunnel.policy's form
    method: str
    path: str
    headers: dict[str, list[str]]


_Pred = Callable[[_Request], bool]




def _has_l4(m: Match) -> bool:
    return bool(
        m.namespaces
        or m.not_namespaces
        or m.principals
        or m.not_principals
        or m.source_ips
        or m.not_source_ips
        or m.destination_ips
        or m.not_destination_ips
        or m.destination_ports
        or m.not_destination_ports
    )


def _strings(values: Iterable[str], get: Callable[[_Request], str | None]) -> list[_Pred]:
    ms = [string_matcher(v) for v in values]
    return [lambda r, m=m: m(get(r)) for m in ms]


def _field(pos: list[_Pred], neg: list[_Pred]) -> _Pred | None:
    if not pos and not neg:
        return None

    def pred(r: _Request) -> bool:
        if pos and not any(p(r) for p in pos):
            return False
        return not any(n(r) for n in neg)

    return pred


def _header_pred(name: str, patterns: Iterable[str]) -> _Pred:
    low = name.lower()
    ms = [string_matcher(p) for p in patterns]

    def pred(r: _Request) -> bool:
        values = r.headers.get(low)
        if not values:
            return False
        return any(m(v) for v in values for m in ms)

    return pred


def _compile_l7_match(m: Match, action: str, key: str) -> _Pred:
    try:
        preds: list[_Pred] = []
        if _has_l4(m):
            # the node proxy's own compilation of the L4 fields
            l4 = compile_l4_match(
                replace(m, methods=(), not_methods=(), paths=(), not_paths=(), headers={}),
                action,
                key,
            )
            preds.append(lambda r, f=l4: f(r.facts))
        for pos, neg in (
            (
                [lambda r, s=frozenset(m.methods): r.method in s] if m.methods else [],
                [lambda r, s=frozenset(m.not_methods): r.method in s] if m.not_methods else [],
            ),
            (_strings(m.paths, lambda r: r.path), _strings(m.not_paths, lambda r: r.path)),
        ):
            p = _field(pos, neg)
            if p is not None:
                preds.append(p)
        for name, patterns in m.headers.items():
            preds.append(_header_pred(name, tuple(patterns)))
    except (ValueError, TypeError, AttributeError) as e:
        log.error("policy %s: invalid match value (%s); failing closed", key, e)
        return never if action == ALLOW else always
    if not preds:
        return never  # an empty match matches nothing, as in ztunnel
    if len(preds) == 1:
        return preds[0]
    return lambda r: all(p(r) for p in preds)


def authorize_request(
    policies: Iterable[Policy],
    conn: Connection,
    method: str,
    path: str,
    headers: Headers,
) -> Decision:
    """Decide whether the request may pass; denied requests get 403 from the gateway.

    ``path`` may carry a query (it is ignored); ``headers`` is a mapping or a list of pairs.
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    hdrs: dict[str, list[str]] = {}
    for k, v in items:
        hdrs.setdefault(k.lower(), []).append(v)
    req = _Request(facts(conn), method, path.split("?", 1)[0], hdrs)
    return evaluate(policies, req, _compile_l7_match)

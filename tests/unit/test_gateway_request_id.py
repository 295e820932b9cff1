"""x-request-id values the gateway starts are random version-4 UUIDs (formatted by hand)."""

from __future__ import annotations

import uuid

from l7gateway.forward import _request_id


def test_request_ids_are_random_uuid4_in_canonical_form():
    ids = [_request_id() for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 4 and u.variant == uuid.RFC_4122
    # every random hex position takes every value (no position stuck or biased to a range)
    for pos in range(36):
        if pos in (8, 13, 14, 18, 19, 23):  # dashes, the version digit, the variant digit
            continue
        assert len({rid[pos] for rid in ids}) == 16, pos
    assert {rid[19] for rid in ids} == set("89ab")

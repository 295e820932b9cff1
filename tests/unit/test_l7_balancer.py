"""Endpoint choice (P2C over peak EWMA), outlier ejection, and weighted backend choice."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from l7gateway.balancer import Balancer, is_failure, pick_backend
from nodeproxy.routes import BackendRef


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


def balancer(eps=("a", "b", "c"), seed=1, **kw):
    clock = Clock()
    return Balancer(list(eps), random.Random(seed), clock, **kw), clock


def serve(b, clock, ep, latency, ok=True):
    t = b.start(ep)
    clock.advance(latency)
    b.finish(t, ok)


# -- MeshHTTPRouteWeight / MeshTrafficSplit ----------------------------------------------


def test_weights_70_30_within_5_percent():
    backends = [BackendRef("v1", "shop", 80, weight=70), BackendRef("v2", "shop", 80, weight=30)]
    for seed in range(5):
        rng = random.Random(seed)
        counts = Counter(pick_backend(backends, rng).name for _ in range(10_000))
        assert abs(counts["v1"] / 10_000 - 0.70) < 0.05
        assert abs(counts["v2"] / 10_000 - 0.30) < 0.05


@pytest.mark.parametrize(
    "weights,want",
    [
        ((0, 0), None),  # all zero → the gateway answers 500
        ((), None),
        ((0, 5), {"b1"}),  # a zero weight is never picked
        ((1,), {"b0"}),
        ((3, 1), {"b0", "b1"}),
    ],
)
def test_pick_backend_edges(weights, want):
    backends = [BackendRef(f"b{i}", "ns", 80, weight=w) for i, w in enumerate(weights)]
    rng = random.Random(0)
    got = {getattr(pick_backend(backends, rng), "name", None) for _ in range(3000)}
    assert got == ({None} if want is None else want)


def test_is_failure():
    assert is_failure(None) and is_failure(503) and not is_failure(404)
    assert not is_failure(503, count_5xx=False) and is_failure(None, count_5xx=False)


# -- P2C over peak EWMA --------------------------------------------------------------------


def test_prefers_the_faster_endpoint():
    b, clock = balancer(("fast", "slow"))
    for _ in range(5):
        serve(b, clock, "fast", 0.005)
        serve(b, clock, "slow", 0.300)
    picks = Counter(b.pick() for _ in range(200))
    assert picks["fast"] == 200
    assert b.cost("fast") < b.cost("slow")


def test_among_many_the_slow_one_is_picked_rarely():
    b, clock = balancer(("a", "b", "c", "d"), seed=5)
    for ep in "abcd":
        serve(b, clock, ep, 0.010 if ep != "d" else 0.500)
    picks = Counter(b.pick() for _ in range(3000))
    # P2C: the worst endpoint loses every comparison it is drawn into; the others share
    assert picks["d"] == 0 and all(picks[e] > 0 for e in "abc")


def test_pending_requests_raise_the_cost():
    b, _ = balancer(("a", "b"))
    t1, t2 = b.start("a"), b.start("a")  # a has two in flight
    assert b.pick() == "b"
    b.finish(t1, True, 0.03)
    b.finish(t2, True, 0.03)
    assert b.cost("a") == pytest.approx(b.cost("b"), rel=0.01)


def test_peak_then_decay():
    b, clock = balancer(("a",), decay=10.0)
    serve(b, clock, "a", 1.0)
    peak = b.cost("a")
    assert peak == pytest.approx(1.0)
    clock.advance(10.0)
    # with time the estimate decays toward zero, so a once-slow endpoint is tried again
    assert b.cost("a") == pytest.approx(peak * 0.3679, rel=0.01)
    # a lower sample is blended in with the time since the last one
    t = b.start("a")
    b.finish(t, True, 0.01)
    assert 0.01 < b.cost("a") < peak


def test_excludes_endpoints_already_tried():
    b, clock = balancer(("a", "b", "c"))
    for _ in range(200):
        assert b.pick(exclude={"a", "b"}) == "c"
        assert b.pick(exclude={"a"}) in {"b", "c"}
    # when every endpoint was tried, reuse one rather than fail
    assert b.pick(exclude={"a", "b", "c"}) in {"a", "b", "c"}


def test_no_endpoints():
    b, _ = balancer(())
    assert b.pick() is None


def test_update_keeps_stats_of_endpoints_that_stay():
    b, clock = balancer(("fast", "slow", "gone"))
    serve(b, clock, "fast", 0.001)
    serve(b, clock, "slow", 0.5)
    t = b.start("gone")
    b.update(["fast", "slow", "new"])
    assert b.endpoints == ["fast", "slow", "new"]
    assert b.cost("slow") > 0.4 and b.cost("fast") < 0.03
    assert b.cost("new") == pytest.approx(0.030)  # default RTT
    b.finish(t, False)  # a token for an endpoint that left is ignored
    assert "gone" not in b.endpoints
    # an endpoint that leaves and comes back starts afresh; old tokens do not touch it
    t = b.start("slow")
    b.update(["fast"])
    b.update(["fast", "slow"])
    b.finish(t, False, 9.0)
    assert b.cost("slow") == pytest.approx(0.030)


# -- outlier ejection ----------------------------------------------------------------------


def fail(b, clock, ep, n=1):
    for _ in range(n):
        serve(b, clock, ep, 0.001, ok=False)


def test_seven_consecutive_failures_eject_for_one_second():
    b, clock = balancer(("a", "b", "c"))
    fail(b, clock, "a", 6)
    assert not b.ejected("a")
    fail(b, clock, "a")
    assert b.ejected("a")
    assert all(b.pick() != "a" for _ in range(200))
    clock.advance(0.99)
    assert b.ejected("a")
    clock.advance(0.02)
    assert not b.ejected("a")  # half-open: a probe may go


def test_success_resets_the_consecutive_count():
    b, clock = balancer(("a", "b", "c"))
    for _ in range(5):
        fail(b, clock, "a", 6)
        serve(b, clock, "a", 0.001)
    assert not b.ejected("a")


def test_threshold_is_configurable():
    b, clock = balancer(("a", "b", "c"), consecutive_failures=5)
    fail(b, clock, "a", 5)
    assert b.ejected("a")


def test_only_one_probe_after_ejection_then_recovery():
    b, clock = balancer(("a", "b", "c"))
    fail(b, clock, "a", 7)
    clock.advance(1.0)
    assert b.pick(exclude={"b", "c"}) == "a"
    probe = b.start("a")
    # while the probe is in flight, nobody else gets "a"
    assert all(b.pick() != "a" for _ in range(100))
    assert b.ejected("a")
    clock.advance(0.01)
    b.finish(probe, True)
    assert not b.ejected("a")
    # recovered: the next 6 failures do not eject, the 7th does, for 1 s again (reset)
    fail(b, clock, "a", 6)
    assert not b.ejected("a")
    fail(b, clock, "a")
    clock.advance(0.999)
    assert b.ejected("a")
    clock.advance(0.002)
    assert not b.ejected("a")


def test_failed_probes_double_the_penalty_up_to_a_minute():
    b, clock = balancer(("a", "b", "c"))
    fail(b, clock, "a", 7)
    periods = []
    for _ in range(9):
        start = clock.now
        while b.ejected("a"):
            clock.advance(0.5)
        periods.append(round(clock.now - start))
        probe = b.start("a")
        assert probe.probe
        b.finish(probe, False, 0.001)  # the probe fails: ejected again at once
    assert periods == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_all_ejected_panics_instead_of_blacking_out():
    b, clock = balancer(("a", "b"))
    fail(b, clock, "a", 7)
    fail(b, clock, "b", 7)
    assert b.ejected("a") and b.ejected("b")
    assert b.pick() in {"a", "b"}  # Envoy's panic mode: spread over everything
    strict, sclock = balancer(("a", "b"), panic_threshold=0.0)
    fail(strict, sclock, "a", 7)
    fail(strict, sclock, "b", 7)
    assert strict.pick() is None


def test_one_of_two_ejected_is_avoided():
    b, clock = balancer(("a", "b"))
    fail(b, clock, "a", 7)
    assert all(b.pick() == "b" for _ in range(100))


def test_fast_failures_do_not_attract_traffic():
    b, clock = balancer(("good", "bad"), consecutive_failures=100)
    for _ in range(20):
        serve(b, clock, "good", 0.050)
        serve(b, clock, "bad", 0.0001, ok=False)
    assert b.cost("bad") >= b.cost("good") * 0.5


def test_requests_the_client_abandoned_never_eject_an_endpoint():
    b, clock = balancer(("a", "b", "c"))
    for _ in range(50):  # e.g. a load generator cancelling its in-flight requests
        t = b.start("a")
        clock.advance(0.001)
        b.release(t)
    assert not b.ejected("a")
    assert b.cost("a") == b.cost("b")  # nothing pending, nothing learned
    fail(b, clock, "a", 7)
    assert b.ejected("a")  # real failures still count

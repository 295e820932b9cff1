"""Retry decisions, back-off bounds, the retry budget, the replay buffer, deadlines."""

from __future__ import annotations

import random

import pytest

from l7gateway.retry import (
    CONNECT_FAILURE,
    DEFAULT_POLICY,
    REFUSED_STREAM,
    RESET,
    TIMEOUT,
    BodyBuffer,
    Deadline,
    RetryBudget,
    backoff_delay,
    policy_backoff,
    should_retry,
)
from nodeproxy.routes import RetryPolicy, Timeouts

ROUTE = RetryPolicy(codes=(500, 502, 503, 504), attempts=3, backoff=0.1)


@pytest.mark.parametrize(
    "policy,outcome,method,so_far,replayable,want",
    [
        # configured codes, idempotent methods
        (ROUTE, 503, "GET", 0, True, True),
        (ROUTE, 500, "PUT", 0, True, True),
        (ROUTE, 504, "DELETE", 2, True, True),
        (ROUTE, 501, "GET", 0, True, False),  # not a listed code
        (ROUTE, 200, "GET", 0, True, False),
        (ROUTE, 404, "GET", 0, True, False),
        # attempts = retries after the first try
        (ROUTE, 503, "GET", 3, True, False),
        (RetryPolicy(codes=(503,), attempts=0), 503, "GET", 0, True, False),
        # non-idempotent methods: only when the request provably never got processed
        (ROUTE, 503, "POST", 0, True, False),
        (ROUTE, 503, "PATCH", 0, True, False),
        (ROUTE, CONNECT_FAILURE, "POST", 0, True, True),
        (ROUTE, REFUSED_STREAM, "PATCH", 0, True, True),
        (ROUTE, RESET, "POST", 0, True, False),
        (ROUTE, TIMEOUT, "POST", 0, True, False),
        # a per-attempt timeout counts as 504, a broken connection as 502
        (ROUTE, TIMEOUT, "GET", 0, True, True),
        (ROUTE, RESET, "GET", 0, True, True),
        (RetryPolicy(codes=(503,), attempts=3), TIMEOUT, "GET", 0, True, False),
        # connection failures are retried even without codes, still within attempts
        (RetryPolicy(codes=(), attempts=1), CONNECT_FAILURE, "GET", 0, True, True),
        (RetryPolicy(codes=(), attempts=1), CONNECT_FAILURE, "GET", 1, True, False),
        # a body past the replay buffer is never retried
        (ROUTE, 503, "PUT", 0, False, False),
        (ROUTE, CONNECT_FAILURE, "POST", 0, False, False),
        # a 4xx code can be listed too
        (RetryPolicy(codes=(429,), attempts=1), 429, "GET", 0, True, True),
        # Istio's default policy: 2 retries on connect-failure, refused-stream, 503
        (None, 503, "GET", 0, True, True),
        (None, 503, "GET", 1, True, True),
        (None, 503, "GET", 2, True, False),
        (None, 500, "GET", 0, True, False),
        (None, CONNECT_FAILURE, "POST", 0, True, True),
        (None, REFUSED_STREAM, "POST", 1, True, True),
        (None, 503, "POST", 0, True, False),
        # codes without attempts: 2 retries
        (RetryPolicy(codes=(500,)), 500, "GET", 1, True, True),
        (RetryPolicy(codes=(500,)), 500, "GET", 2, True, False),
        # an outcome we do not know is not retried
        (ROUTE, "weird", "GET", 0, True, False),
    ],
)
def test_should_retry(policy, outcome, method, so_far, replayable, want):
    v = should_retry(policy, outcome, method, so_far, replayable)
    assert v.retry is want, v.reason


def test_reasons_say_why():
    assert "exhausted" in should_retry(ROUTE, 503, "GET", 3).reason
    assert "POST" in should_retry(ROUTE, 503, "POST", 0).reason
    assert "replay buffer" in should_retry(ROUTE, 503, "GET", 0, False).reason


def test_default_policy_is_istios():
    assert DEFAULT_POLICY.codes == (503,) and DEFAULT_POLICY.attempts == 2
    assert policy_backoff(None) == 0.025
    assert policy_backoff(ROUTE) == 0.1


# -- back-off ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,upper", [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (10, 0.25), (100, 0.25)]
)
def test_backoff_bounds_default_base(n, upper):
    rng = random.Random(n)
    delays = [backoff_delay(n, 0.025, rng) for _ in range(2000)]
    assert all(0 <= d < upper for d in delays)
    # fully jittered: the whole range is used
    assert min(delays) < upper * 0.05 and max(delays) > upper * 0.95


def test_backoff_scales_with_route_base_and_is_deterministic_for_a_seed():
    a = [backoff_delay(n, 0.1, random.Random(42)) for n in range(1, 8)]
    b = [backoff_delay(n, 0.1, random.Random(42)) for n in range(1, 8)]
    assert a == b
    rng = random.Random(1)
    assert all(backoff_delay(20, 0.1, rng) < 1.0 for _ in range(1000))  # capped at 10×base


# -- retry budget --------------------------------------------------------------------------


def test_budget_allows_minimum_concurrent_retries():
    b = RetryBudget(ratio=0.2, min_concurrent=3)
    b.start_request()
    assert [b.try_start_retry() for _ in range(4)] == [True, True, True, False]
    b.finish_retry()
    assert b.try_start_retry()


def test_budget_grows_with_active_requests_and_is_exhausted():
    b = RetryBudget(ratio=0.2, min_concurrent=3)
    for _ in range(50):
        b.start_request()
    granted = sum(b.try_start_retry() for _ in range(100))
    assert granted == 10  # 20 % of 50
    # when requests finish the budget shrinks: no new retries until retries drain
    for _ in range(40):
        b.finish_request()
    assert not b.try_start_retry()
    for _ in range(8):
        b.finish_retry()
    assert b.active_retries == 2 and b.try_start_retry()


def test_budget_counters_never_go_negative():
    b = RetryBudget()
    b.finish_request()
    b.finish_retry()
    assert b.active_requests == 0 and b.active_retries == 0
    with pytest.raises(ValueError):
        RetryBudget(ratio=-1)


# -- body replay buffer --------------------------------------------------------------------


def test_body_within_limit_is_replayed_exactly():
    buf = BodyBuffer(limit=10)
    for chunk in (b"abc", b"", b"defg", b"hij"):
        buf.feed(chunk)
    assert buf.replayable and b"".join(buf.replay()) == b"abcdefghij"


def test_body_over_limit_is_not_replayable():
    buf = BodyBuffer(limit=10)
    buf.feed(b"12345")
    buf.feed(b"678901")
    assert not buf.replayable and buf.size == 11
    buf.feed(b"more")
    assert not buf.replayable
    with pytest.raises(ValueError):
        buf.replay()
    assert not should_retry(ROUTE, 503, "PUT", 0, buf.replayable).retry


def test_default_body_limit_is_64k():
    buf = BodyBuffer()
    buf.feed(b"x" * 65536)
    assert buf.replayable
    buf.feed(b"x")
    assert not buf.replayable


def test_empty_body_is_replayable():
    assert list(BodyBuffer().replay()) == []


# -- deadlines -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timeouts,now,remaining,attempt",
    [
        (None, 100.0, None, None),
        (Timeouts(), 100.0, None, None),
        (Timeouts(request=10.0), 100.0, 10.0, 10.0),
        (Timeouts(request=10.0), 107.5, 2.5, 2.5),
        (Timeouts(request=10.0), 111.0, 0.0, 0.0),
        (Timeouts(request=10.0, backend_request=3.0), 100.0, 10.0, 3.0),
        (Timeouts(request=10.0, backend_request=3.0), 108.0, 2.0, 2.0),  # what is left wins
        (Timeouts(backend_request=3.0), 150.0, None, 3.0),
        (Timeouts(request=0.0, backend_request=3.0), 150.0, None, 3.0),  # 0 = no timeout
        (Timeouts(request=10.0, backend_request=0.0), 101.0, 9.0, 9.0),
    ],
)
def test_deadline_arithmetic(timeouts, now, remaining, attempt):
    d = Deadline.start(100.0, timeouts)
    left, got = d.remaining(now), d.attempt_timeout(now)
    if remaining is None:
        assert left is None
    else:
        assert left == pytest.approx(remaining)
    if attempt is None:
        assert got is None
    else:
        assert got == pytest.approx(attempt)


def test_deadline_allows_a_retry_only_if_the_backoff_fits():
    d = Deadline.start(0.0, Timeouts(request=1.0))
    assert d.allows(0.5, 0.2)
    assert not d.allows(0.9, 0.2)
    assert d.expired(1.0) and not d.expired(0.99)
    assert Deadline.start(0.0, None).allows(1e9, 1e9)


def test_a_retry_loop_over_the_pieces():
    """Drive the pieces the way the gateway will: a flaky backend rescued by a retry."""
    rng = random.Random(3)
    budget = RetryBudget()
    clock = 0.0
    deadline = Deadline.start(clock, Timeouts(request=1.0, backend_request=0.3))
    outcomes = iter([503, 503, 200])
    budget.start_request()
    retries, seen = 0, []
    while True:
        assert deadline.attempt_timeout(clock) <= 0.3
        outcome = next(outcomes)
        seen.append(outcome)
        clock += 0.05
        if not should_retry(ROUTE, outcome, "GET", retries).retry:
            break
        delay = backoff_delay(retries + 1, policy_backoff(ROUTE), rng)
        assert deadline.allows(clock, delay) and budget.try_start_retry()
        clock += delay
        retries += 1
        budget.finish_retry()
    budget.finish_request()
    assert seen == [503, 503, 200] and retries == 2

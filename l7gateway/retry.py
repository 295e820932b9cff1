"""Retry decisions, back-off, the retry budget, the body replay buffer, deadlines. No IO.

How a driver uses these for one request (``clock`` is e.g. ``trio.current_time``)::

    deadline = Deadline.start(clock(), rule.timeouts)
    budget.start_request()
    body = BodyBuffer()                       # feed() every chunk sent upstream
    retries = 0
    try:
        while True:
            timeout = deadline.attempt_timeout(clock())   # None: unbounded
            outcome = ...one attempt, bounded by timeout...  # status, or CONNECT_FAILURE…
            v = should_retry(policy, outcome, method, retries, body.replayable)
            if not v.retry: break
            delay = backoff_delay(retries + 1, policy_backoff(policy), rng)
            if not deadline.allows(clock(), delay) or not budget.try_start_retry(): break
            try: ...sleep(delay); retries += 1 ...
            finally: budget.finish_retry()
    finally:
        budget.finish_request()
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from nodeproxy.routes import RetryPolicy, Timeouts

log = logging.getLogger(__name__)

# Outcomes of one attempt besides an HTTP status code
CONNECT_FAILURE = "connect-failure"  # no connection to the endpoint: never reached the app
REFUSED_STREAM = "refused-stream"  # h2 REFUSED_STREAM / above GOAWAY's last id: unprocessed
RESET = "reset"  # the connection broke after the request was sent: maybe processed
TIMEOUT = "timeout"  # timeouts.backendRequest expired for this attempt

Outcome = int | str

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
NEVER_PROCESSED = frozenset({CONNECT_FAILURE, REFUSED_STREAM})

DEFAULT_BASE_BACKOFF = 0.025
DEFAULT_BODY_LIMIT = 64 * 1024
# Istio's default when a route says nothing: 2 retries on connect-failure, refused-stream, 503
DEFAULT_POLICY = RetryPolicy(codes=(503,), attempts=2, backoff=None)
DEFAULT_ATTEMPTS = 2  # for a route ``retry`` that gives codes but no attempts


@dataclass(frozen=True)
class Verdict:
    retry: bool
    reason: str


def effective_policy(policy: RetryPolicy | None) -> RetryPolicy:
    """The route's policy, or Istio's default when the route has none."""
    return DEFAULT_POLICY if policy is None else policy


def _status_of(outcome: Outcome) -> int | None:
    """The status the client would see for a failure outcome (for ``codes`` matching)."""
    if isinstance(outcome, int):
        return outcome
    if outcome == TIMEOUT:
        return 504
    if outcome == RESET:
        return 502
    return None


def should_retry(
    policy: RetryPolicy | None,
    outcome: Outcome,
    method: str,
    retries_so_far: int,
    body_replayable: bool = True,
) -> Verdict:
    """Whether to try again after an attempt ended with ``outcome``.

    Connection failures and refused streams are retried for every method: the request
    provably never reached the application. A status in ``codes`` (a per-attempt timeout
    counts as 504, a broken connection as 502) is retried only for idempotent methods
    (RFC 9110 §9.2.2). Never past ``attempts`` retries, never with a body we cannot replay.
    """
    p = effective_policy(policy)
    attempts = DEFAULT_ATTEMPTS if p.attempts is None else p.attempts
    if isinstance(outcome, int) and outcome < 500 and outcome not in p.codes:
        return Verdict(False, "success" if outcome < 400 else "client error")
    if outcome in NEVER_PROCESSED:
        pass  # safe for any method
    else:
        status = _status_of(outcome)
        if status is None:
            log.warning("unknown attempt outcome %r; not retried", outcome)
            return Verdict(False, f"unknown outcome {outcome!r}")
        if status not in p.codes:
            return Verdict(False, f"{outcome} is not a retried code")
        if method.upper() not in IDEMPOTENT:
            return Verdict(False, f"{method} may have been processed; not retried")
    if retries_so_far >= attempts:
        return Verdict(False, f"retries exhausted ({retries_so_far}/{attempts})")
    if not body_replayable:
        return Verdict(False, "request body exceeded the replay buffer")
    return Verdict(True, f"retrying after {outcome}")


def policy_backoff(policy: RetryPolicy | None) -> float:
    p = effective_policy(policy)
    return DEFAULT_BASE_BACKOFF if not p.backoff else p.backoff


def backoff_delay(retry_number: int, base: float, rng: random.Random) -> float:
    """Envoy's fully jittered back-off before retry ``retry_number`` (1 for the first).

    Uniform in [0, (2^N − 1)·base), the upper bound capped at 10·base.
    """
    n = max(1, retry_number)
    upper = min((2**min(n, 32) - 1) * base, 10 * base)
    return rng.random() * upper


class RetryBudget:
    """Retries may be at most ``ratio`` of the active requests (but ``min_concurrent`` are
    always allowed), so a failing backend is not hammered by a retry storm."""

    def __init__(self, ratio: float = 0.2, min_concurrent: int = 3) -> None:
        if ratio < 0 or min_concurrent < 0:
            raise ValueError("ratio and min_concurrent must not be negative")
        self.ratio = ratio
        self.min_concurrent = min_concurrent
        self.active_requests = 0
        self.active_retries = 0

    def start_request(self) -> None:
        self.active_requests += 1

    def finish_request(self) -> None:
        self.active_requests = max(0, self.active_requests - 1)

    def limit(self) -> float:
        return max(self.min_concurrent, self.ratio * self.active_requests)

    def try_start_retry(self) -> bool:
        """Take a retry slot if the budget has one; pair with :meth:`finish_retry`."""
        if self.active_retries < self.limit():
            self.active_retries += 1
            return True
        return False

    def finish_retry(self) -> None:
        self.active_retries = max(0, self.active_retries - 1)


class BodyBuffer:
    """Keeps the request body sent so far, up to ``limit`` bytes, for replay on a retry.

    Once the body grows past the limit the copy is dropped and the request is no longer
    replayable (it is streamed on without retries, as Linkerd and Envoy do).
    """

    def __init__(self, limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] | None = []

    @property
    def replayable(self) -> bool:
        return self._chunks is not None

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._chunks is None:
            return
        if self.size > self.limit:
            self._chunks = None  # free it now: it can never be used
            return
        if chunk:
            self._chunks.append(bytes(chunk))

    def replay(self) -> Iterable[bytes]:
        """The chunks to send again; ValueError when the body is not replayable."""
        if self._chunks is None:
            raise ValueError("request body exceeded the replay buffer")
        return list(self._chunks)


@dataclass(frozen=True)
class Deadline:
    """``timeouts.request`` bounds the whole exchange (retries and back-offs included);
    ``timeouts.backendRequest`` bounds each attempt. None or 0 means unbounded."""

    started: float
    request: float | None = None
    backend_request: float | None = None

    @classmethod
    def start(cls, now: float, timeouts: Timeouts | None) -> Deadline:
        if timeouts is None:
            return cls(now)
        return cls(now, timeouts.request or None, timeouts.backend_request or None)

    def remaining(self, now: float) -> float | None:
        """Time left for the whole exchange (≥ 0), None when unbounded."""
        if self.request is None:
            return None
        return max(0.0, self.started + self.request - now)

    def expired(self, now: float) -> bool:
        r = self.remaining(now)
        return r is not None and r <= 0

    def attempt_timeout(self, now: float) -> float | None:
        """The bound for an attempt starting at ``now``: per-try limit and what is left."""
        left = self.remaining(now)
        if self.backend_request is None:
            return left
        if left is None:
            return self.backend_request
        return min(self.backend_request, left)

    def allows(self, now: float, delay: float) -> bool:
        """Whether a retry after sleeping ``delay`` would still have time to run."""
        left = self.remaining(now)
        return left is None or left > delay

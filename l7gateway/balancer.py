"""Endpoint choice per request, and the weighted choice among a rule's backends. No IO.

:class:`Balancer` is power of two choices over a peak-EWMA latency estimate multiplied by
the requests in flight (Linkerd's and tower's ``PeakEwma``): an endpoint's cost is
``rtt · (pending + 1)``; a sample above the estimate replaces it (peak), a lower one is
blended in with weight ``1 − exp(−elapsed/decay)``, and between samples the estimate decays
toward zero so a once-slow endpoint is eventually tried again. Endpoints without a sample
start at ``default_rtt``.

Outlier ejection: ``consecutive_failures`` failures in a row eject an endpoint for
``base_ejection`` seconds, doubling with every repeated ejection up to ``max_ejection``.
When the time is up one probe request is let through (half-open): success restores the
endpoint and forgets its ejections, failure ejects it again for longer. When fewer than
``panic_threshold`` of the endpoints are available, ejection is ignored (Envoy's panic
mode), so a small service is not blacked out by its own outlier detection.

The clock is passed in (``trio.current_time`` in the gateway) and so is the rng: tests are
deterministic.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nodeproxy.routes import BackendRef

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def pick_backend(backends: Sequence[BackendRef], rng: random.Random) -> BackendRef | None:
    """Weighted choice among a rule's backendRefs; None when there are none or every
    weight is 0 (the gateway answers 500)."""
    total = sum(b.weight for b in backends)
    if total <= 0:
        return None
    x = rng.random() * total
    for b in backends:
        if b.weight <= 0:
            continue
        x -= b.weight
        if x < 0:
            return b
    return next(b for b in reversed(backends) if b.weight > 0)  # float rounding at the top


def is_failure(status: int | None, *, count_5xx: bool = True) -> bool:
    """Whether an attempt's outcome counts toward ejection: no response (``None``: connect
    failure, reset, timeout) always; a 5xx status when ``count_5xx``."""
    if status is None:
        return True
    return count_5xx and status >= 500


@dataclass
class _Stats:
    rtt: float  # the estimate, seconds
    updated: float  # when ``rtt`` was last set
    pending: int = 0
    failures: int = 0  # consecutive
    ejections: int = 0  # how many times in a row it was ejected
    ejected_until: float | None = None
    probing: bool = False  # a half-open probe is in flight
    generation: int = 0  # new each time the endpoint (re)joins, so old tokens are ignored


@dataclass(frozen=True)
class Token:
    endpoint: str
    started: float
    generation: int
    probe: bool = False
    _id: object = field(default_factory=object, compare=False)


class Balancer:
    def __init__(
        self,
        endpoints: Iterable[str],
        rng: random.Random,
        clock: Clock,
        *,
        default_rtt: float = 0.030,
        decay: float = 10.0,
        consecutive_failures: int = 7,
        base_ejection: float = 1.0,
        max_ejection: float = 60.0,
        panic_threshold: float = 0.5,
    ) -> None:
        self.rng = rng
        self.clock = clock
        self.default_rtt = default_rtt
        self.decay = decay
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.panic_threshold = panic_threshold
        self._stats: dict[str, _Stats] = {}
        self._order: list[str] = []
        self._generations = itertools.count(1)
        self.update(endpoints)

    # -- membership ------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return list(self._order)

    def update(self, endpoints: Iterable[str]) -> None:
        """Replace the endpoint set; endpoints that stay keep their statistics."""
        now = self.clock()
        new = list(dict.fromkeys(endpoints))
        for ep in self._order:
            if ep not in new:
                del self._stats[ep]
        for ep in new:
            if ep not in self._stats:
                self._stats[ep] = _Stats(
                    rtt=self.default_rtt, updated=now, generation=next(self._generations)
                )
        self._order = new

    # -- state -----------------------------------------------------------------------------
    def _available(self, s: _Stats, now: float) -> bool:
        if s.ejected_until is None:
            return True
        # ejected: only once the time is up, and only one probe at a time
        return now >= s.ejected_until and not s.probing

    def ejected(self, ep: str) -> bool:
        s = self._stats.get(ep)
        return s is not None and not self._available(s, self.clock())

    def cost(self, ep: str) -> float:
        s = self._stats[ep]
        return self._cost(s, self.clock())

    def _cost(self, s: _Stats, now: float) -> float:
        elapsed = max(0.0, now - s.updated)
        rtt = s.rtt * math.exp(-elapsed / self.decay)
        return rtt * (s.pending + 1)

    # -- choice ----------------------------------------------------------------------------
    def pick(self, exclude: Iterable[str] = ()) -> str | None:
        """Choose an endpoint, preferring one not in ``exclude`` (those this request already
        tried). None when there is no endpoint or every one is ejected (and not panicking)."""
        if not self._order:
            return None
        now = self.clock()
        available = [ep for ep in self._order if self._available(self._stats[ep], now)]
        if len(available) < self.panic_threshold * len(self._order):
            # too few left: spread over all rather than overload the few (or none)
            available = list(self._order)
        if not available:
            return None
        skip = set(exclude)
        fresh = [ep for ep in available if ep not in skip]
        candidates = fresh or available
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        ca, cb = self._cost(self._stats[a], now), self._cost(self._stats[b], now)
        return a if ca <= cb else b

    def start(self, ep: str) -> Token:
        """Record that a request to ``ep`` begins; pass the token to :meth:`finish`."""
        now = self.clock()
        s = self._stats.get(ep)
        if s is None:
            return Token(ep, now, -1)
        s.pending += 1
        probe = False
        if s.ejected_until is not None and now >= s.ejected_until and not s.probing:
            s.probing = True
            probe = True
        return Token(ep, now, s.generation, probe)

    def finish(self, token: Token, ok: bool, latency_s: float | None = None) -> None:
        """Record the outcome. ``latency_s`` defaults to the time since :meth:`start`."""
        s = self._stats.get(token.endpoint)
        if s is None or token.generation != s.generation:
            return  # the endpoint left (or came back anew) meanwhile
        now = self.clock()
        s.pending = max(0, s.pending - 1)
        latency = now - token.started if latency_s is None else max(0.0, latency_s)
        if not ok:
            # a fast failure must not make a broken endpoint look attractive
            latency = max(latency, s.rtt)
        self._observe(s, now, latency)
        if token.probe:
            s.probing = False
        if ok:
            s.failures = 0
            if token.probe or (s.ejected_until is not None and now >= s.ejected_until):
                log.info("endpoint %s recovered", token.endpoint)
                s.ejected_until = None
                s.ejections = 0
            return
        s.failures += 1
        if token.probe:
            self._eject(token.endpoint, s, now)  # the probe failed: out again, for longer
        elif s.ejected_until is None and s.failures >= self.consecutive_failures:
            self._eject(token.endpoint, s, now)

    def release(self, token: Token) -> None:
        """The request ended without telling anything about the endpoint (the client went
        away, or the whole request was cancelled): only its pending count drops."""
        s = self._stats.get(token.endpoint)
        if s is None or token.generation != s.generation:
            return
        s.pending = max(0, s.pending - 1)
        if token.probe:
            s.probing = False  # let another request probe

    def _eject(self, ep: str, s: _Stats, now: float) -> None:
        duration = min(self.base_ejection * 2 ** min(s.ejections, 32), self.max_ejection)
        s.ejections += 1
        s.ejected_until = now + duration
        s.failures = 0
        log.warning("endpoint %s ejected for %.1fs (ejection %d)", ep, duration, s.ejections)

    def _observe(self, s: _Stats, now: float, sample: float) -> None:
        if sample > s.rtt:
            s.rtt = sample  # peak: the worst recent value is the estimate
        else:
            w = math.exp(-max(0.0, now - s.updated) / self.decay)
            s.rtt = s.rtt * w + sample * (1 - w)
        s.updated = now

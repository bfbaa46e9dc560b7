"""Per-app push rate limits: one token bucket per app, in process (pure; the clock is injected).

A request costs one token per message. The bucket holds one second of tokens; a request is
admitted when the bucket holds ``min(cost, capacity)`` tokens and then pays its full cost, so
the balance may go negative. That keeps the long-run rate exact without starving a batch larger
than one second's allowance: it goes through, and the app waits for the debt to be repaid.
Each center limits on its own, so N centers admit up to N x the rate; the limit protects the
system from a runaway app, it is not a billing meter.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = now

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = min(self.tokens, self.capacity)

    def take(self, cost: float, now: float) -> float:
        """0.0 if admitted (tokens paid), else the seconds until it would be admitted."""
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        need = min(cost, self.capacity)
        if self.tokens >= need:
            self.tokens -= cost
            return 0.0
        return (need - self.tokens) / self.rate


class RateLimiter:
    """Buckets by app id. ``rate_per_s`` comes from the App record on every call, so an edited
    limit applies as soon as the app cache refreshes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, app_id: str, rate_per_s: float, cost: int = 1) -> float:
        """0.0 = go ahead; > 0 = rate limited, retry after that many seconds."""
        if rate_per_s <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(app_id)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._buckets.clear()  # apps are few; this only guards against a bug creating endless ids
            bucket = self._buckets[app_id] = TokenBucket(rate_per_s, now)
        elif bucket.rate != rate_per_s:
            bucket.set_rate(rate_per_s)
        return bucket.take(cost, now)

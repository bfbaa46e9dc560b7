"""What to do with a webhook response, and when to try again (pure; no clock, no I/O)."""

from __future__ import annotations

import enum
import random


class Verdict(enum.Enum):
    DONE = "done"      # 2xx: the app server has the events
    RETRY = "retry"    # 408, 429, 5xx, timeout, connection error: the app server may recover
    DROP = "drop"      # any other status: the request itself is refused; retrying cannot help


RETRY_STATUSES = frozenset({408, 429})


def classify(status: int | None) -> Verdict:
    """``status`` None means no HTTP answer (timeout, connection refused or reset)."""
    if status is None:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DONE
    if status in RETRY_STATUSES or 500 <= status < 600:
        return Verdict.RETRY
    return Verdict.DROP


class RetryPolicy:
    """Exponential backoff with jitter: the n-th retry waits ``base * 2**(n-1)`` capped at
    ``cap``, then a random value in [half of that, all of it] so that many coordinators
    retrying one recovering app server do not arrive in lock step, while the schedule
    still grows (0.5 s, 1 s, 2 s, ... 30 s with the defaults)."""

    __slots__ = ("max_attempts", "base_s", "cap_s", "_rng")

    def __init__(self, max_attempts: int = 8, base_s: float = 0.5, cap_s: float = 30.0,
                 rng: random.Random | None = None) -> None:
        if max_attempts < 1 or base_s <= 0 or cap_s < base_s:
            raise ValueError("need max_attempts >= 1 and 0 < base_s <= cap_s")
        self.max_attempts = max_attempts
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng or random.Random()

    def ceiling(self, retry: int) -> float:
        """The un-jittered wait before retry number ``retry`` (1-based)."""
        return min(self.cap_s, self.base_s * (2 ** min(retry - 1, 62)))

    def delay(self, retry: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry ``retry``; a server's Retry-After wins, within the cap."""
        if retry_after_s is not None and retry_after_s >= 0:
            return min(self.cap_s, retry_after_s)
        ceiling = self.ceiling(retry)
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def should_retry(self, attempts_made: int) -> bool:
        return attempts_made < self.max_attempts

"""Reconnect delays: exponential with full jitter, so a fleet of clients cut off together does
not come back together (AWS Architecture Blog, "Exponential Backoff And Jitter")."""

from __future__ import annotations

import random


class ReconnectBackoff:
    __slots__ = ("min_s", "max_s", "attempt", "_rng")

    def __init__(self, min_s: float = 0.5, max_s: float = 30.0, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("need 0 < min_s <= max_s")
        self.min_s = min_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int) -> float:
        return min(self.max_s, self.min_s * (2 ** min(attempt, 62)))

    def next(self) -> float:
        """The delay before the next attempt: uniform in [0, min_s * 2**attempt] capped at max_s."""
        delay = self._rng.uniform(0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0

    def jitter(self, base_s: float, spread: float = 0.2) -> float:
        """``base_s`` plus up to ``spread`` of it (for a server's retry_after)."""
        return base_s + self._rng.uniform(0, base_s * spread + 0.05)

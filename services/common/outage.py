"""OutageLog: one warning when a backend starts failing, not one per failed call."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class OutageLog:
    """One warning when a backend starts failing, one info line when it answers again, and a
    reminder at most every ``every_s`` in between (an outage under load is not 10k log lines)."""

    __slots__ = ("backend", "every_s", "_down_since", "_last_line", "_failures")

    def __init__(self, backend: str, every_s: float = 30.0) -> None:
        self.backend = backend
        self.every_s = every_s
        self._down_since = 0.0
        self._last_line = 0.0
        self._failures = 0

    @property
    def down(self) -> bool:
        return bool(self._down_since)

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._failures += 1
        if not self._down_since:
            self._down_since = self._last_line = now
            text = str(exc)  # name the backend once, whether or not the error already does
            log.warning("%s", text if text.startswith(self.backend) else f"{self.backend} unavailable: {text}")
        elif now - self._last_line >= self.every_s:
            self._last_line = now
            log.warning("%s still unavailable after %.0fs (%d failures): %s", self.backend,
                        now - self._down_since, self._failures, exc)

    def ok(self) -> None:
        if self._down_since:
            log.info("%s reachable again after %.1fs (%d failures)", self.backend,
                     time.monotonic() - self._down_since, self._failures)
            self._down_since = 0.0
            self._failures = 0

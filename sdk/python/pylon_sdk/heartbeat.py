"""Adaptive heartbeat policy (pure: no clock, no I/O; the client drives it).

The server picks an interval by network type and closes a session silent for
``interval * 1.5 + grace``. NAT boxes and mobile networks drop idle TCP mappings after an
unknown time; longer intervals save battery and server work, too long ones get the connection
silently cut. So the client probes: after ``up_after`` consecutive on-time PONGs it proposes
``interval + step_s``; the PONG carries the interval the server put in force (it clamps to its
bounds; a smaller answer than proposed marks the server's maximum). A missed PONG means the
last interval was too long for this network: step down, remember a ceiling one step below it,
and reconnect. After ``reprobe_after`` good PONGs at the ceiling the network may have changed,
so probing resumes.
"""

from __future__ import annotations

UNKNOWN_INTERVAL_S = 60  # a server that names no interval still needs PINGs; well under any idle timeout


class HeartbeatPolicy:
    __slots__ = ("step_s", "min_s", "max_s", "up_after", "margin_s", "reprobe_after", "interval_s", "streak",
                 "ceiling_s", "server_max_s", "_proposed")

    def __init__(self, step_s: int = 60, min_s: int = 30, max_s: int = 900, up_after: int = 3,
                 margin_s: float = 10.0, reprobe_after: int = 20, hint_s: int = 0) -> None:
        if not (0 < min_s <= max_s and step_s > 0 and up_after >= 1):
            raise ValueError("need 0 < min_s <= max_s, step_s > 0, up_after >= 1")
        self.step_s = step_s
        self.min_s = min_s
        self.max_s = max_s
        self.up_after = up_after
        self.margin_s = margin_s
        self.reprobe_after = reprobe_after
        self.interval_s = hint_s      # in force; 0 until the first AUTH_OK
        self.streak = 0               # consecutive on-time PONGs at the current interval
        self.ceiling_s = 0            # 0 = none; set one step below an interval that missed
        self.server_max_s = 0         # 0 = unknown; learnt from a clamped proposal
        self._proposed = 0

    def hint(self) -> int:
        """``Auth.heartbeat_hint_s``: what this client knows works (0 lets the server choose)."""
        return self.interval_s

    def on_auth(self, heartbeat_s: int) -> None:
        self.interval_s = heartbeat_s
        self.streak = 0
        self._proposed = 0

    def ping_delay(self) -> float:
        """Seconds from one PING to the next: the interval less a safety margin for latency."""
        interval = self.interval_s or UNKNOWN_INTERVAL_S
        margin = min(self.margin_s, interval * 0.25)
        return max(1.0, interval - margin)

    def _limit(self) -> int:
        limit = self.max_s
        for bound in (self.ceiling_s, self.server_max_s):
            if bound:
                limit = min(limit, bound)
        return limit

    def proposal(self) -> int:
        """``Ping.propose_heartbeat_s`` for the next PING (0 = keep the interval)."""
        self._proposed = 0
        if self.interval_s <= 0 or self.streak < self.up_after:
            return 0
        target = min(self.interval_s + self.step_s, self._limit())
        if target <= self.interval_s:
            return 0
        self._proposed = target
        return target

    def on_pong(self, heartbeat_s: int) -> bool:
        """A PONG arrived in time carrying the interval in force. True if the interval changed."""
        proposed, self._proposed = self._proposed, 0
        before = self.interval_s
        if proposed and heartbeat_s < proposed:
            self.server_max_s = max(heartbeat_s, self.min_s)
        if heartbeat_s > 0:
            self.interval_s = heartbeat_s
        if self.interval_s != before:
            self.streak = 0
            return True
        self.streak += 1
        if self.ceiling_s and self.streak >= self.reprobe_after:
            self.ceiling_s = 0
            self.streak = self.up_after  # probe on the next PING
        return False

    def on_miss(self) -> int:
        """No PONG in time: step down (the next AUTH hints it) and return the new interval."""
        self._proposed = 0
        self.streak = 0
        lowered = max(self.min_s, self.interval_s - self.step_s) if self.interval_s else 0
        self.ceiling_s = lowered
        self.interval_s = lowered
        return lowered

"""The ``[dispatcher]`` config section."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require


@dataclass
class DispatcherConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    # 0 = /metrics only on the HTTP port; otherwise also a bare metrics listener on this port
    metrics_port: int = 0
    default_count: int = 8
    max_count: int = 32
    # addresses a client may report as failed in one request
    max_exclude: int = 64
    # load ratios within one step count as equal, so the per-uid tie-break spreads clients over
    # them instead of sending everyone to the single emptiest room until discovery refreshes
    load_step: float = 0.05
    shutdown_grace_s: float = 2.0

    def validate(self) -> None:
        require(0 <= self.port < 65536, "dispatcher.port", "must be a TCP port (0 = any free port)")
        require(0 <= self.metrics_port < 65536, "dispatcher.metrics_port", "must be a TCP port or 0")
        require(1 <= self.max_count <= 256, "dispatcher.max_count", "must be 1 .. 256")
        require(1 <= self.default_count <= self.max_count, "dispatcher.default_count", "must be 1 .. max_count")
        require(0 <= self.max_exclude <= 1024, "dispatcher.max_exclude", "must be 0 .. 1024")
        require(0 < self.load_step <= 1, "dispatcher.load_step", "must be in (0, 1]")
        require(self.shutdown_grace_s >= 0, "dispatcher.shutdown_grace_s", "must be >= 0")

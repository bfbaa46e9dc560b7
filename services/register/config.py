"""The ``[register]`` config section."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require


@dataclass
class RegisterConfig:
    host: str = "127.0.0.1"         # gRPC (and metrics) bind address
    grpc_port: int = 7300
    metrics_port: int = 0           # 0 = any free port (announced in discovery)
    # One RPC carries one room flush; 5,000 sessions is ~0.1 s of Redis work, far above a
    # room's few-ms flush size, and keeps one bad caller from stalling the event loop.
    max_items: int = 5000
    redis_max_connections: int = 32
    # DropInstance pops the instance set in chunks so a 20k-session room never builds one huge reply
    drop_chunk: int = 1000
    shutdown_grace_s: float = 5.0

    def validate(self) -> None:
        require(0 < self.grpc_port < 65536, "register.grpc_port", "must be a TCP port (1-65535)")
        require(0 <= self.metrics_port < 65536, "register.metrics_port", "must be a TCP port or 0")
        require(1 <= self.max_items <= 100_000, "register.max_items", "must be in 1..100000")
        require(self.redis_max_connections >= 1, "register.redis_max_connections", "must be >= 1")
        require(1 <= self.drop_chunk <= 10_000, "register.drop_chunk", "must be in 1..10000")
        require(self.shutdown_grace_s >= 0, "register.shutdown_grace_s", "must be >= 0")

"""The ``[coordinator]`` config section (deploy/coordinator.example.toml documents every key)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require


@dataclass
class CoordinatorConfig:
    host: str = "127.0.0.1"            # gRPC bind address; 0.0.0.0 on a multi-host deploy
    grpc_port: int = 7500              # 0 = any free port (announced in discovery)
    metrics_port: int = 0              # 0 = any free port (announced in discovery)

    # webhook delivery
    webhook_max_attempts: int = 8      # 0.5 s doubling: attempt 8 starts ~64 s after the first
    webhook_backoff_base_s: float = 0.5
    webhook_backoff_cap_s: float = 30.0
    webhook_queue_per_app: int = 10_000  # events queued or in flight per app
    webhook_rate_per_s: float = 50.0   # requests/s per app, retries included
    webhook_batch_max_events: int = 100
    webhook_batch_max_bytes: int = 1024 * 1024
    webhook_batch_delay_s: float = 0.02
    webhook_concurrency_per_app: int = 4   # requests in flight per app
    webhook_timeout_s: float = 10.0    # whole request, connect included
    webhook_connect_timeout_s: float = 3.0
    webhook_connections: int = 256     # sockets across all app servers
    webhook_connections_per_host: int = 32
    shutdown_grace_s: float = 5.0      # time to flush queued events at shutdown

    # request bounds (a room sends batches of a few hundred)
    max_batch_items: int = 10_000
    upstream_max_payload: int = 64 * 1024   # the client frame limit; a bigger payload is refused
    kick_max_uids: int = 10_000
    kick_concurrency: int = 16         # room instances called at once per kick
    app_cache_ttl_s: float = 5.0

    def validate(self) -> None:
        require(0 <= self.grpc_port < 65536, "coordinator.grpc_port", "must be a TCP port (0 = any)")
        require(0 <= self.metrics_port < 65536, "coordinator.metrics_port", "must be a TCP port (0 = any)")
        require(self.webhook_max_attempts >= 1, "coordinator.webhook_max_attempts", "must be >= 1")
        require(self.webhook_backoff_base_s > 0, "coordinator.webhook_backoff_base_s", "must be > 0")
        require(self.webhook_backoff_cap_s >= self.webhook_backoff_base_s, "coordinator.webhook_backoff_cap_s",
                "must be >= webhook_backoff_base_s")
        require(self.webhook_queue_per_app >= 1, "coordinator.webhook_queue_per_app", "must be >= 1")
        require(self.webhook_rate_per_s > 0, "coordinator.webhook_rate_per_s", "must be > 0")
        require(1 <= self.webhook_batch_max_events <= 10_000, "coordinator.webhook_batch_max_events", "must be 1..10000")
        require(self.webhook_batch_max_bytes >= 1024, "coordinator.webhook_batch_max_bytes", "must be >= 1024")
        require(0 <= self.webhook_batch_delay_s <= 5, "coordinator.webhook_batch_delay_s", "must be 0..5")
        require(self.webhook_concurrency_per_app >= 1, "coordinator.webhook_concurrency_per_app", "must be >= 1")
        require(self.webhook_timeout_s > 0, "coordinator.webhook_timeout_s", "must be > 0")
        require(self.webhook_connect_timeout_s > 0, "coordinator.webhook_connect_timeout_s", "must be > 0")
        require(self.webhook_connections >= 1, "coordinator.webhook_connections", "must be >= 1")
        require(self.webhook_connections_per_host >= 1, "coordinator.webhook_connections_per_host", "must be >= 1")
        require(self.shutdown_grace_s >= 0, "coordinator.shutdown_grace_s", "must be >= 0")
        require(self.max_batch_items >= 1, "coordinator.max_batch_items", "must be >= 1")
        require(self.upstream_max_payload >= 1, "coordinator.upstream_max_payload", "must be >= 1")
        require(self.kick_max_uids >= 1, "coordinator.kick_max_uids", "must be >= 1")
        require(self.kick_concurrency >= 1, "coordinator.kick_concurrency", "must be >= 1")
        require(self.app_cache_ttl_s > 0, "coordinator.app_cache_ttl_s", "must be > 0")

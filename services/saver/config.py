"""The ``[saver]`` config section."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require

DAY_S = 86_400


@dataclass
class SaverConfig:
    host: str = "127.0.0.1"         # gRPC (and metrics) bind address
    grpc_port: int = 7400
    metrics_port: int = 0           # 0 = any free port (announced in discovery)
    default_ttl_s: int = 7 * DAY_S  # a message stored with ttl_s = 0
    max_ttl_s: int = 30 * DAY_S     # longer ttls are cut to this
    # how long an acked message (without its payload) still answers GET /v1/messages/{id}
    ack_retention_s: int = DAY_S
    # a message delivered this many times without an ack is parked (poison-message policy)
    max_attempts: int = 10
    # items per RPC (messages, refs, inboxes); a center push batch is 500
    max_items: int = 5000
    # 64 KiB: the default client frame limit; a bigger payload could never be delivered
    max_payload_bytes: int = 65_536
    load_default_limit: int = 100
    load_max_limit: int = 1000
    # a LoadInbox reply stops growing past this many payload bytes (the rest stays in the inboxes);
    # half of the 64 MiB gRPC message limit
    load_max_bytes: int = 32 * 1024 * 1024
    # MySQL writer: concurrent Store RPCs share multi-row INSERTs of up to this many rows
    mysql_batch_rows: int = 500
    mysql_batch_delay_s: float = 0.002
    mysql_max_pending_rows: int = 50_000
    mysql_flush_concurrency: int = 4
    mysql_pool_size: int = 8
    mysql_timeout_s: float = 10.0
    # background sweep of the MySQL log
    sweep_interval_s: float = 60.0
    sweep_batch_rows: int = 5000
    # rebuild of Redis from MySQL after Redis lost its data (see services/saver/epoch.py)
    epoch_check_interval_s: float = 1.0  # how often to look for the epoch besides the write path
    rebuild_chunk_rows: int = 1000       # rows per MySQL page and Redis pipeline
    rebuild_lock_ttl_s: float = 10.0     # renewed by every page; frees a rebuild whose saver died
    rebuild_wait_s: float = 5.0          # an RPC waits this long (at most its deadline) for a rebuild
    # newest MySQL rows compared with Redis when Redis restarted with its epoch (lost last writes?)
    tail_check_rows: int = 1000
    redis_max_connections: int = 32
    shutdown_grace_s: float = 5.0

    def validate(self) -> None:
        require(0 < self.grpc_port < 65536, "saver.grpc_port", "must be a TCP port (1-65535)")
        require(0 <= self.metrics_port < 65536, "saver.metrics_port", "must be a TCP port or 0")
        require(1 <= self.default_ttl_s <= self.max_ttl_s, "saver.default_ttl_s", "must be in 1..max_ttl_s")
        require(self.max_ttl_s <= 365 * DAY_S, "saver.max_ttl_s", "must be at most one year")
        require(self.ack_retention_s >= 1, "saver.ack_retention_s", "must be >= 1")
        require(1 <= self.max_attempts <= 1000, "saver.max_attempts", "must be in 1..1000")
        require(1 <= self.max_items <= 100_000, "saver.max_items", "must be in 1..100000")
        require(1 <= self.max_payload_bytes <= 16 * 1024 * 1024, "saver.max_payload_bytes",
                "must be in 1..16777216 (MySQL MEDIUMBLOB)")
        require(1 <= self.load_default_limit <= self.load_max_limit, "saver.load_default_limit",
                "must be in 1..load_max_limit")
        require(self.load_max_limit <= 10_000, "saver.load_max_limit", "must be <= 10000")
        require(self.load_max_bytes >= self.max_payload_bytes, "saver.load_max_bytes", "must be >= max_payload_bytes")
        require(1 <= self.mysql_batch_rows <= 5000, "saver.mysql_batch_rows", "must be in 1..5000")
        require(0 <= self.mysql_batch_delay_s <= 1, "saver.mysql_batch_delay_s", "must be in 0..1")
        require(self.mysql_max_pending_rows >= self.max_items, "saver.mysql_max_pending_rows", "must be >= max_items")
        require(1 <= self.mysql_flush_concurrency < self.mysql_pool_size, "saver.mysql_flush_concurrency",
                "must be >= 1 and below mysql_pool_size (reads and the sweep need connections too)")
        require(self.mysql_timeout_s > 0, "saver.mysql_timeout_s", "must be > 0")
        require(self.sweep_interval_s > 0, "saver.sweep_interval_s", "must be > 0")
        require(1 <= self.sweep_batch_rows <= 100_000, "saver.sweep_batch_rows", "must be in 1..100000")
        require(0.05 <= self.epoch_check_interval_s <= 60, "saver.epoch_check_interval_s", "must be in 0.05..60")
        require(1 <= self.rebuild_chunk_rows <= 10_000, "saver.rebuild_chunk_rows", "must be in 1..10000")
        require(1 <= self.rebuild_lock_ttl_s <= 600, "saver.rebuild_lock_ttl_s", "must be in 1..600")
        require(0 <= self.rebuild_wait_s <= 60, "saver.rebuild_wait_s", "must be in 0..60")
        require(0 <= self.tail_check_rows <= 100_000, "saver.tail_check_rows", "must be in 0..100000")
        require(self.redis_max_connections >= 1, "saver.redis_max_connections", "must be >= 1")
        require(self.shutdown_grace_s >= 0, "saver.shutdown_grace_s", "must be >= 0")

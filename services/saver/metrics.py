"""Prometheus metrics of the saver process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STORED = Counter("pylon_saver_messages_stored_total", "Messages stored (Redis inbox + MySQL log)")
LOADED = Counter("pylon_saver_messages_loaded_total", "Messages returned by LoadInbox")
ACKED = Counter("pylon_saver_messages_acked_total", "Acks applied")
DELIVERED = Counter("pylon_saver_messages_delivered_total", "Delivery attempts counted by MarkDelivered")
PARKED = Counter("pylon_saver_messages_parked_total", "Messages parked after max_attempts deliveries without ack")
REQUEUED = Counter("pylon_saver_messages_requeued_total", "Parked messages an operator put back in their inboxes")
PRUNED = Counter("pylon_saver_inbox_pruned_total", "Inbox entries dropped at load (body gone, expired, acked or parked)")
SWEPT = Counter("pylon_saver_mysql_swept_rows_total", "Expired rows deleted from MySQL by the sweep")
BACKEND_ERRORS = Counter("pylon_saver_backend_errors_total", "RPCs failed by a backend", ["backend"])
MYSQL_BATCH_ROWS = Histogram(
    "pylon_saver_mysql_batch_rows", "Rows per MySQL statement", ["op"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
MYSQL_SECONDS = Histogram(
    "pylon_saver_mysql_seconds", "MySQL statement latency", ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MYSQL_WRITE_LAG = Histogram(
    "pylon_saver_mysql_write_lag_seconds",
    "A write's wait from its submission to its MySQL commit (batch queue + statement), by op (insert, update)",
    ["op"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_SECONDS = Histogram(
    "pylon_saver_rpc_seconds", "Saver RPC handling time by method and outcome", ["method", "outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RPC_ITEMS = Histogram(
    "pylon_saver_rpc_items", "Items per saver RPC", ["method"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
REBUILDS = Counter(
    "pylon_saver_rebuilds_total", "Rebuilds of Redis from MySQL run by this saver, by outcome", ["outcome"])
REBUILD_ROWS = Counter("pylon_saver_rebuild_rows_total", "Messages put back into their inboxes by rebuilds")
REBUILD_SECONDS = Histogram(
    "pylon_saver_rebuild_seconds", "Duration of a complete rebuild of Redis from MySQL",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
REBUILDING = Gauge(
    "pylon_saver_rebuilding", "1 while Redis has no epoch and this saver rebuilds it or waits for the saver that does")
EPOCH_REFUSALS = Counter(
    "pylon_saver_epoch_refusals_total", "Operations Redis refused for want of an epoch (its data lost or rebuilt meanwhile)")
BROADCASTS_STORED = Counter("pylon_saver_broadcasts_stored_total", "Broadcasts stored (one per broadcast, not per user)")
BROADCASTS_LOADED = Counter(
    "pylon_saver_broadcasts_loaded_total", "Live broadcasts handed to logins and BINDs that had not acked them")
BROADCASTS_ACKED = Counter("pylon_saver_broadcast_acks_total", "Broadcast copies acked by clients")

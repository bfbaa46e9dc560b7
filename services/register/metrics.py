"""Prometheus metrics of the register process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REGISTERED = Counter("pylon_register_sessions_registered_total", "Sessions written by Register")
UNREGISTERED = Counter("pylon_register_sessions_unregistered_total",
                       "Sessions removed, by the RPC that removed them", ["via"])
REPLACED = Counter("pylon_register_sessions_replaced_total",
                   "Sessions of another instance reported replaced by a new login of the same uid and device")
LOOKUPS = Counter("pylon_register_lookups_total", "uids looked up")
CORRUPT = Counter("pylon_register_corrupt_sessions_total", "Stored session values that did not parse (skipped)")
REDIS_ERRORS = Counter("pylon_register_redis_errors_total", "RPCs failed because Redis was unreachable or erred")
EPOCHS_STARTED = Counter("pylon_register_epochs_started_total",
                         "New epochs this register created because Redis held none (its data was lost, or first start)")
EPOCH_CHANGES = Counter("pylon_register_epoch_changes_total",
                        "Times this register saw the epoch in Redis change from the one it saw before")
EPOCH_INFO = Gauge("pylon_register_epoch_info", "The current register epoch (as a label; value 1)", ["epoch"])
RPC_SECONDS = Histogram(
    "pylon_register_rpc_seconds", "Register RPC handling time by method and outcome", ["method", "outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_ITEMS = Histogram(
    "pylon_register_batch_items", "Items per Register RPC", ["method"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)

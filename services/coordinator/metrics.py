"""Coordinator metrics (the shared ones live in services.common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEBHOOK_REQUESTS = Counter(
    "pylon_webhook_requests_total", "Webhook HTTP attempts by outcome (ok, retryable, no_answer, rejected)",
    ["outcome"],
)
WEBHOOK_SECONDS = Histogram(
    "pylon_webhook_seconds", "Webhook HTTP attempt latency",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WEBHOOK_RETRIES = Counter("pylon_webhook_retries_total", "Webhook batches scheduled for another attempt")
EVENTS_QUEUED = Counter("pylon_webhook_events_queued_total", "Events accepted into a webhook queue", ["kind"])
EVENTS_DELIVERED = Counter("pylon_webhook_events_delivered_total", "Events an app server answered 2xx for")
EVENTS_DROPPED = Counter(
    "pylon_webhook_events_dropped_total",
    "Events not delivered, by reason (queue_full, no_app, no_webhook, not_subscribed, too_large, rejected, "
    "gave_up, shutdown, closing, bug)",
    ["reason"],
)
QUEUE_DEPTH = Gauge("pylon_webhook_queue_depth", "Events queued or in flight per app", ["app"])
KICK_REQUESTS = Counter("pylon_kick_requests_total", "Kick requests by outcome", ["outcome"])
KICKED_SESSIONS = Counter("pylon_kick_sessions_total", "Sessions the rooms reported kicked")

"""Center metrics: Prometheus series plus the plain in-process tallies shown by /v1/stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("pylon_center_http_requests_total", "HTTP requests by route template, method and status",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("pylon_center_http_seconds", "HTTP request latency by route template", ["route"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PUSH_REQUESTS = Counter("pylon_center_push_requests_total", "Accepted push calls", ["kind"])  # unicast | broadcast
PUSH_MESSAGES = Counter("pylon_center_push_messages_total", "Messages stored for delivery by push calls")
PUSH_SECONDS = Histogram("pylon_center_push_seconds", "Push latency: store, lookup and room fan-out", ["kind"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
DELIVERED = Counter("pylon_center_delivered_total", "Messages rooms reported as written to a connection", ["kind"])
RATE_LIMITED = Counter("pylon_center_rate_limited_total", "Push calls refused by a per-app rate limit")
ROOM_FAILURES = Counter("pylon_center_room_failures_total", "Room calls that failed (message stays stored)",
                        ["method"])
OVERLOADED = Counter("pylon_center_overloaded_total", "Push calls refused because too many bytes were in flight")
# broadcast sub-tasks in the shared stream (the same figure on every center: use max(), not sum())
BROADCAST_SUBTASKS = Gauge("pylon_broadcast_subtasks", "Broadcast sub-tasks: queued (not yet read), running "
                           "(read, not done), stuck (running and idle past the claim time or tried > 3 times)",
                           ["state"])
BROADCAST_SUBTASKS_DONE = Counter("pylon_broadcast_subtasks_done_total",
                                  "Broadcast sub-tasks this center completed (room instance wrote it, or was gone)")
BROADCAST_SUBTASK_FAILURES = Counter("pylon_broadcast_subtask_failures_total",
                                     "Room.Broadcast calls of sub-tasks that failed (tried again)")
BROADCAST_SUBTASKS_EXPIRED = Counter("pylon_broadcast_subtasks_expired_total",
                                     "Broadcast sub-tasks dropped because the broadcast expired first")
LOOKUP_FAILURES = Counter("pylon_center_lookup_failures_total",
                          "Register lookups that failed during a push (message stays stored)")
# per app: apps are created by the operator, so the label set stays as small as the app table
APP_MESSAGES = Counter("pylon_center_app_messages_total", "Messages accepted by push calls, per app", ["app"])
APP_BROADCASTS = Counter("pylon_center_app_broadcasts_total", "Broadcasts accepted, per app", ["app"])


@dataclass(slots=True)
class Tally:
    """Counts since this process started, for the dashboard (Prometheus has the real series)."""

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    pushes: int = 0
    messages: int = 0
    delivered: int = 0
    broadcasts: int = 0
    rate_limited: int = 0
    overloaded: int = 0
    room_failures: int = 0
    lookup_failures: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

"""Room metrics. Label children are resolved once here, not per frame."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.common.codec import ErrorCode, Op

CONNECTIONS = Gauge("pylon_room_connections", "Open TCP connections (any state)")
SESSIONS = Gauge("pylon_room_sessions", "Authenticated sessions")
AUTHS = Counter("pylon_room_auths_total", "AUTH attempts by result", ["result"])
FRAMES_IN = Counter("pylon_room_frames_in_total", "Frames received by op", ["op"])
FRAMES_OUT = Counter("pylon_room_frames_out_total", "Frames sent by op", ["op"])
MESSAGES_OUT = Counter("pylon_room_messages_delivered_total", "Messages written to clients", ["kind"])
ACKS = Counter("pylon_room_acks_total", "Message ids acked by clients")
CLOSED = Counter("pylon_room_closed_total", "Connections closed by reason", ["reason"])
UPSTREAM = Counter("pylon_room_upstream_total", "UPSTREAM frames by outcome", ["outcome"])

frames_in = {int(op): FRAMES_IN.labels(op.name) for op in Op}
frames_out = {int(op): FRAMES_OUT.labels(op.name) for op in Op}
auth_result = {code: AUTHS.labels(code.name.lower()) for code in ErrorCode}
auth_ok = AUTHS.labels("ok")
unicast_out = MESSAGES_OUT.labels("unicast")
broadcast_out = MESSAGES_OUT.labels("broadcast")
closed = {code: CLOSED.labels(code.name.lower()) for code in ErrorCode}
closed_by_peer = CLOSED.labels("peer")
closed_kick = CLOSED.labels("kick")
closed_drain = CLOSED.labels("drain")

"""The [room] config section."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require


@dataclass
class RoomConfig:
    listen_host: str = "127.0.0.1"
    port: int = 7100               # client TCP port of instance 0; instance i listens on port + i
    grpc_port: int = 7200          # internal gRPC port of instance 0; instance i uses grpc_port + i
    metrics_port: int = 0          # 0 = pick a free port (reported in discovery)
    shared_port: int = 0           # >0: every instance of the host also accepts here (SO_REUSEPORT)
    instances: int = 1             # processes started by `pylon room` (one event loop each)
    target_connections: int = 0    # when set and instances == 0: instances = ceil(target / per_instance_connections)
    per_instance_connections: int = 18_000  # under the 20,000 open-file cap, leaving room for gRPC/Redis sockets
    backlog: int = 8192            # listen backlog; a small one overflows in a connect storm
    max_frame: int = 65_536        # DESIGN.md §3 default
    handshake_timeout_s: int = 10
    # Adaptive heartbeat (DESIGN.md §3): interval by network type, client proposals clamped to [min, max]
    heartbeat_wifi_s: int = 360
    heartbeat_cellular_s: int = 270
    heartbeat_default_s: int = 300
    heartbeat_min_s: int = 30
    heartbeat_max_s: int = 900
    heartbeat_grace_s: int = 15    # silent for interval * 1.5 + grace -> closed
    write_buffer_limit: int = 256 * 1024  # per connection; a client that does not read past this is closed
    max_unacked_per_session: int = 1000
    max_apps_per_session: int = 16
    max_uid_len: int = 128
    inbox_load_limit: int = 100
    # Batching toward register/saver/coordinator is adaptive (services/common/batching.py): a
    # batch leaves at once while nothing is in flight to that backend, and gathers while a call
    # is (group commit), so a quiet instance adds no wait. batch_delay_ms is the longest a batch
    # gathers behind a call in flight before it may take a free slot (max_flushes_in_flight 1:
    # it never does, it leaves when the call returns). Before the adaptive policy this was a fixed
    # wait: 10 ms measured on a 36k connect storm, 172 us of server CPU per connect (2 ms: 272 us).
    batch_delay_ms: float = 10.0
    # Work nobody waits on (delivery counts, acks, status events, unregistrations) gathers this
    # long even while nothing is in flight: each call costs its fixed CPU on both sides, and at
    # ~200 pushes/s an instance otherwise sent one MarkDelivered and one Ack per message.
    background_linger_ms: float = 20.0
    # Registrations and inbox loads (the connect path): every call costs ~150-500 us of CPU on
    # each side whatever it carries, and a host of 56 instances sees under a hundred connects per
    # second per instance even in a storm. So while an instance sees storm_connects_per_s or more,
    # a connect-path batch waits to gather storm_batch_items at the current rate, but no longer
    # than storm_rtt_factor times the smoothed latency of the backend's last calls, and never
    # more than storm_batch_delay_ms: a loaded register (calls of tens to hundreds of ms in a
    # storm) gets few, large calls; a fast one (a few ms) keeps AUTH_OK within milliseconds at
    # hundreds of connects per second. Measured at 300k connects over 56 instances with the wait
    # bounded only by the items and the cap: a 250 ms cap gave 229 us of room CPU per connect and
    # 7,143 AUTHs refused UNAVAILABLE by a saturated register; 1,000 ms gave 201 us and 81.
    # Without the latency bound, 200 connects/s had AUTH_OK p99 ~1 s (issue 8).
    connect_batch_delay_ms: float = 20.0
    storm_connects_per_s: float = 50.0
    storm_batch_items: int = 200
    storm_batch_delay_ms: float = 1000.0
    storm_rtt_factor: float = 4.0
    max_batch: int = 500
    # Batches in flight per backend queue; while all are out, the next batch keeps filling.
    max_flushes_in_flight: int = 1  # 100k connect storm: server CPU per connect 364 -> 306 us vs 4
    max_pending_auth: int = 20_000  # handshakes waiting on register; past it AUTH gets OVERLOADED
    overload_retry_ms: int = 2_000
    # Connections the kernel has completed but this instance has not accepted yet wait unseen. While
    # that queue holds more than this many seconds of the accept rate (at least 100/s assumed), new
    # AUTHs get OVERLOADED with the retry-after instead of the full handshake, so clients back off
    # with an answer rather than time out (the SDK waits 10 s for AUTH_OK). 0 = never.
    accept_wait_shed_s: float = 5.0
    drain_timeout_s: float = 10.0
    # A drained instance holds its sessions DETACHED this long after sending RECONNECT, so the
    # instances its clients move to can take them over (no inbox reload, no attempt counted).
    drain_handover_s: float = 5.0
    app_refresh_s: float = 5.0
    # Flash disconnect (DESIGN.md §3): a session whose link dropped is kept this long for a
    # resume; 0 = a lost link ends the session at once.
    resume_grace_s: int = 60
    # Payload bytes a detached session holds of what arrives meanwhile (also at most
    # max_unacked_per_session messages); the rest stays stored and a resume reads the inbox.
    resume_hold_bytes: int = 256 * 1024
    # A resume_token older than this is refused (a normal login follows); the session itself
    # is held only for resume_grace_s after its link dropped.
    resume_token_max_age_s: int = 7 * 86400
    # Shared by every room instance of a cluster; empty = one random secret kept in Redis.
    resume_secret: str = ""
    # How often an instance asks register for its epoch when no registration told it lately.
    register_check_s: float = 2.0

    def validate(self) -> None:
        require(0 <= self.port < 65536, "room.port", "must be a TCP port")
        require(0 <= self.grpc_port < 65536, "room.grpc_port", "must be a TCP port")
        require(0 <= self.shared_port < 65536, "room.shared_port", "must be a TCP port (0 = none)")
        require(self.instances >= 0, "room.instances", "must be >= 0 (0 = from target_connections)")
        require(1024 <= self.max_frame <= 16 * 1024 * 1024, "room.max_frame", "must be within 1 KiB..16 MiB")
        require(1 <= self.heartbeat_min_s <= self.heartbeat_max_s, "room.heartbeat_min_s", "must be >= 1 and <= heartbeat_max_s")
        for name in ("heartbeat_wifi_s", "heartbeat_cellular_s", "heartbeat_default_s"):
            v = getattr(self, name)
            require(self.heartbeat_min_s <= v <= self.heartbeat_max_s, f"room.{name}", "must be within [heartbeat_min_s, heartbeat_max_s]")
        require(self.handshake_timeout_s >= 1, "room.handshake_timeout_s", "must be >= 1")
        require(self.write_buffer_limit >= 4096, "room.write_buffer_limit", "must be >= 4096")
        require(self.max_batch >= 1, "room.max_batch", "must be >= 1")
        for name in ("batch_delay_ms", "connect_batch_delay_ms", "storm_batch_delay_ms", "background_linger_ms"):
            require(0 <= getattr(self, name) <= 5000, f"room.{name}", "must be within 0..5000 ms")
        require(self.storm_batch_items >= 1, "room.storm_batch_items", "must be >= 1")
        require(0 < self.storm_rtt_factor <= 1000, "room.storm_rtt_factor", "must be within (0, 1000]")
        require(self.max_flushes_in_flight >= 1, "room.max_flushes_in_flight", "must be >= 1")
        require(0 <= self.accept_wait_shed_s <= 3600, "room.accept_wait_shed_s", "must be within 0..3600 s (0 = never)")
        require(0 <= self.resume_grace_s <= 3600, "room.resume_grace_s", "must be within 0..3600 s (0 = no resume)")
        require(60 <= self.resume_token_max_age_s <= 30 * 86400, "room.resume_token_max_age_s",
                "must be within 60 s..30 days")
        require(0 <= self.resume_hold_bytes <= 64 * 1024 * 1024, "room.resume_hold_bytes", "must be within 0..64 MiB")
        require(0 <= self.drain_handover_s <= 300, "room.drain_handover_s", "must be within 0..300 s")
        require(0.2 <= self.register_check_s <= 60, "room.register_check_s", "must be within 0.2..60 s")

    def heartbeat_for(self, net: str) -> int:
        """Interval for a network type; ``net`` lower-cased by the caller ("WIFI" is wifi)."""
        if net == "wifi" or net == "ethernet":
            return self.heartbeat_wifi_s
        if net == "cellular":
            return self.heartbeat_cellular_s
        return self.heartbeat_default_s

    def clamp_heartbeat(self, proposed: int) -> int:
        return max(self.heartbeat_min_s, min(self.heartbeat_max_s, proposed))

    def instance_count(self) -> int:
        if self.instances:
            return self.instances
        per = self.per_instance_connections
        return max(1, -(-self.target_connections // per))

"""The [room] config section."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import require

HEADER_MIN = 256  # the smallest max_auth_frame: a 12-byte header and a short token


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
    # A unicast delivery attempt (the poison-message count) waits this long for the client's ACK,
    # which then reports it to saver in the same write as the ack; only attempts still unacked
    # after it go out as MarkDelivered. So a message acked at once costs one saver call and one
    # MySQL row update, not two of each, and never two transactions on one row at the same time.
    # A crash of the instance loses at most this much of the count. 0: report every attempt alone.
    delivery_report_ms: float = 250.0
    # Registrations and inbox loads over lanes (pylon.rpc_lanes) instead of gRPC. Measured on the
    # 2-core box (bench/RESULTS.md): over lanes, logins at 1,000/s have p99 45 ms against 64-76 ms,
    # and 64 handshakes in flight get 2,514 connects/s against 1,850-2,057. But a 300k storm over
    # lanes fell into accept-queue shedding (500k AUTHs shed, 1,100 connects/s, 950 us each) where
    # gRPC holds 3,020/s at 484 us: the calls return sooner, so more of the storm's handshakes
    # wait in the accept queues instead of in batches, past accept_wait_shed_s, and every shed
    # AUTH comes back as another connect. Over lanes with shedding off the same storm held at
    # 2,776/s, 471 us. With the shed rule of 2516894 (8 s, drain-time retry-after) the storm over
    # lanes ran at 2,240/s against 2,782/s over gRPC (smaller batches: 0.039 Register calls per
    # connect against 0.019), so it stays off. Acks, delivery counts, kicks and take-overs use
    # lanes either way, and so do center's calls.
    connect_path_lanes: bool = False
    # Broadcasts: a fan-out gathers the broadcasts that keep arriving for its app this long (up to
    # four times as long while they keep coming), so a burst leaves as a few PUSH frames per
    # session, each carrying several, instead of one frame (and one client ACK) per broadcast.
    broadcast_linger_ms: float = 25.0
    # What clients ack of broadcasts is gathered per (uid, app) this long before it goes to saver:
    # a burst of broadcasts acked frame by frame costs one saver write per user, not one per frame.
    # A crash of the instance loses at most this much: those copies come again at the next login
    # (the SDK drops them by msg_id).
    broadcast_ack_linger_ms: float = 1000.0
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
    # with an answer rather than time out (the SDK waits 10 s for AUTH_OK, and the wait in the
    # queue counts). 8 s leaves the handshake 2 s. At 5 s, a 300k storm with 16,000 handshakes in
    # flight (Little's law: ~5.5 s in the queues at ~3,000 connects/s) shed 63k-105k AUTHs of
    # clients that would have been answered in time, each one another connect. 0 = never.
    accept_wait_shed_s: float = 8.0
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
    # TLS for clients (DESIGN.md §5): instance i also serves TLS on tls_port + i when tls_port,
    # tls_cert and tls_key are set; SIGHUP reads the certificate and key again (new handshakes use
    # them, open connections stay).
    tls_port: int = 0
    tls_cert: str = ""             # PEM certificate chain
    tls_key: str = ""              # PEM private key
    # Access policy at accept time (services/room/access.py), per instance. Phones behind carrier
    # NAT share one address by the thousand, so the per-address limits are generous; a flood from
    # one address is still held to a few percent of an instance.
    max_connections: int = 0       # the instance's cap; 0 = the open-file limit minus fd_reserve
    fd_reserve: int = 512          # descriptors kept for gRPC, Redis, metrics and listeners
    connect_rate_per_ip: float = 100.0  # new connections per second per source address; 0 = no limit
    connect_burst_per_ip: float = 500.0  # the bucket's size: a burst after a network change
    max_connections_per_ip: int = 2000   # open connections per source address; 0 = unlimited
    max_preauth_per_ip: int = 256  # connections per source address that have not finished AUTH; 0 = unlimited
    allow_cidrs: list[str] = field(default_factory=list)  # non-empty: only these source addresses
    deny_cidrs: list[str] = field(default_factory=list)   # never these (wins over allow)
    access_exempt_cidrs: list[str] = field(default_factory=list)  # no per-address limits (your own probes, proxies)
    max_tracked_ips: int = 65_536  # source addresses remembered (buckets, counts); bounded, pruned
    access_retry_ms: int = 5_000   # retry-after of TOO_MANY_CONNECTIONS
    denied_retry_ms: int = 600_000  # retry-after of ACCESS_DENIED
    # The largest frame accepted before AUTH_OK (an AUTH carries a token, a uid and a few apps):
    # a client that has not authenticated cannot make the room buffer max_frame bytes.
    max_auth_frame: int = 16_384

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
        for name in ("batch_delay_ms", "connect_batch_delay_ms", "storm_batch_delay_ms", "background_linger_ms",
                     "delivery_report_ms", "broadcast_linger_ms", "broadcast_ack_linger_ms"):
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
        require(0 <= self.tls_port < 65536, "room.tls_port", "must be a TCP port (0 = no TLS)")
        if self.tls_port:
            require(bool(self.tls_cert and self.tls_key), "room.tls_cert",
                    "tls_port needs tls_cert and tls_key (PEM files)")
        require(self.max_connections >= 0, "room.max_connections", "must be >= 0 (0 = from the open-file limit)")
        require(0 <= self.fd_reserve <= 100_000, "room.fd_reserve", "must be within 0..100000")
        require(0 <= self.connect_rate_per_ip <= 1e6, "room.connect_rate_per_ip", "must be within 0..1e6 (0 = no limit)")
        require(1 <= self.connect_burst_per_ip <= 1e7, "room.connect_burst_per_ip", "must be within 1..1e7")
        require(self.max_connections_per_ip >= 0, "room.max_connections_per_ip", "must be >= 0 (0 = unlimited)")
        require(self.max_preauth_per_ip >= 0, "room.max_preauth_per_ip", "must be >= 0 (0 = unlimited)")
        require(1024 <= self.max_tracked_ips <= 10_000_000, "room.max_tracked_ips", "must be within 1024..10000000")
        require(0 <= self.access_retry_ms <= 3_600_000, "room.access_retry_ms", "must be within 0..3600000")
        require(0 <= self.denied_retry_ms <= 86_400_000, "room.denied_retry_ms", "must be within 0..86400000")
        require(HEADER_MIN <= self.max_auth_frame <= self.max_frame, "room.max_auth_frame",
                "must be within 256..max_frame")
        from services.room.access import check_cidrs

        for name in ("allow_cidrs", "deny_cidrs", "access_exempt_cidrs"):
            value = getattr(self, name)
            require(isinstance(value, list) and all(isinstance(v, str) for v in value), f"room.{name}",
                    "must be a list of CIDR blocks such as [\"10.0.0.0/8\", \"2001:db8::/32\"]")
            bad = check_cidrs(value)
            require(not bad, f"room.{name}", f"{bad!r} is not a CIDR block or address")

    def connection_cap(self, open_files: int) -> int:
        """The instance's connection cap: ``max_connections``, or what the open-file limit leaves."""
        if self.max_connections:
            return self.max_connections
        return max(1, open_files - self.fd_reserve)

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

"""The ``[center]`` config section."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import not_placeholder, require

# A PUSH frame carries the payload plus a header (12 bytes) and the Message envelope (msg_id,
# app id up to 64 bytes, created_ms, seq: < 128 bytes); 1 KiB of headroom keeps every payload
# inside the room's default 64 KiB frame.
MAX_FRAME_BYTES = 64 * 1024
FRAME_HEADROOM_BYTES = 1024


@dataclass
class CenterConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # processes serving `port` together (SO_REUSEPORT; the kernel spreads connections over them).
    # One process is one core (DESIGN.md §2): a host with spare cores runs one per core it gives center.
    processes: int = 1
    # 0 = /metrics only on the API port; otherwise also a bare metrics listener on this port
    metrics_port: int = 0
    # Bearer key for /v1/apps and for acting on behalf of any app; empty disables admin routes
    admin_key: str = ""
    # whole request body, read into memory before parsing. A 60 KiB payload in base64 (80 KiB) plus
    # 1000 uids of 128 chars needs 0.2 MiB; the batch form of 1,000 messages needs ~1.1 MiB at 1 KiB
    # of text each, so 4 MiB takes 1,000 messages of up to ~3.5 KiB (2.6 KiB binary, in base64)
    max_body_bytes: int = 4 * 1024 * 1024
    max_uids_per_push: int = 1000
    # messages of the batch form (DESIGN.md §5: up to 1,000); 1,000 messages of 512 bytes are ~0.6 MiB of body
    max_messages_per_push: int = 1000
    max_payload_bytes: int = 60 * 1024
    max_uid_len: int = 128
    default_ttl_s: int = 7 * 24 * 3600
    max_ttl_s: int = 30 * 24 * 3600
    token_ttl_s: int = 7 * 24 * 3600
    max_token_ttl_s: int = 90 * 24 * 3600
    # a Saver.Store / Room.Push call carries at most this many payload bytes (gRPC limit is 64 MiB)
    rpc_batch_bytes: int = 8 * 1024 * 1024
    # ... and at most this many messages (saver refuses more than saver.max_items = 5000 per call)
    rpc_batch_items: int = 1000
    # message bytes (payload x uids) this process holds across concurrent pushes; beyond it 503 + Retry-After
    max_in_flight_bytes: int = 256 * 1024 * 1024
    # deadline of one Room.Push / Room.Broadcast; a slow room must not hold up the caller
    room_deadline_s: float = 2.0
    # app lookups by API key / id are cached this long (other centers see app edits after it)
    app_cache_ttl_s: float = 10.0
    app_cache_miss_ttl_s: float = 2.0
    # every center copies all apps from MySQL to Redis this often: heals a lost or flushed Redis
    app_republish_s: float = 60.0
    mysql_pool_size: int = 4
    shutdown_grace_s: float = 5.0
    # a stored broadcast is delivered at every connect until acked, for its whole TTL: a shorter
    # default and maximum than for messages to one user
    broadcast_default_ttl_s: int = 24 * 3600
    broadcast_max_ttl_s: int = 7 * 24 * 3600
    # run a broadcast sub-task worker in this process (false: an API-only center; at least one
    # center of the cluster must run one, or broadcasts reach only the users who connect later)
    broadcast_worker: bool = True
    # broadcast sub-tasks (one Room.Broadcast each) this process runs at a time
    broadcast_max_in_flight: int = 64
    # a sub-task not touched this long belongs to a center that died: another one takes it over
    subtask_claim_idle_s: float = 10.0
    # deadline of one Room.Broadcast: an instance writes to every session it holds before it answers
    # (~1 s per 100,000 sessions measured), so more than the 2 s of a Room.Push
    broadcast_room_deadline_s: float = 10.0

    def validate(self) -> None:
        require(0 <= self.port < 65536, "center.port", "must be a TCP port (0 = any free port)")
        require(0 <= self.metrics_port < 65536, "center.metrics_port", "must be a TCP port or 0")
        require(not self.admin_key or len(self.admin_key) >= 8, "center.admin_key", "must be empty or >= 8 characters")
        not_placeholder(self.admin_key, "center.admin_key")
        require(1024 <= self.max_body_bytes <= 64 * 1024 * 1024, "center.max_body_bytes", "must be 1 KiB .. 64 MiB")
        require(1 <= self.processes <= 64, "center.processes", "must be 1 .. 64")
        require(self.processes == 1 or self.port != 0, "center.processes",
                "several processes share one fixed port: set center.port (not 0)")
        require(1 <= self.max_uids_per_push <= 100_000, "center.max_uids_per_push", "must be 1 .. 100000")
        require(1 <= self.max_messages_per_push <= 10_000, "center.max_messages_per_push", "must be 1 .. 10000")
        require(1 <= self.max_payload_bytes <= MAX_FRAME_BYTES - FRAME_HEADROOM_BYTES, "center.max_payload_bytes",
                f"must be 1 .. {MAX_FRAME_BYTES - FRAME_HEADROOM_BYTES} (a payload must fit in one 64 KiB frame)")
        require(1 <= self.max_uid_len <= 128, "center.max_uid_len", "must be 1 .. 128 (the messages.uid column)")
        require(1 <= self.default_ttl_s <= self.max_ttl_s, "center.default_ttl_s", "must be 1 .. max_ttl_s")
        require(self.max_ttl_s <= 365 * 24 * 3600, "center.max_ttl_s", "must be at most a year")
        require(60 <= self.token_ttl_s <= self.max_token_ttl_s, "center.token_ttl_s", "must be 60 .. max_token_ttl_s")
        require(self.rpc_batch_bytes >= self.max_payload_bytes * 2, "center.rpc_batch_bytes",
                "must hold at least two payloads")
        require(self.rpc_batch_bytes <= 32 * 1024 * 1024, "center.rpc_batch_bytes", "must be <= 32 MiB")
        require(1 <= self.rpc_batch_items <= 5000, "center.rpc_batch_items", "must be 1 .. 5000")
        require(self.max_in_flight_bytes >= self.max_payload_bytes, "center.max_in_flight_bytes",
                "must be >= max_payload_bytes")
        require(self.room_deadline_s > 0, "center.room_deadline_s", "must be > 0")
        require(self.app_cache_ttl_s >= 0 and self.app_cache_miss_ttl_s >= 0, "center.app_cache_ttl_s", "must be >= 0")
        require(self.app_republish_s >= 1, "center.app_republish_s", "must be >= 1")
        require(self.mysql_pool_size >= 1, "center.mysql_pool_size", "must be >= 1")
        require(self.shutdown_grace_s >= 0, "center.shutdown_grace_s", "must be >= 0")
        require(1 <= self.broadcast_default_ttl_s <= self.broadcast_max_ttl_s, "center.broadcast_default_ttl_s",
                "must be 1 .. broadcast_max_ttl_s")
        require(self.broadcast_max_ttl_s <= 30 * 24 * 3600, "center.broadcast_max_ttl_s", "must be at most 30 days")
        require(1 <= self.broadcast_max_in_flight <= 10_000, "center.broadcast_max_in_flight", "must be 1 .. 10000")
        require(self.subtask_claim_idle_s >= 0.5, "center.subtask_claim_idle_s", "must be >= 0.5")
        require(self.broadcast_room_deadline_s > 0, "center.broadcast_room_deadline_s", "must be > 0")

"""The pure parts of center's broadcasts: progress states, pacing shares, the per-minute limit."""

from services.center import broadcasts as bc
from services.common.discovery import Instance


def test_progress_states():
    expires = 10_000
    assert bc.progress_state(2, 0, False, expires, 5_000) == "queued"
    assert bc.progress_state(2, 0, True, expires, 5_000) == "running"
    assert bc.progress_state(2, 1, True, expires, 5_000) == "running"
    # done wins over expired: every instance wrote it before or after the TTL ran out
    assert bc.progress_state(2, 2, True, expires, 20_000) == "done"
    assert bc.progress_state(2, 1, True, expires, expires) == "expired"
    assert bc.progress_state(2, 0, False, expires, expires + 1) == "expired"
    assert bc.progress_state(0, 0, False, expires, 5_000) == "done"  # no room instance at all


def test_pacing_share_rounds_up_and_zero_is_unlimited():
    assert bc.share_of_rate(0, 5) == 0
    assert bc.share_of_rate(1000, 0) == 0
    assert bc.share_of_rate(1000, 3) == 334
    assert bc.share_of_rate(1, 60) == 1  # never rounded down to 0 (which would mean unlimited)
    assert bc.share_of_rate(10**12, 1) == (1 << 32) - 1  # fits the uint32 max_per_s


def test_per_minute_limit_allows_a_minute_at_once_then_waits():
    now = [100.0]
    limiter = bc.BroadcastLimiter(clock=lambda: now[0])
    assert [limiter.check("a", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.check("a", 3)
    assert 19.9 < wait <= 20.0  # one token per 20 s at 3 a minute
    assert limiter.check("b", 3) == 0.0  # per app
    now[0] += 20.0
    assert limiter.check("a", 3) == 0.0 and limiter.check("a", 3) > 0
    assert all(limiter.check("a", 0) == 0.0 for _ in range(100))  # 0 = unlimited
    # a changed limit applies at once, with a full bucket of the new size
    assert [limiter.check("a", 5) for _ in range(5)] == [0.0] * 5 and limiter.check("a", 5) > 0


def test_keys_of_one_broadcast_share_a_cluster_slot():
    keys = [bc.state_key(42), bc.done_key(42), bc.delivered_key(42)]
    assert all("{42}" in k for k in keys) and len(set(keys)) == 3


def test_progress_view_uses_decimal_id():
    p = bc.Progress(1 << 63, "a", "done", 2, 2, 7, 1, 2)
    assert p.to_dict() == {"broadcast_id": str(1 << 63), "app": "a", "state": "done", "subtasks_total": 2,
                           "subtasks_done": 2, "delivered": 7, "created_ms": 1, "expires_ms": 2}


def test_message_for_the_room_is_a_broadcast_copy_with_its_ttl():
    b = bc.Broadcast(9, "a", b"p", 1_000, 61_000, 2, 5)
    m = b.message()
    assert (m.msg_id, m.app, m.payload, m.created_ms, m.ttl_s, m.broadcast, m.uid) == (9, "a", b"p", 1_000, 60, True, "")


def test_room_deadline_grows_with_paced_fan_out():
    worker = bc.SubtaskWorker(redis=None, rooms=None, discovery=None, consumer="c#1", tally=None,
                              settings=bc.WorkerSettings(room_deadline_s=10.0))
    room = Instance(service="room", id="r", load=100_000)
    assert worker.deadline_for(room, 0) == 10.0  # unpaced
    assert worker.deadline_for(room, 1_000) == 152.0  # 100 s of pacing, half again, 2 s
    assert worker.deadline_for(Instance(service="room", id="r", load=10), 1_000) == 10.0

"""The room's plain-int counters come out of /metrics under their usual names."""

from prometheus_client import generate_latest

from services.common.codec import ErrorCode, Op
from services.room import metrics as m


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_counts_are_exported_with_labels():
    before = generate_latest().decode()
    m.frames_in[Op.PING].inc()
    m.frames_in[Op.PING].inc(2)
    m.auth_result[ErrorCode.BAD_TOKEN].inc()
    m.SESSIONS.inc(5)
    m.SESSIONS.dec(2)
    m.UPSTREAM.labels("accepted").inc()
    after = generate_latest().decode()
    for name, delta in (('pylon_room_frames_in_total{op="PING"}', 3),
                        ('pylon_room_auths_total{result="bad_token"}', 1),
                        ("pylon_room_sessions", 3),
                        ('pylon_room_upstream_total{outcome="accepted"}', 1)):
        assert _sample(after, name) - _sample(before, name) == delta
    assert "# TYPE pylon_room_frames_in_total counter" in after
    assert "# TYPE pylon_room_sessions gauge" in after
    # every label value exists before it is first counted (dashboards see zeros, not gaps)
    assert 'pylon_room_closed_total{reason="slow_consumer"}' in after

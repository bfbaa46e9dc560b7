"""A silent session is closed no earlier than interval x 1.5 + grace, and at most a second later."""

import pytest

from services.room.config import RoomConfig
from services.room.connection import ClientConnection
from services.room.core import RoomInstance


@pytest.mark.parametrize("now", [10.0, 10.01, 10.5, 10.99])
@pytest.mark.parametrize("heartbeat_s, grace_s", [(1, 1), (3, 0), (270, 15)])
def test_silence_deadline_is_never_early(now, heartbeat_s, grace_s):
    cfg = RoomConfig(heartbeat_min_s=1, heartbeat_grace_s=grace_s)
    room = RoomInstance(cfg, "room-test", apps=None, backends=None, clock=lambda: now)
    session = ClientConnection().session
    session.heartbeat_s = heartbeat_s
    window = heartbeat_s * 1.5 + grace_s
    # the wheel closes a connection when the second equal to its deadline begins
    assert window <= room._silence_deadline(session) - now <= window + 1
    assert cfg.handshake_timeout_s <= room._deadline(cfg.handshake_timeout_s) - now <= cfg.handshake_timeout_s + 1


def test_overdue_check_counts_handshakes_the_wheel_missed():
    from services.room import metrics as m
    from services.room.session import AUTHENTICATING, OPEN

    now = 1000.0
    room = RoomInstance(RoomConfig(), "room-test", apps=None, backends=None, clock=lambda: now)
    states = [AUTHENTICATING, OPEN, AUTHENTICATING]
    deadlines = [int(now) - 5, int(now) - 5, int(now) + 5]
    for state, deadline in zip(states, deadlines, strict=True):
        conn = ClientConnection()
        conn.session.state, conn.session.deadline = state, deadline
        room.connections.add(conn)
    assert room.check_overdue() == 1  # only the handshake past its deadline; OPEN ones heartbeat
    assert m.OVERDUE.value() == 1

"""The supervisor's kill of an instance still draining comes after the whole drain: the hand-over
window (sessions wait DETACHED to be taken over) and the flush deadline, not the flush alone."""

from __future__ import annotations

import signal
import time

from services.room.config import RoomConfig
from services.room.supervisor import RoomSupervisor, drain_deadline_s


def test_the_kill_deadline_covers_the_hand_over_and_the_flushes():
    cfg = RoomConfig(instances=2, drain_handover_s=20, drain_timeout_s=10)
    assert drain_deadline_s(cfg) > 30
    assert drain_deadline_s(RoomConfig(drain_handover_s=0, drain_timeout_s=10)) > 10


def test_a_stop_signal_arms_the_kill_after_the_whole_drain():
    cfg = RoomConfig(instances=2, drain_handover_s=20, drain_timeout_s=10)
    sup = RoomSupervisor(None, cfg, serve=None)
    before = time.monotonic()
    sup._on_stop_signal(signal.SIGTERM, None)  # no instance started: nothing to forward to
    assert sup.stopping
    assert sup.kill_at - before >= 30 + 1
    armed = sup.kill_at
    sup._on_stop_signal(signal.SIGTERM, None)  # a second signal does not move the deadline
    assert sup.kill_at == armed

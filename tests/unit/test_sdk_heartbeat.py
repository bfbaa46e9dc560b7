"""Adaptive heartbeat policy and reconnect backoff (pure)."""

import random

import pytest
from pylon_sdk.backoff import ReconnectBackoff
from pylon_sdk.heartbeat import HeartbeatPolicy


def pongs(p, n):
    """n on-time PONGs where the server keeps the interval (no proposal accepted)."""
    for _ in range(n):
        assert p.proposal() == 0
        assert p.on_pong(p.interval_s) is False


def test_probes_longer_after_consecutive_pongs_and_server_accepts():
    p = HeartbeatPolicy(step_s=60, min_s=30, max_s=900, up_after=3)
    assert p.hint() == 0
    p.on_auth(300)
    pongs(p, 3)
    assert p.proposal() == 360
    assert p.on_pong(360) is True       # accepted: the server now expects PINGs every 360 s
    assert p.interval_s == 360
    pongs(p, 3)                         # counting starts again at the new interval
    assert p.proposal() == 420


def test_server_clamp_marks_its_maximum():
    p = HeartbeatPolicy(step_s=60, up_after=1)
    p.on_auth(300)
    pongs(p, 1)
    assert p.proposal() == 360
    assert p.on_pong(330) is True       # server allowed only 330
    assert p.server_max_s == 330
    for _ in range(10):
        assert p.proposal() == 0        # never probes past the server's bound
        p.on_pong(330)


def test_server_refusal_without_change():
    p = HeartbeatPolicy(step_s=60, up_after=1)
    p.on_auth(480)
    pongs(p, 1)
    assert p.proposal() == 540
    assert p.on_pong(480) is False
    assert p.proposal() == 0


def test_never_beyond_max():
    p = HeartbeatPolicy(step_s=60, max_s=400, up_after=1)
    p.on_auth(360)
    pongs(p, 1)
    assert p.proposal() == 400
    p.on_pong(400)
    pongs(p, 5)


def test_miss_steps_down_and_sets_a_ceiling_until_reprobe():
    p = HeartbeatPolicy(step_s=60, min_s=30, up_after=2, reprobe_after=5)
    p.on_auth(420)
    assert p.on_miss() == 360
    assert p.hint() == 360              # the next AUTH asks for the shorter interval
    p.on_auth(360)
    pongs(p, 4)                         # at the ceiling: no probing
    assert p.ceiling_s == 360
    p.on_pong(360)                      # 5th good PONG: the network may have changed
    assert p.ceiling_s == 0
    assert p.proposal() == 420


def test_miss_never_goes_below_min():
    p = HeartbeatPolicy(step_s=60, min_s=30)
    p.on_auth(45)
    assert p.on_miss() == 30
    assert p.on_miss() == 30


def test_ping_delay_leaves_a_margin():
    p = HeartbeatPolicy(margin_s=10)
    p.on_auth(300)
    assert p.ping_delay() == 290
    p.on_auth(8)
    assert p.ping_delay() == 6          # margin is at most a quarter of a short interval
    p.on_auth(0)
    assert p.ping_delay() > 1           # unknown interval: still pings, not in a tight loop


def test_bad_parameters():
    with pytest.raises(ValueError):
        HeartbeatPolicy(min_s=100, max_s=50)


def test_backoff_full_jitter_doubles_and_caps():
    b = ReconnectBackoff(0.5, 30, rng=random.Random(1))
    assert [b.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    delays = [b.next() for _ in range(12)]
    for n, d in enumerate(delays):
        assert 0 <= d <= b.ceiling(n)
    assert b.attempt == 12
    b.reset()
    assert b.next() <= 0.5


def test_backoff_jitter_for_retry_after():
    b = ReconnectBackoff(rng=random.Random(2))
    for _ in range(100):
        assert 1.0 <= b.jitter(1.0) <= 1.25

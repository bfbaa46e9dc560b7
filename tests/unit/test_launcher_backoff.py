"""Restart backoff and exit descriptions shared by `pylon up` and the room supervisor (pure)."""

from __future__ import annotations

import signal

from services.launcher.procs import RestartBackoff, describe_exit


def test_backoff_grows_while_the_process_keeps_dying_young():
    b = RestartBackoff(first_s=0.5, max_s=4.0, stable_s=30.0)
    assert [b.died(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_resets_after_a_stable_run():
    b = RestartBackoff(first_s=0.5, max_s=30.0, stable_s=30.0)
    b.died(1.0)
    b.died(1.0)
    assert b.died(31.0) == 0.5
    assert b.died(2.0) == 1.0


def test_backoff_never_overflows():
    b = RestartBackoff(first_s=1.0, max_s=30.0)
    for _ in range(2000):
        assert b.died(0.0) <= 30.0


def test_describe_exit():
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"
    assert describe_exit(None) == "is still running"

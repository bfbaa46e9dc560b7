import pytest

from services.center.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_zero_rate_is_unlimited():
    limiter = RateLimiter(Clock())
    assert all(limiter.check("a", 0, 1000) == 0 for _ in range(100))


def test_burst_of_one_second_then_limited_with_retry_after():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.check("a", 10, 1) for _ in range(10)] == [0.0] * 10
    wait = limiter.check("a", 10, 1)
    assert wait == pytest.approx(0.1)
    clock.now += 0.1
    assert limiter.check("a", 10, 1) == 0.0
    assert limiter.check("a", 10, 1) > 0


def test_apps_have_separate_buckets():
    limiter = RateLimiter(Clock())
    for _ in range(5):
        limiter.check("a", 5, 1)
    assert limiter.check("a", 5, 1) > 0
    assert limiter.check("b", 5, 1) == 0.0


def test_batch_larger_than_a_second_goes_through_then_the_debt_is_repaid():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.check("a", 10, 100) == 0.0      # 100 messages at 10/s: admitted once ...
    wait = limiter.check("a", 10, 1)
    assert wait == pytest.approx(9.1)              # ... then ~9 s of debt + 0.1 s for the next message
    clock.now += wait
    assert limiter.check("a", 10, 1) == 0.0


def test_long_run_rate_is_exact():
    clock = Clock()
    limiter = RateLimiter(clock)
    admitted = 0
    for _ in range(10_000):  # 100 s in 10 ms steps, trying 3 messages each step
        clock.now += 0.01
        if limiter.check("a", 50, 3) == 0.0:
            admitted += 3
    assert 50 * 100 <= admitted <= 50 * 100 + 50 + 3


def test_rate_change_applies_immediately():
    clock = Clock()
    limiter = RateLimiter(clock)
    for _ in range(100):
        limiter.check("a", 100, 1)
    assert limiter.check("a", 100, 1) > 0
    clock.now += 1
    assert limiter.check("a", 2, 1) == 0.0   # bucket shrinks to the new capacity of 2
    assert limiter.check("a", 2, 1) == 0.0
    assert limiter.check("a", 2, 1) == pytest.approx(0.5)

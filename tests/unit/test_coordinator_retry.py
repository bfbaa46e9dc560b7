"""Retry verdicts and the backoff schedule; the per-app token bucket."""

import random

import pytest

from services.coordinator.rate_limit import TokenBucket
from services.coordinator.retry import RetryPolicy, Verdict, classify
from services.coordinator.webhook_http import parse_retry_after


@pytest.mark.parametrize("status,verdict", [
    (200, Verdict.DONE), (204, Verdict.DONE), (299, Verdict.DONE),
    (408, Verdict.RETRY), (429, Verdict.RETRY), (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY),
    (599, Verdict.RETRY), (None, Verdict.RETRY),
    (400, Verdict.DROP), (401, Verdict.DROP), (403, Verdict.DROP), (404, Verdict.DROP), (410, Verdict.DROP),
    (301, Verdict.DROP), (302, Verdict.DROP), (100, Verdict.DROP),
])
def test_classify(status, verdict):
    assert classify(status) is verdict


def test_schedule_doubles_from_half_a_second_and_caps_at_30():
    p = RetryPolicy(max_attempts=8, base_s=0.5, cap_s=30.0)
    assert [p.ceiling(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_jitter_stays_between_half_and_full_ceiling():
    p = RetryPolicy(base_s=0.5, cap_s=30.0, rng=random.Random(7))
    for n in range(1, 12):
        for _ in range(200):
            d = p.delay(n)
            assert p.ceiling(n) / 2 <= d <= p.ceiling(n)
    # not lock step: many coordinators retrying the same server spread out
    assert len({round(p.delay(3), 6) for _ in range(50)}) > 40


def test_retry_after_wins_within_the_cap():
    p = RetryPolicy(base_s=0.5, cap_s=30.0)
    assert p.delay(1, retry_after_s=7) == 7
    assert p.delay(1, retry_after_s=3600) == 30


def test_attempt_budget():
    p = RetryPolicy(max_attempts=3)
    assert [p.should_retry(n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize("value,expected", [("5", 5.0), (" 12 ", 12.0), ("", None), (None, None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-3", None)])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


def test_token_bucket_spaces_requests_after_the_burst():
    b = TokenBucket(rate=10, burst=2, now=0.0)
    assert b.reserve(0.0) == 0
    assert b.reserve(0.0) == 0
    assert b.reserve(0.0) == pytest.approx(0.1)   # third waits one token time
    assert b.reserve(0.0) == pytest.approx(0.2)   # waiters queue behind each other
    assert b.reserve(1.0) == 0                    # refilled (capped at the burst)
    assert b.reserve(1.0) == 0
    assert b.reserve(1.0) > 0

"""The SDK's bounded memory of delivered message ids."""

import pytest
from pylon_sdk.dedupe import RecentIds


def test_remembers_and_forgets_the_oldest():
    r = RecentIds(3)
    for i in (1, 2, 3):
        assert not r.seen(i)
        r.add(i)
    assert r.seen(1) and r.seen(2) and r.seen(3)
    r.add(4)
    assert len(r) == 3
    assert not r.seen(1)  # oldest evicted
    assert r.seen(4)


def test_seen_refreshes_an_id():
    r = RecentIds(3)
    for i in (1, 2, 3):
        r.add(i)
    assert r.seen(1)      # a duplicate of 1 arrived: keep it known
    r.add(4)
    assert r.seen(1)
    assert not r.seen(2)


def test_capacity_is_enforced_under_load():
    r = RecentIds(10_000)
    for i in range(50_000):
        r.add(i)
    assert len(r) == 10_000
    assert 49_999 in r and 39_999 not in r


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        RecentIds(0)

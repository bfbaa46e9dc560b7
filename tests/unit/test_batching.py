import asyncio

import pytest

from services.common.batching import Batcher, Overloaded


class Recorder:
    def __init__(self, delay=0.0, fail=False):
        self.batches = []
        self.delay = delay
        self.fail = fail

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("backend down")
        return [x * 10 for x in items]


async def test_items_flush_together_after_the_delay_with_results_in_order():
    rec = Recorder()
    b = Batcher("t1", rec, delay_s=0.01)
    got = []
    for i in range(5):
        b.submit(i, lambda r, e: got.append((r, e)))
    await asyncio.sleep(0.05)
    assert rec.batches == [[0, 1, 2, 3, 4]]
    assert got == [(0, None), (10, None), (20, None), (30, None), (40, None)]
    assert b.pending == 0


async def test_a_full_batch_flushes_at_once_and_leftovers_follow():
    rec = Recorder()
    b = Batcher("t2", rec, max_batch=3, delay_s=10)
    for i in range(4):
        b.submit(i)
    await asyncio.sleep(0)
    assert rec.batches == [[0, 1, 2]]
    await b.drain(1)
    assert rec.batches == [[0, 1, 2], [3]]


async def test_batches_grow_while_every_flush_slot_is_busy():
    rec = Recorder(delay=0.05)
    b = Batcher("t3", rec, delay_s=0.001, max_concurrent_flushes=1)
    b.submit(0)
    await asyncio.sleep(0.01)  # first batch in flight
    for i in range(1, 50):
        b.submit(i)
        await asyncio.sleep(0.0005)
    await b.drain(2)
    assert rec.batches[0] == [0]
    assert len(rec.batches) <= 4 and sum(map(len, rec.batches)) == 50


async def test_bounded_queue_sheds_with_overloaded():
    b = Batcher("t4", Recorder(delay=0.1), max_pending=3, delay_s=0.001)
    for i in range(3):
        b.submit(i)
    with pytest.raises(Overloaded):
        b.submit(3)
    await b.drain(1)
    b.submit(4)  # room again once the batch is done
    await b.drain(1)


async def test_a_failed_flush_reaches_every_item():
    b = Batcher("t5", Recorder(fail=True), delay_s=0.001)
    errors = []
    for i in range(3):
        b.submit(i, lambda r, e: errors.append((r, type(e))))
    await b.drain(1)
    assert errors == [(None, ConnectionError)] * 3


async def test_busy_delay_while_items_arrive_fast_and_quick_delay_when_quiet():
    rec = Recorder()
    b = Batcher("t_busy", rec, delay_s=0.01, busy_delay_s=0.3, busy_rate=20)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < 0.6:  # a storm of ~500+ items/s for 0.6 s
        b.submit(0)
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.5)
    sizes = [len(x) for x in rec.batches]
    # without the busy delay this is ~60 batches of ~10; with it, a quick one or two, then 0.3 s ones
    assert 2 <= len(sizes) <= 6, sizes
    assert max(sizes) >= 30, sizes
    await asyncio.sleep(1.0)  # quiet now: a lone item leaves after the quick delay
    n = len(rec.batches)
    t1 = loop.time()
    b.submit(1)
    while len(rec.batches) == n:
        await asyncio.sleep(0.002)
    assert loop.time() - t1 < 0.15


def test_busy_wait_gathers_busy_items_at_the_measured_rate_within_bounds():
    b = Batcher("t_busy2", Recorder(), delay_s=0.02, busy_delay_s=1.0, busy_rate=50, busy_items=200)
    for rate, expected in ((10, 0.02),      # below busy_rate: the quick delay
                           (80, 1.0),       # 200 items would take 2.5 s: capped
                           (400, 0.5),      # 200 items at 400/s
                           (100_000, 0.02)):  # a fast stream fills a batch at once: never below delay_s
        b._fill_rate, b._cut_at = rate, 100.0
        assert b._delay(100.1) == pytest.approx(expected)
    b._fill_rate, b._cut_at = 400, 100.0
    assert b._delay(102.0) == 0.02  # nothing for longer than the cap since the last flush: quiet again

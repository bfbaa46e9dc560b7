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

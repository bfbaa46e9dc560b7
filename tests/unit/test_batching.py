import asyncio

import pytest

from services.common.batching import Batcher, Overloaded


class Recorder:
    def __init__(self, delay=0.0, fail=False):
        self.batches = []
        self.delay = delay
        self.fail = fail
        self.started_at = []

    async def __call__(self, items):
        self.batches.append(list(items))
        self.started_at.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("backend down")
        return [x * 10 for x in items]


async def test_a_quiet_system_flushes_at_once_without_waiting_for_the_delay():
    rec = Recorder()
    b = Batcher("t_quiet", rec, delay_s=5.0)
    loop = asyncio.get_running_loop()
    got = []
    t0 = loop.time()
    b.submit(7, lambda r, e: got.append((r, e)))
    while not got:
        await asyncio.sleep(0)
    assert got == [(70, None)]
    assert loop.time() - t0 < 0.05  # not the 5 s delay
    assert rec.batches == [[7]]


async def test_items_of_one_loop_iteration_travel_together_with_results_in_order():
    rec = Recorder()
    b = Batcher("t1", rec, delay_s=0.01)
    got = []
    for i in range(5):
        b.submit(i, lambda r, e: got.append((r, e)))
    await asyncio.sleep(0.05)
    assert rec.batches == [[0, 1, 2, 3, 4]]
    assert got == [(0, None), (10, None), (20, None), (30, None), (40, None)]
    assert b.pending == 0


async def test_group_commit_items_gather_while_a_flush_is_in_flight_and_leave_when_it_returns():
    # the first flush takes 0.3 s: the 19 items below arrive (in separate loop iterations) well
    # within it even on a loaded machine
    rec = Recorder(delay=0.3)
    b = Batcher("t_gc", rec, delay_s=10.0, max_concurrent_flushes=4)
    b.submit(0)
    await asyncio.sleep(0.01)  # first batch in flight
    for i in range(1, 20):
        b.submit(i)
        await asyncio.sleep(0)
    for _ in range(300):  # not drain(): it would cut the batch itself
        if len(rec.batches) == 2:
            break
        await asyncio.sleep(0.01)
    assert rec.batches == [[0], list(range(1, 20))]
    # the second left when the first returned (not at once with a slot free, nor after delay_s)
    assert 0.29 <= rec.started_at[1] - rec.started_at[0] < 2.0
    await b.drain(2)


async def test_a_slow_flush_lets_the_next_batch_take_a_free_slot_after_delay_s():
    rec = Recorder(delay=2.0)
    b = Batcher("t_slow", rec, delay_s=0.02, max_concurrent_flushes=2)
    b.submit(0)
    await asyncio.sleep(0.005)
    b.submit(1)
    for _ in range(150):
        if len(rec.batches) == 2:
            break
        await asyncio.sleep(0.01)
    assert rec.batches == [[0], [1]]
    assert rec.started_at[1] - rec.started_at[0] < 1.5  # the second did not wait 2 s for the first
    await b.drain(3)


async def test_batches_grow_while_every_flush_slot_is_busy():
    rec = Recorder(delay=0.3)
    b = Batcher("t3", rec, delay_s=0.001, max_concurrent_flushes=1)
    b.submit(0)
    await asyncio.sleep(0.01)  # first batch in flight
    for i in range(1, 50):
        b.submit(i)
        await asyncio.sleep(0)
    for _ in range(300):  # not drain(): it would cut the batches itself
        if sum(map(len, rec.batches)) == 50:
            break
        await asyncio.sleep(0.01)
    assert rec.batches[0] == [0]
    assert len(rec.batches) <= 4 and sum(map(len, rec.batches)) == 50
    assert [x for batch in rec.batches for x in batch] == list(range(50))  # order kept


async def test_a_full_batch_flushes_at_once_and_leftovers_follow():
    rec = Recorder()
    b = Batcher("t2", rec, max_batch=3, delay_s=10)
    for i in range(4):
        b.submit(i)
    await asyncio.sleep(0)
    assert rec.batches == [[0, 1, 2]]
    await b.drain(1)
    assert rec.batches == [[0, 1, 2], [3]]


async def test_bounded_queue_sheds_with_overloaded():
    b = Batcher("t4", Recorder(delay=0.1), max_pending=3, delay_s=0.001)
    for i in range(3):
        b.submit(i)
    with pytest.raises(Overloaded):
        b.submit(3)
    await b.drain(1)
    b.submit(4)  # room again once the batch is done
    await b.drain(1)


async def test_submit_many_is_all_or_nothing_against_the_bound():
    rec = Recorder(delay=0.05)
    b = Batcher("t_many_bound", rec, max_pending=5)
    first = asyncio.ensure_future(b.submit_many([1, 2, 3]))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await b.submit_many([4, 5, 6])
    assert b.pending == 3  # nothing of the refused call was queued
    assert await first == [10, 20, 30]


async def test_a_failed_flush_reaches_every_item():
    b = Batcher("t5", Recorder(fail=True), delay_s=0.001)
    errors = []
    for i in range(3):
        b.submit(i, lambda r, e: errors.append((r, type(e))))
    await b.drain(1)
    assert errors == [(None, ConnectionError)] * 3


async def test_a_failed_flush_fails_exactly_the_callers_in_its_batch():
    calls = []

    async def flush(items):
        calls.append(list(items))
        await asyncio.sleep(0.02)
        if len(calls) == 1:
            raise ConnectionError("first batch lost")
        return [x + 100 for x in items]

    b = Batcher("t_exact", flush, max_concurrent_flushes=1, delay_s=10)
    a = asyncio.ensure_future(b.submit_many([1, 2]))       # batch 1 (leaves at once)
    await asyncio.sleep(0.005)
    c = asyncio.ensure_future(b.submit_many([3]))          # gathers while batch 1 is in flight
    d = asyncio.ensure_future(b.submit_many([4, 5]))
    with pytest.raises(ConnectionError):
        await a
    assert await c == [103]
    assert await d == [104, 105]
    assert calls == [[1, 2], [3, 4, 5]]


async def test_an_exception_as_one_items_result_fails_only_its_caller():
    async def flush(items):
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    b = Batcher("t_item_err", flush)
    good = asyncio.ensure_future(b.submit_many([1, 2]))
    bad = asyncio.ensure_future(b.submit_many([3, -1]))
    assert await good == [1, 2]
    with pytest.raises(ValueError, match="bad -1"):
        await bad


async def test_a_flush_that_answers_the_wrong_number_of_results_fails_its_items():
    async def flush(items):
        return [1]

    b = Batcher("t_short", flush)
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        await b.submit_many(["a", "b"])


async def test_storm_gathers_while_items_arrive_fast_and_a_quiet_item_leaves_at_once():
    rec = Recorder()
    b = Batcher("t_busy", rec, delay_s=0.01, busy_delay_s=0.3, busy_rate=20)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < 0.6:  # a storm of ~500+ items/s for 0.6 s
        b.submit(0)
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.5)
    sizes = [len(x) for x in rec.batches]
    # without the storm rule this is hundreds of batches of one or two; with it, 0.3 s ones
    assert len(sizes) <= 20, sizes
    assert max(sizes) >= 30, sizes
    await asyncio.sleep(1.0)  # quiet now: a lone item leaves at once
    n = len(rec.batches)
    t1 = loop.time()
    b.submit(1)
    while len(rec.batches) == n:
        await asyncio.sleep(0.002)
    assert loop.time() - t1 < 0.05


def test_storm_wait_gathers_busy_items_at_the_rate_within_bounds():
    b = Batcher("t_busy2", Recorder(), delay_s=0.02, busy_delay_s=1.0, busy_rate=50, busy_items=200)
    b._win_start, b._win_count = 100.0, 0
    for rate, expected in ((10, 0.0),        # below busy_rate: no storm wait
                           (80, 1.0),        # 200 items would take 2.5 s: capped
                           (400, 0.5),       # 200 items at 400/s
                           (100_000, 0.002)):  # a fast stream gathers 200 in 2 ms
        b._rate = rate
        assert b.storm_wait(100.05) == pytest.approx(expected)
    b._rate = 400
    assert b.storm_wait(102.0) == 0.0  # nothing arrived for longer than the cap: quiet again


def test_storm_wait_is_bounded_by_a_multiple_of_the_backends_latency():
    b = Batcher("t_busy3", Recorder(), busy_delay_s=1.0, busy_rate=50, busy_items=200, busy_rtt_factor=4)
    b._win_start, b._win_count, b._rate = 100.0, 0, 400  # alone: 0.5 s
    b.srtt = 0.003                       # a fast backend: 12 ms
    assert b.storm_wait(100.05) == pytest.approx(0.012)
    b.srtt = 0.2                         # a loaded one: the items bound (0.5 s) again
    assert b.storm_wait(100.05) == pytest.approx(0.5)
    b.srtt = 0.0                         # never called yet: no wait
    assert b.storm_wait(100.05) == 0.0


async def test_storm_with_a_fast_backend_keeps_batches_quick():
    rec = Recorder(delay=0.002)
    b = Batcher("t_busy4", rec, busy_delay_s=1.0, busy_rate=50, busy_items=200, busy_rtt_factor=4,
                max_concurrent_flushes=1)
    loop = asyncio.get_running_loop()
    waits = []
    t0 = loop.time()
    while loop.time() - t0 < 0.5:  # ~300-500 items/s
        sent = loop.time()
        b.submit(0, lambda r, e, sent=sent: waits.append(loop.time() - sent))
        await asyncio.sleep(0.002)
    await b.drain(2)
    waits.sort()
    assert waits[int(0.99 * len(waits))] < 0.1, waits[-5:]  # not the 200-item / 1 s wait
    assert len(rec.batches) < len(waits)                     # and still batched


async def test_drain_flushes_what_is_queued():
    rec = Recorder(delay=0.01)
    b = Batcher("t_drain", rec, max_concurrent_flushes=1, delay_s=10)
    for i in range(3):
        b.submit(i)
        await asyncio.sleep(0)
    await b.drain(1)
    assert sum(map(len, rec.batches)) == 3 and b.pending == 0


async def test_batches_are_bounded_by_weight_too_and_a_heavy_item_travels_alone():
    rec = Recorder(delay=0.01)
    b = Batcher("t_weight", rec, max_batch=100, max_weight=10, weigh=lambda x: x, max_concurrent_flushes=1)
    b.submit(1)
    await asyncio.sleep(0)  # in flight alone
    for w in (4, 4, 4, 30, 2):
        b.submit(w)
    await b.drain(2)
    assert rec.batches == [[1], [4, 4], [4], [30], [2]]


async def test_linger_holds_background_work_even_when_nothing_is_in_flight():
    rec = Recorder()
    b = Batcher("t_linger", rec, linger_s=0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    b.submit(1)
    await asyncio.sleep(0.02)
    b.submit(2)
    assert rec.batches == []
    while not rec.batches:
        await asyncio.sleep(0.005)
    assert rec.batches == [[1, 2]] and loop.time() - t0 >= 0.05


async def test_a_backlog_of_several_batches_uses_every_free_slot_at_once():
    rec = Recorder(delay=0.05)
    b = Batcher("t_backlog", rec, max_batch=2, max_concurrent_flushes=3, delay_s=10)
    for i in range(6):
        b.submit(i)
    await asyncio.sleep(0.01)
    assert rec.batches == [[0, 1], [2, 3], [4, 5]]  # not 10 s apart
    await b.drain(1)

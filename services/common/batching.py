"""Micro-batching: many small requests become one RPC / one pipeline / one statement.

``Batcher.submit(item, done)`` queues an item and returns at once; ``flush(items)`` is one
coroutine call for a whole batch and returns one result per item (a result that is an exception
instance is that item's failure), or raises, and every item of that batch gets the exception.
``done(result, error)`` is a plain callback, so a waiting connection costs no task or future;
``submit_many`` is the awaitable form for a caller with a list of items.

When a batch leaves (group commit, adaptive to load):
  - nothing in flight to the target: at once (at the end of the current loop iteration, so
    items submitted by the same wakeup still travel together). A quiet system adds no wait.
  - a flush in flight: the batch gathers, and leaves the moment a flush returns. Its size is
    then the arrival rate times the call's latency, so it grows with the load by itself (one
    RPC costs ~150-500 us of CPU on each side whatever it carries, DESIGN.md §2); while every
    one of ``max_concurrent_flushes`` slots is busy it keeps filling. With a slot free it may
    also leave ``delay_s`` after its first item, so one slow call does not hold the next batch.
  - ``linger_s``: for work nobody waits on (acks, delivery counts, status events) a batch
    waits this long after its first item even when nothing is in flight: fewer calls, and the
    latency is nobody's.
  - ``max_batch`` items, or ``max_weight`` by ``weigh(item)`` (say, messages in a request): at
    once (a slot permitting); a batch never carries more, except one item heavier on its own.
  - storm (``busy_delay_s`` set): while items arrive at ``busy_rate``/s or more and the calls
    themselves take time (the smoothed latency of the last flushes, ``srtt``), a batch waits
    for company: long enough to gather ``busy_items`` at the current rate, but at most
    ``busy_rtt_factor`` x srtt and at most ``busy_delay_s``. A loaded backend (srtt of tens of
    ms) thus gets few, large calls; a fast one (a few ms) keeps the wait at a few ms. Without
    ``busy_rtt_factor`` the srtt bound is off (the wait is busy_items / rate, capped).
``tagged``: the queued batch notes the request id of each submitting call (``submit_many`` takes
it from the caller's context, services/common/logs.py; ``submit`` takes ``tag``), and its flush
runs with those ids as its ``logs.REQUEST_IDS``: its log lines and its RPC's metadata name the
requests it carries. Bounded (logs.RequestIdSet) and noted per call, not per item. When one cut
takes only part of the queue (a backlog over ``max_batch``), the rest keeps the same ids: a
batch may then name a request whose items all left in the one before.
At most ``max_pending`` items wait or are in flight; past that ``submit`` raises ``Overloaded``
and the caller sheds (the 360 lesson: unbounded fan-out under jitter is what blows up memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from services.common import logs, metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
Done = Callable[[Any, BaseException | None], None]

# Arrival rate: items counted over windows of at least this long.
RATE_WINDOW_S = 0.1
# Weight of the newest flush in the smoothed flush latency (TCP's srtt uses 1/8).
SRTT_GAIN = 0.25


class Overloaded(Exception):
    """A bounded queue is full; the caller should shed and tell its peer to retry later."""


class Batcher(Generic[T]):
    def __init__(self, name: str, flush: Callable[[list[T]], Awaitable[Sequence[Any] | None]], *,
                 max_batch: int = 500, delay_s: float = 0.002, max_pending: int = 50_000,
                 max_concurrent_flushes: int = 4, busy_delay_s: float | None = None,
                 busy_rate: float = 0.0, busy_items: int = 0, busy_rtt_factor: float | None = None,
                 weigh: Callable[[T], int] | None = None, max_weight: int = 0, linger_s: float = 0.0,
                 tagged: bool = False) -> None:
        if max_batch < 1 or max_concurrent_flushes < 1 or max_pending < 1:
            raise ValueError(f"{name}: max_batch, max_concurrent_flushes and max_pending must be >= 1")
        self.name = name
        self._flush_fn = flush
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.max_pending = max_pending
        self.max_concurrent_flushes = max_concurrent_flushes
        self.busy_delay_s = busy_delay_s
        self.busy_rate = busy_rate
        self.busy_items = busy_items or max_batch
        self.busy_rtt_factor = busy_rtt_factor
        self.linger_s = linger_s
        self._weigh = weigh
        self.max_weight = max_weight if weigh is not None else 0
        self._weights: list[int] = []
        self._queued_weight = 0
        self._items: list[T] = []
        self._dones: list[Done | None] = []
        self._tags: logs.RequestIdSet | None = logs.RequestIdSet() if tagged else None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._due_at = 0.0        # loop time the armed timer fires (0: at once)
        self._hold = False  # the queued batch is held by the storm rule or linger_s (not cut by a returning flush)
        self._pending = 0  # queued + in flight
        self._slot_wait = False  # the queued batch is due but every flush slot is busy
        self._tasks: set[asyncio.Task] = set()
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._shed = metrics.SHED.labels(name)
        self._first_at = 0.0     # loop time of the queued batch's first item
        self._win_start = 0.0    # arrival-rate window
        self._win_count = 0
        self._rate = 0.0         # items/s in the last full window
        self.srtt = 0.0          # smoothed flush latency, s
        self.flushes = 0         # batches sent (for tests and metrics)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def rate(self) -> float:
        return self._rate

    # ------------------------------------------------------------ submit
    def submit(self, item: T, done: Done | None = None, tag: str | None = None) -> None:
        if self._pending >= self.max_pending:
            self._shed.inc()
            raise Overloaded(f"{self.name} queue full ({self.max_pending})")
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._count_arrival(now)
        if not self._items:
            self._first_at = now
        self._items.append(item)
        self._dones.append(done)
        if tag is not None and self._tags is not None:
            self._tags.add(tag)
        self._pending += 1
        if self.max_weight:
            w = self._weigh(item)
            self._weights.append(w)
            self._queued_weight += w
        if self._full():
            self._start_flush()
        elif self._timer is None and not self._slot_wait:
            self._arm(loop, now)

    async def submit_many(self, items: Sequence[T]) -> list[Any]:
        """Queue ``items`` (all of them or, when they do not fit, none: Overloaded) and wait for
        their results, in order. The first failure of any of them is raised once every batch
        carrying them has answered."""
        if not items:
            return []
        if self._pending + len(items) > self.max_pending:
            self._shed.inc()
            raise Overloaded(f"{self.name}: {self._pending} items waiting (limit {self.max_pending})")
        fut = asyncio.get_running_loop().create_future()
        results: list[Any] = [None] * len(items)
        state = [len(items), None]  # remaining, first error

        def completer(i: int) -> Done:
            def done(result: Any, error: BaseException | None) -> None:
                if error is None and isinstance(result, BaseException):
                    error = result
                if error is not None and state[1] is None:
                    state[1] = error
                results[i] = result
                state[0] -= 1
                if state[0] == 0 and not fut.done():
                    if state[1] is not None:
                        fut.set_exception(state[1])
                    else:
                        fut.set_result(results)
            return done

        if self._tags is not None:
            tag = logs.REQUEST_IDS.get() or logs.REQUEST_ID.get()
            if tag is not None:
                self._tags.add(tag)
        for i, item in enumerate(items):
            self.submit(item, completer(i))
        return await fut

    def _count_arrival(self, now: float) -> None:
        self._win_count += 1
        elapsed = now - self._win_start
        if elapsed >= RATE_WINDOW_S:
            # a window that ends in a long silence says the stream stopped, not its old average
            self._rate = self._win_count / elapsed if elapsed < 2 * RATE_WINDOW_S else 1 / elapsed
            self._win_start, self._win_count = now, 0

    # ------------------------------------------------------------ when to cut
    def storm_wait(self, now: float) -> float:
        """How long the batch whose first item arrives now should gather (0: no storm)."""
        if self.busy_delay_s is None:
            return 0.0
        rate = self._rate
        since = now - self._win_start
        if since > 2 * RATE_WINDOW_S + self.busy_delay_s:
            rate = 0.0  # nothing arrived for a while: the last window's rate is stale
        elif since >= RATE_WINDOW_S / 10:
            rate = max(rate, self._win_count / since)  # a storm that starts shows within ~10 ms
        if rate < self.busy_rate or rate <= 0:
            return 0.0
        wait = min(self.busy_delay_s, self.busy_items / rate)
        if self.busy_rtt_factor is not None:
            wait = min(wait, self.busy_rtt_factor * self.srtt)
        return wait

    def _arm(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Arm the cut of the queued batch (its first item arrived at ``_first_at``)."""
        hold = max(self.storm_wait(now), self.linger_s)
        if hold > 0:
            self._hold = True
            self._due_at = self._first_at + hold
            self._timer = loop.call_at(self._due_at, self._on_timer)
        elif not self._tasks:
            self._hold = False
            self._due_at = 0.0
            self._timer = loop.call_soon(self._on_timer)  # idle: at once
        else:
            # a flush is in flight: gather until it returns (_flush_finished), or delay_s
            self._hold = False
            self._due_at = self._first_at + self.delay_s
            self._timer = loop.call_at(self._due_at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._start_flush()

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        if len(self._tasks) >= self.max_concurrent_flushes:
            self._slot_wait = True  # cut when a slot frees (_flush_finished)
            return
        self._slot_wait = False
        n = self._cut_size()
        items, dones = self._items[:n], self._dones[:n]
        del self._items[:n], self._dones[:n]
        tags = None
        if self._tags is not None:
            tags = self._tags.joined() or ""
            if not self._items:
                self._tags = logs.RequestIdSet()
        self._depth.set(self._pending)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(items, dones, loop.time(), tags))
        self._tasks.add(task)
        self.flushes += 1
        task.add_done_callback(self._flush_finished)
        if self._items:
            now = loop.time()
            self._first_at = now
            if self._full():  # a backlog bigger than one batch: the next one may take a free slot now
                self._hold = False
                self._timer = loop.call_soon(self._on_timer)
            else:
                self._arm(loop, now)

    def _cut_size(self) -> int:
        """Items of the next batch: up to max_batch, and up to max_weight (at least one item)."""
        n = min(len(self._items), self.max_batch)
        if self.max_weight:
            total = 0
            for i, w in enumerate(self._weights[:n]):
                if i and total + w > self.max_weight:
                    n = i
                    break
                total += w
            del self._weights[:n]
            self._queued_weight -= total
        return n

    def _full(self) -> bool:
        return len(self._items) >= self.max_batch or bool(self.max_weight and self._queued_weight >= self.max_weight)

    def _flush_finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not self._items:
            return
        loop = asyncio.get_running_loop()
        if self._full():
            self._start_flush()
        elif self._hold and self._due_at > loop.time():
            if self._timer is None:  # the due time passed while every slot was busy
                self._timer = loop.call_at(self._due_at, self._on_timer)
        else:
            self._start_flush()  # group commit: what gathered meanwhile leaves now

    async def _run(self, items: list[T], dones: list[Done | None], started: float, tags: str | None) -> None:
        # this task's context is a copy of whichever caller's submit cut the batch: its ids are
        # replaced by the batch's own (none for an untagged batcher)
        if tags is not None:
            logs.REQUEST_IDS.set(tags or None)
            logs.REQUEST_ID.set(None)
        elif logs.REQUEST_IDS.get() is not None or logs.REQUEST_ID.get() is not None:
            logs.REQUEST_IDS.set(None)
            logs.REQUEST_ID.set(None)
        results: Sequence[Any] | None = None
        error: BaseException | None = None
        try:
            results = await self._flush_fn(items)
        except asyncio.CancelledError:
            error = ConnectionAbortedError(f"{self.name} cancelled")
        except Exception as exc:
            error = exc
            log.warning("%s: batch of %d failed: %s", self.name, len(items), exc)
        finally:
            self._pending -= len(items)
            self._depth.set(self._pending)
            rtt = asyncio.get_running_loop().time() - started
            self.srtt = rtt if self.srtt == 0.0 else self.srtt + SRTT_GAIN * (rtt - self.srtt)
        if error is None and results is not None and len(results) != len(items):
            error = RuntimeError(f"{self.name}: flush returned {len(results)} results for {len(items)} items")
            log.error("%s", error)
        for i, done in enumerate(dones):
            if done is None:
                continue
            try:
                done(results[i] if (error is None and results is not None) else None, error)
            except Exception:
                log.exception("%s: completion callback failed", self.name)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued and wait for flushes in flight."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._items or self._tasks:
            self._start_flush()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not self._tasks:
                break
            await asyncio.wait(list(self._tasks), timeout=left, return_when=asyncio.FIRST_COMPLETED)

"""Micro-batching: many small requests become one RPC / one pipeline.

``Batcher.submit(item, done)`` queues an item and returns at once. The batch is flushed when
it reaches ``max_batch`` items or ``delay_s`` after its first item, whichever comes first;
``flush(items)`` is one coroutine call for the whole batch and returns one result per item (or
raises, and every item's ``done`` gets the exception). ``done(result, error)`` is a plain
callback, so a waiting connection costs no task or future. While ``max_concurrent_flushes``
batches are in flight, a due batch is not cut: it keeps filling until a flush returns, so the
batch size grows with the load by itself (one RPC costs ~150-500 us whatever it carries). With
``busy_delay_s`` set, while items arrive at ``busy_rate`` per second or more (the rate the
previous batch filled at, if the next item came within ``busy_delay_s`` of its flush) a batch
waits long enough to gather ``busy_items`` at that rate, at most ``busy_delay_s``: under a storm
the wait costs little latency and saves an RPC per few items; when quiet, items leave after
``delay_s``. At most ``max_pending`` items wait;
past that ``submit`` raises ``Overloaded`` and the caller sheds (the 360 lesson: unbounded
fan-out under jitter is what blows up memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from services.common import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
Done = Callable[[Any, BaseException | None], None]


class Overloaded(Exception):
    """A bounded queue is full; the caller should shed and tell its peer to retry later."""


class Batcher(Generic[T]):
    def __init__(self, name: str, flush: Callable[[list[T]], Awaitable[Sequence[Any] | None]], *,
                 max_batch: int = 500, delay_s: float = 0.002, max_pending: int = 50_000,
                 max_concurrent_flushes: int = 4, busy_delay_s: float | None = None,
                 busy_rate: float = 0.0, busy_items: int = 0) -> None:
        self.name = name
        self._flush_fn = flush
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.max_pending = max_pending
        self._items: list[T] = []
        self._dones: list[Done | None] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pending = 0  # queued + in flight
        self.max_concurrent_flushes = max_concurrent_flushes
        self._due = False  # a flush is due but every flush slot is busy
        self._tasks: set[asyncio.Task] = set()
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._shed = metrics.SHED.labels(name)
        self.busy_delay_s = busy_delay_s
        self.busy_rate = busy_rate
        self.busy_items = busy_items or max_batch
        self._armed_at = 0.0   # loop time the current batch's timer was armed
        self._cut_at = 0.0     # loop time the previous batch was cut
        self._fill_rate = 0.0  # items/s the previous batch filled at

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, item: T, done: Done | None = None) -> None:
        if self._pending >= self.max_pending:
            self._shed.inc()
            raise Overloaded(f"{self.name} queue full ({self.max_pending})")
        self._items.append(item)
        self._dones.append(done)
        self._pending += 1
        if len(self._items) >= self.max_batch:
            self._start_flush()
        elif self._timer is None and not self._due:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._delay(loop.time()), self._start_flush)

    def _delay(self, now: float) -> float:
        """The wait for the batch whose first item arrives now."""
        self._armed_at = now
        rate = self._fill_rate
        if self.busy_delay_s is not None and rate >= self.busy_rate and now - self._cut_at <= self.busy_delay_s:
            return min(self.busy_delay_s, max(self.delay_s, self.busy_items / rate))
        return self.delay_s

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        if len(self._tasks) >= self.max_concurrent_flushes:
            self._due = True  # flushed when a slot frees (see _flush_finished)
            return
        self._due = False
        items, dones = self._items[:self.max_batch], self._dones[:self.max_batch]
        del self._items[:self.max_batch], self._dones[:self.max_batch]
        self._depth.set(self._pending)
        loop = asyncio.get_running_loop()
        if self.busy_delay_s is not None:
            now = loop.time()
            # (n - 1) / fill time: one lone item says nothing about the rate
            self._fill_rate = (len(items) - 1) / max(now - self._armed_at, 1e-3)
            self._cut_at = now
        task = loop.create_task(self._run(items, dones))
        self._tasks.add(task)
        task.add_done_callback(self._flush_finished)
        if self._items and self._timer is None:
            self._timer = loop.call_later(self._delay(loop.time()), self._start_flush)

    def _flush_finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._due or len(self._items) >= self.max_batch:
            self._start_flush()

    async def _run(self, items: list[T], dones: list[Done | None]) -> None:
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

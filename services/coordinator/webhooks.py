"""Webhook delivery core: per-app bounded queues, batching, signing, retry, rate limit.

One ``AppQueue`` per app with traffic (created on the first event, removed after it has been
idle for ``idle_s``). Its pump task waits for up to ``batch_max_events`` events or
``batch_delay_s`` after the first one, takes a batch, and hands it to a send task; at most
``concurrency_per_app`` sends run per app and each attempt takes a token from the app's bucket,
so a slow or failing app server only ever occupies its own slots. A send holds its slot through
its backoff sleeps: a failing app server thereby throttles itself, its queue fills up, and new
events for it are refused at the door (``offer`` returns False) instead of piling up in memory.

``offer`` never awaits: the gRPC handler only appends to a deque. HTTP happens in ``transport``
(``webhook_http.AiohttpTransport`` in production, a plain coroutine in tests).

Per-app state machine of a batch: QUEUED → SENDING → (DONE | BACKOFF → SENDING | DROPPED).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.apps import App
from services.coordinator import events as ev
from services.coordinator import metrics as m
from services.coordinator.rate_limit import TokenBucket
from services.coordinator.retry import RetryPolicy, Verdict, classify
from services.coordinator.webhook_signing import sign

log = logging.getLogger(__name__)

USER_AGENT = "pylon-coordinator/0.1.0"


@dataclass(slots=True, frozen=True)
class WebhookResponse:
    status: int | None            # None: no HTTP answer (timeout, refused, reset)
    retry_after_s: float | None = None
    error: str = ""
    permanent: bool = False       # no answer, and retrying cannot help (e.g. the URL is invalid)

    @property
    def verdict(self) -> Verdict:
        return Verdict.DROP if self.permanent else classify(self.status)


Transport = Callable[[str, bytes, dict[str, str]], Awaitable[WebhookResponse]]


@dataclass(slots=True, frozen=True)
class DeliverySettings:
    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    queue_per_app: int = 10_000
    rate_per_s: float = 50.0
    batch_max_events: int = 100
    batch_max_bytes: int = 1024 * 1024
    batch_delay_s: float = 0.02
    concurrency_per_app: int = 4
    idle_s: float = 30.0

    @classmethod
    def from_config(cls, cfg) -> DeliverySettings:
        return cls(max_attempts=cfg.webhook_max_attempts, backoff_base_s=cfg.webhook_backoff_base_s,
                   backoff_cap_s=cfg.webhook_backoff_cap_s, queue_per_app=cfg.webhook_queue_per_app,
                   rate_per_s=cfg.webhook_rate_per_s, batch_max_events=cfg.webhook_batch_max_events,
                   batch_max_bytes=cfg.webhook_batch_max_bytes, batch_delay_s=cfg.webhook_batch_delay_s,
                   concurrency_per_app=cfg.webhook_concurrency_per_app)


class AppQueue:
    __slots__ = ("app", "events", "pending", "first_at", "bucket", "slots", "wake", "pump", "sends", "depth",
                 "overhead")

    def __init__(self, app: App, settings: DeliverySettings, now: float) -> None:
        self.app = app                    # the latest record seen: a new secret or URL applies to the next attempt
        self.events: collections.deque[bytes] = collections.deque()
        self.pending = 0                  # queued + in flight; the bound applies to this
        self.first_at = 0.0               # when the oldest queued event arrived (loop time)
        self.bucket = TokenBucket(settings.rate_per_s, now=now)
        self.slots = asyncio.Semaphore(settings.concurrency_per_app)
        self.wake = asyncio.Event()
        self.pump: asyncio.Task | None = None
        self.sends: set[asyncio.Task] = set()
        self.depth = m.QUEUE_DEPTH.labels(app.id)
        self.overhead = ev.body_overhead(app.id)


class WebhookDelivery:
    def __init__(self, transport: Transport, settings: DeliverySettings | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.transport = transport
        self.settings = settings or DeliverySettings()
        s = self.settings
        self.retry = retry or RetryPolicy(s.max_attempts, s.backoff_base_s, s.backoff_cap_s)
        self._queues: dict[str, AppQueue] = {}
        self._closing = False
        self._closing_event = asyncio.Event()
        self._deadline = float("inf")
        self._delivery_ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time() * 1000):x}"

    # ------------------------------------------------------------------ intake (never awaits)

    @property
    def accepting(self) -> bool:
        return not self._closing

    def depth(self, app_id: str) -> int:
        q = self._queues.get(app_id)
        return q.pending if q else 0

    @property
    def total_pending(self) -> int:
        return sum(q.pending for q in self._queues.values())

    def offer(self, app: App, event: bytes, kind: str) -> bool:
        """Queue one encoded event for ``app``'s webhook. False: refused (counted), nothing queued."""
        if self._closing:
            m.EVENTS_DROPPED.labels("closing").inc()
            return False
        if not app.webhook_url:
            m.EVENTS_DROPPED.labels("no_webhook").inc()
            return False
        q = self._queues.get(app.id)
        if q is None:
            loop = asyncio.get_running_loop()
            q = self._queues[app.id] = AppQueue(app, self.settings, loop.time())
            q.pump = loop.create_task(self._pump(q), name=f"webhook-pump-{app.id}")
            q.pump.add_done_callback(self._pump_done)
        elif q.app is not app:
            q.app = app
        if q.pending >= self.settings.queue_per_app:
            m.EVENTS_DROPPED.labels("queue_full").inc()
            return False
        if not q.events:
            q.first_at = asyncio.get_running_loop().time()
        q.events.append(event)
        q.pending += 1
        q.depth.set(q.pending)
        m.EVENTS_QUEUED.labels(kind).inc()
        n = len(q.events)
        if n == 1 or n >= self.settings.batch_max_events:
            q.wake.set()
        return True

    # ------------------------------------------------------------------ pump: queue → batches

    async def _pump(self, q: AppQueue) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        while True:
            if not q.events:
                if self._closing:
                    return
                q.wake.clear()
                try:
                    await asyncio.wait_for(q.wake.wait(), s.idle_s)
                except TimeoutError:
                    if not q.events and q.pending == 0 and self._queues.get(q.app.id) is q:
                        del self._queues[q.app.id]
                        m.QUEUE_DEPTH.remove(q.app.id)
                        return
                continue
            if len(q.events) < s.batch_max_events and not self._closing:
                remaining = q.first_at + s.batch_delay_s - loop.time()
                if remaining > 0:
                    q.wake.clear()
                    try:
                        await asyncio.wait_for(q.wake.wait(), remaining)
                    except TimeoutError:
                        pass
            # waiting for a slot and a token lets more events join the batch
            await q.slots.acquire()
            try:
                await self._take_token(q, loop)
                batch = self._take_batch(q)
            except BaseException:
                q.slots.release()
                raise
            if not batch:
                q.slots.release()
                continue
            task = loop.create_task(self._send(q, batch))
            q.sends.add(task)
            task.add_done_callback(q.sends.discard)

    def _pump_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # a bug: forget the queue so that the next event starts a fresh one instead of queueing forever
        for app_id, q in list(self._queues.items()):
            if q.pump is task:
                del self._queues[app_id]
                m.EVENTS_DROPPED.labels("bug").inc(len(q.events))
                log.error("webhook pump of app %s crashed; dropped %d queued events", app_id, len(q.events),
                          exc_info=task.exception())

    def _take_batch(self, q: AppQueue) -> list[bytes]:
        s = self.settings
        batch: list[bytes] = []
        size = q.overhead
        while q.events and len(batch) < s.batch_max_events:
            nxt = len(q.events[0]) + 1
            if batch and size + nxt > s.batch_max_bytes:
                break
            batch.append(q.events.popleft())
            size += nxt
        # what is left already waited its turn: send it as soon as a slot frees up
        q.first_at = float("-inf")
        return batch

    async def _take_token(self, q: AppQueue, loop: asyncio.AbstractEventLoop) -> None:
        wait = q.bucket.reserve(loop.time())
        if wait > 0:
            await asyncio.sleep(wait)

    # ------------------------------------------------------------------ send: one batch, with retries

    async def _send(self, q: AppQueue, batch: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        n = len(batch)
        body = ev.body(q.app.id, batch)
        delivery_id = f"{self._id_prefix}-{next(self._delivery_ids):x}"
        attempt = 0
        try:
            while True:
                attempt += 1
                app = q.app
                resp = await self._attempt(app, body, delivery_id, attempt)
                verdict = resp.verdict
                if verdict is Verdict.DONE:
                    m.EVENTS_DELIVERED.inc(n)
                    return
                if verdict is Verdict.DROP:
                    m.EVENTS_DROPPED.labels("rejected").inc(n)
                    log.warning("webhook of app %s answered %s: dropped %d events (delivery %s)",
                                app.id, resp.status or resp.error, n, delivery_id)
                    return
                if not self.retry.should_retry(attempt):
                    m.EVENTS_DROPPED.labels("gave_up").inc(n)
                    log.warning("webhook of app %s failed %d times (last: %s): dropped %d events (delivery %s)",
                                app.id, attempt, resp.status or resp.error, n, delivery_id)
                    return
                delay = self.retry.delay(attempt, resp.retry_after_s)
                m.WEBHOOK_RETRIES.inc()
                log.debug("webhook of app %s: %s, retry %d in %.2fs", app.id, resp.status or resp.error,
                          attempt, delay)
                if not await self._backoff(loop.time() + delay):
                    m.EVENTS_DROPPED.labels("shutdown").inc(n)
                    log.warning("shutting down: dropped %d events for app %s instead of retrying", n, app.id)
                    return
                await self._take_token(q, loop)
        finally:
            q.pending -= n
            q.depth.set(q.pending)
            q.slots.release()

    async def _backoff(self, until: float) -> bool:
        """Sleep until ``until``; False (at once) if shutdown begins and that is past its deadline."""
        loop = asyncio.get_running_loop()
        if not self._closing:
            try:
                await asyncio.wait_for(self._closing_event.wait(), max(0.0, until - loop.time()))
            except TimeoutError:
                return True
        if until > self._deadline:
            return False
        await asyncio.sleep(max(0.0, until - loop.time()))
        return True

    async def _attempt(self, app: App, body: bytes, delivery_id: str, attempt: int) -> WebhookResponse:
        headers = sign(app.secret, body)
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = USER_AGENT
        headers["X-Pylon-Delivery"] = delivery_id
        headers["X-Pylon-Attempt"] = str(attempt)
        started = time.perf_counter()
        try:
            resp = await self.transport(app.webhook_url, body, headers)
        except Exception as exc:  # the transport maps network errors itself; anything else is our bug
            log.exception("webhook transport failed for app %s", app.id)
            resp = WebhookResponse(None, error=f"transport bug: {exc!r}")
        m.WEBHOOK_SECONDS.observe(time.perf_counter() - started)
        if resp.status is None and not resp.permanent:
            outcome = "no_answer"
        else:
            outcome = {Verdict.DONE: "ok", Verdict.RETRY: "retryable", Verdict.DROP: "rejected"}[resp.verdict]
        m.WEBHOOK_REQUESTS.labels(outcome).inc()
        return resp

    # ------------------------------------------------------------------ lifecycle

    async def close(self, grace_s: float = 5.0) -> int:
        """Stop accepting, try to deliver what is queued within ``grace_s``; return events dropped."""
        loop = asyncio.get_running_loop()
        self._closing = True
        self._deadline = loop.time() + grace_s
        self._closing_event.set()
        for q in self._queues.values():
            q.wake.set()
        # pumps spawn sends until their queues are empty, so wait in rounds until nothing runs
        while (tasks := self._tasks()) and (remaining := self._deadline - loop.time()) > 0:
            await asyncio.wait(tasks, timeout=remaining)
        dropped = self.total_pending
        await self.abort()
        if dropped:
            m.EVENTS_DROPPED.labels("shutdown").inc(dropped)
            log.warning("webhook delivery stopped with %d events undelivered (dropped)", dropped)
        else:
            log.info("webhook delivery stopped; every queued event was delivered or settled")
        return dropped

    async def abort(self) -> None:
        """Cancel every pump and send at once."""
        self._closing = True
        tasks = self._tasks()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for q in self._queues.values():
            q.events.clear()
            q.pending = 0
            m.QUEUE_DEPTH.remove(q.app.id)
        self._queues.clear()

    def _tasks(self) -> list[asyncio.Task]:
        tasks: list[asyncio.Task] = []
        for q in self._queues.values():
            if q.pump is not None and not q.pump.done():
                tasks.append(q.pump)
            tasks.extend(t for t in q.sends if not t.done())
        return tasks

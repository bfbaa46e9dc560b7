"""Stored broadcasts: one sub-task per room instance, shared by every center (DESIGN.md §1 center).

``POST /v1/broadcast`` (``BroadcastService.submit``) stores the broadcast through
``Saver.StoreBroadcast`` (from then on every login or BIND of the app gets it from the inbox
load until the user acks it), then writes in one MULTI:

  ``pylon:bc:{<id>}:st``    HASH   app, payload, created_ms, expires_ms, total, max_per_s, started
  ``pylon:bc:{<id>}:done``  SET    room instances whose sub-task is done
  ``pylon:bc:{<id>}:dl``    HASH   room instance -> sessions it wrote the broadcast to
  ``pylon:bc:recent``       ZSET   id by created_ms, the 1,000 newest (the admin list)
  ``pylon:bc:tasks``        STREAM one entry per room instance: bid, room, attempt

and answers once that is durable. The per-broadcast keys live until a day past the broadcast's
expiry, so its progress can still be read after it ended.

Every center runs a ``SubtaskWorker`` in consumer group ``centers``: it reads entries, calls
``Room.Broadcast`` on the entry's instance (that instance only: its sessions are the ones the
sub-task is about), and on success records the count, XACKs and XDELs the entry. Failures are
retried with backoff until done or expired; while a worker holds an entry it re-claims it
(XCLAIM JUSTID, min-idle 0) so others leave it alone; entries idle longer than
``subtask_claim_idle_s`` belong to a center that died and are taken over (XAUTOCLAIM). An
instance that left discovery needs no call: it died with its sessions, whose users get the
broadcast from the inbox load when they reconnect. The room answers a repeat of a broadcast id
with its earlier count, and the done set and delivery hash are idempotent, so a sub-task run
twice (a slow center whose entry was taken over) counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError, ResponseError

from services.center import telemetry
from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.center.errors import NotFound, RateLimited
from services.center.ratelimit import TokenBucket
from services.common.apps import App
from services.common.discovery import Discovery, Instance
from services.common.ids import IdGenerator
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)

TASKS_KEY = "pylon:bc:tasks"
RECENT_KEY = "pylon:bc:recent"
GROUP = "centers"
RECENT_KEEP = 1000
# progress stays readable this long after the broadcast expired
KEEP_AFTER_EXPIRY_MS = 24 * 3600 * 1000
# a sub-task retried more often than this counts as stuck in pylon_broadcast_subtasks
STUCK_ATTEMPTS = 3
# pending entries looked at per gauge refresh (XPENDING extended form); more are counted, not inspected
GAUGE_SCAN = 1000
# a consumer that holds nothing and was idle this long is a center that died: removed from the group
DEAD_CONSUMER_IDLE_MS = 3600 * 1000
# how long close() waits for the worker's tasks (a blocked XREADGROUP returns within read_block_ms)
CLOSE_WAIT_S = 3.0


def state_key(bid: int) -> str:
    # {bid}: the three keys of one broadcast hash to one Redis Cluster slot
    return f"pylon:bc:{{{bid}}}:st"


def done_key(bid: int) -> str:
    return f"pylon:bc:{{{bid}}}:done"


def delivered_key(bid: int) -> str:
    return f"pylon:bc:{{{bid}}}:dl"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Accepted:
    broadcast_id: int
    subtasks: int


@dataclass(frozen=True, slots=True)
class Broadcast:
    """What a worker needs of a broadcast (read once from its progress hash, then cached)."""

    id: int
    app: str
    payload: bytes
    created_ms: int
    expires_ms: int
    total: int
    max_per_s: int

    def message(self) -> pb.StoredMessage:
        ttl_s = max(1, (self.expires_ms - self.created_ms) // 1000)
        return pb.StoredMessage(msg_id=self.id, app=self.app, payload=self.payload, created_ms=self.created_ms,
                                ttl_s=ttl_s, broadcast=True)


@dataclass(frozen=True, slots=True)
class Progress:
    broadcast_id: int
    app: str
    state: str          # queued | running | done | expired
    subtasks_total: int
    subtasks_done: int
    delivered: int
    created_ms: int
    expires_ms: int

    def to_dict(self) -> dict:
        return {"broadcast_id": str(self.broadcast_id), "app": self.app, "state": self.state,
                "subtasks_total": self.subtasks_total, "subtasks_done": self.subtasks_done,
                "delivered": self.delivered, "created_ms": self.created_ms, "expires_ms": self.expires_ms}


def progress_state(total: int, done: int, started: bool, expires_ms: int, now_ms: int) -> str:
    if done >= total:
        return "done"
    if now_ms >= expires_ms:
        return "expired"
    return "running" if started else "queued"


def share_of_rate(rate_per_s: int, instances: int) -> int:
    """One instance's share of an app's broadcast pacing (0 = unlimited)."""
    if rate_per_s <= 0 or instances <= 0:
        return 0
    return min(math.ceil(rate_per_s / instances), (1 << 32) - 1)


class BroadcastLimiter:
    """Broadcast requests per app per minute: a token bucket holding one minute's allowance, so an
    app may send its whole minute at once and then waits. Per center, like the push limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, app_id: str, per_min: int) -> float:
        """0.0 = go ahead; > 0 = seconds until the next one is admitted."""
        if per_min <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(app_id)
        if bucket is None or bucket.capacity != per_min:
            if len(self._buckets) >= self._max:
                self._buckets.clear()
            bucket = self._buckets[app_id] = TokenBucket(per_min / 60.0, now)
            bucket.capacity = bucket.tokens = float(per_min)
        return bucket.take(1, now)


class BroadcastService:
    """The request side: accept, read progress, list recent broadcasts."""

    def __init__(self, *, ids: IdGenerator, saver: ServiceClient, discovery: Discovery, redis,
                 tally: telemetry.Tally, limiter: BroadcastLimiter | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.ids = ids
        self.saver = saver
        self.discovery = discovery
        self.redis = redis
        self.tally = tally
        self.limiter = limiter or BroadcastLimiter()
        self._clock = clock

    async def submit(self, app: App, payload: bytes, ttl_s: int) -> Accepted:
        wait = self.limiter.check(app.id, app.broadcasts_per_min)
        if wait > 0:
            self.tally.rate_limited += 1
            telemetry.RATE_LIMITED.inc()
            raise RateLimited(f"app {app.id!r} is limited to {app.broadcasts_per_min} broadcasts per minute", wait)
        started = time.perf_counter()
        now_ms = int(self._clock() * 1000)
        bid = self.ids.next()
        message = pb.StoredMessage(msg_id=bid, app=app.id, payload=payload, created_ms=now_ms, ttl_s=ttl_s,
                                   broadcast=True)
        try:
            await self.saver.call("StoreBroadcast", pb.StoreRequest(messages=[message]))
        except BACKEND_ERRORS as exc:
            raise unavailable("saver", exc) from exc
        try:
            # fresh: a stale list would skip a room instance that just started
            rooms = sorted({i.id for i in await self.discovery.instances("room", fresh=True) if i.grpc})
        except BACKEND_ERRORS as exc:
            raise unavailable("discovery", exc) from exc
        expires_ms = now_ms + ttl_s * 1000
        total = len(rooms)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(state_key(bid), mapping={
            "app": app.id, "payload": payload, "created_ms": now_ms, "expires_ms": expires_ms, "total": total,
            "max_per_s": share_of_rate(app.broadcast_deliveries_per_s, total), "started": 0})
        pipe.pexpireat(state_key(bid), expires_ms + KEEP_AFTER_EXPIRY_MS)
        pipe.zadd(RECENT_KEY, {str(bid): now_ms})
        pipe.zremrangebyrank(RECENT_KEY, 0, -RECENT_KEEP - 1)
        for room in rooms:
            pipe.xadd(TASKS_KEY, {"bid": str(bid), "room": room, "attempt": 1})
        try:
            await pipe.execute()
        except RedisError as exc:
            # stored in saver already: its users get it when they connect, but nobody fans it out now
            log.warning("broadcast %d stored but its sub-tasks could not be queued: %s", bid, exc)
            raise unavailable("redis", exc) from exc
        self.tally.broadcasts += 1
        telemetry.PUSH_REQUESTS.labels("broadcast").inc()
        telemetry.PUSH_SECONDS.labels("broadcast").observe(time.perf_counter() - started)
        return Accepted(bid, total)

    async def progress(self, bid: int, app_id: str | None) -> Progress:
        """Progress of one broadcast; NotFound if unknown, or of another app than ``app_id``."""
        found = (await self._read([bid]))[0]
        if found is None or (app_id is not None and found.app != app_id):
            raise NotFound(f"no broadcast {bid}", "unknown_broadcast")
        return found

    async def recent(self, limit: int) -> list[Progress]:
        ids = [int(i) for i in await self.redis.zrevrange(RECENT_KEY, 0, limit - 1)]
        return [p for p in await self._read(ids) if p is not None]

    async def _read(self, bids: list[int]) -> list[Progress | None]:
        if not bids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for bid in bids:
            pipe.hmget(state_key(bid), "app", "created_ms", "expires_ms", "total", "started")
            pipe.scard(done_key(bid))
            pipe.hvals(delivered_key(bid))
        try:
            replies = await pipe.execute()
        except RedisError as exc:
            raise unavailable("redis", exc) from exc
        now_ms = int(self._clock() * 1000)
        out: list[Progress | None] = []
        for i, bid in enumerate(bids):
            (app, created, expires, total, started), done, delivered = replies[3 * i: 3 * i + 3]
            if app is None or total is None:
                out.append(None)
                continue
            total_n, expires_n = int(total), int(expires)
            done_n = min(int(done), total_n)
            out.append(Progress(bid, _s(app), progress_state(total_n, done_n, started not in (None, b"0", "0"),
                                                             expires_n, now_ms),
                                total_n, done_n, sum(int(d) for d in delivered), int(created), expires_n))
        return out


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    max_in_flight: int = 64
    claim_idle_s: float = 10.0
    room_deadline_s: float = 10.0
    retry_first_s: float = 0.2
    retry_max_s: float = 5.0
    gauge_every_s: float = 5.0
    read_count: int = 32
    read_block_ms: int = 1000


class SubtaskWorker:
    """This center's share of the broadcast sub-tasks (see the module docstring)."""

    def __init__(self, *, redis, rooms: ServiceClient, discovery: Discovery, consumer: str, tally: telemetry.Tally,
                 settings: WorkerSettings = WorkerSettings(), clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.rooms = rooms
        self.discovery = discovery
        self.consumer = consumer
        self.tally = tally
        self.s = settings
        self._clock = clock
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._running: dict[str, asyncio.Task] = {}   # stream entry id -> its task
        self._cache: dict[int, Broadcast | None] = {}
        self._loops: list[asyncio.Task] = []
        self._closing = False

    @staticmethod
    def consumer_name(center_id: str) -> str:
        return f"{center_id}#{os.getpid()}"

    async def start(self) -> None:
        try:
            await self._ensure_group()
        except RedisError as exc:  # the loops create it when they find it missing
            log.warning("broadcast consumer group not created yet: %s", exc)
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._read_loop()), loop.create_task(self._claim_loop()),
                       loop.create_task(self._gauge_loop())]

    async def close(self) -> None:
        """Stop reading; running sub-tasks are cancelled and stay pending, for another center to claim
        after ``claim_idle_s`` (or for this one after a restart)."""
        self._closing = True
        pending = {*self._loops, *self._running.values()}
        deadline = time.monotonic() + CLOSE_WAIT_S
        while pending and time.monotonic() < deadline:
            # again and again: redis-py finishes a command that was cancelled before it was sent
            # (an XREADGROUP then blocks for up to read_block_ms) and may swallow the cancellation
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        if pending:
            log.warning("%d broadcast worker tasks did not stop in %.0f s", len(pending), CLOSE_WAIT_S)
        self._loops = []

    async def _ensure_group(self) -> None:
        try:
            # from "0", not "$": entries queued before the group existed (it was lost with Redis data
            # while the stream came back from its AOF) are still worked on; expired ones are dropped
            await self.redis.xgroup_create(TASKS_KEY, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------ loops

    async def _read_loop(self) -> None:
        while not self._closing:
            # wait for a free slot before reading: what is read is this center's to run
            await self._slots.acquire()
            self._slots.release()
            free = self._free()
            try:
                replies = await self.redis.xreadgroup(GROUP, self.consumer, {TASKS_KEY: ">"},
                                                      count=min(self.s.read_count, free), block=self.s.read_block_ms)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost its data
                    await self._recreate_group()
                    continue
                log.warning("broadcast sub-task read failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except RedisError as exc:
                log.warning("broadcast sub-task read failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, entries in replies or []:
                for entry_id, fields in entries:
                    await self._launch(_s(entry_id), fields)

    async def _recreate_group(self) -> None:
        try:
            await self._ensure_group()
        except RedisError as exc:
            log.warning("cannot create broadcast consumer group: %s", exc)
            await asyncio.sleep(1.0)

    def _free(self) -> int:
        return self.s.max_in_flight - len(self._running)

    async def _launch(self, entry_id: str, fields: dict | None) -> None:
        if entry_id in self._running:
            return
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._run(entry_id, fields or {}))
        self._running[entry_id] = task

    async def _claim_loop(self) -> None:
        """Keep this center's entries claimed, and take over those of centers that died."""
        every = max(0.05, self.s.claim_idle_s / 3)
        dead_check_at = 0.0
        while not self._closing:
            await asyncio.sleep(every)
            try:
                if self._running:
                    await self.redis.xclaim(TASKS_KEY, GROUP, self.consumer, 0, list(self._running), justid=True)
                await self._take_over()
                if time.monotonic() >= dead_check_at:
                    dead_check_at = time.monotonic() + 60.0
                    await self._drop_dead_consumers()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._recreate_group()
                else:
                    log.warning("broadcast sub-task claim failed: %s", exc)
            except RedisError as exc:
                log.warning("broadcast sub-task claim failed: %s", exc)

    async def _take_over(self) -> None:
        cursor = "0-0"
        idle_ms = int(self.s.claim_idle_s * 1000)
        while self._free() > 0:
            reply = await self.redis.xautoclaim(TASKS_KEY, GROUP, self.consumer, idle_ms, cursor,
                                                count=min(self.s.read_count, self._free()))
            cursor, entries = _s(reply[0]), reply[1]
            deleted = [_s(i) for i in reply[2]] if len(reply) > 2 else []
            if deleted:  # done and deleted, but its XACK was lost
                await self.redis.xack(TASKS_KEY, GROUP, *deleted)
            for entry_id, fields in entries:
                if fields is None:
                    continue
                log.info("taking over broadcast sub-task %s (its center stopped working on it)", _s(entry_id))
                await self._launch(_s(entry_id), fields)
            if cursor == "0-0":
                return

    async def _drop_dead_consumers(self) -> None:
        for c in await self.redis.xinfo_consumers(TASKS_KEY, GROUP):
            name = _s(c["name"])
            if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) > DEAD_CONSUMER_IDLE_MS:
                await self.redis.xgroup_delconsumer(TASKS_KEY, GROUP, name)

    async def _gauge_loop(self) -> None:
        while not self._closing:
            try:
                await self.refresh_gauge()
            except RedisError as exc:
                log.warning("broadcast sub-task gauge refresh failed: %s", exc)
            await asyncio.sleep(self.s.gauge_every_s)

    async def refresh_gauge(self) -> dict[str, int]:
        """queued = in the stream and not yet read; running = read, not done; stuck = running and idle
        longer than ``claim_idle_s`` or tried more than STUCK_ATTEMPTS times. The same figures on every
        center (they describe the shared stream)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(TASKS_KEY)
        pipe.xpending(TASKS_KEY, GROUP)
        pipe.xpending_range(TASKS_KEY, GROUP, "-", "+", GAUGE_SCAN)
        try:
            length, summary, entries = await pipe.execute()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            length, summary, entries = 0, {"pending": 0}, []
        running = int(summary["pending"])
        idle_ms = self.s.claim_idle_s * 1000
        stuck = sum(1 for e in entries
                    if e["time_since_delivered"] > idle_ms or e["times_delivered"] > STUCK_ATTEMPTS)
        figures = {"queued": max(0, int(length) - running), "running": running, "stuck": stuck}
        for state, n in figures.items():
            telemetry.BROADCAST_SUBTASKS.labels(state).set(n)
        return figures

    # ------------------------------------------------------------ one sub-task

    async def _run(self, entry_id: str, fields: dict) -> None:
        try:
            await self._work(entry_id, fields)
        except asyncio.CancelledError:
            raise
        except Exception:
            # a bug: the entry stays pending and is taken over after claim_idle_s
            log.exception("broadcast sub-task %s failed", entry_id)
        finally:
            self._running.pop(entry_id, None)
            self._slots.release()

    async def _work(self, entry_id: str, fields: dict) -> None:
        raw = {_s(k): _s(v) for k, v in fields.items()}
        try:
            bid, room = int(raw["bid"]), raw["room"]
        except (KeyError, ValueError):
            log.warning("dropping malformed broadcast sub-task %s: %r", entry_id, raw)
            await self._finish(entry_id)
            return
        delay = self.s.retry_first_s
        attempt = 1
        while not self._closing:
            try:
                bc = await self._broadcast(bid)
                if bc is None or self._clock() * 1000 >= bc.expires_ms:
                    await self._finish(entry_id)
                    telemetry.BROADCAST_SUBTASKS_EXPIRED.inc()
                    return
                inst = await self._instance(room)
                if inst is None:
                    # the instance died with its sessions: they get the broadcast when they reconnect
                    await self._done(entry_id, bid, room, 0, bc.expires_ms)
                    return
                await self.redis.hset(state_key(bid), "started", 1)
                reply = await self.rooms.call("Broadcast", pb.BroadcastRequest(message=bc.message(),
                                                                               max_per_s=bc.max_per_s),
                                              target=inst.grpc, deadline_s=self.deadline_for(inst, bc.max_per_s))
                await self._done(entry_id, bid, room, reply.delivered, bc.expires_ms)
                return
            except BACKEND_ERRORS as exc:
                telemetry.BROADCAST_SUBTASK_FAILURES.inc()
                log.warning("broadcast %d to %s failed (attempt %d), retrying in %.1f s: %s", bid, room, attempt,
                            delay, describe(exc))
            attempt += 1
            with contextlib.suppress(RedisError):
                # the retry count other centers (and the stuck gauge) see; also resets the idle time
                await self.redis.xclaim(TASKS_KEY, GROUP, self.consumer, 0, [entry_id], justid=True,
                                        retrycount=attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.s.retry_max_s)

    async def _broadcast(self, bid: int) -> Broadcast | None:
        if bid in self._cache:
            return self._cache[bid]
        values = await self.redis.hmget(state_key(bid), "app", "payload", "created_ms", "expires_ms", "total",
                                        "max_per_s")
        bc = None
        if values[0] is not None:
            app, payload, created, expires, total, max_per_s = values
            bc = Broadcast(bid, _s(app), bytes(payload or b""), int(created), int(expires), int(total),
                           int(max_per_s or 0))
        if len(self._cache) >= 256:
            # a few broadcasts are live at a time (payloads up to 60 KiB); the cache only saves re-reads
            self._cache.clear()
        self._cache[bid] = bc
        return bc

    async def _instance(self, room: str) -> Instance | None:
        """The room instance, or None once it is gone from discovery (looked at fresh before
        concluding that: a cached list may predate the instance)."""
        for fresh in (False, True):
            for inst in await self.discovery.instances("room", fresh=fresh):
                if inst.id == room and inst.grpc:
                    return inst
        return None

    def deadline_for(self, inst: Instance, max_per_s: int) -> float:
        """A paced fan-out takes sessions / rate seconds before the room answers: the deadline
        grows with it (half as much again, plus 2 s), never below ``room_deadline_s``."""
        if max_per_s <= 0:
            return self.s.room_deadline_s
        return max(self.s.room_deadline_s, inst.load / max_per_s * 1.5 + 2.0)

    async def _done(self, entry_id: str, bid: int, room: str, delivered: int, expires_ms: int) -> None:
        keep_until = expires_ms + KEEP_AFTER_EXPIRY_MS

        def record(pipe) -> None:
            pipe.sadd(done_key(bid), room)
            pipe.hset(delivered_key(bid), room, delivered)
            pipe.hset(state_key(bid), "started", 1)
            pipe.pexpireat(done_key(bid), keep_until)
            pipe.pexpireat(delivered_key(bid), keep_until)
            pipe.pexpireat(state_key(bid), keep_until)
            pipe.xack(TASKS_KEY, GROUP, entry_id)
            pipe.xdel(TASKS_KEY, entry_id)

        await self._until_written(record, f"the result of broadcast {bid} on {room}")
        self.tally.delivered += delivered
        telemetry.DELIVERED.labels("broadcast").inc(delivered)
        telemetry.BROADCAST_SUBTASKS_DONE.inc()

    async def _finish(self, entry_id: str) -> None:
        def record(pipe) -> None:
            pipe.xack(TASKS_KEY, GROUP, entry_id)
            pipe.xdel(TASKS_KEY, entry_id)

        await self._until_written(record, f"the end of broadcast sub-task {entry_id}")

    async def _until_written(self, record: Callable[[object], None], what: str) -> None:
        """One MULTI of what ``record`` queues, tried until Redis takes it (the room call is not
        repeated for a Redis blip)."""
        delay = self.s.retry_first_s
        while not self._closing:
            pipe = self.redis.pipeline(transaction=True)
            record(pipe)
            try:
                await pipe.execute()
                return
            except RedisError as exc:
                log.warning("could not record %s, retrying: %s", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.s.retry_max_s)

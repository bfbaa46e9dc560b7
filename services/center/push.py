"""Push: store before send, then hand each message to the room instances that hold its user.
(Broadcasts are stored and fanned out as sub-tasks by ``broadcasts.py``.)

Unicast/multicast flow (DESIGN.md §1 center, §5), for a list of (uid, payload, ttl) messages of
one app (``push_messages``; ``push`` is the one-payload form):
  ids → Saver.Store → Register.Lookup → group by session.instance → Room.Push per instance.
Each of the three calls is shared with the pushes running at the same time (``shared_calls``:
one batched queue per call kind and room instance, group commit), so concurrent requests cost
a few RPCs between them, while each request still waits only for its own messages: it answers
once they are stored (committed to MySQL and in Redis), with its own ids in order and its own
online/delivered counts. Lookup runs only after the store: a session that registers after the
lookup loads its inbox after that and finds the message there.
A failed Store fails exactly the requests whose messages it carried (503). Once Store succeeded
the caller gets its ids: a failed lookup or room call only delays delivery to the user's next
connect (the message waits in the inbox), so it is logged and counted, never returned as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.center import telemetry
from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.center.errors import Overloaded, RateLimited
from services.center.ratelimit import RateLimiter
from services.center.redelivery import Redelivery
from services.center.shared_calls import (
    MESSAGE_OVERHEAD,
    LookupQueue,
    RoomPushQueues,
    StoreQueue,
    chunk_spans,
    message_size,
)
from services.common import batching
from services.common.apps import App
from services.common.ids import IdGenerator
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)

_MESSAGE_OVERHEAD = MESSAGE_OVERHEAD
# Items waiting in one shared queue (the bytes behind them are bounded by max_in_flight_bytes).
_MAX_QUEUED_ITEMS = 200_000


@dataclass(frozen=True, slots=True)
class PushResult:
    msg_ids: list[int]
    online: int          # uids with at least one session bound to the app
    delivered: int       # messages rooms reported as written to a connection
    room_failures: int   # room instances that could not be reached in time


def chunks_by_bytes(messages: Sequence[pb.StoredMessage], max_bytes: int,
                    max_items: int = 1000) -> Iterator[list[pb.StoredMessage]]:
    """Consecutive slices of at most ``max_bytes`` and ``max_items`` each (a larger message travels alone)."""
    for a, b in chunk_spans([message_size(m) for m in messages], max_bytes, max_items):
        yield list(messages[a:b])


def plan_room_deliveries(messages: Sequence[pb.StoredMessage], users: Iterable[pb.UserSessions],
                         app_id: str) -> tuple[dict[str, list[tuple[pb.StoredMessage, int]]], int]:
    """Room instance id -> (message, sessions of its uid there bound to the app) for it, and how
    many distinct uids are online for the app.

    A message goes once to each instance holding a session of its uid bound to the app; the
    room fans it out to all of that user's local sessions itself.
    """
    by_uid: dict[str, list[pb.StoredMessage]] = {}
    for m in messages:
        by_uid.setdefault(m.uid, []).append(m)
    plan: dict[str, list[tuple[pb.StoredMessage, int]]] = {}
    online = 0
    for user in users:
        msgs = by_uid.get(user.uid)
        if not msgs:
            continue
        per_instance: dict[str, int] = {}
        for s in user.sessions:
            if s.instance and app_id in s.apps:
                per_instance[s.instance] = per_instance.get(s.instance, 0) + 1
        if per_instance:
            online += 1
        for inst in sorted(per_instance):
            n = per_instance[inst]
            plan.setdefault(inst, []).extend((m, n) for m in msgs)
    return plan, online


def plan_room_pushes(messages: Sequence[pb.StoredMessage], users: Iterable[pb.UserSessions],
                     app_id: str) -> tuple[dict[str, list[pb.StoredMessage]], int]:
    """Room instance id -> messages for it, and how many distinct uids are online for the app."""
    plan, online = plan_room_deliveries(messages, users, app_id)
    return {inst: [m for m, _ in items] for inst, items in plan.items()}, online


def _message_fields(m: Any) -> tuple[str, bytes, int]:
    """(uid, payload, ttl_s) of a message given as a tuple or as an object with those attributes."""
    if isinstance(m, tuple):
        uid, payload, ttl_s = m
        return uid, payload, ttl_s
    return m.uid, m.payload, m.ttl_s


class PushService:
    def __init__(self, *, ids: IdGenerator, saver: ServiceClient, register: ServiceClient, rooms: ServiceClient,
                 limiter: RateLimiter, tally: telemetry.Tally, room_deadline_s: float = 2.0,
                 rpc_batch_bytes: int = 8 * 1024 * 1024, rpc_batch_items: int = 1000,
                 max_in_flight_bytes: int = 256 * 1024 * 1024, clock: Callable[[], float] = time.time) -> None:
        self.ids = ids
        self.saver = saver
        self.register = register
        self.rooms = rooms
        self.limiter = limiter
        self.tally = tally
        self.room_deadline_s = room_deadline_s
        self.rpc_batch_bytes = rpc_batch_bytes
        self.rpc_batch_items = rpc_batch_items
        self.max_in_flight_bytes = max_in_flight_bytes
        self._in_flight_bytes = 0
        self._clock = clock
        self._owners = itertools.count(1)
        self.stores = StoreQueue(saver, max_batch=rpc_batch_items, max_bytes=rpc_batch_bytes,
                                 max_pending=_MAX_QUEUED_ITEMS)
        self.lookups = LookupQueue(register, max_batch=rpc_batch_items, max_pending=_MAX_QUEUED_ITEMS)
        self.room_pushes = RoomPushQueues(rooms, deadline_s=room_deadline_s, max_batch=rpc_batch_items,
                                          max_bytes=rpc_batch_bytes, max_pending=_MAX_QUEUED_ITEMS)
        self.redelivery = Redelivery(self.deliver_again)

    def _admit(self, app: App, cost: int) -> None:
        wait = self.limiter.check(app.id, app.push_rate_per_s, cost)
        if wait > 0:
            self.tally.rate_limited += 1
            telemetry.RATE_LIMITED.inc()
            raise RateLimited(f"app {app.id!r} is limited to {app.push_rate_per_s} messages/s", wait)

    @contextlib.contextmanager
    def _in_flight(self, n_bytes: int) -> Iterator[None]:
        """Bound the message bytes this process holds across concurrent pushes (one request alone
        always passes, so the largest valid request can never be refused forever)."""
        if self._in_flight_bytes and self._in_flight_bytes + n_bytes > self.max_in_flight_bytes:
            self._refuse(f"this center holds {self._in_flight_bytes} bytes of pushes in flight; retry shortly")
        self._in_flight_bytes += n_bytes
        try:
            yield
        finally:
            self._in_flight_bytes -= n_bytes

    def _refuse(self, why: str) -> None:
        self.tally.overloaded += 1
        telemetry.OVERLOADED.inc()
        raise Overloaded(why)

    # ------------------------------------------------------------ unicast / multicast

    async def push(self, app: App, uids: Sequence[str], payload: bytes, ttl_s: int) -> PushResult:
        """One payload to each of ``uids`` (one message per uid, ids in the order of ``uids``)."""
        return await self.push_messages(app, [(u, payload, ttl_s) for u in uids])

    async def push_messages(self, app: App, messages: Sequence[Any]) -> PushResult:
        """Messages of one app, each (uid, payload, ttl_s) (a tuple, or an object with those
        attributes): one id per message, in order. Returns once every message is stored; raises
        the center error of a failed store (nothing of this request is then reported stored)."""
        fields = [_message_fields(m) for m in messages]
        n_bytes = sum(len(p) + len(u) + _MESSAGE_OVERHEAD for u, p, _ in fields)
        with self._in_flight(n_bytes):
            self._admit(app, len(fields))
            started = time.perf_counter()
            now_ms = int(self._clock() * 1000)
            msg_ids = self.ids.batch(len(fields))
            app_id = app.id
            stored = [pb.StoredMessage(msg_id=i, uid=u, app=app_id, payload=p, created_ms=now_ms, ttl_s=t)
                      for i, (u, p, t) in zip(msg_ids, fields, strict=True)]
            await self._store(stored)
            delivered, online, failures, undelivered = await self._deliver(app_id, stored)
            if undelivered:
                self.redelivery.add(undelivered)
        self.tally.pushes += 1
        self.tally.messages += len(stored)
        self.tally.delivered += delivered
        telemetry.PUSH_REQUESTS.labels("unicast").inc()
        telemetry.PUSH_MESSAGES.inc(len(stored))
        telemetry.DELIVERED.labels("unicast").inc(delivered)
        telemetry.PUSH_SECONDS.labels("unicast").observe(time.perf_counter() - started)
        return PushResult(msg_ids, online, delivered, failures)

    async def _store(self, messages: list[pb.StoredMessage]) -> None:
        try:
            await self.stores.store(next(self._owners), messages)
        except batching.Overloaded as exc:
            self._refuse(f"too many messages waiting for saver; retry shortly ({exc})")
        except BACKEND_ERRORS as exc:  # not turned into a center error by the queue (should not happen)
            raise unavailable("saver", exc) from exc

    async def _deliver(self, app_id: str, stored: list[pb.StoredMessage]
                       ) -> tuple[int, int, int, list[pb.StoredMessage]]:
        """Look up the stored messages' users and hand the messages to their rooms. Returns
        (delivered, online uids, failed room instances, messages whose lookup or room call failed:
        they are safe in their inboxes, and tried again by ``redelivery``)."""
        users, lookup_failed = await self._lookup_sessions(list(dict.fromkeys(m.uid for m in stored)))
        plan, online = plan_room_deliveries(stored, users, app_id)
        delivered, failures, failed = await self._push_plan(plan)
        return delivered, online, failures, (stored if lookup_failed else failed)

    async def deliver_again(self, messages: list[pb.StoredMessage]) -> list[pb.StoredMessage]:
        """Redelivery's way out: the same lookup and room calls, per app; returns what failed again."""
        by_app: dict[str, list[pb.StoredMessage]] = {}
        for m in messages:
            by_app.setdefault(m.app, []).append(m)
        again: list[pb.StoredMessage] = []
        for app_id, msgs in by_app.items():
            delivered, _, _, failed = await self._deliver(app_id, msgs)
            self.tally.delivered += delivered
            telemetry.DELIVERED.labels("unicast").inc(delivered)
            again += failed
        return again

    async def _lookup(self, uids: list[str]) -> list[pb.UserSessions]:
        return (await self._lookup_sessions(uids))[0]

    async def _lookup_sessions(self, uids: list[str]) -> tuple[list[pb.UserSessions], bool]:
        """Sessions of ``uids`` through the shared Register.Lookup queue, and whether it failed."""
        try:
            users, failed = await self.lookups.lookup(uids)
        except batching.Overloaded as exc:
            users, failed = [], True
            log.warning("lookup queue full; messages are tried again shortly: %s", exc)
        if failed:
            self.tally.lookup_failures += 1
            telemetry.LOOKUP_FAILURES.inc()
        return users, bool(failed)

    async def _room_addresses(self, wanted: Iterable[str]) -> dict[str, str]:
        """Room instance id -> gRPC address, re-reading discovery once for instances not cached yet."""
        wanted = set(wanted)
        try:
            live = {i.id: i.grpc for i in await self.rooms.instances()}
            if not wanted <= live.keys():
                fresh = await self.rooms.discovery.instances(self.rooms.service, fresh=True)
                live = {i.id: i.grpc for i in fresh if i.grpc}
        except BACKEND_ERRORS as exc:
            log.warning("discovery read of rooms failed: %s", describe(exc))
            return {}
        return {k: v for k, v in live.items() if k in wanted}

    async def _push_to_rooms(self, plan: dict[str, list]) -> tuple[int, int]:
        delivered, failures, _ = await self._push_plan(plan)
        return delivered, failures

    async def _push_plan(self, plan: dict[str, list]) -> tuple[int, int, list[pb.StoredMessage]]:
        """Deliveries, failed instances and the messages of failed room calls of ``plan``
        (``plan_room_deliveries``; a plan of bare messages from ``plan_room_pushes`` is taken too,
        counted one session each). Messages for an instance no longer in discovery are not among
        the failed: it died with its sessions, whose clients reconnect and load their inboxes."""
        if not plan:
            return 0, 0, []
        plan = {inst: [i if isinstance(i, tuple) else (i, 1) for i in items] for inst, items in plan.items()}
        addresses = await self._room_addresses(plan)
        # the instance died with sessions still registered: delivery at next connect
        failed_instances = {inst for inst in plan if inst not in addresses}
        calls = []
        failed: list[pb.StoredMessage] = []
        for inst, items in plan.items():
            target = addresses.get(inst)
            if target is None:
                continue
            try:
                calls.append((inst, items, self.room_pushes.queue(target).submit_many(items)))
            except batching.Overloaded as exc:
                failed_instances.add(inst)
                failed += [m for m, _ in items]
                log.warning("Room.Push queue for %s full; messages are tried again shortly: %s", inst, exc)
        delivered = 0
        if calls:
            results = await _gather_settled([c for _, _, c in calls])
            for (inst, items, _), result in zip(calls, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, BACKEND_ERRORS):
                        raise result
                    failed_instances.add(inst)
                    failed += [m for m, _ in items]
                    log.warning("Room.Push to %s failed; messages are tried again shortly: %s", inst,
                                describe(result))
                else:
                    delivered += sum(result)
        if failed_instances:
            self.tally.room_failures += len(failed_instances)
            telemetry.ROOM_FAILURES.labels("Push").inc(len(failed_instances))
        return delivered, len(failed_instances), failed


async def _gather_settled(coros: list) -> list:
    """Results of ``coros`` run concurrently, an exception in place of a failed one's result."""
    if len(coros) == 1:
        try:
            return [await coros[0]]
        except Exception as exc:
            return [exc]
    return await asyncio.gather(*coros, return_exceptions=True)

"""Push: store before send, then hand each message to the room instances that hold its user.

Unicast/multicast flow (DESIGN.md §1 center, §5):
  ids → Saver.Store (one call per batch; the inbox is the truth) → Register.Lookup (one call)
  → group by session.instance → Room.Push (one call per room instance, concurrently, with deadlines).
Once Store succeeded the caller gets its ids: a failed lookup or room call only delays delivery
to the user's next connect (the message waits in the inbox), so it is logged and counted, never
returned as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from services.center import telemetry
from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.center.errors import Overloaded, RateLimited
from services.center.ratelimit import RateLimiter
from services.center.redelivery import Redelivery
from services.common.apps import App
from services.common.ids import IdGenerator
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)

# Envelope bytes of a StoredMessage besides payload and strings (ids, timestamps, tags).
_MESSAGE_OVERHEAD = 64


@dataclass(frozen=True, slots=True)
class PushResult:
    msg_ids: list[int]
    online: int          # uids with at least one session bound to the app
    delivered: int       # messages rooms reported as written to a connection
    room_failures: int   # room instances that could not be reached in time


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    broadcast_id: int
    rooms: int
    delivered: int
    failed: int


def message_size(m: pb.StoredMessage) -> int:
    return len(m.payload) + len(m.uid) + len(m.app) + _MESSAGE_OVERHEAD


def chunks_by_bytes(messages: Sequence[pb.StoredMessage], max_bytes: int,
                    max_items: int = 1000) -> Iterator[list[pb.StoredMessage]]:
    """Consecutive slices of at most ``max_bytes`` and ``max_items`` each (a larger message travels alone)."""
    chunk: list[pb.StoredMessage] = []
    size = 0
    for m in messages:
        s = message_size(m)
        if chunk and (size + s > max_bytes or len(chunk) >= max_items):
            yield chunk
            chunk, size = [], 0
        chunk.append(m)
        size += s
    if chunk:
        yield chunk


def plan_room_pushes(messages: Sequence[pb.StoredMessage], users: Iterable[pb.UserSessions],
                     app_id: str) -> tuple[dict[str, list[pb.StoredMessage]], int]:
    """Room instance id -> messages for it, and how many distinct uids are online for the app.

    A message goes once to each instance holding a session of its uid bound to the app; the
    room fans it out to all of that user's local sessions itself.
    """
    by_uid: dict[str, list[pb.StoredMessage]] = {}
    for m in messages:
        by_uid.setdefault(m.uid, []).append(m)
    plan: dict[str, list[pb.StoredMessage]] = {}
    online = 0
    for user in users:
        msgs = by_uid.get(user.uid)
        if not msgs:
            continue
        instances = {s.instance for s in user.sessions if s.instance and app_id in s.apps}
        if instances:
            online += 1
        for inst in sorted(instances):
            plan.setdefault(inst, []).extend(msgs)
    return plan, online


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
            self.tally.overloaded += 1
            telemetry.OVERLOADED.inc()
            raise Overloaded(f"this center holds {self._in_flight_bytes} bytes of pushes in flight; retry shortly")
        self._in_flight_bytes += n_bytes
        try:
            yield
        finally:
            self._in_flight_bytes -= n_bytes

    # ------------------------------------------------------------ unicast / multicast

    async def push(self, app: App, uids: Sequence[str], payload: bytes, ttl_s: int) -> PushResult:
        with self._in_flight((len(payload) + _MESSAGE_OVERHEAD) * len(uids)):
            self._admit(app, len(uids))
            started = time.perf_counter()
            now_ms = int(self._clock() * 1000)
            msg_ids = self.ids.batch(len(uids))
            messages = [pb.StoredMessage(msg_id=i, uid=u, app=app.id, payload=payload, created_ms=now_ms,
                                         ttl_s=ttl_s) for i, u in zip(msg_ids, uids, strict=True)]
            await self._store(messages)
            delivered, online, failures, undelivered = await self._deliver(app.id, messages)
            if undelivered:
                self.redelivery.add(undelivered)
        self.tally.pushes += 1
        self.tally.messages += len(messages)
        self.tally.delivered += delivered
        telemetry.PUSH_REQUESTS.labels("unicast").inc()
        telemetry.PUSH_MESSAGES.inc(len(messages))
        telemetry.DELIVERED.labels("unicast").inc(delivered)
        telemetry.PUSH_SECONDS.labels("unicast").observe(time.perf_counter() - started)
        return PushResult(msg_ids, online, delivered, failures)

    async def _store(self, messages: list[pb.StoredMessage]) -> None:
        chunks = list(chunks_by_bytes(messages, self.rpc_batch_bytes, self.rpc_batch_items))
        replies = await asyncio.gather(
            *(self.saver.call("Store", pb.StoreRequest(messages=c)) for c in chunks), return_exceptions=True)
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, BaseException):
                if isinstance(reply, BACKEND_ERRORS):
                    log.warning("Saver.Store of %d messages failed: %s", len(chunk), describe(reply))
                    raise unavailable("saver", reply) from reply
                raise reply
            if len(reply.seqs) == len(chunk):
                for m, seq in zip(chunk, reply.seqs, strict=True):
                    m.seq = seq
            else:
                log.error("Saver.Store answered %d seqs for %d messages", len(reply.seqs), len(chunk))

    async def _deliver(self, app_id: str, messages: list[pb.StoredMessage]
                       ) -> tuple[int, int, int, list[pb.StoredMessage]]:
        """Look up the messages' users and hand the messages to their rooms. Returns (delivered,
        online uids, failed room instances, messages whose lookup or room call failed)."""
        users, lost_uids = await self._lookup_sessions(list(dict.fromkeys(m.uid for m in messages)))
        plan, online = plan_room_pushes(messages, users, app_id)
        delivered, failures, failed = await self._push_plan(plan)
        if lost_uids:
            failed += [m for m in messages if m.uid in lost_uids]
        return delivered, online, failures, failed

    async def deliver_again(self, messages: list[pb.StoredMessage]) -> list[pb.StoredMessage]:
        """Redelivery's way out: the same lookup and room calls, per app; returns what failed again."""
        by_app: dict[str, list[pb.StoredMessage]] = {}
        for m in messages:
            by_app.setdefault(m.app, []).append(m)
        failed: list[pb.StoredMessage] = []
        for app_id, msgs in by_app.items():
            delivered, _, _, again = await self._deliver(app_id, msgs)
            self.tally.delivered += delivered
            telemetry.DELIVERED.labels("unicast").inc(delivered)
            failed += again
        return failed

    async def _lookup(self, uids: list[str]) -> list[pb.UserSessions]:
        return (await self._lookup_sessions(uids))[0]

    async def _push_to_rooms(self, plan: dict[str, list[pb.StoredMessage]]) -> tuple[int, int]:
        delivered, failures, _ = await self._push_plan(plan)
        return delivered, failures

    async def _lookup_sessions(self, uids: list[str]) -> tuple[list[pb.UserSessions], set[str]]:
        """Sessions of ``uids``: one Register.Lookup per ``rpc_batch_items`` uids (one call by
        default), and the uids whose lookup failed."""
        step = self.rpc_batch_items
        parts = [uids[i:i + step] for i in range(0, len(uids), step)]
        replies = await asyncio.gather(
            *(self.register.call("Lookup", pb.LookupRequest(uids=part)) for part in parts), return_exceptions=True)
        users: list[pb.UserSessions] = []
        lost: set[str] = set()
        for part, reply in zip(parts, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, BACKEND_ERRORS):
                    raise reply
                self.tally.lookup_failures += 1
                telemetry.LOOKUP_FAILURES.inc()
                log.warning("Register.Lookup failed; messages are tried again shortly: %s", describe(reply))
                lost.update(part)
            else:
                users.extend(reply.users)
        return users, lost

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

    async def _push_plan(self, plan: dict[str, list[pb.StoredMessage]]
                         ) -> tuple[int, int, list[pb.StoredMessage]]:
        """(delivered, failed room instances, messages of room calls that failed). Messages for
        an instance no longer in discovery are not among them: it died with its sessions, whose
        clients reconnect and load their inboxes."""
        if not plan:
            return 0, 0, []
        addresses = await self._room_addresses(plan)
        calls = []
        for inst, msgs in plan.items():
            target = addresses.get(inst)
            if target is None:
                # the instance died with sessions still registered: delivery at next connect
                continue
            for chunk in chunks_by_bytes(msgs, self.rpc_batch_bytes, self.rpc_batch_items):
                calls.append((inst, chunk, self.rooms.call("Push", pb.PushRequest(messages=chunk), target=target,
                                                           deadline_s=self.room_deadline_s)))
        failed_instances = {inst for inst in plan if inst not in addresses}
        failed: list[pb.StoredMessage] = []
        delivered = 0
        results = await asyncio.gather(*(c for _, _, c in calls), return_exceptions=True)
        for (inst, chunk, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, BACKEND_ERRORS):
                    raise result
                failed_instances.add(inst)
                failed += chunk
                log.warning("Room.Push to %s failed; messages are tried again shortly: %s", inst, describe(result))
            else:
                delivered += result.delivered
        if failed_instances:
            self.tally.room_failures += len(failed_instances)
            telemetry.ROOM_FAILURES.labels("Push").inc(len(failed_instances))
        return delivered, len(failed_instances), failed

    # ------------------------------------------------------------ broadcast

    async def broadcast(self, app: App, payload: bytes, ttl_s: int) -> BroadcastResult:
        """Simple broadcast: one Room.Broadcast per live room instance, all concurrently.

        Later step (DESIGN.md §1, center): split the broadcast into one sub-task per room instance
        on a Redis Stream consumer group shared by all centers, so that a broadcast survives the
        center that accepted it and the fan-out work is spread. Not done here yet.
        """
        self._admit(app, 1)
        started = time.perf_counter()
        message = pb.StoredMessage(msg_id=self.ids.next(), app=app.id, payload=payload,
                                   created_ms=int(self._clock() * 1000), ttl_s=ttl_s, broadcast=True)
        try:
            # fresh: a broadcast is rare, and a stale list would skip a room that just started
            rooms = [i for i in await self.rooms.discovery.instances(self.rooms.service, fresh=True) if i.grpc]
        except BACKEND_ERRORS as exc:
            raise unavailable("discovery", exc) from exc
        request = pb.BroadcastRequest(message=message)
        results = await asyncio.gather(
            *(self.rooms.call("Broadcast", request, target=r.grpc, deadline_s=self.room_deadline_s) for r in rooms),
            return_exceptions=True)
        delivered = failed = 0
        for room, result in zip(rooms, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, BACKEND_ERRORS):
                    raise result
                failed += 1
                log.warning("Room.Broadcast to %s failed: %s", room.id, describe(result))
            else:
                delivered += result.delivered
        self.tally.broadcasts += 1
        self.tally.delivered += delivered
        self.tally.room_failures += failed
        telemetry.PUSH_REQUESTS.labels("broadcast").inc()
        telemetry.DELIVERED.labels("broadcast").inc(delivered)
        if failed:
            telemetry.ROOM_FAILURES.labels("Broadcast").inc(failed)
        telemetry.PUSH_SECONDS.labels("broadcast").observe(time.perf_counter() - started)
        return BroadcastResult(message.msg_id, len(rooms), delivered, failed)

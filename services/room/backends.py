"""The room's batched calls to register, saver and coordinator.

Every call a connection makes is queued in a ``Batcher`` (DESIGN.md §2: one RPC must carry
hundreds of items): at once while nothing is in flight to that backend, else with everything
that gathered behind the call in flight; connect-path batches gather longer in a storm. Queues are bounded;
``Overloaded`` reaches the connection, which answers ERROR OVERLOADED with a retry-after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from services.common.batching import Batcher
from services.common.pb import internal_pb2 as ipb
from services.common.pb import internal_pb2_grpc as igrpc
from services.common.rpc import ChannelPool, NoInstanceError, ServiceClient
from services.room.config import RoomConfig

log = logging.getLogger(__name__)

ACK_RETRY_PAUSES_S = (0.25, 1.0, 2.0)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Queue(Protocol):
    """A batched call: ``submit`` returns at once (or raises ``Overloaded``); ``done(result,
    error)`` runs when the batch carrying the item is answered."""

    def submit(self, item: Any, done: Callable[[Any, BaseException | None], None] | None = None) -> None: ...


class Backends(Protocol):
    """What a ``RoomInstance`` needs from the rest of the system (the unit tests' fake has the same)."""

    register: Queue       # ipb.Session -> True
    unregister: Queue     # ipb.Session
    load_inbox: Queue     # ipb.InboxKey -> ipb.Inbox
    delivered: Queue      # ipb.MessageRef (one delivery attempt)
    ack: Queue            # ipb.MessageRef
    upstream: Queue       # ipb.UpstreamItem -> bool (accepted)
    status: Queue         # ipb.StatusEvent
    on_epoch: Callable[[str], None] | None   # told register's epoch from every registration reply

    async def take_session(self, target: str, request: ipb.TakeSessionRequest,
                           deadline_s: float) -> ipb.TakenSession: ...

    async def register_epoch(self) -> str: ...


class RoomBackends:
    def __init__(self, discovery, pool: ChannelPool, cfg: RoomConfig, deadline_s: float) -> None:
        self.on_epoch: Callable[[str], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        self.room_client = ServiceClient(discovery, pool, "room", igrpc.RoomStub, deadline_s)
        # the connect path (registrations, inbox loads) over lanes only with cfg.connect_path_lanes
        lanes = cfg.connect_path_lanes
        self.register_client = ServiceClient(discovery, pool, "register", igrpc.RegisterStub, deadline_s, lanes=lanes)
        self.inbox_client = ServiceClient(discovery, pool, "saver", igrpc.SaverStub, deadline_s, lanes=lanes)
        self.saver_client = ServiceClient(discovery, pool, "saver", igrpc.SaverStub, deadline_s)
        self.coordinator_client = ServiceClient(discovery, pool, "coordinator", igrpc.CoordinatorStub, deadline_s)
        kw = dict(max_batch=cfg.max_batch, delay_s=cfg.batch_delay_ms / 1000,
                  max_concurrent_flushes=cfg.max_flushes_in_flight)
        connect_kw = dict(kw, delay_s=cfg.connect_batch_delay_ms / 1000, busy_delay_s=cfg.storm_batch_delay_ms / 1000,
                          busy_rate=cfg.storm_connects_per_s, busy_items=cfg.storm_batch_items,
                          busy_rtt_factor=cfg.storm_rtt_factor)
        background_kw = dict(kw, linger_s=cfg.background_linger_ms / 1000)
        self.register = Batcher("room_register", self._register, max_pending=cfg.max_pending_auth, **connect_kw)
        self.unregister = Batcher("room_unregister", self._unregister, max_pending=200_000, **background_kw)
        self.load_inbox = Batcher("room_load_inbox", self._load_inbox, max_pending=cfg.max_pending_auth,
                                  **connect_kw)
        self.delivered = Batcher("room_delivered", self._delivered, max_pending=200_000, **background_kw)
        self.ack = Batcher("room_ack", self._ack, max_pending=200_000, **background_kw)
        self.upstream = Batcher("room_upstream", self._upstream, max_pending=20_000, **kw)  # the client waits
        self.status = Batcher("room_status", self._status, max_pending=200_000, **background_kw)
        self.inbox_limit = cfg.inbox_load_limit

    @property
    def batchers(self) -> list[Batcher]:
        return [self.register, self.load_inbox, self.delivered, self.ack, self.upstream, self.status, self.unregister]

    async def _register(self, sessions: list[ipb.Session]) -> list[bool]:
        reply = await self.register_client.call("Register", ipb.SessionBatch(sessions=sessions))
        if self.on_epoch is not None and reply.epoch:
            self.on_epoch(reply.epoch)
        if reply.replaced:
            task = asyncio.get_running_loop().create_task(self._kick_replaced(list(reply.replaced)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return [True] * len(sessions)

    async def _kick_replaced(self, sessions: list[ipb.Session]) -> None:
        """A login replaced sessions of the same device held by other instances: KICK them there
        with reason ``replaced`` (DESIGN.md §3). An instance that is gone needs nothing."""
        by_instance: dict[str, list[str]] = {}
        for s in sessions:
            by_instance.setdefault(s.instance, []).append(s.session_id)
        rooms = {i.id: i.grpc for i in await self.room_client.instances()}
        for instance, session_ids in by_instance.items():
            target = rooms.get(instance)
            if not target:
                continue
            try:
                await self.room_client.call("Kick", ipb.KickRequest(session_ids=session_ids, reason="replaced"),
                                            target=target)
            except grpc.aio.AioRpcError as exc:
                log.warning("could not kick %d replaced sessions on %s: %s", len(session_ids), instance,
                            exc.code().name)

    async def register_epoch(self) -> str:
        return (await self.register_client.call("Epoch", ipb.Empty())).epoch

    async def take_session(self, target: str, request: ipb.TakeSessionRequest,
                           deadline_s: float) -> ipb.TakenSession:
        # not tried elsewhere: only the instance named in the token holds the session
        return await self.room_client.call("TakeSession", request, target=target, deadline_s=deadline_s)

    async def _unregister(self, sessions: list[ipb.Session]) -> None:
        await self.register_client.call("Unregister", ipb.SessionBatch(sessions=sessions))

    async def _load_inbox(self, keys: list[ipb.InboxKey]) -> list[ipb.Inbox]:
        reply = await self.inbox_client.call("LoadInbox", ipb.LoadRequest(keys=keys, limit_per_inbox=self.inbox_limit))
        return list(reply.inboxes)

    async def _delivered(self, refs: list[ipb.MessageRef]) -> None:
        await self.saver_client.call("MarkDelivered", ipb.MessageRefs(refs=refs))

    async def _ack(self, refs: list[ipb.MessageRef]) -> None:
        # An ack lost here is delivered again only at the client's next connect, so a short saver
        # or Redis outage is ridden out: a few tries, while later acks keep gathering in the queue.
        request = ipb.MessageRefs(refs=refs)
        for pause in ACK_RETRY_PAUSES_S:
            try:
                await self.saver_client.call("Ack", request)
                return
            except (grpc.aio.AioRpcError, NoInstanceError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in RETRYABLE:
                    raise
                log.warning("room_ack: %d acks not stored yet (%s), trying again in %.1fs", len(refs),
                            exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc, pause)
                await asyncio.sleep(pause)
        await self.saver_client.call("Ack", request)

    async def _upstream(self, items: list[ipb.UpstreamItem]) -> list[bool]:
        # not tried again elsewhere: a coordinator that failed mid-call may have posted to the app already
        reply = await self.coordinator_client.call("Upstream", ipb.UpstreamBatch(items=items), failover=False)
        accepted = list(reply.accepted)
        return accepted + [False] * (len(items) - len(accepted))

    async def _status(self, events: list[ipb.StatusEvent]) -> None:
        await self.coordinator_client.call("Status", ipb.StatusBatch(events=events))

    async def drop_instance(self, instance: str) -> None:
        await self.register_client.call("DropInstance", ipb.InstanceRequest(instance=instance))

    async def drain(self, timeout_s: float) -> None:
        for b in self.batchers:
            await b.drain(timeout_s)

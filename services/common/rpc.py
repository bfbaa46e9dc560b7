"""The one internal RPC client layer (DESIGN.md §2).

``ChannelPool`` keeps a few ``grpc.aio`` channels per target (HTTP/2 connections, each carrying
many concurrent calls); ``ServiceClient`` picks a live instance of a service from discovery and
returns a stub on a pooled channel. Every call made through ``call`` has a deadline and is
timed in ``pylon_rpc_seconds``. In-flight calls per client are bounded by a semaphore so a
burst queues here instead of piling thousands of calls on one channel (3,000 concurrent calls
on one channel ended CANCELLED in our measurements).

Request ids (services/common/logs.py): every call carries the ids of the requests it works for
in one metadata entry, and ``start_server`` installs ``RequestIdInterceptor``, which makes them
the ids of the call's task on the server, so the server's log lines and onward calls carry them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from services.common import lanes, logs, metrics
from services.common.discovery import Discovery, Instance

# 64 MiB: a push batch of 500 x 64 KiB payloads must fit
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


# how long a target that answered UNAVAILABLE is skipped by picks (at least; else the discovery TTL)
AVOID_MIN_S = 5.0
# below this much deadline left, a failed call is not tried again elsewhere
MIN_RETRY_S = 0.05
# a target whose lane could not be connected to is called over gRPC this long before its lane is tried again
LANE_RETRY_S = 30.0


class NoInstanceError(Exception):
    """No live instance of the service is known to discovery."""


class ChannelPool:
    """gRPC channels per target, and the lane (services/common/lanes.py) of every target whose
    instance announced one: with ``use_lanes`` calls go there instead."""

    def __init__(self, channels_per_target: int = 2, use_lanes: bool = True) -> None:
        self.size = channels_per_target
        self.use_lanes = use_lanes
        self._channels: dict[str, list[grpc.aio.Channel]] = {}
        self._rr: dict[str, itertools.cycle] = {}
        self.lane_of: dict[str, str] = {}      # gRPC target -> its instance's lane address
        self._lanes: dict[str, lanes.LaneChannel] = {}  # gRPC target -> the connection to its lane
        self._no_lane: dict[str, float] = {}   # gRPC target -> monotonic time until which its lane is not tried

    def learn(self, found: list[Instance]) -> None:
        """Note the lanes that instances read from discovery announce."""
        if not self.use_lanes:
            return
        lane_of = self.lane_of
        for i in found:
            if i.lane and i.grpc and lane_of.get(i.grpc) != i.lane:
                lane_of[i.grpc] = i.lane
                self._no_lane.pop(i.grpc, None)
                self._forget_lane(i.grpc)  # the instance restarted on another lane port

    def _forget_lane(self, target: str) -> None:
        stale = self._lanes.pop(target, None)
        if stale is not None:
            asyncio.get_running_loop().create_task(stale.close())

    def lane(self, target: str) -> lanes.LaneChannel | None:
        address = self.lane_of.get(target)
        if address is None:
            return None
        if self._no_lane and self._no_lane.get(target, 0.0) > time.monotonic():
            return None
        ch = self._lanes.get(target)
        if ch is None:
            ch = self._lanes[target] = lanes.LaneChannel(address, expect=target)
        return ch

    def channel(self, target: str) -> grpc.aio.Channel:
        chans = self._channels.get(target)
        if chans is None:
            chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(self.size)]
            self._channels[target] = chans
            self._rr[target] = itertools.cycle(chans)
        return next(self._rr[target])

    def lane_unreachable(self, target: str) -> None:
        """The target's lane refused a connection: use gRPC to it for a while."""
        self._no_lane[target] = time.monotonic() + LANE_RETRY_S
        self._forget_lane(target)

    async def drop(self, target: str) -> None:
        for ch in self._channels.pop(target, []):
            await ch.close()
        self._rr.pop(target, None)
        self.lane_of.pop(target, None)
        lane = self._lanes.pop(target, None)
        if lane is not None:
            await lane.close()

    async def close(self) -> None:
        for target in set(self._channels) | set(self.lane_of):  # every lane channel is a lane_of target's
            await self.drop(target)


class ServiceClient:
    """Calls to one service, targets from discovery."""

    def __init__(self, discovery: Discovery, pool: ChannelPool, service: str, stub_cls: Callable[[Any], Any],
                 deadline_s: float = 5.0, max_in_flight: int = 256, lanes: bool = True) -> None:
        self.discovery = discovery
        self.pool = pool
        self.service = service
        self.stub_cls = stub_cls
        self.deadline_s = deadline_s
        self._stubs: dict[str, Any] = {}
        self._avoid: dict[str, float] = {}  # target -> monotonic time until which picks skip it
        self._sem = asyncio.Semaphore(max_in_flight)
        self.lanes = lanes  # False: this client's calls stay on gRPC whatever the pool does

    def stub_for(self, target: str) -> Any:
        lane = self.pool.lane(target) if self.lanes else None
        if lane is not None:
            key = f"{target}#lane{id(lane)}"
            stub = self._stubs.get(key)
            if stub is None:
                stub = self._stubs[key] = self.stub_cls(lanes.StubChannel(lane))
            return stub
        ch = self.pool.channel(target)
        key = f"{target}#{id(ch)}"
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = self.stub_cls(ch)
        return stub

    async def instances(self) -> list[Instance]:
        found = [i for i in await self.discovery.instances(self.service) if i.grpc]
        self.pool.learn(found)
        return found

    async def pick(self, key: str | None = None) -> Instance:
        live = await self.instances()
        if not live:
            live = [i for i in await self.discovery.instances(self.service, fresh=True) if i.grpc]
            self.pool.learn(live)
        if not live:
            raise NoInstanceError(f"no live {self.service} instance")
        if self._avoid:
            now = time.monotonic()
            usable = [i for i in live if self._avoid.get(i.grpc, 0.0) <= now]
            if usable:
                live = usable  # all of them failing lately: try them anyway rather than nothing
        if key is None:
            return random.choice(live)
        return live[hash(key) % len(live)]

    async def call(self, method: str, request: Any, target: str | None = None, deadline_s: float | None = None,
                   failover: bool = True) -> Any:
        """Call ``method`` on ``target``, or on an instance picked from discovery. A picked
        instance that answers UNAVAILABLE (stopped, unreachable, or its own backend down) is
        avoided for a while, and with ``failover`` the call goes once more to another instance
        within what is left of the deadline (a stopped instance lingers in discovery until its record
        is withdrawn or expires). Callers pass ``failover=False`` for a method that is not safe
        to run twice."""
        deadline = deadline_s or self.deadline_s
        if target is not None:
            return await self._call(target, method, request, deadline)
        started = time.monotonic()
        first = (await self.pick()).grpc
        try:
            return await self._call(first, method, request, deadline)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            self._shun(first)
            left = deadline - (time.monotonic() - started)
            if not failover or left < MIN_RETRY_S:
                raise
            second = (await self.pick()).grpc
            if second == first:
                raise
            metrics.RPC_FAILOVERS.labels(self.service, method).inc()
            return await self._call(second, method, request, left)

    def _shun(self, target: str) -> None:
        now = time.monotonic()
        if len(self._avoid) >= 64:
            self._avoid = {t: until for t, until in self._avoid.items() if until > now}
        self._avoid[target] = now + max(self.discovery.ttl_s, AVOID_MIN_S)

    async def _call(self, target: str, method: str, request: Any, deadline_s: float) -> Any:
        stub = self.stub_for(target)
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with self._sem:
                try:
                    return await getattr(stub, method)(request, timeout=deadline_s, metadata=logs.outgoing_metadata())
                except lanes.LaneUnreachable as exc:
                    # nothing was sent: the same call over gRPC, within what is left of the deadline
                    log.warning("%s: lane of %s unreachable (%s); calling it over gRPC for %.0fs", self.service,
                                target, exc.details(), LANE_RETRY_S)
                    self.pool.lane_unreachable(target)
                    left = max(MIN_RETRY_S, deadline_s - (time.perf_counter() - started))
                    return await getattr(self.stub_for(target), method)(request, timeout=left,
                                                                        metadata=logs.outgoing_metadata())
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name.lower()
            raise
        finally:
            metrics.RPC_SECONDS.labels(self.service, method, outcome).observe(time.perf_counter() - started)


log = logging.getLogger(__name__)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Sets ``logs.REQUEST_IDS`` from the call's metadata. grpc.aio runs the interceptors and the
    handler in one contextvars.Context per call, so the value is the call's alone; at DEBUG one
    line per call names the method and the ids."""

    async def intercept_service(self, continuation, handler_call_details):
        ids = logs.incoming_ids(handler_call_details.invocation_metadata)
        if ids is not None:
            logs.REQUEST_IDS.set(ids)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("call %s", handler_call_details.method)
        return await continuation(handler_call_details)


class Servers:
    """A service's gRPC server and the lane serving the same servicers beside it."""

    def __init__(self, grpc_server: grpc.aio.Server, lane: lanes.LaneServer | None) -> None:
        self.grpc = grpc_server
        self.lane = lane

    @property
    def lane_port(self) -> int:
        return self.lane.port if self.lane is not None else 0

    def lane_address(self, host: str) -> str:
        """What to announce in discovery as ``Instance.lane`` ("" without a lane)."""
        return f"{host}:{self.lane.port}" if self.lane is not None else ""

    async def stop(self, grace: float | None = None) -> None:
        if self.lane is not None:
            await self.lane.stop(grace or 0.0)
        await self.grpc.stop(grace)


async def start_server(bind: str, add_servicers: list[tuple[Callable, Any]], lane: bool = True,
                       lane_port: int = 0, identity: str = "") -> Servers:
    """Serve the servicers over gRPC on ``bind``, and with ``lane`` over a lane on the same host
    (``lane_port``, 0 = a free one) that answers only callers looking for ``identity`` (the gRPC
    address this instance announces; "" = any)."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[RequestIdInterceptor()])
    for add, servicer in add_servicers:
        add(servicer, server)
    try:
        port = server.add_insecure_port(bind)
    except RuntimeError as exc:  # grpcio raises RuntimeError, not OSError, for a port in use
        raise OSError(f"cannot bind gRPC server to {bind} (port in use?)") from exc
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {bind}")
    await server.start()
    lane_server = None
    if lane:
        lane_server = lanes.LaneServer(add_servicers, identity=identity)
        host = bind.rpartition(":")[0].strip("[]") or "0.0.0.0"
        try:
            await lane_server.start(host, lane_port)
        except OSError as exc:
            await server.stop(None)
            raise OSError(f"cannot bind the lane beside gRPC on {host}:{lane_port}: {exc}") from exc
    return Servers(server, lane_server)

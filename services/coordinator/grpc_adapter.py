"""gRPC face of the coordinator (pylon.internal.Coordinator): validate, call the core, map errors."""

from __future__ import annotations

import logging

import grpc
from redis.exceptions import RedisError

from services.common import metrics as common_metrics
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pb_grpc
from services.common.rpc import NoInstanceError
from services.coordinator import metrics as m
from services.coordinator.intake import EventIntake
from services.coordinator.kick import Kicker

log = logging.getLogger(__name__)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, intake: EventIntake, kicker: Kicker, max_batch_items: int = 10_000,
                 kick_max_uids: int = 10_000) -> None:
        self.intake = intake
        self.kicker = kicker
        self.max_batch_items = max_batch_items
        self.kick_max_uids = kick_max_uids

    async def _too_many(self, context, what: str, n: int, limit: int) -> None:
        common_metrics.ERRORS.labels("peer").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{n} {what} in one request; the limit is {limit}")

    async def Upstream(self, request: pb.UpstreamBatch, context) -> pb.UpstreamReply:
        if len(request.items) > self.max_batch_items:
            await self._too_many(context, "upstream items", len(request.items), self.max_batch_items)
        try:
            accepted = await self.intake.upstream(request.items)
        except (RedisError, OSError) as exc:
            common_metrics.ERRORS.labels("backend").inc()
            log.warning("upstream: app directory unavailable: %s", exc)
            accepted = None
        if accepted is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "app directory (Redis) unavailable")
        return pb.UpstreamReply(accepted=accepted)

    async def Status(self, request: pb.StatusBatch, context) -> pb.Count:
        if len(request.events) > self.max_batch_items:
            await self._too_many(context, "status events", len(request.events), self.max_batch_items)
        try:
            queued = await self.intake.status(request.events)
        except (RedisError, OSError) as exc:
            common_metrics.ERRORS.labels("backend").inc()
            log.warning("status: app directory unavailable: %s", exc)
            queued = None
        if queued is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "app directory (Redis) unavailable")
        return pb.Count(n=queued)

    async def Kick(self, request: pb.KickRequest, context) -> pb.KickReply:
        n = max(len(request.uids), len(request.session_ids))
        if n > self.kick_max_uids:
            await self._too_many(context, "uids/session ids", n, self.kick_max_uids)
        problem = ""
        try:
            kicked = await self.kicker.kick(list(request.uids), list(request.session_ids), request.app, request.reason)
        except NoInstanceError as exc:
            problem = str(exc)
        except grpc.aio.AioRpcError as exc:
            problem = f"register: {exc.code().name} {exc.details()}"
        except (RedisError, OSError) as exc:
            problem = f"discovery: {exc}"
        if problem:
            m.KICK_REQUESTS.labels("unavailable").inc()
            common_metrics.ERRORS.labels("backend").inc()
            log.warning("kick failed: %s", problem)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"kick failed: {problem}")
        return pb.KickReply(kicked=kicked)

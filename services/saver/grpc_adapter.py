"""gRPC adapter: pylon.internal.Saver → MessageStore.

Status mapping: the caller's bad request → INVALID_ARGUMENT; Redis or MySQL down → UNAVAILABLE
(logged once per outage, not per call); bounded MySQL queue full → RESOURCE_EXHAUSTED.
While Redis is being rebuilt from MySQL a call waits for it until shortly before its deadline,
so the caller hears UNAVAILABLE (and can try elsewhere or later) rather than DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
import time

import grpc
import pymysql
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import metrics
from services.common.outage import OutageLog
from services.common.pb import internal_pb2, internal_pb2_grpc
from services.saver import metrics as m
from services.saver.errors import BackendUnavailable, Overloaded, RequestError
from services.saver.parked import ParkedMessages
from services.saver.store import MessageStore

log = logging.getLogger(__name__)

# kept from the caller's deadline for the answer to reach it
_REPLY_MARGIN_S = 0.25


def rebuild_wait_s(context) -> float | None:
    """How long this call may wait for a rebuild: its time left less the reply margin (None: no deadline)."""
    left = context.time_remaining()
    return None if left is None else max(left - _REPLY_MARGIN_S, 0.0)


class SaverServicer(internal_pb2_grpc.SaverServicer):
    def __init__(self, store: MessageStore, parked: ParkedMessages | None = None) -> None:
        self.store = store
        self.parked = parked
        # MySQL outages are logged by the journal, which sees every statement
        self._redis_outage = OutageLog("Redis")

    async def _run(self, method: str, n_items: int, context, coro):
        started = time.perf_counter()
        outcome = "ok"
        m.RPC_ITEMS.labels(method).observe(n_items)
        try:
            result = await coro
            self._redis_outage.ok()
            return result
        except RequestError as exc:
            outcome = "invalid_argument"
            metrics.ERRORS.labels("peer").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"saver.{method}: {exc}")
        except Overloaded as exc:
            outcome = "resource_exhausted"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"saver.{method}: overloaded, retry later: {exc}")
        except (BackendUnavailable, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            outcome = "unavailable"
            if not isinstance(exc, BackendUnavailable):
                exc = BackendUnavailable("Redis", str(exc))
            m.BACKEND_ERRORS.labels(exc.backend).inc()
            metrics.ERRORS.labels("backend").inc()
            if exc.backend == "Redis":
                self._redis_outage.failed(exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"saver.{method}: {exc}")
        except (RedisError, pymysql.err.MySQLError) as exc:
            outcome = "internal"
            backend = "Redis" if isinstance(exc, RedisError) else "MySQL"
            m.BACKEND_ERRORS.labels(backend).inc()
            metrics.ERRORS.labels("bug").inc()
            log.error("saver.%s: %s error: %r", method, backend, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"saver.{method}: {backend} error: {exc}")
        finally:
            m.RPC_SECONDS.labels(method, outcome).observe(time.perf_counter() - started)

    async def Store(self, request, context):
        seqs = await self._run("Store", len(request.messages), context, self.store.store(request.messages, rebuild_wait_s(context)))
        return internal_pb2.StoreReply(seqs=seqs)

    async def LoadInbox(self, request, context):
        inboxes = await self._run("LoadInbox", len(request.keys), context,
                                  self.store.load(request.keys, request.limit_per_inbox, rebuild_wait_s(context)))
        return internal_pb2.LoadReply(inboxes=inboxes)

    async def Ack(self, request, context):
        n = await self._run("Ack", len(request.refs), context, self.store.ack(request.refs))
        return internal_pb2.Count(n=n)

    async def MarkDelivered(self, request, context):
        n = await self._run("MarkDelivered", len(request.refs), context, self.store.mark_delivered(request.refs, rebuild_wait_s(context)))
        return internal_pb2.Count(n=n)

    async def StoreBroadcast(self, request, context):
        n = await self._run("StoreBroadcast", len(request.messages), context,
                            self.store.store_broadcast(request.messages, rebuild_wait_s(context)))
        return internal_pb2.Count(n=n)

    async def GetMessage(self, request, context):
        return await self._run("GetMessage", 1, context, self.store.get(request.msg_id))

    # ---------------------------------------------------------------- operators (services/saver/parked.py)

    def _operator(self) -> ParkedMessages:
        if self.parked is None:  # wiring bug: main() always gives one
            raise RuntimeError("this SaverServicer was built without ParkedMessages")
        return self.parked

    async def ListParked(self, request, context):
        return await self._run("ListParked", 1, context, self._operator().list(request))

    async def Requeue(self, request, context):
        requeued, skipped = await self._run("Requeue", len(request.msg_ids) or 1, context,
                                            self._operator().requeue(request))
        return internal_pb2.RequeueReply(requeued=requeued, skipped=skipped)

    async def InspectInboxes(self, request, context):
        views = await self._run("InspectInboxes", len(request.keys), context, self._operator().inspect(request))
        return internal_pb2.InspectReply(inboxes=views)

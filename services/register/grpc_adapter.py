"""gRPC adapter: pylon.internal.Register → SessionStore. Validation errors become
INVALID_ARGUMENT, an unreachable Redis becomes UNAVAILABLE (logged once per outage, not per call)."""

from __future__ import annotations

import logging
import time

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import metrics
from services.common.outage import OutageLog
from services.common.pb import internal_pb2, internal_pb2_grpc
from services.register import metrics as m
from services.register.keys import RequestError
from services.register.store import SessionStore

log = logging.getLogger(__name__)


class RegisterServicer(internal_pb2_grpc.RegisterServicer):
    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self._redis_log = OutageLog("Redis")

    async def _run(self, method: str, n_items: int | None, context, coro):
        """``n_items`` None: a call without items (Epoch), kept out of the batch-size histogram."""
        started = time.perf_counter()
        outcome = "ok"
        if n_items is not None:
            m.BATCH_ITEMS.labels(method).observe(n_items)
        try:
            result = await coro
            self._redis_log.ok()
            return result
        except RequestError as exc:
            outcome = "invalid_argument"
            metrics.ERRORS.labels("peer").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"register.{method}: {exc}")
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            outcome = "unavailable"
            m.REDIS_ERRORS.inc()
            metrics.ERRORS.labels("backend").inc()
            self._redis_log.failed(exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"register.{method}: Redis unavailable: {exc}")
        except RedisError as exc:
            outcome = "internal"
            m.REDIS_ERRORS.inc()
            metrics.ERRORS.labels("backend").inc()
            log.error("register.%s: Redis error: %s", method, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"register.{method}: Redis error: {exc}")
        finally:
            m.RPC_SECONDS.labels(method, outcome).observe(time.perf_counter() - started)

    async def Register(self, request, context):
        n, epoch, replaced = await self._run("Register", len(request.sessions), context,
                                             self.store.register(request.sessions))
        return internal_pb2.RegisterReply(n=n, epoch=epoch, replaced=replaced)

    async def Epoch(self, request, context):
        epoch = await self._run("Epoch", None, context, self.store.epoch())
        return internal_pb2.RegisterReply(epoch=epoch)

    async def Unregister(self, request, context):
        n = await self._run("Unregister", len(request.sessions), context, self.store.unregister(request.sessions))
        return internal_pb2.Count(n=n)

    async def Lookup(self, request, context):
        users = await self._run("Lookup", len(request.uids), context, self.store.lookup(request.uids))
        return internal_pb2.LookupReply(users=users)

    async def DropInstance(self, request, context):
        n = await self._run("DropInstance", 1, context, self.store.drop_instance(request.instance))
        return internal_pb2.Count(n=n)

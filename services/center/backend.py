"""Failures of the services and stores center depends on: they become 503, not 500."""

from __future__ import annotations

import asyncio

import grpc
import pymysql
import redis.exceptions

from services.center.errors import BackendUnavailable, InvalidRequest
from services.common.rpc import NoInstanceError

# Exceptions that mean "a backend is down or slow", as opposed to a bug in center.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    grpc.aio.AioRpcError, NoInstanceError, redis.exceptions.RedisError, pymysql.err.MySQLError,
    ConnectionError, asyncio.TimeoutError,
)


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details() or ''}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def unavailable(service: str, exc: BaseException) -> BackendUnavailable | InvalidRequest:
    """The error to give the caller when a call to ``service`` failed."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        # the backend refused what the caller sent (e.g. a limit stricter than center's)
        return InvalidRequest(f"{service} refused the request: {exc.details()}", "rejected_by_backend")
    if isinstance(exc, NoInstanceError):
        return BackendUnavailable(f"no live {service} instance", "backend_unavailable")
    return BackendUnavailable(f"{service} unavailable ({describe(exc)})", "backend_unavailable")

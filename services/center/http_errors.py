"""JSON errors and request metrics for the center's aiohttp app.

Every failure leaves as ``{"error": {"code": ..., "message": ...}}``: our typed errors with their
status, aiohttp's own (unknown route, wrong method, body too large) translated, a backend
failure that escaped the core as 503, and anything else as 500 with one traceback in the log
(that one is our bug).
"""

from __future__ import annotations

import logging
import math
import time

import msgspec
from aiohttp import web
from prometheus_client import Counter, Histogram

from services.center import telemetry
from services.center.backend import BACKEND_ERRORS, describe
from services.center.errors import (
    BackendUnavailable,
    CenterError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthenticated,
)

log = logging.getLogger(__name__)

STATUS: dict[type[CenterError], int] = {
    InvalidRequest: 400, Unauthenticated: 401, Forbidden: 403, NotFound: 404, Conflict: 409,
    PayloadTooLarge: 413, RateLimited: 429, BackendUnavailable: 503,
}
# aiohttp's own HTTP errors (raised before a handler runs) -> stable codes
AIOHTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 411: "length_required",
                 413: "body_too_large", 414: "uri_too_long", 415: "unsupported_media_type", 431: "headers_too_large"}
_METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"})


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # msgspec writes the same JSON as json.dumps(separators=(",", ":")), non-ASCII as UTF-8
    # rather than \u escapes, in a fifth of the time
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json",
                        headers=headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   index: int | None = None) -> web.Response:
    error: dict[str, object] = {"code": code, "message": message}
    if index is not None:
        error["index"] = index  # which message of a batch-form push was refused
    return json_response({"error": error}, status, headers)


def status_of(exc: CenterError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def _render(exc: CenterError) -> web.Response:
    headers = None
    if exc.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return error_response(status_of(exc), exc.code, exc.message, headers, getattr(exc, "index", None))


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    # only templates ("/v1/users/{uid}"), never raw paths: label cardinality stays bounded
    return resource.canonical if resource is not None else "unmatched"


def make_middleware(tally: telemetry.Tally):
    # labelled children looked up once: labels() costs a lock and a dict walk per call, and the
    # keys are bounded (route templates x methods x statuses)
    request_counters: dict[tuple[str, str, int], Counter] = {}
    latency_histograms: dict[str, Histogram] = {}

    @web.middleware
    async def errors_and_metrics(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except CenterError as exc:
            response = _render(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(exc.status, AIOHTTP_CODES.get(exc.status, f"http_{exc.status}"),
                                      exc.reason or "request failed")
        except BACKEND_ERRORS as exc:
            log.warning("%s %s: backend failure: %s", request.method, request.path, describe(exc))
            response = error_response(503, "backend_unavailable", f"a backend is unavailable ({describe(exc)})")
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = error_response(500, "internal_error", "internal error; it has been logged")
        route = _route_name(request)
        tally.requests += 1
        if response.status >= 500:
            tally.errors_5xx += 1
        elif response.status >= 400:
            tally.errors_4xx += 1
        method = request.method if request.method in _METHODS else "OTHER"
        key = (route, method, response.status)
        counter = request_counters.get(key)
        if counter is None:
            counter = request_counters[key] = telemetry.HTTP_REQUESTS.labels(route, method, str(response.status))
        counter.inc()
        histogram = latency_histograms.get(route)
        if histogram is None:
            histogram = latency_histograms[route] = telemetry.HTTP_SECONDS.labels(route)
        histogram.observe(time.perf_counter() - started)
        return response

    return errors_and_metrics

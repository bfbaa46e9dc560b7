"""Requests aiohttp refuses before any route runs, answered as JSON and logged without a flood.

aiohttp answers a request line or header over its limits (8,190 bytes a line, 128 headers), a bad
``Content-Length`` or bytes that are not HTTP with a text/plain 400 and logs an ERROR with a
traceback for each one, so anyone can fill a log with a loop. Here those are the peer's fault:
a JSON error like every other (``{"error": {"code", "message"}}``) with the most precise status
(414 long URL, 431 header too large or too many, 400 otherwise), a Prometheus counter, and at
most one WARNING line per ``WARN_INTERVAL_S`` naming how many more were refused meanwhile.
A 500 from here is still our bug and keeps its traceback.

``GuardedAppRunner`` is a drop-in ``web.AppRunner``; ``body_limit`` refuses a request whose
``Content-Length`` already says it is over the app's body limit, before waiting for the body.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from prometheus_client import Counter

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 10.0  # one line per 10 s is enough to notice a flood without being one
_DETAIL_CHARS = 120  # of the parser's message; the offending line itself may be megabytes

REFUSED = Counter("pylon_http_refused_total", "HTTP requests refused by the HTTP parser or the body limit", ["code"])


class RateLimitedWarning:
    """``warn()`` logs at most once per ``interval_s``; the next line counts the ones skipped."""

    def __init__(self, logger: logging.Logger, interval_s: float = WARN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._clock = clock
        self._next = 0.0
        self.suppressed = 0

    def warn(self, msg: str, *args: object) -> bool:
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval_s
        if self.suppressed:
            msg += " (and %d more refused since the last such line)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._log.warning(msg, *args)
        return True


_WARNING = RateLimitedWarning(log)


def classify(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a request the parser refused."""
    if isinstance(exc, http_exceptions.LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytes | bytearray) and (line[:1] == b"/" or line[:4].lower() == b"http"):
            return 414, "uri_too_long", "request URL too long"
        return 431, "headers_too_large", "request header too large"
    detail = getattr(exc, "message", "") or "malformed request"
    detail = " ".join(str(detail).split())[:_DETAIL_CHARS]  # one line: the parser's message has newlines
    if "too many headers" in detail.lower():
        return 431, "headers_too_large", "too many request headers"
    return 400, "bad_request", f"malformed HTTP request: {detail}"


def _json_error(status: int, code: str, message: str) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.force_close()  # the parser's state is unknown after a refusal
    return resp


class JsonErrorRequestHandler(RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # an exception escaped a handler: ours
            self.logger.error("Error handling request from %s", request.remote, exc_info=exc)
            code, text = "internal_error", "internal error; it has been logged"
        else:
            status, code, text = classify(exc)
            REFUSED.labels(code).inc()
            _WARNING.warn("refused a request from %s: %s %s", request.remote, status, text)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        return _json_error(status, code, text)


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer parser refusals as JSON (see module doc)."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same object, same state; only the handler class differs
        return server


def body_limit(max_bytes: int):
    """Middleware: a declared ``Content-Length`` over ``max_bytes`` is a 413 at once, without
    waiting for (or reading) a body that may never come."""

    @web.middleware
    async def declared_body_limit(request: web.Request, handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_bytes:
            REFUSED.labels("body_too_large").inc()
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=length)
        return await handler(request)

    return declared_body_limit

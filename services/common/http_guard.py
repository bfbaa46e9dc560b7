"""Requests aiohttp refuses before any route runs, answered as JSON and logged without a flood.

aiohttp answers a request line or header over its limits (8,190 bytes a line, 128 headers), a bad
``Content-Length`` or bytes that are not HTTP with a text/plain 400 and logs an ERROR with a
traceback for each one, so anyone can fill a log with a loop. Here those are the peer's fault:
a JSON error like every other (``{"error": {"code", "message"}}``) with the most precise status
(414 long URL, 431 header too large or too many, 400 otherwise), a Prometheus counter, and at
most one WARNING line per ``WARN_INTERVAL_S`` naming how many more were refused meanwhile.
A 500 from here is still our bug and keeps its traceback.

A request head (request line and headers) must arrive whole within ``header_timeout_s`` (10 s)
of its first byte, or the connection gets a JSON 408 and is closed: aiohttp itself waits for a
head forever, so a client trickling header bytes (slowloris) could hold every descriptor of the
process. One sweep per second per process checks the heads in progress; no timer per connection.

``GuardedAppRunner`` is a drop-in ``web.AppRunner``; ``body_limit`` refuses a request whose
``Content-Length`` already says it is over the app's body limit, before waiting for the body.
"""

from __future__ import annotations

import asyncio
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
HEADER_TIMEOUT_S = 10.0  # from a head's first byte to its last
SWEEP_S = 1.0
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


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


def _json_error(status: int, code: str, message: str) -> web.Response:
    resp = web.Response(status=status, body=_error_body(code, message), content_type="application/json")
    resp.force_close()  # the parser's state is unknown after a refusal
    return resp


class JsonErrorRequestHandler(RequestHandler):
    def __init__(self, manager, *args, **kwargs) -> None:
        super().__init__(manager, *args, **kwargs)
        self._heads = getattr(manager, "heads", None)  # handler -> loop time its head began

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        heads = self._heads
        if heads is None:
            return
        if self._request_count != before:
            heads.pop(self, None)  # a whole head arrived (what follows in this read counts from its next bytes)
        elif (data and self not in heads and not self._request_in_progress and not self._messages
              and self._payload_parser is None and not (self._force_close or self._close)):
            # bytes while no request is queued or being handled: the start of a head (a body's
            # bytes arrive while its request is queued or in its handler)
            heads[self] = self._loop.time()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._heads is not None:
            self._heads.pop(self, None)
        super().connection_lost(exc)

    def head_timed_out(self) -> None:
        """The head did not arrive whole in time: a JSON 408, then the connection is closed."""
        REFUSED.labels("header_timeout").inc()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        text = f"request head not complete within {self._manager.header_timeout_s:g} s"
        _WARNING.warn("refused a request from %s: 408 %s", peer[0] if isinstance(peer, tuple) else peer, text)
        body = _error_body("request_timeout", text)
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        self.force_close()
        transport.close()

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
    heads: dict
    header_timeout_s: float

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)

    def sweep(self) -> None:
        """Close the connections whose head began more than ``header_timeout_s`` ago."""
        cutoff = self._loop.time() - self.header_timeout_s
        late = [h for h, began in self.heads.items() if began < cutoff]
        for handler in late:
            self.heads.pop(handler, None)
            handler.head_timed_out()


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer parser refusals as JSON and whose request heads
    must arrive within ``header_timeout_s`` (see module doc)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._sweeper: asyncio.TimerHandle | None = None

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same object, same state; only the handler class differs
        server.heads = {}
        server.header_timeout_s = self.header_timeout_s
        loop = asyncio.get_running_loop()
        interval = min(SWEEP_S, self.header_timeout_s / 2)

        def sweep() -> None:
            try:
                server.sweep()
            finally:
                self._sweeper = loop.call_later(interval, sweep)

        self._sweeper = loop.call_later(interval, sweep)
        return server

    async def cleanup(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().cleanup()


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

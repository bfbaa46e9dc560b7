"""Lanes: the internal calls of services/common/rpc.py over plain framed TCP beside gRPC.

A unary grpc.aio call costs ~1-1.6 ms of CPU here, both ends together, whatever it carries (a
trivial call measured between two processes on the 2-core box: ~600 us in the caller, ~420-1,050
us in the server, most of it in gRPC's poller thread and its hand-offs to the event loop). That
fixed cost, paid once per hop per batch, was most of a pushed message's cost. A lane carries the
same protobuf messages to the same servicer methods over one TCP connection per peer with an
``asyncio.Protocol`` at each end: no HTTP/2, no thread, many calls in flight on one connection,
answered in any order.

Frames (big-endian): a request is ``u32 length | u32 call id | u32 deadline ms | u16 method
length | u16 request ids length | method | request ids | body``; an answer is ``u32 length | u32
call id | u8 status code | body`` where a non-zero status code (grpc.StatusCode's number) is
followed by its details in UTF-8 instead of a body. ``length`` counts what follows it.

A connection opens with a greeting: the caller sends ``u32 length | "PYLN" | identity`` (the
gRPC address it found this lane announced beside), the server answers ``u32 1 | u8 1`` when that
is its own identity (or it has none) and ``u32 1 | u8 0`` otherwise, and closes. So a lane
address that has come to belong to another process (a restart on a new port, another process
given the old one, an advertised host that is not the bind host) is never called: the caller
takes it for unreachable and makes the call over gRPC.

A server serves the servicers it is given exactly as gRPC would: the same handlers, the same
(de)serialisers (taken from the generated ``add_*Servicer_to_server``), a context with
``abort`` and ``time_remaining``, the caller's request ids set for the call's task. A caller
sees what a gRPC caller sees: the reply message, or a ``grpc.aio.AioRpcError`` with the same
codes (UNAVAILABLE when the peer cannot be reached or the connection is lost with the call in
flight; DEADLINE_EXCEEDED when the deadline passes). gRPC stays: every service keeps serving it,
instances announce their lane in discovery beside it, and callers use a lane only where one is
announced (``pylon.rpc_lanes`` false: never).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import struct
from collections.abc import Callable
from typing import Any

import grpc

from services.common import logs

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 64 * 1024 * 1024 + 65_536  # rpc.MAX_MESSAGE_BYTES plus the header
CONNECT_TIMEOUT_S = 1.0  # a lane not connected within this is taken for unreachable (gRPC then)
# calls one connection may have in flight on a server; past it a call is answered RESOURCE_EXHAUSTED
# at once (callers hold at most rpc.ServiceClient's 256 per client, so this is a peer gone wrong)
MAX_CALLS_PER_CONNECTION = 4096
_REQ = struct.Struct("!IIIHH")   # length, call id, deadline ms, method length, ids length
_ANS = struct.Struct("!IIB")     # length, call id, status code
_LEN = struct.Struct("!I")
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_HELLO = b"PYLN"
_WELCOME = _LEN.pack(1) + b"\x01"
_NOT_ME = _LEN.pack(1) + b"\x00"
_OK = 0
_METADATA = grpc.aio.Metadata()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, _METADATA, _METADATA, details)


class LaneUnreachable(grpc.aio.AioRpcError):
    """The lane could not be connected to: nothing of the call was sent (rpc.ServiceClient then
    makes it over gRPC, which may take another path: a proxy, a firewall that lets only it pass)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, _METADATA, _METADATA, details)


# ------------------------------------------------------------------ server
class _Handlers:
    """Collects the method handlers a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.methods: dict[bytes, tuple[Callable, Callable, Callable]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        for h in handlers:
            for name, mh in getattr(h, "_method_handlers", {}).items():
                self._add(name, mh)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for method, mh in handlers.items():
            self._add(f"/{service}/{method}", mh)

    def _add(self, path: str, mh) -> None:
        if mh.unary_unary is None:
            return  # lanes carry unary calls only; a streaming method stays on gRPC
        self.methods[path.encode()] = (mh.request_deserializer, mh.unary_unary, mh.response_serializer)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LaneContext:
    """What the servicers use of ``grpc.aio.ServicerContext``."""

    __slots__ = ("_deadline", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._loop = loop
        self._deadline = deadline

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - self._loop.time())


class _ServerConnection(asyncio.Protocol):
    __slots__ = ("lane", "transport", "buf", "tasks", "greeted")

    def __init__(self, lane: LaneServer) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.tasks: set[asyncio.Task] = set()
        self.greeted = False

    def _greet(self, buf: bytearray) -> int:
        """Read the caller's greeting; returns the bytes it took (0: not all here yet, -1: refused)."""
        if len(buf) < 4:
            return 0
        (n,) = _LEN.unpack_from(buf, 0)
        if n < 4 or n > 1024 or (len(buf) >= 8 and bytes(buf[4:8]) != _HELLO):
            self.transport.close()
            return -1
        if len(buf) < 4 + n:
            return 0
        expected = bytes(buf[8:4 + n]).decode(errors="replace")
        mine = self.lane.identity
        if mine and expected and expected != mine:
            self.transport.write(_NOT_ME)
            self.transport.close()
            return -1
        self.transport.write(_WELCOME)
        self.greeted = True
        return 4 + n

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.lane.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.lane.connections.discard(self)
        for t in self.tasks:
            t.cancel()  # nobody to answer: as gRPC cancels the handlers of a connection that broke
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        if not self.greeted:
            pos = self._greet(buf)
            if pos <= 0:
                if pos < 0:
                    buf.clear()
                return
        end = len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME_BYTES or n < _REQ.size - 4:
                log.warning("lane: a frame of %d bytes from %s; closing the connection", n,
                            self.transport.get_extra_info("peername") if self.transport else "?")
                self.transport.close()
                buf.clear()
                return
            if end - pos < 4 + n:
                break
            _, call_id, deadline_ms, mlen, ilen = _REQ.unpack_from(buf, pos)
            at = pos + _REQ.size
            method = bytes(buf[at:at + mlen])
            ids = buf[at + mlen:at + mlen + ilen].decode() if ilen else None
            body = bytes(buf[at + mlen + ilen:pos + 4 + n])
            pos += 4 + n
            self._start(call_id, deadline_ms, method, ids, body)
        if pos:
            del buf[:pos]

    def _start(self, call_id: int, deadline_ms: int, method: bytes, ids: str | None, body: bytes) -> None:
        if len(self.tasks) >= MAX_CALLS_PER_CONNECTION:
            self._answer(call_id, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                         f"more than {MAX_CALLS_PER_CONNECTION} calls in flight on one lane connection")
            return
        loop = self.lane.loop
        ctx = contextvars.copy_context()
        if ids is not None:
            ctx.run(logs.REQUEST_IDS.set, ids)
        task = loop.create_task(self._run(call_id, deadline_ms, method, body), context=ctx)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, call_id: int, deadline_ms: int, method: bytes, body: bytes) -> None:
        handler = self.lane.methods.get(method)
        if handler is None:
            self._answer(call_id, grpc.StatusCode.UNIMPLEMENTED.value[0], f"method {method.decode()!r} not found")
            return
        deserialize, behavior, serialize = handler
        if log.isEnabledFor(logging.DEBUG):  # as rpc.RequestIdInterceptor logs a gRPC call
            log.debug("call %s (lane)", method.decode())
        loop = self.lane.loop
        try:
            request = deserialize(body)
            reply = await behavior(request, LaneContext(loop, loop.time() + deadline_ms / 1000))
            out = serialize(reply)
        except _Abort as exc:
            self._answer(call_id, exc.code.value[0], exc.details)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("lane: %s failed", method.decode())
            self._answer(call_id, grpc.StatusCode.UNKNOWN.value[0], f"Unexpected error in handler: {exc!r}")
            return
        t = self.transport
        if t is not None:
            t.write(_ANS.pack(len(out) + 5, call_id, _OK) + out)

    def _answer(self, call_id: int, code: int, details: str) -> None:
        t = self.transport
        if t is not None:
            text = details.encode()[:8192]
            t.write(_ANS.pack(len(text) + 5, call_id, code) + text)


class LaneServer:
    """Serves the unary methods of gRPC servicers on a lane port."""

    def __init__(self, add_servicers: list[tuple[Callable, Any]], identity: str = "") -> None:
        self.identity = identity  # the gRPC address announced beside this lane ("" = answer any caller)
        collected = _Handlers()
        for add, servicer in add_servicers:
            add(servicer, collected)
        self.methods = collected.methods
        self.connections: set[_ServerConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: _ServerConnection(self), host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop listening, give calls in flight ``grace_s`` to finish, then close every connection."""
        if self._server is None:
            return
        self._server.close()
        pending = [t for c in self.connections for t in c.tasks]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        await self._server.wait_closed()
        self._server = None


# ------------------------------------------------------------------ client
class _ClientConnection(asyncio.Protocol):
    def __init__(self, channel: LaneChannel) -> None:
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.welcome: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        expect = self.channel.expect.encode()
        transport.write(_LEN.pack(4 + len(expect)) + _HELLO + expect)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.welcome.done():
            self.welcome.set_result(False)
        self.channel._lost(self, exc)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        if not self.welcome.done():
            if len(buf) < 5:
                return
            self.welcome.set_result(bytes(buf[:5]) == _WELCOME)
            pos = 5
        end = len(buf)
        pending = self.channel.pending
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME_BYTES or n < _ANS.size - 4:
                log.warning("lane: an answer frame of %d bytes from %s; closing the connection", n,
                            self.channel.target)
                self.transport.close()
                buf.clear()
                return
            if end - pos < 4 + n:
                break
            _, call_id, code = _ANS.unpack_from(buf, pos)
            body = bytes(buf[pos + _ANS.size:pos + 4 + n])
            pos += 4 + n
            fut = pending.pop(call_id, None)
            if fut is not None and not fut.done():
                if code == _OK:
                    fut.set_result(body)
                else:
                    fut.set_exception(rpc_error(_CODES.get(code, grpc.StatusCode.UNKNOWN),
                                                body.decode(errors="replace")))
        if pos:
            del buf[:pos]


class LaneChannel:
    """One TCP connection to one peer's lane, opened on first use and again after a loss; every
    call made meanwhile shares it."""

    def __init__(self, target: str, expect: str = "") -> None:
        self.target = target
        self.expect = expect  # the gRPC address this lane was announced beside (checked at connect)
        host, _, port = target.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self.pending: dict[int, asyncio.Future] = {}
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Future | None = None
        self._next_id = 0
        self._closed = False

    async def _connection(self) -> _ClientConnection:
        conn = self._conn
        if conn is not None and conn.transport is not None:
            return conn
        if self._closed:
            raise LaneUnreachable(f"lane to {self.target} is closed")
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            self._connecting = loop.create_future()
            connecting = self._connecting
            conn = None
            try:
                _, conn = await loop.create_connection(lambda: _ClientConnection(self), self._host, self._port)
                if not await conn.welcome:
                    raise OSError(f"it is not the lane of {self.expect or 'this peer'} (any more)")
            except (OSError, asyncio.CancelledError) as exc:
                # refused, not this peer's, or no greeting before the caller's connect timeout
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                err = LaneUnreachable(f"lane to {self.target}: {exc or 'no greeting'}")
                connecting.set_exception(err)
                connecting.exception()  # retrieved: a connect nobody else waited for logs nothing
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise err from None
            finally:
                self._connecting = None
            self._conn = conn
            connecting.set_result(conn)
            return conn
        return await asyncio.shield(self._connecting)

    def _lost(self, conn: _ClientConnection, exc) -> None:
        if self._conn is conn:
            self._conn = None
        pending, self.pending = self.pending, {}
        why = f"lane to {self.target} lost" + (f": {exc}" if exc else "")
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(rpc_error(grpc.StatusCode.UNAVAILABLE, why))

    async def call(self, method: bytes, body: bytes, timeout: float, ids: str | None) -> bytes:
        conn = self._conn
        if conn is None or conn.transport is None:
            try:
                conn = await asyncio.wait_for(self._connection(), min(timeout, CONNECT_TIMEOUT_S))
            except TimeoutError:  # a firewall that drops what it does not let through
                raise LaneUnreachable(f"lane to {self.target}: no connection within "
                                      f"{min(timeout, CONNECT_TIMEOUT_S):.1f}s") from None
        loop = asyncio.get_running_loop()
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        fut = loop.create_future()
        self.pending[call_id] = fut
        raw_ids = ids.encode() if ids else b""
        conn.transport.write(_REQ.pack(_REQ.size - 4 + len(method) + len(raw_ids) + len(body), call_id,
                                       min(int(timeout * 1000), 0xFFFFFFFF), len(method), len(raw_ids))
                             + method + raw_ids + body)
        timer = loop.call_later(timeout, self._expire, call_id)
        try:
            return await fut
        finally:
            timer.cancel()
            self.pending.pop(call_id, None)

    def _expire(self, call_id: int) -> None:
        fut = self.pending.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    async def close(self) -> None:
        self._closed = True
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.close()


class _LaneMethod:
    __slots__ = ("channel", "path", "serialize", "deserialize")

    def __init__(self, channel: LaneChannel, path: str, serialize: Callable, deserialize: Callable) -> None:
        self.channel = channel
        self.path = path.encode()
        self.serialize = serialize
        self.deserialize = deserialize

    async def __call__(self, request, timeout: float | None = None, metadata=None, **_ignored):
        ids = logs.incoming_ids(metadata)
        body = await self.channel.call(self.path, self.serialize(request), timeout or 3600.0, ids)
        return self.deserialize(body)


class StubChannel:
    """Enough of ``grpc.aio.Channel`` for a generated stub: its unary methods go over the lane."""

    def __init__(self, channel: LaneChannel) -> None:
        self.lane = channel

    def unary_unary(self, path: str, request_serializer=None, response_deserializer=None, **_kw):
        return _LaneMethod(self.lane, path, request_serializer, response_deserializer)

    def unary_stream(self, *a, **kw):  # no streaming methods are called through rpc.ServiceClient
        raise NotImplementedError("lanes carry unary calls only")

    stream_unary = stream_stream = unary_stream

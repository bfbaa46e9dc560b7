"""``PylonClient``: route, connect, authenticate, resume, heartbeat, deliver once, ack, reconnect.

Client states (the only transitions there are; ``_set_state`` enforces them)::

    IDLE ──start()──▶ CONNECTING ──AUTH_OK──▶ CONNECTED
                        │   ▲  ▲                 │ connection lost, missed PONG,
                        │   │  └─────────────────┤ COMMAND RECONNECT (straight to CONNECTING)
                        ▼   │                    ▼
                      BACKOFF ◀──────────────────┘
    any ──close(), KICK, permanent ERROR (bad token, unknown app, uid mismatch)──▶ CLOSED

One connection at a time. Per connection four tasks run: the reader (frames → events), the
writer (bounded outgoing queue → socket), the heartbeat and the delivery worker (PUSH frames
→ ``on_message`` → one ACK frame per PUSH frame). Delivery runs apart from the reader so a slow
handler does not hold up PONGs and upstream acks; PUSH frames wait in a bounded queue and a
full queue stops the reader, which is the backpressure the server sees.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pylon_sdk import frames
from pylon_sdk.backoff import ReconnectBackoff
from pylon_sdk.connection import Link
from pylon_sdk.dedupe import RecentIds
from pylon_sdk.errors import (
    AuthError,
    ClientClosed,
    ConnectionLost,
    NotConnected,
    ProtocolError,
    PylonError,
    ReplyTimeout,
    RouteError,
    SendQueueFull,
    ServerError,
    UpstreamTimeout,
)
from pylon_sdk.heartbeat import HeartbeatPolicy
from pylon_sdk.message import Message
from pylon_sdk.routing import MAX_EXCLUDE, Address, DispatcherRoutes, FixedRoutes
from services.common.codec import ErrorCode, FrameError, Op

log = logging.getLogger("pylon_sdk")

MAX_APPS = 256            # apps bound on one connection; the AUTH frame must stay far below max_frame
ACK_CHUNK = 4096          # ids per ACK frame: the server refuses more (WIRE.md §5)
STABLE_SESSION_S = 10.0   # a session that lived this long resets the reconnect backoff
MAX_TOKEN_REFRESHES = 2   # TOKEN_EXPIRED right after a refresh twice in a row: the provider is broken


class State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    CLOSED = "closed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.CONNECTING, State.CLOSED}),
    State.CONNECTING: frozenset({State.CONNECTING, State.CONNECTED, State.BACKOFF, State.CLOSED}),
    State.CONNECTED: frozenset({State.CONNECTING, State.BACKOFF, State.CLOSED}),
    State.BACKOFF: frozenset({State.CONNECTING, State.BACKOFF, State.CLOSED}),
    State.CLOSED: frozenset(),
}


class _End(enum.Enum):
    CONNECT_FAILED = "connect_failed"  # no session from this address: try the next one
    LOST = "lost"                      # the session ended: reconnect after a backoff
    RETRY_LATER = "retry_later"        # the server is busy: come back after retry_after
    REDIRECT = "redirect"              # COMMAND RECONNECT: go to the given addresses now
    REFRESH_TOKEN = "refresh_token"    # TOKEN_EXPIRED and a token_provider to ask
    STOP = "stop"                      # kicked or refused for good


@dataclass(slots=True)
class _Outcome:
    end: _End
    reason: str
    address: Address | None = None
    error: PylonError | None = None
    retry_after_s: float = 0.0
    addresses: list[Address] = field(default_factory=list)
    kicked: bool = False
    session_s: float = 0.0


OnMessage = Callable[[Message], Any]
OnEvent = Callable[[str, Any], Any]


class PylonClient:
    """An asyncio client for one user on one device.

    ``on_message(msg)`` (sync or async) gets every message once; it is acked when the handler
    returns, and not acked if it raises (the server then delivers it again). ``on_event(kind,
    data)`` (sync or async, optional) is told: ``"connected"`` (dict), ``"disconnected"``
    (reason), ``"error"`` (a ``PylonError``), ``"kicked"`` (reason), ``"heartbeat"`` (dict with
    the interval now in force), ``"command"`` ((kind, addresses) of commands the SDK does not
    act on), ``"closed"`` (reason).
    """

    def __init__(self, dispatcher_url: str | None = None, uid: str = "", token: str = "", device_id: str = "",
                 apps: Iterable[str] = (), net: str = "wifi", on_message: OnMessage | None = None,
                 on_event: OnEvent | None = None, *, addresses: Iterable[tuple[str, int]] | None = None,
                 region: str = "", token_provider: Callable[[], Awaitable[str] | str] | None = None,
                 heartbeat: HeartbeatPolicy | None = None, ack_timeout_s: float = 10.0,
                 connect_timeout_s: float = 10.0, auth_timeout_s: float = 10.0, pong_timeout_s: float = 10.0,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0, max_queued_frames: int = 1024,
                 max_pending_upstream: int = 1024, push_queue_frames: int = 256, dedupe_size: int = 10_000) -> None:
        if not uid:
            raise ValueError("uid is required")
        if not token:
            raise ValueError("token is required")
        if (dispatcher_url is None) == (addresses is None):
            raise ValueError("give exactly one of dispatcher_url and addresses")
        self.uid = uid
        self.token = token
        self.device_id = device_id
        self.net = net
        self._apps: dict[str, None] = dict.fromkeys(a for a in apps if a)
        self._tokens: list[str] = []
        if len(self._apps) > MAX_APPS:
            raise ValueError(f"at most {MAX_APPS} apps per connection")
        self._on_message = on_message
        self._on_event = on_event
        self._token_provider = token_provider
        self._routes = FixedRoutes(addresses) if addresses is not None else \
            DispatcherRoutes(dispatcher_url, uid, net, region, connect_timeout_s)
        self._heartbeat = heartbeat or HeartbeatPolicy()
        self.ack_timeout_s = ack_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.auth_timeout_s = auth_timeout_s
        self.pong_timeout_s = pong_timeout_s
        self.max_queued_frames = max_queued_frames
        self.max_pending_upstream = max_pending_upstream
        self.push_queue_frames = push_queue_frames
        self._backoff = ReconnectBackoff(reconnect_min_s, reconnect_max_s)
        self._recent = RecentIds(dedupe_size)

        self._state = State.IDLE
        self._link: Link | None = None
        self._session_id = ""
        self._resume_token = ""
        self._pending: dict[int, asyncio.Future] = {}       # UPSTREAM seq -> accepted
        self._pending_bind: dict[int, asyncio.Future] = {}  # BIND/UNBIND seq -> apps bound
        self._pong_waiter: asyncio.Future | None = None
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._own_tasks: set[asyncio.Task] = set()
        self._event_tasks: set[asyncio.Task] = set()
        self.close_reason = ""
        self.close_error: PylonError | None = None

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is State.CONNECTED

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def resume_token(self) -> str:
        return self._resume_token

    @property
    def heartbeat_s(self) -> int:
        return self._heartbeat.interval_s

    @property
    def apps(self) -> list[str]:
        return list(self._apps)

    @property
    def address(self) -> Address | None:
        return self._link.address if self._link is not None and self.connected else None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float | None = None) -> None:
        """Connect and return once the first session is up.

        Raises ``AuthError`` if the server refuses this client for good, ``ClientClosed`` if it
        was kicked or closed meanwhile, ``TimeoutError`` if ``timeout`` passes first (the
        client keeps trying in the background; ``close()`` stops it).
        """
        if self._state is not State.IDLE:
            raise ClientClosed("client is closed") if self._state is State.CLOSED else \
                PylonError("start() was already called")
        self._set_state(State.CONNECTING)
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"pylon-client-{self.uid}")
        self._own_tasks.add(self._runner)
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._runner}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._ready.is_set():
            return
        if self._runner.done() or self._state is State.CLOSED:
            raise self.close_error or ClientClosed(self.close_reason or "closed")
        raise TimeoutError(f"not connected within {timeout} s; still trying in the background")

    async def wait_connected(self, timeout: float | None = None) -> None:
        if self._state is State.CLOSED:
            raise self.close_error or ClientClosed(self.close_reason)
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def wait_closed(self) -> str:
        """Wait until the client is closed (kick, permanent error, ``close()``); return the reason."""
        await self._closed.wait()
        return self.close_reason

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Safe to call from inside a handler."""
        self._stop("closed by the application")
        runner = self._runner
        if runner is None:
            await self._routes.close()
            return
        if asyncio.current_task() in self._own_tasks:
            return  # called from a handler: the runner unwinds once the handler returns
        if not runner.done():
            runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    # ------------------------------------------------------------------ requests

    async def send_upstream(self, app: str, kind: str, payload: bytes | str, timeout: float | None = None) -> bool:
        """Send data to ``app``'s server; True once the server accepted it (UPSTREAM_ACK).

        False: the server refused it (app without webhook, queue full, not bound...). Raises
        ``NotConnected`` between sessions, ``FrameTooLarge`` / ``SendQueueFull`` before sending,
        ``UpstreamTimeout`` or ``ConnectionLost`` when the answer does not come.
        """
        if isinstance(payload, str):
            payload = payload.encode()
        link = self._require_link()
        if len(self._pending) >= self.max_pending_upstream:
            raise SendQueueFull(f"{len(self._pending)} upstream requests await an answer (limit "
                                f"{self.max_pending_upstream})")
        return await self._request(link, Op.UPSTREAM, frames.upstream(app, kind, bytes(payload)), self._pending,
                                   timeout, UpstreamTimeout)

    async def bind(self, apps: Iterable[str], tokens: Iterable[str] = (), timeout: float | None = None) -> list[str]:
        """Receive messages of more apps on this connection; return the apps now bound.

        ``tokens``: one per app the main token does not cover (same uid). The apps and tokens
        are sent again in AUTH after a reconnect. Raises ``ServerError`` if the server refuses
        (unknown app, bad token ...), ``NotConnected`` between sessions.
        """
        apps = [a for a in dict.fromkeys(apps) if a]
        tokens = list(tokens)
        if len(dict.fromkeys([*self._apps, *apps])) > MAX_APPS:
            raise ValueError(f"at most {MAX_APPS} apps per connection")
        link = self._require_link()
        bound = await self._request(link, Op.BIND, frames.bind(apps, tokens), self._pending_bind, timeout)
        self._tokens.extend(t for t in tokens if t not in self._tokens)
        return bound

    async def unbind(self, apps: Iterable[str], timeout: float | None = None) -> list[str]:
        """Stop receiving messages of ``apps`` on this connection; return the apps still bound."""
        apps = [a for a in dict.fromkeys(apps) if a]
        link = self._require_link()
        return await self._request(link, Op.UNBIND, frames.bind(apps), self._pending_bind, timeout)

    async def _request(self, link: Link, op: Op, body: bytes, table: dict[int, asyncio.Future],
                       timeout: float | None, timeout_error: type[ReplyTimeout] = ReplyTimeout) -> Any:
        """Send a request frame and wait for the reply with its seq (the read loop resolves ``table``)."""
        seq = link.next_seq()
        fut = asyncio.get_running_loop().create_future()
        table[seq] = fut
        wait = timeout if timeout is not None else self.ack_timeout_s
        try:
            link.send(op, body, seq)
            return await asyncio.wait_for(fut, wait)
        except TimeoutError:
            raise timeout_error(f"no answer to {op.name} within {wait} s") from None
        finally:
            table.pop(seq, None)

    def _require_link(self) -> Link:
        if self._state is State.CLOSED:
            raise self.close_error or ClientClosed(self.close_reason)
        if self._link is None or self._state is not State.CONNECTED:
            raise NotConnected(f"not connected ({self._state.value})")
        return self._link

    # ------------------------------------------------------------------ supervisor

    def _set_state(self, new: State) -> None:
        old = self._state
        if old is State.CLOSED:
            return  # close() won a race with the runner; CLOSED is final
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"bug: client state {old.value} -> {new.value}")
        self._state = new

    async def _run(self) -> None:
        exclude: list[Address] = []
        preferred: list[Address] = []
        refreshes = 0
        try:
            while self._state is not State.CLOSED:
                if preferred:
                    addrs, preferred = preferred, []
                else:
                    try:
                        addrs = await self._routes.get(exclude)
                        if not addrs:
                            raise RouteError("dispatcher returned no room address")
                    except RouteError as exc:
                        self._emit("error", exc)
                        await self._pause(self._backoff.next())
                        continue
                outcome: _Outcome | None = None
                for addr in addrs:
                    self._set_state(State.CONNECTING)
                    outcome = await self._connect_once(addr)
                    if outcome.end is not _End.CONNECT_FAILED:
                        break
                    log.info("pylon: %s", outcome.reason)
                    if addr in exclude:
                        exclude.remove(addr)
                    exclude.append(addr)
                    del exclude[:-MAX_EXCLUDE]
                    if self._state is State.CLOSED:
                        return
                assert outcome is not None
                if self._state is State.CLOSED:
                    return
                if outcome.session_s:
                    exclude.clear()
                    refreshes = 0
                    if outcome.session_s >= STABLE_SESSION_S:
                        self._backoff.reset()
                end = outcome.end
                if end is _End.STOP:
                    self._finish(outcome)
                    return
                if end is _End.REDIRECT:
                    preferred = outcome.addresses
                    continue
                if end is _End.REFRESH_TOKEN:
                    refreshes += 1
                    if not await self._refresh_token(outcome, refreshes):
                        return
                    continue
                if end is _End.RETRY_LATER:
                    if outcome.address is not None and outcome.address not in exclude:
                        exclude.append(outcome.address)
                    wait = outcome.retry_after_s
                    await self._pause(self._backoff.jitter(wait) if wait > 0 else self._backoff.next())
                    continue
                await self._pause(self._backoff.next())  # LOST, or every address failed
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the SDK: say so and stop rather than spin
            log.exception("pylon client stopped by an internal error")
            self._finish(_Outcome(_End.STOP, f"internal error: {exc!r}", error=PylonError(repr(exc))))
        finally:
            self._stop(self.close_reason or "closed")
            await self._routes.close()

    async def _pause(self, seconds: float) -> None:
        self._set_state(State.BACKOFF)
        log.debug("pylon: reconnecting in %.2f s", seconds)
        await asyncio.sleep(seconds)

    async def _refresh_token(self, outcome: _Outcome, refreshes: int) -> bool:
        if self._token_provider is None or refreshes > MAX_TOKEN_REFRESHES:
            self._finish(outcome if self._token_provider is None else
                         _Outcome(_End.STOP, "token still expired after refreshing", error=outcome.error))
            return False
        try:
            token = self._token_provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            log.warning("pylon: token_provider failed: %r", exc)
            self._finish(_Outcome(_End.STOP, f"token_provider failed: {exc!r}", error=outcome.error))
            return False
        if not isinstance(token, str) or not token:
            self._finish(_Outcome(_End.STOP, "token_provider returned no token", error=outcome.error))
            return False
        self.token = token
        return True

    def _stop(self, reason: str) -> None:
        """Enter CLOSED (idempotent): no more reconnects, waiters released."""
        if self._state is not State.CLOSED:
            self._state = State.CLOSED
            self.close_reason = self.close_reason or reason
        if self._link is not None:
            self._link.close()
        self._ready.clear()
        self._fail_pending(ClientClosed(self.close_reason))
        if not self._closed.is_set():
            self._closed.set()
            self._emit("closed", self.close_reason)

    def _finish(self, outcome: _Outcome) -> None:
        self.close_reason = outcome.reason
        self.close_error = outcome.error
        if outcome.kicked:
            self._emit("kicked", outcome.reason)
        self._stop(outcome.reason)

    # ------------------------------------------------------------------ one connection

    async def _connect_once(self, addr: Address) -> _Outcome:
        try:
            link = await Link.open(addr, self.connect_timeout_s, self.max_queued_frames)
        except (OSError, TimeoutError) as exc:
            return _Outcome(_End.CONNECT_FAILED, f"cannot connect to {addr}: {exc or type(exc).__name__}", addr)
        loop = asyncio.get_running_loop()
        writer = loop.create_task(link.write_loop())
        self._own_tasks.add(writer)
        try:
            outcome = await self._handshake(link, addr)
            if outcome is None:
                outcome = await self._run_session(link, writer)
            return outcome
        finally:
            link.close()
            if self._link is link:
                self._link = None
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._own_tasks.discard(writer)
            self._fail_pending(ConnectionLost("connection closed before the server answered"))
            if self._state is State.CONNECTED:
                self._set_state(State.CONNECTING)

    async def _handshake(self, link: Link, addr: Address) -> _Outcome | None:
        """Send AUTH and wait for AUTH_OK. None when the session is up."""
        body = frames.auth(self.token, self.uid, self.device_id, list(self._apps), self.net, self._resume_token,
                           self._heartbeat.hint(), self._tokens)
        try:
            link.send(Op.AUTH, body, link.next_seq(), control=True)
        except PylonError as exc:  # FrameTooLarge: too many apps/tokens for one frame; retrying cannot help
            return _Outcome(_End.STOP, f"cannot authenticate: {exc}", addr, error=exc)
        failed = f"handshake with {addr} failed"
        try:
            frame = await asyncio.wait_for(link.recv(), self.auth_timeout_s)
        except TimeoutError:
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: no answer within {self.auth_timeout_s} s", addr)
        except FrameError as exc:
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: {exc.message}", addr)
        except OSError as exc:
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: {exc}", addr)
        if frame is None:
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: connection closed", addr)
        try:
            event = frames.decode(frame)
        except ProtocolError as exc:
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: {exc}", addr)
        if isinstance(event, frames.Error):
            return self._error_outcome(event.error, addr, in_session=False)
        if not isinstance(event, frames.AuthOk):
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: expected AUTH_OK, got {type(event).__name__}", addr)
        self._session_id = event.session_id
        self._resume_token = event.resume_token or self._resume_token
        if event.apps:
            self._apps = dict.fromkeys(event.apps)
        self._heartbeat.on_auth(event.heartbeat_s)
        link.set_max_frame(event.max_frame)
        return None

    def _error_outcome(self, err: ServerError, addr: Address, in_session: bool) -> _Outcome:
        self._emit("error", err)
        reason = f"server {addr}: {err}"
        if err.code == ErrorCode.TOKEN_EXPIRED:
            auth_err = AuthError(err.code, err.message, err.fatal, err.retry_after_ms)
            end = _End.REFRESH_TOKEN if self._token_provider is not None else _End.STOP
            return _Outcome(end, reason, addr, error=auth_err)
        if err.permanent:
            return _Outcome(_End.STOP, reason, addr, error=AuthError(err.code, err.message, err.fatal,
                                                                      err.retry_after_ms))
        if err.retry_later:
            return _Outcome(_End.RETRY_LATER, reason, addr, error=err, retry_after_s=err.retry_after_ms / 1000)
        return _Outcome(_End.LOST if in_session else _End.CONNECT_FAILED, reason, addr, error=err)

    async def _run_session(self, link: Link, writer: asyncio.Task) -> _Outcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._link = link
        self._set_state(State.CONNECTED)
        self._ready.set()
        log.info("pylon: connected to %s session=%s heartbeat=%ss", link.address, self._session_id,
                 self._heartbeat.interval_s)
        self._emit("connected", {"session_id": self._session_id, "address": str(link.address),
                                 "heartbeat_s": self._heartbeat.interval_s, "apps": list(self._apps)})
        pushes: asyncio.Queue[frames.Push] = asyncio.Queue(self.push_queue_frames)
        reader = loop.create_task(self._read_loop(link, pushes))
        beat = loop.create_task(self._heartbeat_loop(link, pushes))
        deliver = loop.create_task(self._delivery_loop(link, pushes))
        tasks = {reader, beat, deliver, writer}
        self._own_tasks.update((reader, beat, deliver))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reader, beat, deliver):
                t.cancel()
            await asyncio.gather(reader, beat, deliver, return_exceptions=True)
            self._own_tasks.difference_update((reader, beat, deliver))
            self._ready.clear()
            self._pong_waiter = None
        outcome = _Outcome(_End.LOST, "connection ended", link.address)
        for t in (reader, beat, writer, deliver):
            if t in done and not t.cancelled():
                exc = t.exception()
                if exc is None and isinstance(t.result(), _Outcome):
                    outcome = t.result()
                elif exc is not None:
                    outcome = _Outcome(_End.LOST, f"connection to {link.address} failed: {exc!r}", link.address)
                break
        outcome.session_s = max(loop.time() - started, 1e-6)
        if self._state is not State.CLOSED:
            log.info("pylon: disconnected from %s: %s", link.address, outcome.reason)
            self._emit("disconnected", outcome.reason)
        return outcome

    async def _read_loop(self, link: Link, pushes: asyncio.Queue) -> _Outcome:
        addr = link.address
        while True:
            try:
                frame = await link.recv()
            except FrameError as exc:
                return _Outcome(_End.LOST, f"bad frame from {addr}: {exc.message}", addr)
            except OSError as exc:
                return _Outcome(_End.LOST, f"connection to {addr} failed: {exc}", addr)
            if frame is None:
                return _Outcome(_End.LOST, f"{addr} closed the connection", addr)
            try:
                event = frames.decode(frame)
            except ProtocolError as exc:
                log.warning("pylon: %s from %s", exc, addr)
                return _Outcome(_End.LOST, f"{addr}: {exc}", addr)
            if isinstance(event, frames.Push):
                await pushes.put(event)
            elif isinstance(event, frames.Pong):
                waiter = self._pong_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.heartbeat_s)
                elif event.heartbeat_s:
                    self._heartbeat.interval_s = event.heartbeat_s
            elif isinstance(event, frames.UpstreamAck):
                fut = self._pending.pop(event.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(event.accepted)
            elif isinstance(event, frames.Error):
                answered = False
                if event.seq:
                    fut = self._pending.pop(event.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(False)  # upstream refused (e.g. NOT_BOUND)
                        answered = True
                    fut = self._pending_bind.pop(event.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(event.error)
                        answered = True
                if event.error.fatal:
                    return self._error_outcome(event.error, addr, in_session=True)
                if not answered:
                    self._emit("error", event.error)
            elif isinstance(event, frames.Kick):
                return _Outcome(_End.STOP, f"kicked: {event.reason}" if event.reason else "kicked", addr,
                                kicked=True)
            elif isinstance(event, frames.Command):
                if event.kind == "BOUND":
                    self._apps = dict.fromkeys(event.apps)
                    fut = self._pending_bind.pop(event.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(list(event.apps))
                elif event.kind == "RECONNECT":
                    targets = []
                    for text in event.addresses:
                        try:
                            targets.append(Address(*frames.parse_address(text)))
                        except ProtocolError as exc:
                            log.warning("pylon: %s", exc)
                    return _Outcome(_End.REDIRECT if targets else _End.LOST, f"{addr} asked to reconnect", addr,
                                    addresses=targets)
                else:
                    self._emit("command", (event.kind, list(event.addresses)))
            else:
                log.warning("pylon: unexpected %s from %s ignored", type(event).__name__, addr)

    async def _heartbeat_loop(self, link: Link, pushes: asyncio.Queue) -> _Outcome:
        hb = self._heartbeat
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(hb.ping_delay())
            proposal = hb.proposal()
            waiter = self._pong_waiter = loop.create_future()
            try:
                link.send(Op.PING, frames.ping(proposal), control=True)
            except PylonError as exc:
                return _Outcome(_End.LOST, f"cannot send PING: {exc}", link.address)
            while True:
                try:
                    in_force = await asyncio.wait_for(asyncio.shield(waiter), self.pong_timeout_s)
                    break
                except TimeoutError:
                    if pushes.full():
                        continue  # the reader is parked behind a slow on_message: no PONG can be seen yet
                    lowered = hb.on_miss()
                    self._emit("heartbeat", {"interval_s": lowered, "missed": True})
                    return _Outcome(_End.LOST, f"no PONG from {link.address} within {self.pong_timeout_s} s",
                                    link.address)
            if hb.on_pong(in_force):
                self._emit("heartbeat", {"interval_s": hb.interval_s, "missed": False})

    async def _delivery_loop(self, link: Link, pushes: asyncio.Queue) -> None:
        recent = self._recent
        while True:
            push: frames.Push = await pushes.get()
            acked: list[int] = []
            for msg in push.messages:
                if recent.seen(msg.msg_id):
                    acked.append(msg.msg_id)  # the server missed our ACK: ack again, do not deliver again
                    continue
                if self._on_message is not None:
                    try:
                        result = self._on_message(msg)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        log.exception("pylon: on_message failed for msg_id=%d (not acked; it will be delivered "
                                      "again)", msg.msg_id)
                        continue
                recent.add(msg.msg_id)
                acked.append(msg.msg_id)
            if self._state is State.CLOSED:
                return
            for i in range(0, len(acked), ACK_CHUNK):
                try:
                    link.send(Op.ACK, frames.ack(acked[i:i + ACK_CHUNK]), control=True)
                except NotConnected:
                    return
                except SendQueueFull as exc:
                    log.warning("pylon: ACK not sent (%s); the server will redeliver, duplicates are dropped", exc)

    # ------------------------------------------------------------------ helpers

    def _fail_pending(self, exc: PylonError) -> None:
        for table in (self._pending, self._pending_bind):
            pending = list(table.values())
            table.clear()
            for fut in pending:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # a caller that timed out never reads it; do not warn about that

    def _emit(self, kind: str, data: Any) -> None:
        if self._on_event is None:
            return
        try:
            result = self._on_event(kind, data)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._event_tasks.add(task)
                task.add_done_callback(self._event_done)
        except Exception:
            log.exception("pylon: on_event(%r) failed", kind)

    def _event_done(self, task: asyncio.Task) -> None:
        self._event_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pylon: on_event handler failed", exc_info=task.exception())

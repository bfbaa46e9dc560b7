"""``PylonClient``: route, connect, authenticate, resume, heartbeat, deliver once, ack, reconnect.

Client states (the only transitions there are; ``_set_state`` enforces them)::

    IDLE ──start()──▶ CONNECTING ──AUTH_OK──▶ CONNECTED
                        │   ▲  ▲                 │ connection lost, missed PONG,
                        │   │  └─────────────────┤ COMMAND RECONNECT (straight to CONNECTING)
                        ▼   │                    ▼
                      BACKOFF ◀──────────────────┘
    any ──close(), KICK (any reason, ``replaced`` included), permanent ERROR
          (bad token, unknown app, uid mismatch)──▶ CLOSED

One connection at a time. Per connection three tasks run: the reader (frames → events), the
writer (bounded outgoing queue → socket) and the heartbeat. One delivery worker per client
(PUSH frames → ``on_message`` → record → one ACK frame per PUSH frame, see ``delivery``) outlives
the connections: a handler in progress when the connection drops finishes, is recorded, and its
message is acked again when the server sends it again. Delivery runs apart from the reader so a
slow handler does not hold up PONGs and upstream acks; PUSH frames wait in a bounded queue and a
full queue stops the reader, which is the backpressure the server sees.

Resume: every AUTH carries the ``resume_token`` of the last AUTH_OK. When the room still holds the
session (flash disconnect within its grace period) AUTH_OK says ``resumed`` and the unacked
messages come again with the same ids; otherwise the inbox is reloaded from storage. Either way
the dedupe in ``delivery`` hands each id over once.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pylon_sdk import frames
from pylon_sdk.backoff import ReconnectBackoff
from pylon_sdk.connection import Link
from pylon_sdk.dedupe import HandledIdsFile, RecentIds
from pylon_sdk.delivery import Delivery
from pylon_sdk.errors import (
    AuthError,
    ClientClosed,
    ConnectionLost,
    DedupeStoreError,
    Kicked,
    NotConnected,
    ProtocolError,
    PylonError,
    ReplyTimeout,
    RouteError,
    SendQueueFull,
    ServerError,
    TlsError,
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
    kicked: Kicked | None = None
    session_s: float = 0.0


OnMessage = Callable[[Message], Any]
OnEvent = Callable[[str, Any], Any]


class PylonClient:
    """An asyncio client for one user on one device.

    ``on_message(msg)`` (sync or async) gets every msg_id once; it is recorded as handled and
    acked after the handler returns, and neither if it raises (the server then delivers it
    again). With ``dedupe_path`` the handled ids are kept in a SQLite file, so a restarted app
    is not handed a message it handled before. ``on_event(kind, data)`` (sync or async,
    optional) is told: ``"connected"`` (dict, with ``resumed``), ``"disconnected"`` (reason),
    ``"error"`` (a ``PylonError``), ``"kicked"`` (reason), ``"heartbeat"`` (dict with the
    interval now in force), ``"command"`` ((kind, addresses) of commands the SDK does not act
    on), ``"closed"`` (reason).
    """

    def __init__(self, dispatcher_url: str | None = None, uid: str = "", token: str = "", device_id: str = "",
                 apps: Iterable[str] = (), net: str = "wifi", on_message: OnMessage | None = None,
                 on_event: OnEvent | None = None, *, addresses: Iterable[tuple[str, int]] | None = None,
                 region: str = "", token_provider: Callable[[], Awaitable[str] | str] | None = None,
                 heartbeat: HeartbeatPolicy | None = None, ack_timeout_s: float = 10.0,
                 connect_timeout_s: float = 10.0, auth_timeout_s: float = 10.0, pong_timeout_s: float = 10.0,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0, max_queued_frames: int = 1024,
                 max_pending_upstream: int = 1024, push_queue_frames: int = 256, dedupe_size: int = 10_000,
                 dedupe_path: str | os.PathLike | None = None, dedupe_fsync: bool = False,
                 tls_ca: str | os.PathLike | None = None, ssl_context: ssl.SSLContext | None = None,
                 tls_server_name: str | None = None, tls_only: bool = False) -> None:
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
        self._on_event = on_event
        self._token_provider = token_provider
        self._routes = FixedRoutes(addresses) if addresses is not None else \
            DispatcherRoutes(dispatcher_url, uid, net, region, connect_timeout_s)
        self._heartbeat = heartbeat or HeartbeatPolicy()
        # TLS (WIRE.md §1): with a CA file (or a context of the caller's), every address that offers
        # a TLS port is reached over TLS, the room's certificate verified; tls_only skips the others
        if tls_ca is not None and ssl_context is not None:
            raise ValueError("give at most one of tls_ca and ssl_context")
        self._tls: ssl.SSLContext | None = ssl_context
        if tls_ca is not None:
            self._tls = ssl.create_default_context(cafile=os.fspath(tls_ca))
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls_only and self._tls is None:
            raise ValueError("tls_only needs tls_ca or ssl_context")
        self.tls_server_name = tls_server_name
        self.tls_only = tls_only
        self._tls_ports: dict[tuple[str, int], int] = {}  # (host, port) -> TLS port, from the routes seen
        self.ack_timeout_s = ack_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.auth_timeout_s = auth_timeout_s
        self.pong_timeout_s = pong_timeout_s
        self.max_queued_frames = max_queued_frames
        self.max_pending_upstream = max_pending_upstream
        self.push_queue_frames = push_queue_frames
        self._backoff = ReconnectBackoff(reconnect_min_s, reconnect_max_s)
        self._handled_file = HandledIdsFile(dedupe_path, uid, dedupe_size, dedupe_fsync) \
            if dedupe_path is not None else None
        self._delivery = Delivery(on_message, RecentIds(dedupe_size), self._handled_file,
                                  on_store_error=lambda exc: self._emit("error", exc))
        self._pushes: asyncio.Queue[frames.Push] = asyncio.Queue(push_queue_frames)
        self._worker: asyncio.Task | None = None
        self._closed_by_handler = False

        self._state = State.IDLE
        self._link: Link | None = None
        self._session_id = ""
        self._resume_token = ""
        self._resumed = False
        self._kick_reason = ""
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
        """The last AUTH_OK's token, sent in the next AUTH ("" after a kick)."""
        return self._resume_token

    @property
    def resumed(self) -> bool:
        """True if the last AUTH_OK took over the previous session (a flash disconnect within the
        room's grace period): nothing was reloaded, the unacked messages come again."""
        return self._resumed

    @property
    def duplicates_dropped(self) -> int:
        """Messages the server sent again that were acked without handing them to ``on_message``."""
        return self._delivery.duplicates

    @property
    def _recent(self) -> RecentIds:
        # Kept as an attribute name because test harnesses wrap it to watch the dedupe.
        return self._delivery.recent

    @_recent.setter
    def _recent(self, recent: RecentIds) -> None:
        self._delivery.recent = recent

    @property
    def kick_reason(self) -> str:
        """The reason of the KICK that closed the client (``replaced``: another connection with
        this uid and device_id took the session over); "" if it was not kicked."""
        return self._kick_reason

    @property
    def heartbeat_s(self) -> int:
        return self._heartbeat.interval_s

    @property
    def apps(self) -> list[str]:
        return list(self._apps)

    @property
    def address(self) -> Address | None:
        return self._link.address if self._link is not None and self.connected else None

    @property
    def tls(self) -> bool:
        """True while connected over TLS (the room's certificate verified)."""
        return self._link is not None and self.connected and self._link.tls

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float | None = None) -> None:
        """Connect and return once the first session is up.

        Raises ``AuthError`` if the server refuses this client for good, ``ClientClosed`` if it
        was kicked (``Kicked``) or closed meanwhile, ``DedupeStoreError`` if the dedupe file cannot
        be opened, ``TimeoutError`` if ``timeout`` passes first (the client keeps trying in the
        background; ``close()`` stops it).
        """
        if self._state is not State.IDLE:
            raise ClientClosed("client is closed") if self._state is State.CLOSED else \
                PylonError("start() was already called")
        if self._handled_file is not None:
            self._handled_file.open()
        self._set_state(State.CONNECTING)
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._delivery_loop(), name=f"pylon-delivery-{self.uid}")
        self._worker.add_done_callback(self._worker_done)
        self._own_tasks.add(self._worker)
        self._runner = loop.create_task(self._run(), name=f"pylon-client-{self.uid}")
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
        """Close the connection and stop reconnecting. Safe to call from inside a handler (the
        handler then runs to its end and its message is recorded; the ACK cannot go any more).
        From outside, a handler still running is cancelled: its message is not recorded, and the
        server delivers it again to the next client of this uid."""
        current = asyncio.current_task()
        if current is not None and current is self._worker:
            self._closed_by_handler = True
        self._stop("closed by the application")
        runner = self._runner
        if runner is None:
            await self._routes.close()
            return
        if current in self._own_tasks:
            # Called from a handler: the runner unwinds (it may be asleep in a backoff) and waits
            # for the handler to return.
            if current is self._worker and not runner.done():
                runner.cancel()
            return
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
                        addrs = self._tls_addresses(await self._routes.get(exclude))
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
            try:
                await self._stop_delivery()
            finally:
                await self._routes.close()

    async def _stop_delivery(self) -> None:
        """End the delivery worker (it ends by itself when the handler itself called close()),
        drop the PUSH frames still queued (unacked: the server keeps them), close the dedupe file."""
        worker = self._worker
        try:
            if worker is not None:
                if not self._closed_by_handler:
                    worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)  # a close() meanwhile cancels it too
                self._own_tasks.discard(worker)
        finally:
            while not self._pushes.empty():
                self._pushes.get_nowait()
            if self._handled_file is not None:
                try:
                    self._handled_file.close()
                except DedupeStoreError as exc:
                    log.error("pylon: %s", exc)

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
        if outcome.kicked is not None:
            # The session is gone for good (replaced: it now belongs to another copy of the app);
            # its token must not be used to take it back.
            self._kick_reason = outcome.kicked.reason
            self._resume_token = ""
            self._emit("kicked", outcome.reason)
        self._stop(outcome.reason)

    # ------------------------------------------------------------------ one connection

    def _tls_addresses(self, addrs: list[Address]) -> list[Address]:
        """Remember which addresses offer TLS, fill in the TLS port of addresses that came without
        one (COMMAND RECONNECT names the plain port), and with ``tls_only`` drop those without."""
        if self._tls is None:
            return addrs
        out = []
        for a in addrs:
            if a.tls_port:
                if len(self._tls_ports) < 4096:
                    self._tls_ports[(a.host, a.port)] = a.tls_port
            else:
                known = self._tls_ports.get((a.host, a.port), 0)
                if known:
                    a = a._replace(tls_port=known)
            if a.tls_port or not self.tls_only:
                out.append(a)
        if addrs and not out:
            self._emit("error", TlsError("no room address offers TLS (tls_only)"))
        return out

    async def _connect_once(self, addr: Address) -> _Outcome:
        if self._tls is not None and self.tls_only and not addr.tls_port:
            return _Outcome(_End.CONNECT_FAILED, f"{addr} offers no TLS port (tls_only)", addr)
        try:
            link = await Link.open(addr, self.connect_timeout_s, self.max_queued_frames, self._tls,
                                   self.tls_server_name)
        except ssl.SSLCertVerificationError as exc:
            err = TlsError(f"TLS certificate of {addr} (port {addr.tls_port}) did not verify: {exc.verify_message}")
            self._emit("error", err)
            return _Outcome(_End.CONNECT_FAILED, str(err), addr, error=err)
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
        if isinstance(event, frames.Kick):
            return self._kick_outcome(event, addr)
        if not isinstance(event, frames.AuthOk):
            return _Outcome(_End.CONNECT_FAILED, f"{failed}: expected AUTH_OK, got {type(event).__name__}", addr)
        self._session_id = event.session_id
        self._resume_token = event.resume_token  # every AUTH_OK has a fresh one; an older one names an older session
        self._resumed = event.resumed
        if event.apps:
            self._apps = dict.fromkeys(event.apps)
        self._heartbeat.on_auth(event.heartbeat_s)
        link.set_max_frame(event.max_frame)
        return None

    @staticmethod
    def _kick_outcome(event: frames.Kick, addr: Address) -> _Outcome:
        # Every reason stops the client (WIRE.md §8). For ``replaced`` it matters most: another
        # connection of this uid and device_id took the session, and reconnecting would take it
        # back, and so on, each copy kicking the other.
        kicked = Kicked(event.reason)
        return _Outcome(_End.STOP, str(kicked), addr, error=kicked, kicked=kicked)

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
        log.info("pylon: connected to %s session=%s heartbeat=%ss resumed=%s", link.address, self._session_id,
                 self._heartbeat.interval_s, self._resumed)
        self._emit("connected", {"session_id": self._session_id, "address": str(link.address),
                                 "heartbeat_s": self._heartbeat.interval_s, "apps": list(self._apps),
                                 "resumed": self._resumed})
        pushes = self._pushes
        reader = loop.create_task(self._read_loop(link, pushes))
        beat = loop.create_task(self._heartbeat_loop(link, pushes))
        tasks = {reader, beat, writer}
        self._own_tasks.update((reader, beat))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reader, beat):
                t.cancel()
            await asyncio.gather(reader, beat, return_exceptions=True)
            self._own_tasks.difference_update((reader, beat))
            self._ready.clear()
            self._pong_waiter = None
        outcome = _Outcome(_End.LOST, "connection ended", link.address)
        for t in (reader, beat, writer):
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
                return self._kick_outcome(event, addr)
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
                    targets = self._tls_addresses(targets)
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

    async def _delivery_loop(self) -> None:
        """The client's one delivery worker: PUSH frames in arrival order, across connections."""
        stopped = self._is_closed
        while True:
            push: frames.Push = await self._pushes.get()
            acks = await self._delivery.deliver(push.messages, stopped)
            if stopped():
                return
            self._send_acks(acks)

    def _worker_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()  # a bug in the SDK: without the worker nothing is delivered, so stop
        log.error("pylon: delivery stopped by an internal error", exc_info=exc)
        if self._state is not State.CLOSED:
            self._finish(_Outcome(_End.STOP, f"internal error in delivery: {exc!r}", error=PylonError(repr(exc))))
            if self._runner is not None and not self._runner.done():
                self._runner.cancel()  # it may be asleep in a backoff

    def _is_closed(self) -> bool:
        return self._state is State.CLOSED

    def _send_acks(self, acks: list[int]) -> None:
        """ACK on the connection up now. The frame may have come on an earlier one: a room that
        resumed the session knows the ids; otherwise it ignores them and sends the messages again
        from storage, and those duplicates are acked in their turn."""
        link = self._link
        if not acks or link is None or self._state is not State.CONNECTED:
            if acks:
                log.debug("pylon: %d ids handled between connections; acked when the server sends them again",
                          len(acks))
            return
        for i in range(0, len(acks), ACK_CHUNK):
            try:
                link.send(Op.ACK, frames.ack(acks[i:i + ACK_CHUNK]), control=True)
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

"""RoomInstance: every rule of the client protocol for one room instance (one process).

Connections hand it frames with the ``Session`` they belong to; it answers, registers sessions,
delivers pushes, forwards acks and upstream data, holds dropped sessions for a resume, and hands
them over to another instance. All backend I/O goes through batched queues (``RoomBackends``,
typed as ``backends.Backends``) with plain callbacks, so an idle connection owns nothing but its
slotted ``ClientConnection`` and ``Session``. The session state machine is in ``session.py``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

from google.protobuf.message import DecodeError

from services.common import tcpinfo, tokens
from services.common.batching import Overloaded
from services.common.codec import HEADER, HEADER_SIZE, VERSION, ErrorCode, Frame, Op
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from services.room import metrics as m
from services.room import resume
from services.room.access import AccessPolicy, Refusal, open_file_limit
from services.room.app_cache import AppCache
from services.room.config import RoomConfig
from services.room.connection import ClientConnection
from services.room.fanout import BroadcastFanout
from services.room.session import AUTHENTICATING, CLOSED, DETACHED, HANDSHAKE, OPEN, Event, Held, Session
from services.room.wheel import HeartbeatWheel

log = logging.getLogger(__name__)

MAX_IDS_PER_ACK = 4096
# (uid, app) pairs whose broadcast acks may wait for the linger at most; more go to saver at once
MAX_GATHERED_BROADCAST_ACKS = 50_000
MAX_UNREPORTED_DELIVERIES = 100_000  # attempts waiting for an ACK to carry them (delivery_report_ms)
# Keep a PUSH frame this far under max_frame so that header and protobuf framing always fit.
PUSH_FRAME_SLACK = 512
# The accept rate a shedding decision assumes at least: a quiet instance accepts ~0/s, and must
# not shed the first burst of a storm before it has shown what it can take (one instance does
# ~100-1,000/s here), nor what queued during a short stall such as a GC pause.
ACCEPT_RATE_FLOOR = 100.0
# A shed AUTH is told to come back once the queue it met has drained (its depth over the accept
# rate), at least overload_retry_ms and at most this: with a flat 2 s, shed clients of a storm
# rejoined the same deep queue and were shed again, each time costing a connect (bench/RESULTS.md).
MAX_SHED_RETRY_MS = 30_000
# Take-overs (resume on another instance) in flight at once; past it a resume is a normal login.
# After an instance dies its clients all come back at once with tokens naming it.
MAX_TAKES_IN_FLIGHT = 1000
TAKE_DEADLINE_S = 2.0
# Sessions registered again per step after a register epoch change (one batch each).
REREGISTER_CHUNK = 500
REREGISTER_RETRY_PAUSES_S = (1.0, 2.0, 4.0, 8.0)  # then every 8 s until it succeeds
# A handed-over session's register entry is removed by the instance that took it; this long
# after the hand-over the old instance removes it too, in case that never happened.
HANDOVER_UNREGISTER_S = 5.0


ACCEPT_WAIT_SAMPLE = 16  # 1 in this many accepted connections is timed
# (upper bound in ms, counter): exported from start, zeros included
ACCEPT_WAIT_BUCKETS = tuple((limit, m.ACCEPT_WAITS.labels(label)) for limit, label in (
    (1000, "under_1s"), (10_000, "1s_to_10s"), (float("inf"), "over_10s")))


def accept_wait_ms(sock) -> int:
    """For a just-accepted connection, how long ago its last data arrived (TCP_INFO
    ``tcpi_last_data_recv``; with no data yet, the kernel counts from when the connection was
    completed): the time the client's AUTH, or the connection, waited for ``accept()``."""
    return tcpinfo.read(sock, tcpinfo.LAST_DATA_RECV)


def accept_queue_length(sock) -> int:
    """Connections waiting in a listening socket's accept queue (``tcpi_unacked`` in LISTEN)."""
    return tcpinfo.read(sock, tcpinfo.UNACKED)


def _wall_ms() -> int:
    return int(time.time() * 1000)


class AuthFailure(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RoomInstance:
    def __init__(self, cfg: RoomConfig, instance_id: str, apps: AppCache, backends,
                 clock: Callable[[], float] = time.monotonic, wall_ms: Callable[[], int] = _wall_ms,
                 grpc_address: str = "", connection_cap: int = 0) -> None:
        self.cfg = cfg
        self.id = instance_id
        self.grpc_address = grpc_address  # where other instances reach this one (resume tokens name it)
        self.apps = apps
        self.backends = backends
        self.max_frame = cfg.max_frame
        self.max_auth_frame = cfg.max_auth_frame  # frames before AUTH_OK (ClientConnection)
        self.clock = clock
        # who may connect (services/room/access.py); the cap keeps fd_reserve descriptors free
        self.access = AccessPolicy.from_config(cfg, connection_cap or cfg.connection_cap(open_file_limit()), clock)
        m.CONNECTION_CAP.set(self.access.max_connections)
        self.wall_ms = wall_ms
        self.connections: set[ClientConnection] = set()   # open links, any state
        self.by_uid: dict[str, Session | list[Session]] = {}  # OPEN and DETACHED sessions
        # app -> its OPEN and DETACHED sessions (an insertion-ordered set): a broadcast's fan-out
        # visits these, never every connection
        self.by_app: dict[str, dict[Session, None]] = {}
        self.fanout = BroadcastFanout(self, wall_ms=wall_ms, linger_s=cfg.broadcast_linger_ms / 1000)
        # sessions with an inbox load in flight -> [loads, msg ids acked meanwhile] (see _loaded_for)
        self._loading: dict[Session, list] = {}
        # (uid, app) -> broadcast ids acked and not yet sent to saver (see broadcast_ack_linger_ms)
        self._bc_acks: dict[tuple[str, str], list[int]] = {}
        self._bc_ack_timer: asyncio.TimerHandle | None = None
        # msg_id -> [ref, attempts]: unicast deliveries written and not reported to saver yet
        # (see delivery_report_ms); an ACK that comes first carries them instead of a MarkDelivered
        self._unreported: dict[int, list] = {}
        self._report_timer: asyncio.TimerHandle | None = None
        self.sessions = 0   # OPEN
        self.detached = 0   # DETACHED
        self.wheel = HeartbeatWheel(int(clock()))
        self.draining = False
        # Session numbers start from the wall clock in microseconds, so a restarted instance never
        # hands out a number a token of its previous run still names.
        self._next_sid = wall_ms() * 1000
        self.resume_secret = cfg.resume_secret.encode() if cfg.resume_secret else secrets.token_bytes(32)
        self.register_epoch = ""
        self._reregister_task: asyncio.Task | None = None
        self._epoch_task: asyncio.Task | None = None
        self._epoch_checked_at = clock()
        self._tasks: set[asyncio.Task] = set()  # take-overs in flight
        self._tick_task: asyncio.Task | None = None
        self.listeners: list = []  # listening sockets, for their accept-queue length
        self.accepted = 0          # connections accepted since start
        self.accept_rate = 0.0     # smoothed accepts per second
        self._accepted_before = 0
        self._accept_checked_at = clock()
        self.shedding = False
        self.shed_retry_ms = cfg.overload_retry_ms
        self._pong_bodies: dict[int, bytes] = {}
        self._app_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._nets: dict[str, str] = {}
        self._handlers = {
            Op.PING: self._on_ping,
            Op.ACK: self._on_ack,
            Op.BIND: self._on_bind,
            Op.UNBIND: self._on_unbind,
            Op.UPSTREAM: self._on_upstream,
        }
        ClientConnection.room = self
        if backends is not None and hasattr(backends, "on_epoch"):
            backends.on_epoch = self.on_register_epoch

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            # each step on its own: a failing check must not stop the wheel, nor the wheel the checks
            steps = [self._advance_wheel, self.check_accept_queue, self.check_register_epoch]
            if not ticks % 10:
                steps += [self.check_overdue, self.prune_sources]
            for step in steps:
                try:
                    step()
                except Exception:
                    log.exception("room tick: %s failed", step.__name__)

    def _advance_wheel(self) -> None:
        self.wheel.advance(int(self.clock()), self._expire)

    def check_overdue(self) -> int:
        """Connections past their handshake deadline that the wheel has not closed (there should
        be none): counted in ``pylon_room_overdue_handshakes`` and logged, as a check on the wheel."""
        now = int(self.clock())
        by_state: dict[int, int] = {}
        for conn in self.connections:
            s = conn.session
            if s.state in (HANDSHAKE, AUTHENTICATING) and 0 < s.deadline < now - 1:
                by_state[s.state] = by_state.get(s.state, 0) + 1
        n = sum(by_state.values())
        m.OVERDUE.set(n)
        if n:
            log.warning("%d connections past their handshake deadline are still open (by state: %s); wheel size %d",
                        n, by_state, self.wheel.size)
        return n

    def prune_sources(self) -> None:
        self.access.prune()
        m.TRACKED_SOURCES.set(len(self.access.sources))

    def check_accept_queue(self) -> None:
        """Read how many connections wait in the listen sockets' accept queues (TCP_INFO of a
        listening socket carries it) and shed AUTHs while that is more than
        ``accept_wait_shed_s`` of the accept rate (at least ``ACCEPT_RATE_FLOOR``): those
        clients would otherwise wait unseen past their AUTH timeout and come back anyway,
        without a retry-after to spread them. A shed AUTH costs a fraction of a full one, so
        the queue drains faster for everyone behind it."""
        if not self.listeners:
            return
        waiting = 0
        for sock in self.listeners:
            try:
                waiting += accept_queue_length(sock)
            except OSError:
                pass
        now = self.clock()
        elapsed = max(now - self._accept_checked_at, 1e-3)
        # accepts per second, smoothed over ~5 ticks so one stalled second does not look like no
        # capacity; the last tick's own rate when it is higher, so the ramp at the start of a storm
        # (the smoothed rate still near 0 while thousands wait) is not taken for no capacity either
        last = (self.accepted - self._accepted_before) / elapsed
        self.accept_rate += 0.2 * (last - self.accept_rate)
        self._accept_checked_at, self._accepted_before = now, self.accepted
        shed_s = self.cfg.accept_wait_shed_s
        rate = max(self.accept_rate, last, ACCEPT_RATE_FLOOR)
        shedding = bool(shed_s) and waiting > rate * shed_s
        self.shed_retry_ms = min(MAX_SHED_RETRY_MS, max(self.cfg.overload_retry_ms, int(waiting * 1000 / rate)))
        if shedding != self.shedding:
            log.warning("%s AUTHs: %d connections wait to be accepted, ~%.0f accepted/s",
                        "shedding" if shedding else "no longer shedding", waiting, self.accept_rate)
        self.shedding = shedding
        m.ACCEPT_QUEUE.set(waiting)
        m.ACCEPT_SHEDDING.set(int(shedding))

    def drain(self, frame_for: Callable[[Session], bytes]) -> int:
        """Write each open session its COMMAND RECONNECT (``frame_for``) and drop its link. Open
        sessions stay DETACHED so the instances their clients move to can take them over (see
        ``close_all``); connections still in their handshake are closed. Returns links dropped."""
        conns = list(self.connections)
        for conn in conns:
            s = conn.session
            if s.conn is conn and s.state == OPEN:
                t = conn.transport
                if t is not None and not t.is_closing():
                    t.write(frame_for(s))
                self.detach(s)
            else:
                self.close(s)
                self._drop_link(conn)
        m.closed_drain.inc(len(conns))
        return len(conns)

    def close_all(self) -> int:
        """End every session still held (the last step of a drain): unregistered, offline events."""
        held = list(self.all_sessions())
        for s in held:
            self.close(s)
        for conn in list(self.connections):
            self.close(conn.session)
            self._drop_link(conn)
        self.flush_broadcast_acks()
        self.report_deliveries()
        return len(held)

    async def stop(self) -> None:
        for task in (self._tick_task, self._reregister_task, self._epoch_task, *self._tasks):
            if task is not None:
                task.cancel()
        await self.fanout.close()

    # ------------------------------------------------------------------ connection events
    def on_connect(self, conn: ClientConnection) -> None:
        m.CONNECTIONS.inc()
        self.accepted += 1
        if not self.accepted % ACCEPT_WAIT_SAMPLE:
            self._time_accept(conn)
        self.connections.add(conn)
        conn.transport.set_write_buffer_limits(high=self.cfg.write_buffer_limit)
        session = conn.session
        if self.draining:
            self.fail(session, ErrorCode.UNAVAILABLE, "instance is draining", retry_after_ms=100)
            return
        peer = conn.transport.get_extra_info("peername")
        source, refusal = self.access.admit(peer[0] if isinstance(peer, tuple) else None, len(self.connections) - 1)
        if refusal is not None:
            self._refuse(session, refusal)
            return
        if source is not None:
            conn.source, conn.preauth = source, True
        session.deadline = self._deadline(self.cfg.handshake_timeout_s)
        self.wheel.add(session)

    def _refuse(self, session: Session, refusal: Refusal) -> None:
        """The access policy said no: ERROR with the retry-after, then close (no AUTH was read)."""
        m.access_refused[refusal.reason].inc()
        m.closed[refusal.code].inc()
        self.send(session, Op.ERROR, cpb.Error(code=refusal.code, message=refusal.message, fatal=True,
                                               retry_after_ms=refusal.retry_after_ms).SerializeToString())
        self.close(session)

    def _time_accept(self, conn: ClientConnection) -> None:
        sock = conn.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            waited = accept_wait_ms(sock)
        except OSError:
            return
        for limit, count in ACCEPT_WAIT_BUCKETS:
            if waited < limit:
                count.inc()
                return

    def on_lost(self, conn: ClientConnection) -> None:
        session = conn.session
        if session.conn is conn and session.state != CLOSED:
            m.closed_by_peer.inc()
            if session.state == OPEN:
                self.detach(session)
            else:
                self.close(session)
        self._drop_link(conn)

    def _drop_link(self, conn: ClientConnection, abort: bool = False) -> None:
        """Forget a link (idempotent) and close its transport."""
        if conn in self.connections:
            self.connections.discard(conn)
            m.CONNECTIONS.dec()
            source = conn.source
            if source is not None:
                conn.source = None
                self.access.released(source, conn.preauth)
                conn.preauth = False
        conn.buf = b""
        t = conn.transport
        if t is not None and not t.is_closing():
            t.abort() if abort else t.close()

    def _expire(self, session: Session) -> None:
        state = session.state
        if state == HANDSHAKE:
            self.fail(session, ErrorCode.HANDSHAKE_TIMEOUT, f"no AUTH within {self.cfg.handshake_timeout_s}s")
        elif state == AUTHENTICATING:
            self.fail(session, ErrorCode.UNAVAILABLE, "session registration timed out", self.cfg.overload_retry_ms)
        elif state == OPEN:
            # the link is dead or the client gone: the session waits for a resume like any lost link
            self.fail(session, ErrorCode.IDLE_TIMEOUT, f"no PING within the {session.heartbeat_s}s heartbeat",
                      keep_session=True)
        elif state == DETACHED:
            m.closed_resume_expired.inc()
            self.close(session)

    def detach(self, session: Session, abort: bool = False) -> None:
        """OPEN -> DETACHED: drop the link, keep the session (registered, unacked messages, what
        arrives meanwhile) for ``resume_grace_s``. Without a grace the session ends."""
        if self.cfg.resume_grace_s <= 0 or not session.registered or self.draining and not self.cfg.drain_handover_s:
            self.close(session, abort)
            return
        session.move(Event.DETACH)
        conn, session.conn = session.conn, None
        if conn is not None:
            self._drop_link(conn, abort)
        self.sessions -= 1
        m.SESSIONS.dec()
        self.detached += 1
        m.DETACHED.inc()
        session.deadline = self._deadline(self.cfg.resume_grace_s)
        self.wheel.add(session)  # a no-op if it is filed earlier already

    def close(self, session: Session, abort: bool = False) -> None:
        """End a session (idempotent): unregistered and an offline event if it was registered."""
        state = session.state
        if state == CLOSED:
            return
        session.move(Event.CLOSE)
        session.deadline = 0
        if state == OPEN:
            self.sessions -= 1
            m.SESSIONS.dec()
        elif state == DETACHED:
            self.detached -= 1
            m.DETACHED.dec()
        if state in (OPEN, DETACHED):
            self._unindex(session)
        self._loading.pop(session, None)
        conn, session.conn = session.conn, None
        if conn is not None:
            self._drop_link(conn, abort)
        if session.registered:
            session.registered = False
            self._submit(self.backends.unregister, self._session_pb(session))
            self._status(session, session.apps, online=False)
        session.forget_held()

    # ------------------------------------------------------------------ frames
    def handle(self, session: Session, frame: Frame) -> None:
        op = frame.op
        m.frames_in[op].inc()
        state = session.state
        if state == OPEN:
            handler = self._handlers.get(op)
            if handler is None:
                self.fail(session, ErrorCode.PROTOCOL_VIOLATION, f"op {Op(op).name} is not allowed here")
                return
            try:
                handler(session, frame)
            except DecodeError:
                self.fail(session, ErrorCode.MALFORMED_FRAME, f"{Op(op).name} body is not a valid protobuf message")
        elif state == HANDSHAKE:
            if op != Op.AUTH:
                self.fail(session, ErrorCode.PROTOCOL_VIOLATION, "the first frame must be AUTH")
                return
            session.move(Event.AUTH)  # no second AUTH while this one is in progress
            if self.shedding:  # before any token or protobuf work: the point is to answer cheaply
                self.fail(session, ErrorCode.OVERLOADED, "room is busy: too many connections waiting to be accepted",
                          self.shed_retry_ms, seq=frame.seq)
                return
            try:
                auth = cpb.Auth.FromString(frame.body)
            except DecodeError:
                self.fail(session, ErrorCode.MALFORMED_FRAME, "AUTH body is not a valid protobuf message")
                return
            self._auth(session, auth, frame.seq, refreshed=False)
        else:  # AUTHENTICATING: the client must wait for AUTH_OK
            self.fail(session, ErrorCode.PROTOCOL_VIOLATION, f"{Op(op).name} before AUTH_OK")

    def send(self, session: Session, op: int, body: bytes = b"", seq: int = 0) -> None:
        conn = session.conn
        t = conn.transport if conn is not None else None
        if t is None or t.is_closing():
            return
        t.write(HEADER.pack(HEADER_SIZE + len(body), VERSION, op, 0, seq) + body)
        m.frames_out[op].inc()

    def fail(self, session: Session, code: ErrorCode, message: str, retry_after_ms: int = 0,
             fatal: bool = True, seq: int = 0, keep_session: bool = False) -> None:
        """ERROR frame; a fatal one ends the link, and the session too unless ``keep_session``
        (then an open session waits DETACHED for a resume)."""
        if session.state == CLOSED:
            return
        body = cpb.Error(code=code, message=message, fatal=fatal, retry_after_ms=retry_after_ms).SerializeToString()
        self.send(session, Op.ERROR, body, seq)
        if fatal:
            m.closed[code].inc()
            if session.state in (HANDSHAKE, AUTHENTICATING):
                m.auth_result[code].inc()
            if keep_session and session.state == OPEN:
                self.detach(session)
            else:
                self.close(session)

    # ------------------------------------------------------------------ AUTH
    def _verify_apps(self, uid: str, token_by_app: dict[str, tokens.ParsedToken],
                     app_ids: Iterable[str]) -> tuple[str, ...]:
        bound = []
        for app_id in app_ids:
            app = self.apps.get(app_id)
            if app is None:
                raise AuthFailure(ErrorCode.UNKNOWN_APP, f"unknown app {app_id!r}")
            token = token_by_app.get(app_id)
            if token is None:
                raise AuthFailure(ErrorCode.BAD_TOKEN, f"no token for app {app_id!r}")
            try:
                claims = token.check(app.secret)
            except tokens.TokenError as exc:
                code = ErrorCode.TOKEN_EXPIRED if exc.expired else ErrorCode.BAD_TOKEN
                raise AuthFailure(code, f"{exc} (app {app_id!r})") from None
            if claims["sub"] != uid:
                raise AuthFailure(ErrorCode.UID_MISMATCH, f"token of app {app_id!r} is for another uid")
            if claims.get("app") != app_id:
                raise AuthFailure(ErrorCode.BAD_TOKEN, f"token is not for app {app_id!r}")
            bound.append(app.id)  # the cached App's id: one shared str, not one per connection
        return self._canonical_apps(tuple(dict.fromkeys(bound)))

    def _canonical_apps(self, apps: tuple[str, ...]) -> tuple[str, ...]:
        """Share one tuple object among all sessions bound to the same apps (memory per session)."""
        shared = self._app_tuples.get(apps)
        if shared is None:
            if len(self._app_tuples) > 10_000:
                self._app_tuples.clear()
            shared = self._app_tuples[apps] = apps
        return shared

    def _tokens_by_app(self, token_list: Iterable[str]) -> dict[str, tokens.ParsedToken]:
        out: dict[str, tokens.ParsedToken] = {}
        for token in token_list:
            try:
                parsed = tokens.ParsedToken(token)
                out.setdefault(parsed.app, parsed)
            except tokens.TokenError as exc:
                raise AuthFailure(ErrorCode.BAD_TOKEN, str(exc)) from None
        return out

    def _after_app_refresh(self, session: Session, app_ids: list[str], retry: Callable[[], None],
                           refreshed: bool) -> bool:
        """True if the caller may go on now; else ``retry`` runs after one app-table refresh."""
        if refreshed or all(a in self.apps.apps for a in app_ids):
            return True

        def resume_after(ok: bool) -> None:
            if session.state == CLOSED:
                return
            if not ok:
                self.fail(session, ErrorCode.UNAVAILABLE, "app directory unavailable", self.cfg.overload_retry_ms)
                return
            retry()

        if not self.apps.wait_refresh(resume_after):
            self.fail(session, ErrorCode.OVERLOADED, "too many handshakes waiting", self.cfg.overload_retry_ms)
        return False

    def _auth(self, session: Session, auth: cpb.Auth, seq: int, refreshed: bool) -> None:
        cfg = self.cfg
        try:
            if not auth.token:
                raise AuthFailure(ErrorCode.BAD_TOKEN, "AUTH carries no token")
            token_by_app = self._tokens_by_app([auth.token, *auth.tokens])
            primary = next(iter(token_by_app))
            wanted = list(dict.fromkeys([primary, *auth.apps]))
            if len(wanted) > cfg.max_apps_per_session:
                raise AuthFailure(ErrorCode.TOO_MANY_ITEMS, f"at most {cfg.max_apps_per_session} apps per connection")
            if not self._after_app_refresh(session, wanted, lambda: self._auth(session, auth, seq, True), refreshed):
                return
            uid = auth.uid
            if not uid:
                app = self.apps.get(primary)
                uid = token_by_app[primary].check(app.secret)["sub"] if app else ""
            if not uid or len(uid) > cfg.max_uid_len:
                raise AuthFailure(ErrorCode.UID_MISMATCH, f"uid must be 1..{cfg.max_uid_len} characters")
            bound = self._verify_apps(uid, token_by_app, wanted)
        except AuthFailure as exc:
            self.fail(session, exc.code, exc.message, seq=seq)
            return
        except tokens.TokenError as exc:
            self.fail(session, ErrorCode.BAD_TOKEN, str(exc), seq=seq)
            return

        session.uid = uid
        session.device_id = auth.device_id[:128]
        session.apps = bound
        net = auth.net[:16].lower()
        session.net = self._nets.setdefault(net, net) if len(self._nets) < 64 else net
        hb = cfg.heartbeat_for(session.net)
        if auth.heartbeat_hint_s:
            hb = cfg.clamp_heartbeat(auth.heartbeat_hint_s)
        session.heartbeat_s = hb
        session.connected_ms = self.wall_ms()
        if auth.resume_token and cfg.resume_grace_s > 0 and self._resume(session, auth.resume_token, seq):
            return
        self._register(session, seq)

    def _register(self, session: Session, seq: int, taken_from: ipb.Session | None = None) -> None:
        self._next_sid += 1
        session.sid = self._next_sid
        try:
            self.backends.register.submit(self._session_pb(session),
                                          lambda _r, err: self._registered(session, seq, err, taken_from))
        except Overloaded:
            if taken_from is not None:  # the session we took ends with this refusal
                self._submit(self.backends.unregister, taken_from)
                self._status_pb(taken_from, online=False)
            self.fail(session, ErrorCode.OVERLOADED, "room is overloaded, retry later", self.cfg.overload_retry_ms,
                      seq=seq)

    def session_id(self, session: Session) -> str:
        return f"{self.id}/{session.sid}"

    def _session_pb(self, session: Session) -> ipb.Session:
        return ipb.Session(uid=session.uid, session_id=f"{self.id}/{session.sid}", instance=self.id,
                           apps=session.apps, device_id=session.device_id, connected_ms=session.connected_ms,
                           net=session.net)

    def _registered(self, session: Session, seq: int, err: BaseException | None,
                    taken_from: ipb.Session | None = None) -> None:
        if err is not None or session.state != AUTHENTICATING:
            # The call failed on our side (deadline, connection) but register may still have written
            # the session, or it closed while registering: take it back out. Unregister only removes
            # it while this instance owns it.
            self._submit(self.backends.unregister, self._session_pb(session))
            if taken_from is not None:  # the session we took is gone with it
                self._submit(self.backends.unregister, taken_from)
                self._status_pb(taken_from, online=False)
            if err is not None and session.state == AUTHENTICATING:
                self.fail(session, ErrorCode.UNAVAILABLE, "session store unavailable, retry later",
                          self.cfg.overload_retry_ms, seq=seq)
            return
        session.registered = True
        session.move(Event.REGISTERED)
        self._index(session)
        self.sessions += 1
        m.SESSIONS.inc()
        m.auth_ok.inc()
        m.AUTH_SECONDS.observe(max(0, self.wall_ms() - session.connected_ms) / 1000)
        self._arm(session)
        if session.device_id:
            self._replace_duplicates(session)
        self._send_auth_ok(session, seq, resumed=taken_from is not None)
        if taken_from is not None:
            # presence stayed online: the old entry goes only now that the new one is in
            self._submit(self.backends.unregister, taken_from)
            m.RESUMES.labels("taken").inc()
            self._rewrite_unacked(session)
            # what reached the old instance between the take-over and this registration is only in
            # the inbox: read it once (what the session already holds is skipped, not counted)
            self._load_inbox(session, session.apps)
            return
        self._status(session, session.apps, online=True)
        self._load_inbox(session, session.apps)

    def _send_auth_ok(self, session: Session, seq: int, resumed: bool) -> None:
        conn = session.conn
        if conn is not None and conn.preauth:  # the link no longer counts as unauthenticated
            conn.preauth = False
            self.access.authenticated(conn.source)
        token = resume.mint(self.resume_secret, self.id, self.grpc_address, session.sid, session.uid,
                            self.wall_ms() // 1000)
        self.send(session, Op.AUTH_OK, cpb.AuthOk(
            session_id=self.session_id(session), resume_token=token, heartbeat_s=session.heartbeat_s,
            server_time_ms=self.wall_ms(), max_frame=self.max_frame, apps=session.apps,
            resumed=resumed).SerializeToString(), seq)

    def _replace_duplicates(self, session: Session) -> None:
        """DESIGN.md §3: a new session of the same (uid, device_id) replaces the old one."""
        for other in self.sessions_of(session.uid):
            if other is not session and other.device_id == session.device_id:
                self.send(other, Op.KICK, cpb.Kick(reason="replaced").SerializeToString())
                m.REPLACED.inc()
                m.closed_replaced.inc()
                self.close(other)

    def _wants_status(self, apps: Iterable[str]) -> bool:
        """Only apps that subscribed get online/offline events: skip the RPC for the rest."""
        for app_id in apps:
            app = self.apps.get(app_id)
            if app is not None and app.status_events:
                return True
        return False

    def _status(self, session: Session, apps: tuple[str, ...], online: bool) -> None:
        if apps and self._wants_status(apps):
            self._submit(self.backends.status, ipb.StatusEvent(
                uid=session.uid, apps=apps, online=online, session_id=self.session_id(session),
                device_id=session.device_id, ts_ms=self.wall_ms(), instance=self.id))

    def _status_pb(self, s: ipb.Session, online: bool) -> None:
        if self._wants_status(s.apps):
            self._submit(self.backends.status, ipb.StatusEvent(
                uid=s.uid, apps=s.apps, online=online, session_id=s.session_id, device_id=s.device_id,
                ts_ms=self.wall_ms(), instance=s.instance))

    def _load_inbox(self, session: Session, apps: Iterable[str]) -> None:
        done = self._loaded_for(session)
        if not self._submit(self.backends.load_inbox, ipb.InboxKey(uid=session.uid, apps=apps), done):
            done(None, Overloaded("inbox load queue full"))  # stays stored: the next load delivers it

    def _submit(self, batcher, item, done=None) -> bool:
        try:
            batcher.submit(item, done)
            return True
        except Overloaded:
            return False

    # ------------------------------------------------------------------ resume
    def _resume(self, session: Session, token: str, seq: int) -> bool:
        """True if the AUTH resumes a held session (here, or taken over from another instance);
        False: a normal login follows (the token was forged, expired, or its session is gone)."""
        claim = resume.verify(self.resume_secret, token, session.uid, self.wall_ms() // 1000,
                              self.cfg.resume_token_max_age_s)
        if claim is None:
            m.RESUMES.labels("invalid").inc()
            return False
        if claim.instance == self.id:
            old = self.find_session(session.uid, claim.sid)
            if old is not None and old.state == OPEN:
                # its old link still looks open (half-open, or the client opened another): drop it
                self.detach(old, abort=True)
            if old is None or old.state != DETACHED:
                m.RESUMES.labels("not_found").inc()
                return False
            self._resume_here(session, old, seq)
            return True
        if not claim.grpc or len(self._tasks) >= MAX_TAKES_IN_FLIGHT:
            m.RESUMES.labels("not_found").inc()
            return False
        request = ipb.TakeSessionRequest(session_id=f"{claim.instance}/{claim.sid}", uid=session.uid,
                                         to_instance=self.id)
        task = asyncio.get_running_loop().create_task(self._take(session, claim, request, seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _take(self, session: Session, claim: resume.ResumeClaim, request: ipb.TakeSessionRequest,
                    seq: int) -> None:
        try:
            taken = await self.backends.take_session(claim.grpc, request, TAKE_DEADLINE_S)
        except Exception as exc:  # the old instance is gone or unreachable: a normal login
            log.debug("take-over of %s from %s failed: %s", request.session_id, claim.grpc, exc)
            taken = None
        old = ipb.Session(uid=session.uid, session_id=request.session_id, instance=claim.instance,
                          apps=taken.apps if taken is not None else (), device_id=session.device_id)
        if session.state != AUTHENTICATING:
            if taken is not None and taken.found:  # the client left meanwhile: the session ends here
                self._submit(self.backends.unregister, old)
                self._status_pb(old, online=False)
            return
        if taken is None or not taken.found:
            m.RESUMES.labels("not_found").inc()
            self._register(session, seq)
            return
        apps = session.apps
        if taken.unacked:
            session.unacked = {h.msg_id: h for h in self._keep(session, taken.unacked) if h.app in apps} or None
        if taken.pending:
            session.pending = [h for h in self._keep(session, taken.pending) if h.app in apps] or None
        if taken.connected_ms:
            session.connected_ms = taken.connected_ms
        self._register(session, seq, taken_from=old)

    def _resume_here(self, session: Session, old: Session, seq: int) -> None:
        """Attach the new link to the session it resumes on this instance: no registration, no
        storage reload, the unacked messages written again without counting another attempt."""
        conn = session.conn
        session.move(Event.CLOSE)  # the placeholder made at connect ends silently: never registered
        session.conn, session.deadline = None, 0
        old.move(Event.ATTACH)
        old.conn = conn
        conn.session = old
        self.detached -= 1
        m.DETACHED.dec()
        self.sessions += 1
        m.SESSIONS.inc()
        old.heartbeat_s, old.net, old.device_id = session.heartbeat_s, session.net, session.device_id
        self._arm(old)
        added = tuple(a for a in session.apps if a not in old.apps)
        dropped = tuple(a for a in old.apps if a not in session.apps)
        if added or dropped:
            self._drop_messages(old, set(dropped))
            self._set_apps(old, session.apps)
            self._submit(self.backends.register, self._session_pb(old))
            self._status(old, added, online=True)
            self._status(old, dropped, online=False)
        m.RESUMES.labels("same_instance").inc()
        m.auth_ok.inc()
        self._send_auth_ok(old, seq, resumed=True)
        self._rewrite_unacked(old)
        if old.reload:  # more arrived while detached than it held: the rest is in the inbox
            old.reload = False
            self._load_inbox(old, old.apps)
        elif added:
            self._load_inbox(old, added)

    def _rewrite_unacked(self, session: Session) -> None:
        """After a resume: the unacked messages again (no attempt counted), then what arrived
        while the session was detached (counted, as any first delivery). Those whose body was
        over the session's byte bound are read from the inbox again."""
        unacked = session.unacked
        if unacked:
            bodiless = [msg_id for msg_id, h in unacked.items() if h.payload is None]
            for msg_id in bodiless:
                del unacked[msg_id]
            if bodiless:
                session.reload = True
            self._write_messages(session, list(unacked.values()))
        pending, session.pending = session.pending, None
        if pending:
            session.held_bytes -= sum(len(h.payload) for h in pending)
            self._deliver_held(session, pending)

    def take_session(self, request: ipb.TakeSessionRequest) -> ipb.TakenSession:
        """Room.TakeSession: hand a session over to the instance its client resumed on. The old
        link (if any) is dropped, no offline event is sent, and the session is not unregistered
        here: the new instance replaces the register entry once its own is written."""
        instance, _, sid = request.session_id.rpartition("/")
        if instance != self.id or not sid.isdigit():
            return ipb.TakenSession(found=False)
        session = self.find_session(request.uid, int(sid))
        if session is None:
            return ipb.TakenSession(found=False)
        uid = session.uid

        def stored(held) -> list[ipb.StoredMessage]:
            # bodiless ones are left out: the new instance reads the inbox once after a take-over
            return [ipb.StoredMessage(msg_id=h.msg_id, uid=uid, app=h.app, payload=h.payload, created_ms=h.created_ms,
                                      seq=h.seq, broadcast=h.broadcast) for h in held if h.payload is not None]

        taken = ipb.TakenSession(found=True, apps=session.apps, unacked=stored((session.unacked or {}).values()),
                                 pending=stored(session.pending or ()), connected_ms=session.connected_ms,
                                 device_id=session.device_id)
        handed_over = self._session_pb(session)
        session.registered = False
        self.report_deliveries()  # its ACKs now reach the other instance, which has not seen these attempts
        m.TAKEN.inc()
        m.closed_taken.inc()
        self.close(session, abort=True)
        # The new instance replaces this register entry once its own is written; should its
        # answer never come back (this reply lost, its client gone), take the entry out
        # ourselves a little later (owner-checked: it removes only this instance's entry).
        asyncio.get_running_loop().call_later(HANDOVER_UNREGISTER_S, self._submit, self.backends.unregister,
                                              handed_over)
        return taken

    def find_session(self, uid: str, sid: int) -> Session | None:
        for s in self.sessions_of(uid):
            if s.sid == sid:
                return s
        return None

    # ------------------------------------------------------------------ register epoch
    def on_register_epoch(self, epoch: str) -> None:
        """Register names the generation of its data in every reply. A new one means it lost
        what it had (FLUSHALL, a Redis restarted empty): register every session again, then
        read their inboxes (pushes in between found nobody online and only stored)."""
        if not epoch or epoch == self.register_epoch:
            return
        previous, self.register_epoch = self.register_epoch, epoch
        self._epoch_checked_at = self.clock()
        if not previous:
            return
        log.warning("register epoch changed (%s -> %s): its session data was lost; registering %d sessions again",
                    previous, epoch, self.sessions + self.detached)
        m.EPOCHS.inc()
        if self._reregister_task is not None:
            self._reregister_task.cancel()
        self._reregister_task = asyncio.get_running_loop().create_task(self._reregister_all())

    def check_register_epoch(self) -> None:
        """Once every ``register_check_s`` with no registration reply in between, ask register."""
        now = self.clock()
        if now - self._epoch_checked_at < self.cfg.register_check_s or self._epoch_task is not None:
            return
        if not hasattr(self.backends, "register_epoch"):
            return
        self._epoch_checked_at = now

        async def check() -> None:
            try:
                self.on_register_epoch(await self.backends.register_epoch())
            except Exception as exc:
                log.debug("register epoch check failed: %s", exc)
            finally:
                self._epoch_task = None

        self._epoch_task = asyncio.get_running_loop().create_task(check())

    async def _reregister_all(self) -> None:
        sessions = [s for s in self.all_sessions() if s.registered]

        async def register(chunk: list[Session]) -> list[Session]:
            failed = await self._submit_all(self.backends.register, [self._session_pb(s) for s in chunk],
                                            [self._reregistered_for(s) for s in chunk])
            if failed:
                return chunk  # idempotent: the whole chunk again
            m.REREGISTERED.inc(len(chunk))
            return []

        async def reload(chunk: list[Session]) -> list[Session]:
            failed: list[Session] = []
            await self._submit_all(self.backends.load_inbox, [ipb.InboxKey(uid=s.uid, apps=s.apps) for s in chunk],
                                   [self._reloaded_for(s, failed) for s in chunk])
            return failed

        for i in range(0, len(sessions), REREGISTER_CHUNK):
            await self._until_through("registering sessions again", sessions[i:i + REREGISTER_CHUNK],
                                      lambda s: s.registered, register)
        # a failed read (saver rebuilding, its Redis just back) would leave the pushes that found
        # nobody online meanwhile unseen until the client's next connect
        for i in range(0, len(sessions), REREGISTER_CHUNK):
            await self._until_through("reading inboxes again", sessions[i:i + REREGISTER_CHUNK],
                                      lambda s: s.state in (OPEN, DETACHED), reload)
        log.info("registered %d sessions again after the register epoch change", len(sessions))
        self._reregister_task = None

    @staticmethod
    async def _until_through(what: str, chunk: list[Session], keep: Callable[[Session], bool],
                             send: Callable[[list[Session]], Awaitable[list[Session]]]) -> None:
        """``send(sessions)`` (of ``chunk``, those still ``keep``) until it returns no session to
        try again, pausing REREGISTER_RETRY_PAUSES_S between tries; a newer epoch change cancels
        the task that waits here."""
        tries = 0
        while chunk := [s for s in chunk if keep(s)]:
            again = await send(chunk)
            if not again:
                return
            pause = REREGISTER_RETRY_PAUSES_S[min(tries, len(REREGISTER_RETRY_PAUSES_S) - 1)]
            tries += 1
            log.warning("%s after the register epoch change: %d of %d failed; next try in %.0fs", what,
                        len(again), len(chunk), pause)
            chunk = again
            await asyncio.sleep(pause)

    def _reregistered_for(self, session: Session) -> Callable:
        def registered(_result, err: BaseException | None) -> None:
            if err is None and not session.registered:
                # it ended while its write was queued: its unregister went first, so again now
                self._submit(self.backends.unregister, self._session_pb(session))
        return registered

    def _reloaded_for(self, session: Session, failed: list[Session]) -> Callable:
        """``_loaded_for``, also noting a failed load in ``failed``."""
        loaded = self._loaded_for(session)

        def done(inbox: ipb.Inbox | None, err: BaseException | None) -> None:
            loaded(inbox, err)
            if err is not None:
                failed.append(session)
        return done

    def _loaded_for(self, session: Session) -> Callable:
        """The completion of an inbox load for ``session``: deliver what came (on error the
        messages stay stored: the next push, load or connect delivers them). While a load is in
        flight the session's ACKs are noted (``_loading``): an inbox read before an ACK reached
        saver still lists that message, and it must not be written (and counted) again."""
        loading = self._loading
        entry = loading.get(session)
        if entry is None:
            entry = loading[session] = [0, None]
        entry[0] += 1

        def loaded(inbox: ipb.Inbox | None, err: BaseException | None) -> None:
            acked = None
            e = loading.get(session)
            if e is not None:
                acked = e[1]
                e[0] -= 1
                if e[0] <= 0:
                    del loading[session]
            if err is None and inbox is not None and inbox.messages and session.state in (OPEN, DETACHED):
                messages = inbox.messages
                if acked:
                    messages = [msg for msg in messages if msg.msg_id not in acked]
                if messages:
                    self.deliver(session, messages)
        return loaded

    async def _submit_all(self, queue, items: list, dones: list | None) -> int:
        """Queue ``items`` and wait until all are answered, waiting out a full queue; returns
        how many failed."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        left = len(items)
        failed = 0
        if not left:
            return 0

        def finished(done):
            def cb(result, err):
                nonlocal left, failed
                if done is not None:
                    done(result, err)
                failed += err is not None
                left -= 1
                if not left and not fut.done():
                    fut.set_result(None)
            return cb

        for i, item in enumerate(items):
            while True:
                try:
                    queue.submit(item, finished(dones[i] if dones else None))
                    break
                except Overloaded:
                    await asyncio.sleep(0.1)
        await fut
        return failed

    # ------------------------------------------------------------------ index
    def _index(self, session: Session) -> None:
        self._index_apps(session, session.apps)
        cur = self.by_uid.get(session.uid)
        if cur is None:
            self.by_uid[session.uid] = session
        elif isinstance(cur, list):
            cur.append(session)
        else:
            self.by_uid[session.uid] = [cur, session]

    def _index_apps(self, session: Session, apps: Iterable[str]) -> None:
        by_app = self.by_app
        for app in apps:
            members = by_app.get(app)
            if members is None:
                members = by_app[app] = {}
            members[session] = None

    def _unindex_apps(self, session: Session, apps: Iterable[str]) -> None:
        by_app = self.by_app
        for app in apps:
            members = by_app.get(app)
            if members is not None:
                members.pop(session, None)
                if not members:
                    del by_app[app]

    def _set_apps(self, session: Session, apps: tuple[str, ...]) -> None:
        """Change what a session is bound to, keeping the app index (OPEN and DETACHED sessions) in step."""
        if session.state in (OPEN, DETACHED):
            self._unindex_apps(session, [a for a in session.apps if a not in apps])
            self._index_apps(session, [a for a in apps if a not in session.apps])
        session.apps = apps

    def _unindex(self, session: Session) -> None:
        self._unindex_apps(session, session.apps)
        cur = self.by_uid.get(session.uid)
        if cur is session:
            del self.by_uid[session.uid]
        elif isinstance(cur, list):
            if session in cur:
                cur.remove(session)
            if len(cur) == 1:
                self.by_uid[session.uid] = cur[0]
            elif not cur:
                del self.by_uid[session.uid]

    def sessions_of(self, uid: str) -> list[Session]:
        cur = self.by_uid.get(uid)
        if cur is None:
            return []
        return list(cur) if isinstance(cur, list) else [cur]

    def all_sessions(self) -> Iterable[Session]:
        for cur in list(self.by_uid.values()):
            if isinstance(cur, list):
                yield from list(cur)
            else:
                yield cur

    # ------------------------------------------------------------------ heartbeat
    def _deadline(self, seconds: float) -> int:
        """The wheel second at which a connection silent for ``seconds`` from now is closed. The
        wheel expires a deadline when its second begins, so round up: never early, at most 1 s late."""
        return int(self.clock() + seconds) + 1

    def _silence_deadline(self, session: Session) -> int:
        return self._deadline(session.heartbeat_s * 1.5 + self.cfg.heartbeat_grace_s)

    def _arm(self, session: Session) -> None:
        """Switch to the heartbeat deadline (the wheel files it again only if that is earlier)."""
        session.deadline = self._silence_deadline(session)
        self.wheel.add(session)

    def _on_ping(self, session: Session, frame: Frame) -> None:
        if frame.body:
            proposed = cpb.Ping.FromString(frame.body).propose_heartbeat_s
            if proposed:
                session.heartbeat_s = self.cfg.clamp_heartbeat(proposed)
        # a later deadline; the wheel re-files the session when its old bucket comes due
        session.deadline = self._silence_deadline(session)
        body = self._pong_bodies.get(session.heartbeat_s)
        if body is None:
            body = self._pong_bodies[session.heartbeat_s] = cpb.Pong(heartbeat_s=session.heartbeat_s).SerializeToString()
        self.send(session, Op.PONG, body, frame.seq)

    # ------------------------------------------------------------------ delivery
    def _keep(self, session: Session, messages: Iterable[ipb.StoredMessage]) -> list[Held]:
        """Copies of ``messages`` for the session to hold, their bodies within its byte bound."""
        budget = self.cfg.resume_hold_bytes
        out = []
        for msg in messages:
            payload = msg.payload
            if session.held_bytes + len(payload) <= budget:
                session.held_bytes += len(payload)
            else:
                payload = None
            out.append(Held(msg.msg_id, msg.app, payload, msg.created_ms, msg.seq, msg.broadcast))
        return out

    def _writable(self, session: Session, messages) -> bool:
        """True if ``messages`` can be written to the session now. A detached session holds them
        for its resume (within its bounds); one that stopped reading loses its link first and
        then holds them the same way (all of it stays stored)."""
        state = session.state
        if state == OPEN and not session.conn.paused:
            return True
        if state == OPEN:
            m.closed[ErrorCode.SLOW_CONSUMER].inc()
            self.detach(session, abort=True)
            state = session.state
        if state == DETACHED:
            self._hold(session, messages)
        return False

    def deliver(self, session: Session, messages: Iterable[ipb.StoredMessage]) -> int:
        """Write unicast messages for bound apps; remember them until acked. A detached session
        keeps them for its resume (not written, no attempt counted). Returns messages written."""
        if not self._writable(session, messages):
            return 0
        unacked = session.unacked or {}
        limit = self.cfg.max_unacked_per_session
        apps = session.apps
        fresh: list[ipb.StoredMessage] = []
        for msg in messages:
            if msg.app not in apps or msg.msg_id in unacked:
                continue  # not for this session, or already written to it and not yet acked
            if len(unacked) + len(fresh) >= limit:
                break  # the rest stays in the inbox until the client acks
            fresh.append(msg)
        if not fresh:
            return 0
        self._write_messages(session, fresh)
        for h in self._keep(session, fresh):
            unacked[h.msg_id] = h
        session.unacked = unacked
        self._count_delivered(session, fresh)
        return len(fresh)

    def _deliver_held(self, session: Session, held: list[Held]) -> None:
        """Write what a detached session held (its bodies are already counted in held_bytes)."""
        unacked = session.unacked or {}
        fresh = [h for h in held if h.msg_id not in unacked][:max(0, self.cfg.max_unacked_per_session - len(unacked))]
        if len(fresh) < len(held):
            session.reload = True  # the rest is in the inbox
        if not fresh:
            return
        self._write_messages(session, fresh)
        for h in fresh:
            unacked[h.msg_id] = h
            session.held_bytes += len(h.payload)
        session.unacked = unacked
        self._count_delivered(session, fresh)

    def _count_delivered(self, session: Session, fresh) -> None:
        """One delivery attempt per unicast message (the poison-message count); a broadcast copy
        has no attempts: it is handed out again at connect until acked, within its TTL.

        Attempts wait ``delivery_report_ms`` (one timer for the instance): an ACK within that time
        reports them with the ack (``MessageRef.deliveries``), so a message acked at once costs
        saver one write, not a MarkDelivered and an Ack. Unacked ones go out as MarkDelivered."""
        uid = session.uid
        n = 0
        unreported = self._unreported
        direct = self.cfg.delivery_report_ms <= 0
        for msg in fresh:
            if msg.broadcast:
                continue
            n += 1
            if direct:
                self._submit(self.backends.delivered, ipb.MessageRef(uid=uid, app=msg.app, msg_id=msg.msg_id))
                continue
            e = unreported.get(msg.msg_id)
            if e is None:
                unreported[msg.msg_id] = [ipb.MessageRef(uid=uid, app=msg.app, msg_id=msg.msg_id), 1]
            elif e[0].uid == uid and e[0].app == msg.app:
                e[1] += 1  # written to another session of this user as well
            else:  # not a msg_id of this (uid, app): saver's owner check decides
                self._submit(self.backends.delivered, ipb.MessageRef(uid=uid, app=msg.app, msg_id=msg.msg_id))
        m.unicast_out.inc(n)
        if n < len(fresh):
            m.broadcast_out.inc(len(fresh) - n)
        if len(unreported) >= MAX_UNREPORTED_DELIVERIES:
            self.report_deliveries()
        elif unreported and self._report_timer is None:
            self._report_timer = asyncio.get_running_loop().call_later(
                self.cfg.delivery_report_ms / 1000, self.report_deliveries)

    def report_deliveries(self) -> None:
        """Send the delivery attempts no ACK has carried yet to saver (MarkDelivered)."""
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        unreported, self._unreported = self._unreported, {}
        submit, queue = self._submit, self.backends.delivered
        for ref, attempts in unreported.values():
            for _ in range(attempts):
                submit(queue, ref)

    def _hold(self, session: Session, messages: Iterable[ipb.StoredMessage]) -> None:
        """Keep what arrives for a detached session, within a count and a byte bound; what does
        not fit stays stored, and the resume reads the inbox for it."""
        pending = session.pending
        if pending is None:
            pending = session.pending = []
        held = {h.msg_id for h in pending}
        if session.unacked:
            held.update(session.unacked)
        room_left = self.cfg.max_unacked_per_session - len(held)
        bytes_left = self.cfg.resume_hold_bytes - session.held_bytes
        for msg in messages:
            if msg.app not in session.apps or msg.msg_id in held:
                continue
            payload = msg.payload
            if room_left <= 0 or len(payload) > bytes_left:
                session.reload = True
                break
            pending.append(Held(msg.msg_id, msg.app, payload, msg.created_ms, msg.seq, msg.broadcast))
            held.add(msg.msg_id)
            room_left -= 1
            bytes_left -= len(payload)
            session.held_bytes += len(payload)

    def _write_messages(self, session: Session, messages: list[ipb.StoredMessage]) -> None:
        """PUSH frames, as few as fit under max_frame, for ``messages`` (no bookkeeping)."""
        batch: list[cpb.Message] = []
        size = 0
        budget = self.max_frame - HEADER_SIZE - PUSH_FRAME_SLACK
        for msg in messages:
            item = cpb.Message(msg_id=msg.msg_id, app=msg.app, payload=msg.payload, created_ms=msg.created_ms,
                               seq=msg.seq, broadcast=msg.broadcast)
            item_size = item.ByteSize() + 8
            if batch and size + item_size > budget:
                self.send(session, Op.PUSH, cpb.Push(messages=batch).SerializeToString())
                batch, size = [], 0
            batch.append(item)
            size += item_size
        if batch:
            self.send(session, Op.PUSH, cpb.Push(messages=batch).SerializeToString())

    def push(self, messages: Iterable[ipb.StoredMessage]) -> int:
        """Messages from center for sessions on this instance (gRPC Room.Push)."""
        by_uid: dict[str, list[ipb.StoredMessage]] = {}
        for msg in messages:
            if msg.uid in self.by_uid:
                by_uid.setdefault(msg.uid, []).append(msg)
        delivered = 0
        for uid, msgs in by_uid.items():
            for session in self.sessions_of(uid):
                delivered += self.deliver(session, msgs)
        return delivered

    def write_broadcast(self, session: Session, frame: bytes, held: list[Held]) -> int:
        """One session's part of a fan-out pass (services/room/fanout.py): the pass's PUSH
        frame, encoded once, and the shared copies kept until acked. 1 if written."""
        if not self._writable(session, held):
            return 0
        unacked = session.unacked
        if unacked is None:
            unacked = session.unacked = {}
        fresh = held
        for h in held:
            if h.msg_id in unacked:  # it has some already (an inbox load, a repeat): the rest only
                fresh = [h for h in held if h.msg_id not in unacked]
                break
        if not fresh or len(unacked) + len(fresh) > self.cfg.max_unacked_per_session:
            # nothing new, or too much unacked: what it lacks comes from the next inbox load
            if not unacked:
                session.unacked = None
            return 0
        if fresh is held:
            session.conn.transport.write(frame)
        else:
            self._write_messages(session, fresh)
        budget = self.cfg.resume_hold_bytes
        for h in fresh:
            size = len(h.payload)
            if session.held_bytes + size <= budget:
                session.held_bytes += size
                unacked[h.msg_id] = h
            else:  # over its bound: only the id (a resume reads the inbox for the body)
                unacked[h.msg_id] = Held(h.msg_id, h.app, None, h.created_ms, 0, True)
        return 1

    def kick(self, uids: Iterable[str], session_ids: Iterable[str], reason: str, app: str = "") -> int:
        wanted = set(session_ids)
        uid_list = list(uids)
        if uid_list:
            targets = [s for uid in uid_list for s in self.sessions_of(uid)]
        elif wanted:
            targets = list(self.all_sessions())
        else:
            targets = []
        n = 0
        body = cpb.Kick(reason=reason).SerializeToString()
        for session in targets:
            if wanted and self.session_id(session) not in wanted:
                continue
            if app and app not in session.apps:
                continue
            self.send(session, Op.KICK, body)
            m.closed_kick.inc()
            self.close(session)
            n += 1
        return n

    # ------------------------------------------------------------------ acks, bind, upstream
    def _on_ack(self, session: Session, frame: Frame) -> None:
        ids = cpb.Ack.FromString(frame.body).msg_ids
        if len(ids) > MAX_IDS_PER_ACK:
            self.fail(session, ErrorCode.TOO_MANY_ITEMS, f"at most {MAX_IDS_PER_ACK} ids per ACK", fatal=False,
                      seq=frame.seq)
            return
        if self._loading:
            e = self._loading.get(session)
            if e is not None:  # a load in flight may have read these before the ACK: see _loaded_for
                e[1] = (e[1] or set()).union(ids)
        unacked = session.unacked
        if not unacked:
            return
        n = 0
        uid = session.uid
        broadcasts: dict[str, list[int]] | None = None
        for msg_id in ids:
            h = unacked.pop(msg_id, None)
            if h is not None:  # unknown ids need no storage ack
                if h.broadcast:  # one ref per app for all the broadcasts of this frame
                    if broadcasts is None:
                        broadcasts = {}
                    broadcasts.setdefault(h.app, []).append(msg_id)
                else:
                    ref = ipb.MessageRef(uid=uid, app=h.app, msg_id=msg_id)
                    e = self._unreported.pop(msg_id, None)
                    if e is not None:
                        if e[0].uid == uid and e[0].app == h.app:
                            ref.deliveries = e[1]  # reported with the ack: no MarkDelivered
                        else:
                            self._unreported[msg_id] = e
                    self._submit(self.backends.ack, ref)
                if h.payload is not None:
                    session.held_bytes -= len(h.payload)
                n += 1
        if broadcasts:
            self._gather_broadcast_acks(uid, broadcasts)
        if n:
            m.ACKS.inc(n)
        if not unacked:
            session.unacked = None  # an emptied dict keeps its table (~37 KB after 1,000 entries)

    def _gather_broadcast_acks(self, uid: str, broadcasts: dict[str, list[int]]) -> None:
        """Broadcast acks wait ``broadcast_ack_linger_ms`` per (uid, app), one timer for the whole
        instance, so the acks of a burst reach saver as one ref per user."""
        pending = self._bc_acks
        for app, bids in broadcasts.items():
            have = pending.get((uid, app))
            if have is None:
                pending[(uid, app)] = bids
            else:
                have += bids
        linger = self.cfg.broadcast_ack_linger_ms / 1000
        if linger <= 0 or len(pending) >= MAX_GATHERED_BROADCAST_ACKS:
            self.flush_broadcast_acks()
        elif self._bc_ack_timer is None:
            self._bc_ack_timer = asyncio.get_running_loop().call_later(linger, self.flush_broadcast_acks)

    def flush_broadcast_acks(self) -> None:
        if self._bc_ack_timer is not None:
            self._bc_ack_timer.cancel()
            self._bc_ack_timer = None
        pending, self._bc_acks = self._bc_acks, {}
        for (uid, app), bids in pending.items():
            for i in range(0, len(bids), MAX_IDS_PER_ACK):
                part = bids[i:i + MAX_IDS_PER_ACK]
                self._submit(self.backends.ack, ipb.MessageRef(uid=uid, app=app, msg_id=part[0], broadcast=True,
                                                               more_broadcast_ids=part[1:]))

    def _on_bind(self, session: Session, frame: Frame) -> None:
        req = cpb.Bind.FromString(frame.body)
        self._bind(session, list(req.apps), list(req.tokens), frame.seq, refreshed=False, conn=session.conn)

    def _bind(self, session: Session, apps: list[str], token_list: list[str], seq: int, refreshed: bool,
              conn: ClientConnection | None) -> None:
        if session.conn is not conn:
            return  # the link that asked is gone (a resume gave the session another): its seq means nothing now
        new = [a for a in dict.fromkeys(apps) if a not in session.apps]
        try:
            if len(session.apps) + len(new) > self.cfg.max_apps_per_session:
                raise AuthFailure(ErrorCode.TOO_MANY_ITEMS, f"at most {self.cfg.max_apps_per_session} apps per connection")
            if not self._after_app_refresh(session, new, lambda: self._bind(session, apps, token_list, seq, True, conn),
                                           refreshed):
                return
            bound = self._verify_apps(session.uid, self._tokens_by_app(token_list), new)
        except AuthFailure as exc:
            self.fail(session, exc.code, exc.message, fatal=False, seq=seq)
            return
        if session.state != OPEN:
            return
        bound = tuple(a for a in bound if a not in session.apps)
        self._set_apps(session, self._canonical_apps(session.apps + bound))
        self._rebound(session, seq)
        if bound:
            self._status(session, bound, online=True)
            self._load_inbox(session, bound)

    def _on_unbind(self, session: Session, frame: Frame) -> None:
        drop = set(cpb.Bind.FromString(frame.body).apps)
        dropped = tuple(a for a in session.apps if a in drop)
        self._set_apps(session, self._canonical_apps(tuple(a for a in session.apps if a not in drop)))
        self._drop_messages(session, drop)
        self._rebound(session, frame.seq)
        self._status(session, dropped, online=False)

    def _drop_messages(self, session: Session, apps: set[str]) -> None:
        """Forget held messages of apps no longer bound (they stay stored for a later bind)."""
        if not apps:
            return
        if session.unacked:
            for msg_id in [k for k, h in session.unacked.items() if h.app in apps]:
                del session.unacked[msg_id]
            session.unacked = session.unacked or None
        if session.pending:
            session.pending = [h for h in session.pending if h.app not in apps] or None
        session.held_bytes = sum(len(h.payload) for h in (*(session.unacked or {}).values(), *(session.pending or ()))
                                 if h.payload is not None)

    def _rebound(self, session: Session, seq: int) -> None:
        self._submit(self.backends.register, self._session_pb(session))
        self.send(session, Op.COMMAND, cpb.Command(kind="BOUND", apps=session.apps).SerializeToString(), seq)

    def _on_upstream(self, session: Session, frame: Frame) -> None:
        req = cpb.Upstream.FromString(frame.body)
        seq = frame.seq
        if req.app not in session.apps:
            m.UPSTREAM.labels("not_bound").inc()
            self.fail(session, ErrorCode.NOT_BOUND, f"connection is not bound to app {req.app!r}", fatal=False,
                      seq=seq)
            return
        item = ipb.UpstreamItem(uid=session.uid, app=req.app, kind=req.kind[:64], payload=req.payload,
                                session_id=self.session_id(session), device_id=session.device_id,
                                ts_ms=self.wall_ms())

        conn = session.conn

        def done(accepted, err) -> None:
            ok = bool(accepted) and err is None
            m.UPSTREAM.labels("accepted" if ok else "rejected").inc()
            if session.state == OPEN and session.conn is conn:  # the answer belongs to the link that asked
                self.send(session, Op.UPSTREAM_ACK, cpb.UpstreamAck(accepted=ok).SerializeToString(), seq)

        if not self._submit(self.backends.upstream, item, done):
            done(False, None)

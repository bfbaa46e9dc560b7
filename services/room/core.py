"""RoomInstance: every rule of the client protocol for one room instance (one process).

Connections hand it frames; it answers, registers sessions, delivers pushes, forwards acks and
upstream data. All backend I/O goes through batched queues (``RoomBackends``) with plain
callbacks, so an idle connection owns nothing but its slotted ``ClientConnection``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from google.protobuf.message import DecodeError

from services.common import tcpinfo, tokens
from services.common.batching import Overloaded
from services.common.codec import HEADER, HEADER_SIZE, VERSION, ErrorCode, Frame, Op, encode
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from services.room import metrics as m
from services.room.app_cache import AppCache
from services.room.config import RoomConfig
from services.room.connection import AUTHENTICATING, CLOSED, HANDSHAKE, OPEN, ClientConnection
from services.room.wheel import HeartbeatWheel

log = logging.getLogger(__name__)

MAX_IDS_PER_ACK = 4096
# Keep a PUSH frame this far under max_frame so that header and protobuf framing always fit.
PUSH_FRAME_SLACK = 512
# The accept rate a shedding decision assumes at least: a quiet instance accepts ~0/s, and must
# not shed the first burst of a storm before it has shown what it can take (one instance does
# ~100-1,000/s here), nor what queued during a short stall such as a GC pause.
ACCEPT_RATE_FLOOR = 100.0


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


class AuthFailure(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RoomInstance:
    def __init__(self, cfg: RoomConfig, instance_id: str, apps: AppCache, backends,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.id = instance_id
        self.apps = apps
        self.backends = backends
        self.max_frame = cfg.max_frame
        self.clock = clock
        self.connections: set[ClientConnection] = set()
        self.by_uid: dict[str, ClientConnection | list[ClientConnection]] = {}
        self.sessions = 0
        self.wheel = HeartbeatWheel(int(clock()))
        self.draining = False
        self._next_sid = 0
        self._tick_task: asyncio.Task | None = None
        self.listeners: list = []  # listening sockets, for their accept-queue length
        self.accepted = 0          # connections accepted since start
        self.accept_rate = 0.0     # smoothed accepts per second
        self._accepted_before = 0
        self._accept_checked_at = clock()
        self.shedding = False
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

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            # each step on its own: a failing check must not stop the wheel, nor the wheel the checks
            steps = [self._advance_wheel, self.check_accept_queue]
            if not ticks % 10:
                steps.append(self.check_overdue)
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
            if conn.state in (HANDSHAKE, AUTHENTICATING) and 0 < conn.deadline < now - 1:
                by_state[conn.state] = by_state.get(conn.state, 0) + 1
        n = sum(by_state.values())
        m.OVERDUE.set(n)
        if n:
            log.warning("%d connections past their handshake deadline are still open (by state: %s); wheel size %d",
                        n, by_state, self.wheel.size)
        return n

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
        # accepts per second, smoothed over ~5 ticks so one stalled second does not look like no capacity
        self.accept_rate += 0.2 * ((self.accepted - self._accepted_before) / elapsed - self.accept_rate)
        self._accept_checked_at, self._accepted_before = now, self.accepted
        shed_s = self.cfg.accept_wait_shed_s
        rate = max(self.accept_rate, ACCEPT_RATE_FLOOR)
        shedding = bool(shed_s) and waiting > rate * shed_s
        if shedding != self.shedding:
            log.warning("%s AUTHs: %d connections wait to be accepted, ~%.0f accepted/s",
                        "shedding" if shedding else "no longer shedding", waiting, self.accept_rate)
        self.shedding = shedding
        m.ACCEPT_QUEUE.set(waiting)
        m.ACCEPT_SHEDDING.set(int(shedding))

    def drain(self, frame: bytes) -> int:
        """Write ``frame`` (COMMAND RECONNECT) to every connection and close it; returns how many."""
        conns = list(self.connections)
        for conn in conns:
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(frame)
            self.close(conn)
        m.closed_drain.inc(len(conns))
        return len(conns)

    async def stop(self) -> None:
        if self._tick_task:
            self._tick_task.cancel()

    # ------------------------------------------------------------------ connection events
    def on_connect(self, conn: ClientConnection) -> None:
        m.CONNECTIONS.inc()
        self.accepted += 1
        if not self.accepted % ACCEPT_WAIT_SAMPLE:
            self._time_accept(conn)
        self.connections.add(conn)
        conn.transport.set_write_buffer_limits(high=self.cfg.write_buffer_limit)
        if self.draining:
            self.fail(conn, ErrorCode.UNAVAILABLE, "instance is draining", retry_after_ms=100)
            return
        conn.deadline = self._deadline(self.cfg.handshake_timeout_s)
        self.wheel.add(conn)

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
        if conn.state != CLOSED:
            m.closed_by_peer.inc()
        self.close(conn)

    def on_slow(self, conn: ClientConnection) -> None:
        conn.paused = True

    def on_resume(self, conn: ClientConnection) -> None:
        conn.paused = False

    def _expire(self, conn: ClientConnection) -> None:
        if conn.state == HANDSHAKE:
            self.fail(conn, ErrorCode.HANDSHAKE_TIMEOUT, f"no AUTH within {self.cfg.handshake_timeout_s}s")
        elif conn.state == AUTHENTICATING:
            self.fail(conn, ErrorCode.UNAVAILABLE, "session registration timed out", self.cfg.overload_retry_ms)
        elif conn.state == OPEN:
            self.fail(conn, ErrorCode.IDLE_TIMEOUT, f"no PING within the {conn.heartbeat_s}s heartbeat")

    def close(self, conn: ClientConnection, abort: bool = False) -> None:
        """Idempotent. Unregisters the session and tells coordinator it went offline."""
        if conn.state == CLOSED:
            return
        was_open = conn.state == OPEN
        conn.state = CLOSED
        conn.deadline = 0
        conn.buf = b""
        self.connections.discard(conn)
        m.CONNECTIONS.dec()
        if was_open:
            self._unindex(conn)
            self.sessions -= 1
            m.SESSIONS.dec()
        if conn.registered:
            conn.registered = False
            session = self._session(conn)
            self._submit(self.backends.unregister, session)
            if self._wants_status(conn):
                self._submit(self.backends.status, ipb.StatusEvent(
                    uid=conn.uid, apps=conn.apps, online=False, session_id=session.session_id,
                    device_id=conn.device_id, ts_ms=int(time.time() * 1000), instance=self.id))
        t = conn.transport
        if t is not None:
            t.abort() if abort else t.close()

    # ------------------------------------------------------------------ frames
    def handle(self, conn: ClientConnection, frame: Frame) -> None:
        op = frame.op
        m.frames_in[op].inc()
        state = conn.state
        if state == OPEN:
            handler = self._handlers.get(op)
            if handler is None:
                self.fail(conn, ErrorCode.PROTOCOL_VIOLATION, f"op {Op(op).name} is not allowed here")
                return
            try:
                handler(conn, frame)
            except DecodeError:
                self.fail(conn, ErrorCode.MALFORMED_FRAME, f"{Op(op).name} body is not a valid protobuf message")
        elif state == HANDSHAKE:
            if op != Op.AUTH:
                self.fail(conn, ErrorCode.PROTOCOL_VIOLATION, "the first frame must be AUTH")
                return
            conn.state = AUTHENTICATING  # no second AUTH while this one is in progress
            if self.shedding:  # before any token or protobuf work: the point is to answer cheaply
                self.fail(conn, ErrorCode.OVERLOADED, "room is busy: too many connections waiting to be accepted",
                          self.cfg.overload_retry_ms, seq=frame.seq)
                return
            try:
                auth = cpb.Auth.FromString(frame.body)
            except DecodeError:
                self.fail(conn, ErrorCode.MALFORMED_FRAME, "AUTH body is not a valid protobuf message")
                return
            self._auth(conn, auth, frame.seq, refreshed=False)
        else:  # AUTHENTICATING: the client must wait for AUTH_OK
            self.fail(conn, ErrorCode.PROTOCOL_VIOLATION, f"{Op(op).name} before AUTH_OK")

    def send(self, conn: ClientConnection, op: int, body: bytes = b"", seq: int = 0) -> None:
        t = conn.transport
        if t is None or t.is_closing():
            return
        t.write(HEADER.pack(HEADER_SIZE + len(body), VERSION, op, 0, seq) + body)
        m.frames_out[op].inc()

    def fail(self, conn: ClientConnection, code: ErrorCode, message: str, retry_after_ms: int = 0,
             fatal: bool = True, seq: int = 0) -> None:
        if conn.state == CLOSED:
            return
        body = cpb.Error(code=code, message=message, fatal=fatal, retry_after_ms=retry_after_ms).SerializeToString()
        self.send(conn, Op.ERROR, body, seq)
        if fatal:
            m.closed[code].inc()
            if conn.state in (HANDSHAKE, AUTHENTICATING):
                m.auth_result[code].inc()
            self.close(conn)

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

    def _after_app_refresh(self, conn: ClientConnection, app_ids: list[str], retry: Callable[[], None],
                           refreshed: bool) -> bool:
        """True if the caller may go on now; else ``retry`` runs after one app-table refresh."""
        if refreshed or all(a in self.apps.apps for a in app_ids):
            return True

        def resume(ok: bool) -> None:
            if conn.state == CLOSED:
                return
            if not ok:
                self.fail(conn, ErrorCode.UNAVAILABLE, "app directory unavailable", self.cfg.overload_retry_ms)
                return
            retry()

        if not self.apps.wait_refresh(resume):
            self.fail(conn, ErrorCode.OVERLOADED, "too many handshakes waiting", self.cfg.overload_retry_ms)
        return False

    def _auth(self, conn: ClientConnection, auth: cpb.Auth, seq: int, refreshed: bool) -> None:
        cfg = self.cfg
        try:
            if not auth.token:
                raise AuthFailure(ErrorCode.BAD_TOKEN, "AUTH carries no token")
            token_by_app = self._tokens_by_app([auth.token, *auth.tokens])
            primary = next(iter(token_by_app))
            wanted = list(dict.fromkeys([primary, *auth.apps]))
            if len(wanted) > cfg.max_apps_per_session:
                raise AuthFailure(ErrorCode.TOO_MANY_ITEMS, f"at most {cfg.max_apps_per_session} apps per connection")
            if not self._after_app_refresh(conn, wanted, lambda: self._auth(conn, auth, seq, True), refreshed):
                return
            uid = auth.uid
            if not uid:
                app = self.apps.get(primary)
                uid = token_by_app[primary].check(app.secret)["sub"] if app else ""
            if not uid or len(uid) > cfg.max_uid_len:
                raise AuthFailure(ErrorCode.UID_MISMATCH, f"uid must be 1..{cfg.max_uid_len} characters")
            bound = self._verify_apps(uid, token_by_app, wanted)
        except AuthFailure as exc:
            conn.state = HANDSHAKE  # so fail() counts it as an auth failure
            self.fail(conn, exc.code, exc.message, seq=seq)
            return
        except tokens.TokenError as exc:
            self.fail(conn, ErrorCode.BAD_TOKEN, str(exc), seq=seq)
            return

        conn.uid = uid
        conn.device_id = auth.device_id[:128]
        conn.apps = bound
        net = auth.net[:16]
        conn.net = self._nets.setdefault(net, net) if len(self._nets) < 64 else net
        hb = cfg.heartbeat_for(conn.net)
        if auth.heartbeat_hint_s:
            hb = cfg.clamp_heartbeat(auth.heartbeat_hint_s)
        conn.heartbeat_s = hb
        self._next_sid += 1
        conn.sid = self._next_sid
        try:
            self.backends.register.submit(self._session(conn), lambda _r, err: self._registered(conn, seq, err))
        except Overloaded:
            self.fail(conn, ErrorCode.OVERLOADED, "room is overloaded, retry later", self.cfg.overload_retry_ms, seq=seq)

    def _session(self, conn: ClientConnection) -> ipb.Session:
        return ipb.Session(uid=conn.uid, session_id=f"{self.id}/{conn.sid}", instance=self.id, apps=conn.apps,
                           device_id=conn.device_id, connected_ms=0, net=conn.net)

    def _registered(self, conn: ClientConnection, seq: int, err: BaseException | None) -> None:
        if err is not None:
            # The call failed on our side (deadline, connection) but register may still have written
            # the session: take it back out. Unregister only removes it while this instance owns it.
            self._submit(self.backends.unregister, self._session(conn))
            if conn.state == AUTHENTICATING:
                self.fail(conn, ErrorCode.UNAVAILABLE, "session store unavailable, retry later",
                          self.cfg.overload_retry_ms, seq=seq)
            return
        if conn.state != AUTHENTICATING:
            # closed while registering: take the session back out
            self._submit(self.backends.unregister, self._session(conn))
            return
        conn.registered = True
        conn.state = OPEN
        self._index(conn)
        self.sessions += 1
        m.SESSIONS.inc()
        m.auth_ok.inc()
        self._arm(conn)
        session_id = f"{self.id}/{conn.sid}"
        self.send(conn, Op.AUTH_OK, cpb.AuthOk(
            session_id=session_id, resume_token=session_id, heartbeat_s=conn.heartbeat_s,
            server_time_ms=int(time.time() * 1000), max_frame=self.max_frame, apps=conn.apps).SerializeToString(), seq)
        if self._wants_status(conn):
            self._submit(self.backends.status, ipb.StatusEvent(
                uid=conn.uid, apps=conn.apps, online=True, session_id=session_id, device_id=conn.device_id,
                ts_ms=int(time.time() * 1000), instance=self.id))
        self._load_inbox(conn, conn.apps)

    def _wants_status(self, conn: ClientConnection) -> bool:
        """Only apps that subscribed get online/offline events: skip the RPC for the rest."""
        for app_id in conn.apps:
            app = self.apps.get(app_id)
            if app is not None and app.status_events:
                return True
        return False

    def _load_inbox(self, conn: ClientConnection, apps: Iterable[str]) -> None:
        def loaded(inbox: ipb.Inbox | None, err: BaseException | None) -> None:
            if err is None and inbox is not None and inbox.messages and conn.state == OPEN:
                self.deliver(conn, inbox.messages)
            # on error the messages stay stored: the next push or connect delivers them

        self._submit(self.backends.load_inbox, ipb.InboxKey(uid=conn.uid, apps=apps), loaded)

    def _submit(self, batcher, item, done=None) -> bool:
        try:
            batcher.submit(item, done)
            return True
        except Overloaded:
            return False

    # ------------------------------------------------------------------ index
    def _index(self, conn: ClientConnection) -> None:
        cur = self.by_uid.get(conn.uid)
        if cur is None:
            self.by_uid[conn.uid] = conn
        elif isinstance(cur, list):
            cur.append(conn)
        else:
            self.by_uid[conn.uid] = [cur, conn]

    def _unindex(self, conn: ClientConnection) -> None:
        cur = self.by_uid.get(conn.uid)
        if cur is conn:
            del self.by_uid[conn.uid]
        elif isinstance(cur, list):
            if conn in cur:
                cur.remove(conn)
            if len(cur) == 1:
                self.by_uid[conn.uid] = cur[0]
            elif not cur:
                del self.by_uid[conn.uid]

    def conns_of(self, uid: str) -> list[ClientConnection]:
        cur = self.by_uid.get(uid)
        if cur is None:
            return []
        return cur if isinstance(cur, list) else [cur]

    # ------------------------------------------------------------------ heartbeat
    def _deadline(self, seconds: float) -> int:
        """The wheel second at which a connection silent for ``seconds`` from now is closed. The
        wheel expires a deadline when its second begins, so round up: never early, at most 1 s late."""
        return int(self.clock() + seconds) + 1

    def _silence_deadline(self, conn: ClientConnection) -> int:
        return self._deadline(conn.heartbeat_s * 1.5 + self.cfg.heartbeat_grace_s)

    def _arm(self, conn: ClientConnection) -> None:
        """Switch from the handshake deadline to the heartbeat deadline. The connection is already
        on the wheel; only a deadline earlier than its bucket needs a second entry there."""
        deadline = self._silence_deadline(conn)
        earlier = deadline < conn.deadline
        conn.deadline = deadline
        if earlier:
            self.wheel.add(conn)

    def _on_ping(self, conn: ClientConnection, frame: Frame) -> None:
        if frame.body:
            proposed = cpb.Ping.FromString(frame.body).propose_heartbeat_s
            if proposed:
                conn.heartbeat_s = self.cfg.clamp_heartbeat(proposed)
        # a later deadline; the wheel re-files the connection when its old bucket comes due
        conn.deadline = self._silence_deadline(conn)
        body = self._pong_bodies.get(conn.heartbeat_s)
        if body is None:
            body = self._pong_bodies[conn.heartbeat_s] = cpb.Pong(heartbeat_s=conn.heartbeat_s).SerializeToString()
        self.send(conn, Op.PONG, body, frame.seq)

    # ------------------------------------------------------------------ delivery
    def deliver(self, conn: ClientConnection, messages: Iterable[ipb.StoredMessage]) -> int:
        """Write unicast messages for bound apps; remember them until acked. Returns messages written."""
        if conn.state != OPEN:
            return 0
        if conn.paused:
            # it stopped reading and we have more for it: close; the messages stay stored
            m.closed[ErrorCode.SLOW_CONSUMER].inc()
            self.close(conn, abort=True)
            return 0
        unacked = conn.unacked
        if unacked is None:
            unacked = conn.unacked = {}
        limit = self.cfg.max_unacked_per_session
        apps = conn.apps
        batch: list[cpb.Message] = []
        refs: list[ipb.MessageRef] = []
        size = 0
        budget = self.max_frame - HEADER_SIZE - PUSH_FRAME_SLACK
        written = 0
        for msg in messages:
            if msg.app not in apps or msg.msg_id in unacked:
                continue  # not for this connection, or already written to it and not yet acked
            if len(unacked) >= limit:
                break  # the rest stays in the inbox until the client acks
            item = cpb.Message(msg_id=msg.msg_id, app=msg.app, payload=msg.payload, created_ms=msg.created_ms,
                               seq=msg.seq)
            item_size = item.ByteSize() + 8
            if batch and size + item_size > budget:
                self.send(conn, Op.PUSH, cpb.Push(messages=batch).SerializeToString())
                batch, size = [], 0
            batch.append(item)
            size += item_size
            unacked[msg.msg_id] = msg.app
            refs.append(ipb.MessageRef(uid=conn.uid, app=msg.app, msg_id=msg.msg_id))
            written += 1
        if batch:
            self.send(conn, Op.PUSH, cpb.Push(messages=batch).SerializeToString())
        for ref in refs:
            self._submit(self.backends.delivered, ref)
        if written:
            m.unicast_out.inc(written)
        return written

    def push(self, messages: Iterable[ipb.StoredMessage]) -> int:
        """Messages from center for sessions on this instance (gRPC Room.Push)."""
        by_uid: dict[str, list[ipb.StoredMessage]] = {}
        for msg in messages:
            if msg.uid in self.by_uid:
                by_uid.setdefault(msg.uid, []).append(msg)
        delivered = 0
        for uid, msgs in by_uid.items():
            for conn in self.conns_of(uid):
                delivered += self.deliver(conn, msgs)
        return delivered

    def broadcast(self, message: ipb.StoredMessage) -> int:
        """One frame, encoded once, written to every open session bound to the app."""
        body = cpb.Push(messages=[cpb.Message(msg_id=message.msg_id, app=message.app, payload=message.payload,
                                              created_ms=message.created_ms, broadcast=True)]).SerializeToString()
        frame = encode(Op.PUSH, body)
        app = message.app
        n = 0
        for conn in list(self.connections):
            if conn.state == OPEN and app in conn.apps:
                if conn.paused:
                    m.closed[ErrorCode.SLOW_CONSUMER].inc()
                    self.close(conn, abort=True)
                    continue
                conn.transport.write(frame)
                n += 1
        if n:
            m.frames_out[Op.PUSH].inc(n)
            m.broadcast_out.inc(n)
        return n

    def kick(self, uids: Iterable[str], session_ids: Iterable[str], reason: str, app: str = "") -> int:
        wanted = set(session_ids)
        targets: list[ClientConnection] = []
        uid_list = list(uids)
        if uid_list:
            for uid in uid_list:
                targets.extend(self.conns_of(uid))
        elif wanted:
            targets = [c for c in self.connections if c.state == OPEN]
        n = 0
        body = cpb.Kick(reason=reason).SerializeToString()
        for conn in targets:
            if wanted and f"{self.id}/{conn.sid}" not in wanted:
                continue
            if app and app not in conn.apps:
                continue
            self.send(conn, Op.KICK, body)
            m.closed_kick.inc()
            self.close(conn)
            n += 1
        return n

    # ------------------------------------------------------------------ acks, bind, upstream
    def _on_ack(self, conn: ClientConnection, frame: Frame) -> None:
        ids = cpb.Ack.FromString(frame.body).msg_ids
        if len(ids) > MAX_IDS_PER_ACK:
            self.fail(conn, ErrorCode.TOO_MANY_ITEMS, f"at most {MAX_IDS_PER_ACK} ids per ACK", fatal=False,
                      seq=frame.seq)
            return
        unacked = conn.unacked
        if not unacked:
            return
        n = 0
        for msg_id in ids:
            app = unacked.pop(msg_id, None)
            if app is not None:  # broadcasts and unknown ids need no storage ack
                self._submit(self.backends.ack, ipb.MessageRef(uid=conn.uid, app=app, msg_id=msg_id))
                n += 1
        if n:
            m.ACKS.inc(n)

    def _on_bind(self, conn: ClientConnection, frame: Frame) -> None:
        req = cpb.Bind.FromString(frame.body)
        self._bind(conn, list(req.apps), list(req.tokens), frame.seq, refreshed=False)

    def _bind(self, conn: ClientConnection, apps: list[str], token_list: list[str], seq: int, refreshed: bool) -> None:
        new = [a for a in dict.fromkeys(apps) if a not in conn.apps]
        try:
            if len(conn.apps) + len(new) > self.cfg.max_apps_per_session:
                raise AuthFailure(ErrorCode.TOO_MANY_ITEMS, f"at most {self.cfg.max_apps_per_session} apps per connection")
            if not self._after_app_refresh(conn, new, lambda: self._bind(conn, apps, token_list, seq, True), refreshed):
                return
            bound = self._verify_apps(conn.uid, self._tokens_by_app(token_list), new)
        except AuthFailure as exc:
            self.fail(conn, exc.code, exc.message, fatal=False, seq=seq)
            return
        if conn.state != OPEN:
            return
        conn.apps = self._canonical_apps(conn.apps + bound)
        self._rebound(conn, seq)
        if bound:
            self._load_inbox(conn, bound)

    def _on_unbind(self, conn: ClientConnection, frame: Frame) -> None:
        drop = set(cpb.Bind.FromString(frame.body).apps)
        conn.apps = self._canonical_apps(tuple(a for a in conn.apps if a not in drop))
        if conn.unacked:
            for msg_id in [k for k, a in conn.unacked.items() if a in drop]:
                del conn.unacked[msg_id]
        self._rebound(conn, frame.seq)

    def _rebound(self, conn: ClientConnection, seq: int) -> None:
        self._submit(self.backends.register, self._session(conn))
        self.send(conn, Op.COMMAND, cpb.Command(kind="BOUND", apps=conn.apps).SerializeToString(), seq)

    def _on_upstream(self, conn: ClientConnection, frame: Frame) -> None:
        req = cpb.Upstream.FromString(frame.body)
        seq = frame.seq
        if req.app not in conn.apps:
            m.UPSTREAM.labels("not_bound").inc()
            self.fail(conn, ErrorCode.NOT_BOUND, f"connection is not bound to app {req.app!r}", fatal=False, seq=seq)
            return
        item = ipb.UpstreamItem(uid=conn.uid, app=req.app, kind=req.kind[:64], payload=req.payload,
                                session_id=f"{self.id}/{conn.sid}", device_id=conn.device_id,
                                ts_ms=int(time.time() * 1000))

        def done(accepted, err) -> None:
            ok = bool(accepted) and err is None
            m.UPSTREAM.labels("accepted" if ok else "rejected").inc()
            if conn.state == OPEN:
                self.send(conn, Op.UPSTREAM_ACK, cpb.UpstreamAck(accepted=ok).SerializeToString(), seq)

        if not self._submit(self.backends.upstream, item, done):
            done(False, None)

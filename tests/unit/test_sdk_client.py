"""PylonClient against a fake room: an in-test asyncio server speaking the real codec on loopback."""

import asyncio
import json
import time

import pytest
from aiohttp import web
from pylon_sdk import (
    AuthError,
    ClientClosed,
    FrameTooLarge,
    HeartbeatPolicy,
    NotConnected,
    PylonClient,
    SendQueueFull,
    ServerError,
    State,
    UpstreamTimeout,
)

from services.common import codec
from services.common.codec import ErrorCode, Op
from services.common.pb import client_pb2 as pb


class FakeConn:
    def __init__(self, room, reader, writer):
        self.room = room
        self.reader = reader
        self.writer = writer
        self.auth: pb.Auth | None = None
        self.bound: list[str] = []
        self.frames: list[codec.Frame] = []

    def send(self, op, msg=None, seq=0):
        self.writer.write(codec.encode(op, msg.SerializeToString() if msg is not None else b"", seq))

    def push(self, *messages):
        """Each message is (msg_id, app, payload) or (msg_id, app, payload, broadcast)."""
        self.send(Op.PUSH, pb.Push(messages=[pb.Message(msg_id=m[0], app=m[1], payload=m[2],
                                                        broadcast=len(m) > 3 and m[3]) for m in messages]))

    def acked(self):
        return [i for f in self.frames if f.op == Op.ACK for i in pb.Ack.FromString(f.body).msg_ids]

    def close(self):
        self.writer.close()


class FakeRoom:
    """Answers AUTH (or an ERROR chosen by the test), PING, UPSTREAM; records everything.

    With ``resume`` set, an AUTH carrying a resume_token this room issued gets ``resumed = true``.
    ``auth_kick`` answers the next AUTH with KICK of that reason instead."""

    def __init__(self, heartbeat_s=300, max_frame=codec.DEFAULT_MAX_FRAME):
        self.heartbeat_s = heartbeat_s
        self.max_frame = max_frame
        self.conns: list[FakeConn] = []
        self.auth_errors: list[tuple] = []        # popped per AUTH: (code, retry_after_ms)
        self.answer_pings = True
        self.accept_proposals = True
        self.upstream_reply = "ack"               # ack | nack | error | silent
        self.resume = False
        self.auth_kick = ""
        self.issued_tokens: set[str] = set()
        self.new_conn = asyncio.Event()
        self.got_frame = asyncio.Event()
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    async def stop(self):
        for c in self.conns:
            c.close()
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        conn = FakeConn(self, reader, writer)
        self.conns.append(conn)
        self.new_conn.set()
        decoder = codec.FrameDecoder(self.max_frame)
        try:
            while data := await reader.read(65536):
                for f in decoder.feed(data):
                    conn.frames.append(f)
                    self._answer(conn, f)
                    self.got_frame.set()
        except (ConnectionError, codec.FrameError):
            pass
        finally:
            writer.close()

    def _answer(self, conn, f):
        if f.op == Op.AUTH:
            conn.auth = pb.Auth.FromString(f.body)
            if self.auth_errors:
                code, retry_ms = self.auth_errors.pop(0)
                conn.send(Op.ERROR, pb.Error(code=code, message="no", fatal=True, retry_after_ms=retry_ms), f.seq)
                conn.close()
                return
            if self.auth_kick:
                conn.send(Op.KICK, pb.Kick(reason=self.auth_kick))
                conn.close()
                return
            n = len(self.conns)
            resumed = self.resume and conn.auth.resume_token in self.issued_tokens
            self.issued_tokens.add(f"r{n}")
            conn.send(Op.AUTH_OK, pb.AuthOk(session_id=f"s{n}", resume_token=f"r{n}", heartbeat_s=self.heartbeat_s,
                                            max_frame=self.max_frame, apps=list(conn.auth.apps), resumed=resumed),
                      f.seq)
        elif f.op == Op.PING and self.answer_pings:
            ping = pb.Ping.FromString(f.body)
            if ping.propose_heartbeat_s and self.accept_proposals:
                self.heartbeat_s = ping.propose_heartbeat_s
            conn.send(Op.PONG, pb.Pong(heartbeat_s=self.heartbeat_s), f.seq)
        elif f.op in (Op.BIND, Op.UNBIND):
            req = pb.Bind.FromString(f.body)
            if "bad" in req.apps:
                conn.send(Op.ERROR, pb.Error(code=ErrorCode.UNKNOWN_APP, message="no such app"), f.seq)
                return
            bound = list(conn.bound or conn.auth.apps)
            bound = bound + [a for a in req.apps if a not in bound] if f.op == Op.BIND else \
                [a for a in bound if a not in req.apps]
            conn.bound = bound
            conn.send(Op.COMMAND, pb.Command(kind="BOUND", apps=bound), f.seq)
        elif f.op == Op.UPSTREAM:
            if self.upstream_reply == "ack":
                conn.send(Op.UPSTREAM_ACK, pb.UpstreamAck(accepted=True), f.seq)
            elif self.upstream_reply == "nack":
                conn.send(Op.UPSTREAM_ACK, pb.UpstreamAck(accepted=False), f.seq)
            elif self.upstream_reply == "error":
                conn.send(Op.ERROR, pb.Error(code=ErrorCode.NOT_BOUND, message="not bound"), f.seq)


async def until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class Recorder:
    def __init__(self, fail_ids=()):
        self.messages = []
        self.events = []
        self.fail_ids = set(fail_ids)

    async def on_message(self, msg):
        if msg.msg_id in self.fail_ids:
            self.fail_ids.discard(msg.msg_id)
            raise RuntimeError("handler failed once")
        self.messages.append(msg)

    def on_event(self, kind, data):
        self.events.append((kind, data))

    def kinds(self):
        return [k for k, _ in self.events]


@pytest.fixture
async def room():
    r = await FakeRoom().start()
    yield r
    await r.stop()


def make_client(rooms, rec=None, **kw):
    rec = rec or Recorder()
    kw.setdefault("reconnect_min_s", 0.01)
    kw.setdefault("reconnect_max_s", 0.05)
    addrs = [r.address if isinstance(r, FakeRoom) else r for r in rooms]
    return PylonClient(None, "alice", "tok", device_id="dev1", apps=["app1"], net="cellular",
                       on_message=rec.on_message, on_event=rec.on_event, addresses=addrs, **kw), rec


async def test_auth_and_properties(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    assert client.connected and client.state is State.CONNECTED
    assert (client.session_id, client.resume_token, client.heartbeat_s) == ("s1", "r1", 300)
    a = room.conns[0].auth
    assert (a.token, a.uid, a.device_id, list(a.apps), a.net, a.sdk, a.resume_token, a.heartbeat_hint_s) == \
        ("tok", "alice", "dev1", ["app1"], "cellular", "python/0.1.0", "", 0)
    assert rec.kinds() == ["connected"]
    await client.close()
    assert client.state is State.CLOSED
    with pytest.raises(ClientClosed):
        await client.send_upstream("app1", "k", b"x")


async def test_push_is_delivered_once_and_acked_per_frame(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((1, "app1", b"a"), (2, "app1", b"b"), (3, "app1", b"c"))
    await until(lambda: sorted(conn.acked()) == [1, 2, 3])
    assert [m.msg_id for m in rec.messages] == [1, 2, 3]
    assert [f.op for f in conn.frames].count(Op.ACK) == 1      # one ACK frame for the PUSH frame
    conn.push((2, "app1", b"b"), (4, "app1", b"d"))           # 2 is a redelivery (our ACK was "lost")
    await until(lambda: sorted(conn.acked()) == [1, 2, 2, 3, 4])
    assert [m.msg_id for m in rec.messages] == [1, 2, 3, 4]
    await client.close()


async def test_handler_failure_is_not_acked_and_redelivery_is_delivered(room):
    client, rec = make_client([room], Recorder(fail_ids={2}))
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((1, "app1", b"a"), (2, "app1", b"b"), (3, "app1", b"c"))
    await until(lambda: sorted(conn.acked()) == [1, 3])
    conn.push((2, "app1", b"b"))
    await until(lambda: sorted(conn.acked()) == [1, 2, 3])
    assert [m.msg_id for m in rec.messages] == [1, 3, 2]
    await client.close()


async def test_sync_handler_and_no_event_callback(room):
    got = []
    client = PylonClient(None, "alice", "tok", on_message=got.append, addresses=[room.address])
    await client.start(timeout=5)
    room.conns[0].push((9, "app1", b"z"))
    await until(lambda: room.conns[0].acked() == [9])
    assert got[0].text == "z"
    await client.close()


async def test_upstream_ack_nack_error_timeout(room):
    client, _ = make_client([room], ack_timeout_s=0.2)
    await client.start(timeout=5)
    assert await client.send_upstream("app1", "chat", b"hello") is True
    up = [pb.Upstream.FromString(f.body) for f in room.conns[0].frames if f.op == Op.UPSTREAM][0]
    assert (up.app, up.kind, up.payload) == ("app1", "chat", b"hello")
    room.upstream_reply = "nack"
    assert await client.send_upstream("app1", "chat", "text is utf-8") is False
    room.upstream_reply = "error"
    assert await client.send_upstream("app1", "chat", b"x") is False
    room.upstream_reply = "silent"
    with pytest.raises(UpstreamTimeout):
        await client.send_upstream("app1", "chat", b"x")
    with pytest.raises(TimeoutError):  # an UpstreamTimeout is a TimeoutError
        await client.send_upstream("app1", "chat", b"x", timeout=0.05)
    await client.close()


async def test_frames_over_max_frame_are_refused_locally():
    room = await FakeRoom(max_frame=1024).start()
    client, _ = make_client([room])
    await client.start(timeout=5)
    with pytest.raises(FrameTooLarge) as e:
        await client.send_upstream("app1", "chat", b"x" * 2000)
    assert e.value.limit == 1024
    assert await client.send_upstream("app1", "chat", b"x" * 500) is True
    assert client.connected
    await client.close()
    await room.stop()


async def test_pending_upstream_is_bounded(room):
    room.upstream_reply = "silent"
    client, _ = make_client([room], max_pending_upstream=3, ack_timeout_s=1)
    await client.start(timeout=5)
    waiting = [asyncio.ensure_future(client.send_upstream("app1", "k", b"x")) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(SendQueueFull):
        await client.send_upstream("app1", "k", b"x")
    await client.close()
    for w in waiting:
        with pytest.raises(ClientClosed):
            await w


@pytest.mark.parametrize("code", [ErrorCode.BAD_TOKEN, ErrorCode.UNKNOWN_APP, ErrorCode.UID_MISMATCH,
                                  ErrorCode.TOKEN_EXPIRED])
async def test_permanent_auth_errors_stop_without_reconnecting(room, code):
    room.auth_errors.append((code, 0))
    client, rec = make_client([room])
    with pytest.raises(AuthError) as e:
        await client.start(timeout=5)
    assert e.value.code == code
    assert client.state is State.CLOSED
    assert rec.kinds() == ["error", "closed"]
    assert rec.events[0][1].code == code
    await asyncio.sleep(0.2)
    assert len(room.conns) == 1
    await client.close()


async def test_expired_token_is_refreshed_through_the_provider(room):
    room.auth_errors.append((ErrorCode.TOKEN_EXPIRED, 0))
    calls = []

    async def provider():
        calls.append(1)
        return "fresh-token"

    client, _ = make_client([room], token_provider=provider)
    await client.start(timeout=5)
    assert calls == [1]
    assert room.conns[1].auth.token == "fresh-token"
    await client.close()


async def test_overloaded_waits_retry_after_then_reconnects(room):
    room.auth_errors.append((ErrorCode.OVERLOADED, 300))
    client, rec = make_client([room])
    started = time.monotonic()
    await client.start(timeout=5)
    assert time.monotonic() - started >= 0.3
    assert len(room.conns) == 2
    assert "error" in rec.kinds()
    await client.close()


async def test_kick_stops_the_client(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    room.conns[0].send(Op.KICK, pb.Kick(reason="admin"))
    assert await asyncio.wait_for(client.wait_closed(), 5) == "kicked: admin"
    assert ("kicked", "kicked: admin") in rec.events
    assert client.state is State.CLOSED
    await asyncio.sleep(0.2)
    assert len(room.conns) == 1
    await client.close()


async def test_connection_loss_reconnects_with_resume_token(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    assert await client.bind(["app2"], tokens=["tok2"]) == ["app1", "app2"]
    room.conns[0].close()
    await until(lambda: len(room.conns) == 2 and client.connected)
    a = room.conns[1].auth
    assert a.resume_token == "r1"
    assert list(a.apps) == ["app1", "app2"] and list(a.tokens) == ["tok2"]
    assert client.session_id == "s2"
    assert "disconnected" in rec.kinds()
    assert await client.unbind(["app2"]) == ["app1"]
    assert client.apps == ["app1"]
    await client.close()


async def test_refused_bind_raises_and_changes_nothing(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    with pytest.raises(ServerError) as e:
        await client.bind(["bad"], tokens=["t"])
    assert e.value.code == ErrorCode.UNKNOWN_APP and not e.value.fatal
    assert client.apps == ["app1"] and client.connected
    assert "error" not in rec.kinds()  # answered to the caller, not reported twice
    await client.close()
    with pytest.raises(ClientClosed):
        await client.bind(["x"])


async def test_not_connected_while_reconnecting(room):
    client, _ = make_client([room], reconnect_min_s=5, reconnect_max_s=5)
    await client.start(timeout=5)
    await room.stop()
    await until(lambda: not client.connected)
    with pytest.raises(NotConnected):
        await client.send_upstream("app1", "k", b"x")
    await client.close()


async def test_command_reconnect_moves_to_the_given_address(room):
    other = await FakeRoom().start()
    client, _ = make_client([room])
    await client.start(timeout=5)
    room.conns[0].send(Op.COMMAND, pb.Command(kind="RECONNECT", addresses=[f"127.0.0.1:{other.port}"]))
    await until(lambda: len(other.conns) == 1 and client.connected)
    assert other.conns[0].auth.resume_token == "r1"
    assert len(room.conns) == 1
    await client.close()
    await other.stop()


async def test_unknown_command_is_reported(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    room.conns[0].send(Op.COMMAND, pb.Command(kind="SING", addresses=["a:1"]))
    await until(lambda: ("command", ("SING", ["a:1"])) in rec.events)
    assert client.connected
    await client.close()


async def test_dead_address_is_skipped(room):
    from services.launcher.backing import free_port

    client, _ = make_client([("127.0.0.1", free_port()), room])
    await client.start(timeout=5)
    assert client.address.port == room.port
    await client.close()


class FastBeat(HeartbeatPolicy):
    def ping_delay(self):
        return 0.03


async def test_heartbeat_probes_longer_intervals(room):
    client, rec = make_client([room], heartbeat=FastBeat(step_s=30, up_after=2))
    await client.start(timeout=5)
    await until(lambda: client.heartbeat_s >= 360)
    proposals = [pb.Ping.FromString(f.body).propose_heartbeat_s for f in room.conns[0].frames if f.op == Op.PING]
    assert proposals[:6] == [0, 0, 330, 0, 0, 360]
    assert ("heartbeat", {"interval_s": 330, "missed": False}) in rec.events
    await client.close()


async def test_missed_pong_steps_down_and_reconnects(room):
    client, rec = make_client([room], heartbeat=FastBeat(step_s=60), pong_timeout_s=0.1)
    await client.start(timeout=5)
    room.answer_pings = False
    await until(lambda: len(room.conns) >= 2 and room.conns[1].auth is not None)
    assert room.conns[1].auth.heartbeat_hint_s == 240
    assert ("heartbeat", {"interval_s": 240, "missed": True}) in rec.events
    await client.close()


async def test_close_from_inside_the_handler(room):
    client = None
    seen = []

    async def on_message(msg):
        seen.append(msg.msg_id)
        await client.close()

    client = PylonClient(None, "alice", "tok", on_message=on_message, addresses=[room.address])
    await client.start(timeout=5)
    room.conns[0].push((1, "a", b"x"))
    assert await asyncio.wait_for(client.wait_closed(), 5) == "closed by the application"
    await asyncio.sleep(0.05)
    assert seen == [1] and client.state is State.CLOSED


async def test_start_times_out_but_keeps_trying():
    from services.launcher.backing import free_port

    port = free_port()
    client, _ = make_client([("127.0.0.1", port)])
    with pytest.raises(TimeoutError):
        await client.start(timeout=0.2)
    room = FakeRoom()
    room.server = await asyncio.start_server(room._handle, "127.0.0.1", port)
    room.port = port
    await client.wait_connected(5)
    assert client.connected
    await client.close()
    await room.stop()


async def test_constructor_validation():
    with pytest.raises(ValueError):
        PylonClient(None, "u", "t")                     # neither dispatcher nor addresses
    with pytest.raises(ValueError):
        PylonClient("http://d", "u", "t", addresses=[("h", 1)])
    with pytest.raises(ValueError):
        PylonClient("http://d", "", "t")
    with pytest.raises(ValueError):
        PylonClient("ftp://d", "u", "t")


async def test_routes_through_the_dispatcher_and_excludes_failed_addresses(room):
    from services.launcher.backing import free_port

    dead = free_port()
    queries = []

    async def route(request):
        queries.append(dict(request.query))
        rooms = [{"host": "127.0.0.1", "port": dead}]
        if len(queries) > 1:
            rooms.append({"host": "127.0.0.1", "port": room.port})
        return web.Response(text=json.dumps({"rooms": rooms}), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/route", route)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    rec = Recorder()
    client = PylonClient(f"http://127.0.0.1:{port}", "alice", "tok", net="wifi", on_message=rec.on_message,
                         reconnect_min_s=0.01, reconnect_max_s=0.02)
    try:
        await client.start(timeout=5)
        assert queries[0] == {"uid": "alice", "net": "wifi"}
        assert queries[1]["exclude"] == f"127.0.0.1:{dead}"
        assert client.address.port == room.port
    finally:
        await client.close()
        await runner.cleanup()

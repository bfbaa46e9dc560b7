"""A socket-free room: a real ``RoomInstance`` driven through fake transports, a fake clock and
fake backends that implement ``services.room.backends.Backends``. Tests send frames as a client
would, read what the room wrote, and answer the room's batched calls themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from services.common import tokens
from services.common.apps import App
from services.common.codec import FrameDecoder, Op, encode
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from services.room.config import RoomConfig
from services.room.connection import ClientConnection
from services.room.core import RoomInstance

SECRET = "s3cret-for-tests"
BODIES = {Op.AUTH_OK: cpb.AuthOk, Op.PONG: cpb.Pong, Op.PUSH: cpb.Push, Op.UPSTREAM_ACK: cpb.UpstreamAck,
          Op.KICK: cpb.Kick, Op.COMMAND: cpb.Command, Op.ERROR: cpb.Error}


class FakeTransport:
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.decoder = FrameDecoder(1 << 24)
        self.high = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.connection_lost(None)  # asyncio calls it soon after; at once is harsher

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high

    def get_extra_info(self, name, default=None):
        return default


class FakeQueue:
    """A batched call the test answers: ``complete`` runs every queued item's callback."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[tuple[Any, Callable | None]] = []
        self.sent: list[Any] = []  # every item ever submitted

    def submit(self, item, done=None) -> None:
        self.items.append((item, done))
        self.sent.append(item)

    def complete(self, result: Callable[[Any], Any] | Any = True, error: BaseException | None = None) -> int:
        items, self.items = self.items, []
        for item, done in items:
            if done is not None:
                done(result(item) if callable(result) else result, error)
        return len(items)


class FakeBackends:
    def __init__(self) -> None:
        for name in ("register", "unregister", "load_inbox", "delivered", "ack", "upstream", "status"):
            setattr(self, name, FakeQueue(name))
        self.on_epoch: Callable[[str], None] | None = None
        self.epoch = "epoch-1"
        self.takes: list[tuple[str, ipb.TakeSessionRequest]] = []
        self.take_handler: Callable[[str, ipb.TakeSessionRequest], ipb.TakenSession] | None = None

    async def take_session(self, target, request, deadline_s):
        self.takes.append((target, request))
        if self.take_handler is None:
            raise ConnectionError("no such instance")
        return self.take_handler(target, request)

    async def register_epoch(self) -> str:
        return self.epoch


class FakeApps:
    def __init__(self, *apps: App) -> None:
        self.apps = {a.id: a for a in apps}

    def get(self, app_id):
        return self.apps.get(app_id)

    def wait_refresh(self, callback) -> bool:
        callback(True)
        return True


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Client:
    """One client's link to the room."""

    def __init__(self, harness: RoomHarness) -> None:
        self.harness = harness
        self.conn = harness.conn_cls()
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)
        self._read = 0

    @property
    def session(self):
        return self.conn.session

    def send(self, op: Op, body: bytes | Any = b"", seq: int = 0) -> None:
        if not isinstance(body, bytes):
            body = body.SerializeToString()
        self.conn.data_received(encode(op, body, seq))

    def auth(self, uid: str = "alice", app: str = "app1", device_id: str = "", net: str = "", resume_token: str = "",
             apps: tuple[str, ...] = (), seq: int = 1, secret: str = SECRET, hint: int = 0, **extra) -> None:
        token, _ = tokens.sign(secret, uid, app, 3600, device_id=device_id)
        others = [tokens.sign(secret, uid, a, 3600)[0] for a in apps if a != app]
        self.send(Op.AUTH, cpb.Auth(token=token, uid=uid, device_id=device_id, apps=list(apps), net=net,
                                    resume_token=resume_token, heartbeat_hint_s=hint, tokens=others, **extra), seq)

    def frames(self) -> list[tuple[Op, Any, int]]:
        """(op, decoded body, seq) of everything written since the last call."""
        data = bytes(self.transport.out[self._read:])
        self._read = len(self.transport.out)
        out = []
        for f in self.transport.decoder.feed(data):
            cls = BODIES.get(f.op)
            out.append((Op(f.op), cls.FromString(f.body) if cls else f.body, f.seq))
        return out

    def pushed(self) -> list[int]:
        return [msg.msg_id for op, body, _ in self.frames() if op == Op.PUSH for msg in body.messages]

    def drop(self) -> None:
        """The link breaks (the peer went away)."""
        self.transport._end()

    def login(self, **kw) -> cpb.AuthOk:
        """AUTH, registration answered, AUTH_OK read; the inbox load answered empty."""
        self.auth(**kw)
        self.harness.backends.register.complete()
        frames = self.frames()
        ok = [body for op, body, _ in frames if op == Op.AUTH_OK]
        assert ok, f"no AUTH_OK: {frames}"
        self.harness.backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid))
        return ok[0]


class RoomHarness:
    def __init__(self, instance_id: str = "room-test:7100", grpc: str = "127.0.0.1:7200",
                 backends: FakeBackends | None = None, resume_secret: bytes = b"k" * 32, **cfg) -> None:
        self.clock = Clock()
        self.wall = [1_700_000_000_000]
        self.backends = backends or FakeBackends()
        self.apps = FakeApps(App("app1", SECRET, status_events=True), App("app2", SECRET, status_events=True),
                             App("quiet", SECRET))
        # attempts go to MarkDelivered at once unless a test asks for the wait for an ACK
        cfg.setdefault("delivery_report_ms", 0)
        self.cfg = dataclasses.replace(RoomConfig(heartbeat_min_s=1), **cfg)
        self.room = RoomInstance(self.cfg, instance_id, self.apps, self.backends, clock=self.clock,
                                 wall_ms=lambda: self.wall[0], grpc_address=grpc)
        self.room.resume_secret = resume_secret
        # connections of this harness talk to this room, whatever other rooms a test makes
        self.conn_cls = type("HarnessConnection", (ClientConnection,), {"__slots__": (), "room": self.room})

    def client(self) -> Client:
        return Client(self)

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.wall[0] += int(seconds * 1000)
        self.room._advance_wheel()


def message(msg_id: int, uid: str = "alice", app: str = "app1", payload: bytes = b"hi", seq: int = 0):
    return ipb.StoredMessage(msg_id=msg_id, uid=uid, app=app, payload=payload, created_ms=1, seq=seq or msg_id)

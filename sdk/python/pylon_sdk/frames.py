"""Client side of the wire protocol (proto/WIRE.md), pure: server frames → typed events,
requests → frame bytes. Framing itself is ``services.common.codec``; bodies are
``services.common.pb.client_pb2``. No sockets here."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from pylon_sdk.errors import ProtocolError, ServerError
from pylon_sdk.message import Message
from services.common import codec
from services.common.codec import Frame, Op
from services.common.pb import client_pb2 as pb

SDK_VERSION = "python/0.1.0"


@dataclass(slots=True, frozen=True)
class AuthOk:
    session_id: str
    resume_token: str
    heartbeat_s: int
    server_time_ms: int
    max_frame: int
    apps: tuple[str, ...]
    resumed: bool = False         # the session behind the AUTH's resume_token was taken over, nothing reloaded


@dataclass(slots=True, frozen=True)
class Pong:
    heartbeat_s: int


@dataclass(slots=True, frozen=True)
class Push:
    messages: tuple[Message, ...]


@dataclass(slots=True, frozen=True)
class UpstreamAck:
    seq: int
    accepted: bool


@dataclass(slots=True, frozen=True)
class Kick:
    reason: str


@dataclass(slots=True, frozen=True)
class Command:
    seq: int
    kind: str                     # RECONNECT (addresses) | BOUND (apps; answers BIND/UNBIND by seq) | future kinds
    addresses: tuple[str, ...]
    apps: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class Error:
    seq: int
    error: ServerError


ServerEvent = AuthOk | Pong | Push | UpstreamAck | Kick | Command | Error


def _parse(cls, frame: Frame):
    msg = cls()
    try:
        msg.ParseFromString(frame.body)
    except DecodeError as exc:
        raise ProtocolError(f"malformed {Op(frame.op).name} body: {exc}") from None
    return msg


def decode(frame: Frame) -> ServerEvent:
    """One server frame as an event; ``ProtocolError`` if the server sent a client-only op or garbage."""
    op = frame.op
    if op == Op.PUSH:
        body = _parse(pb.Push, frame)
        return Push(tuple(Message(m.msg_id, m.app, m.payload, m.created_ms, m.seq, m.broadcast)
                          for m in body.messages))
    if op == Op.PONG:
        return Pong(_parse(pb.Pong, frame).heartbeat_s)
    if op == Op.UPSTREAM_ACK:
        return UpstreamAck(frame.seq, _parse(pb.UpstreamAck, frame).accepted)
    if op == Op.ERROR:
        e = _parse(pb.Error, frame)
        return Error(frame.seq, ServerError(e.code, e.message, e.fatal, e.retry_after_ms))
    if op == Op.AUTH_OK:
        a = _parse(pb.AuthOk, frame)
        return AuthOk(a.session_id, a.resume_token, a.heartbeat_s, a.server_time_ms,
                      a.max_frame or codec.DEFAULT_MAX_FRAME, tuple(a.apps), a.resumed)
    if op == Op.KICK:
        return Kick(_parse(pb.Kick, frame).reason)
    if op == Op.COMMAND:
        c = _parse(pb.Command, frame)
        return Command(frame.seq, c.kind, tuple(c.addresses), tuple(c.apps))
    raise ProtocolError(f"server sent {Op(op).name}, which only clients send")


def auth(token: str, uid: str, device_id: str, apps: list[str], net: str, resume_token: str, heartbeat_hint_s: int,
         tokens: list[str]) -> bytes:
    return pb.Auth(token=token, uid=uid, device_id=device_id, apps=apps, net=net, resume_token=resume_token,
                   heartbeat_hint_s=heartbeat_hint_s, sdk=SDK_VERSION, tokens=tokens).SerializeToString()


def ping(propose_heartbeat_s: int = 0) -> bytes:
    return pb.Ping(propose_heartbeat_s=propose_heartbeat_s).SerializeToString()


def ack(msg_ids: list[int]) -> bytes:
    return pb.Ack(msg_ids=msg_ids).SerializeToString()


def bind(apps: list[str], tokens: list[str] = ()) -> bytes:
    return pb.Bind(apps=apps, tokens=tokens).SerializeToString()


def upstream(app: str, kind: str, payload: bytes) -> bytes:
    return pb.Upstream(app=app, kind=kind, payload=payload).SerializeToString()


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port); ``ProtocolError`` if it is neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"bad address {text[:80]!r} in COMMAND")
    return host.strip("[]"), int(port)

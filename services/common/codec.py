"""Sans-IO codec for the client wire protocol (proto/WIRE.md).

Bytes in, frames out; frames in, bytes out. No sockets, loops or clocks here: the room's
Protocol and the SDK only move bytes through this module.

Frame layout (all integers big-endian)::

    offset 0        4      5      6        8          12
           | length | ver  | op   | flags  | seq      | body (length - 12 bytes)
           | u32    | u8=1 | u8   | u16    | u32      | protobuf message for op
"""

from __future__ import annotations

import enum
import struct

HEADER = struct.Struct(">IBBHI")
HEADER_SIZE = HEADER.size  # 12
VERSION = 1
DEFAULT_MAX_FRAME = 64 * 1024  # DESIGN.md §3: default negotiated maximum
_MAX_U32 = 0xFFFFFFFF


class Op(enum.IntEnum):
    AUTH = 1
    AUTH_OK = 2
    PING = 3
    PONG = 4
    PUSH = 5
    ACK = 6
    BIND = 7
    UNBIND = 8
    UPSTREAM = 9
    UPSTREAM_ACK = 10
    KICK = 11
    COMMAND = 12
    ERROR = 13


OPS_FROM_CLIENT = frozenset({Op.AUTH, Op.PING, Op.ACK, Op.BIND, Op.UNBIND, Op.UPSTREAM})
OPS_FROM_SERVER = frozenset({Op.AUTH_OK, Op.PONG, Op.PUSH, Op.UPSTREAM_ACK, Op.KICK, Op.COMMAND, Op.ERROR})
_KNOWN_OPS = frozenset(int(op) for op in Op)


class ErrorCode(enum.IntEnum):
    """Stable codes carried in ERROR frames; the table in proto/WIRE.md is normative."""

    # the peer sent bytes that are not a valid frame (fatal)
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    UNKNOWN_OP = 4
    PROTOCOL_VIOLATION = 5  # a valid frame at the wrong time, e.g. PUSH before AUTH
    # authentication (fatal during AUTH, non-fatal for BIND)
    BAD_TOKEN = 10
    TOKEN_EXPIRED = 11
    UNKNOWN_APP = 12
    UID_MISMATCH = 13
    NOT_BOUND = 14  # the frame names an app this connection is not bound to (non-fatal)
    # access policy at connect (fatal; retry_after_ms says when to come back)
    ACCESS_DENIED = 15  # the source address is on the deny list, or not on the allow list
    # time limits (fatal)
    HANDSHAKE_TIMEOUT = 20
    IDLE_TIMEOUT = 21
    # load (fatal during AUTH; retry_after_ms says when to come back)
    OVERLOADED = 30
    RATE_LIMITED = 31
    UNAVAILABLE = 32
    SLOW_CONSUMER = 33
    TOO_MANY_CONNECTIONS = 34  # this source address holds as many (or as many unauthenticated) as allowed
    INSTANCE_FULL = 35  # the instance is at its connection cap: try another address
    # request-level failures (non-fatal)
    UPSTREAM_REJECTED = 40
    TOO_MANY_ITEMS = 41
    INTERNAL = 50


class FrameError(Exception):
    """The peer sent bytes that cannot be framed. Always the peer's fault; always fatal."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Frame:
    __slots__ = ("op", "flags", "seq", "body")

    def __init__(self, op: int, seq: int = 0, body: bytes = b"", flags: int = 0) -> None:
        self.op = op
        self.seq = seq
        self.body = body
        self.flags = flags

    def __repr__(self) -> str:
        name = Op(self.op).name if self.op in _KNOWN_OPS else str(self.op)
        return f"Frame({name}, seq={self.seq}, body={len(self.body)}B)"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Frame)
            and (self.op, self.seq, self.body, self.flags) == (other.op, other.seq, other.body, other.flags)
        )


def encode(op: int, body: bytes = b"", seq: int = 0, flags: int = 0) -> bytes:
    """One frame as bytes. Constant frames should be encoded once and reused."""
    return HEADER.pack(HEADER_SIZE + len(body), VERSION, op, flags, seq & _MAX_U32) + body


def split(buf: bytes, max_frame: int) -> tuple[list[Frame], int]:
    """Every complete frame at the start of ``buf`` and the number of bytes they used.

    A header that announces more than ``max_frame`` bytes is rejected as soon as the header is
    in, before the body is buffered, so a peer cannot make us hold more than ``max_frame`` bytes.
    Stateless, so a connection object needs only its leftover bytes, not a decoder object.
    """
    frames: list[Frame] = []
    pos = 0
    end = len(buf)
    unpack = HEADER.unpack_from
    while end - pos >= HEADER_SIZE:
        length, ver, op, flags, seq = unpack(buf, pos)
        if ver != VERSION:
            raise FrameError(ErrorCode.UNSUPPORTED_VERSION, f"unsupported protocol version {ver}")
        if length < HEADER_SIZE:
            raise FrameError(ErrorCode.MALFORMED_FRAME, f"frame length {length} is shorter than the header")
        if length > max_frame:
            raise FrameError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes exceeds the maximum of {max_frame}")
        if op not in _KNOWN_OPS:
            raise FrameError(ErrorCode.UNKNOWN_OP, f"unknown op {op}")
        if end - pos < length:
            break
        frames.append(Frame(op, seq, buf[pos + HEADER_SIZE : pos + length], flags))
        pos += length
    return frames, pos


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns every complete frame in ``data``.

    Partial frames are kept until the rest arrives; see ``split`` for the size bound.
    """

    __slots__ = ("max_frame", "_buf")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = b""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf + data if self._buf else bytes(data)
        try:
            frames, used = split(buf, self.max_frame)
        except FrameError:
            self._buf = b""
            raise
        self._buf = buf[used:] if used < len(buf) else b""
        return frames

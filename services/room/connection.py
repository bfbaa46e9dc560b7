"""One client connection: an ``asyncio.Protocol`` that is also the session (one slotted object).

It only moves bytes: frames are cut by the sans-IO codec and handed to the ``RoomInstance``,
which holds every rule. No task, timer or future per connection; deadlines live in the
instance's ``HeartbeatWheel``.

Connection states (the only transitions; anything else is a PROTOCOL_VIOLATION)::

    HANDSHAKE      --AUTH ok, registration queued-->  AUTHENTICATING
    HANDSHAKE      --bad AUTH / deadline / garbage-->  CLOSED
    AUTHENTICATING --registered: AUTH_OK sent------>  OPEN
    AUTHENTICATING --register failed / overloaded-->  CLOSED
    OPEN           --KICK / idle / slow / drain / error / peer closed-->  CLOSED
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from services.common.codec import FrameError, split

if TYPE_CHECKING:
    from services.room.core import RoomInstance


class State(enum.IntEnum):
    HANDSHAKE = 0
    AUTHENTICATING = 1
    OPEN = 2
    CLOSED = 3


HANDSHAKE, AUTHENTICATING, OPEN, CLOSED = State.HANDSHAKE, State.AUTHENTICATING, State.OPEN, State.CLOSED


class ClientConnection(asyncio.Protocol):
    # one per process; a class attribute costs no slot per connection
    room: RoomInstance

    __slots__ = (
        "transport", "buf", "state", "uid", "device_id", "apps", "sid", "net",
        "heartbeat_s", "deadline", "unacked", "registered", "paused",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = HANDSHAKE
        self.uid = ""
        self.device_id = ""
        self.apps: tuple[str, ...] = ()
        self.sid = 0                 # instance-local session number; session_id = f"{instance}/{sid}"
        self.net = ""
        self.heartbeat_s = 0
        self.deadline = 0            # wheel second after which the connection is closed
        self.unacked: dict[int, str] | None = None  # msg_id -> app, created on first delivery
        self.registered = False      # present in register (needs an unregister on close)
        self.paused = False          # write buffer over its limit: the client is not reading

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.room.on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        if self.buf:
            data = self.buf + data
        room = self.room
        try:
            frames, used = split(data, room.max_frame)
        except FrameError as exc:
            room.fail(self, exc.code, exc.message)
            return
        self.buf = data[used:] if used < len(data) else b""
        for frame in frames:
            if self.state == CLOSED:
                return
            room.handle(self, frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.on_lost(self)

    def pause_writing(self) -> None:
        # the write buffer passed its high-water mark: the client is not reading
        self.room.on_slow(self)

    def resume_writing(self) -> None:
        self.room.on_resume(self)

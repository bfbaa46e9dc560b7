"""One client connection: an ``asyncio.Protocol`` that only moves bytes.

Frames are cut by the sans-IO codec and handed, with the ``Session`` they belong to, to the
``RoomInstance``, which holds every rule (the session state machine is in ``session.py``). No
task, timer or future per connection; deadlines live in the instance's ``HeartbeatWheel``.
A resume may move a session from a new connection's placeholder to the session it resumes, so
``session`` is reassigned; a connection whose session has moved on is ignored when it ends.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from services.common.codec import FrameError, split
from services.room import metrics as m
from services.room.session import CLOSED, OPEN, Session

if TYPE_CHECKING:
    from services.room.access import SourceState
    from services.room.core import RoomInstance


class ClientConnection(asyncio.Protocol):
    # one per process; a class attribute costs no slot per connection
    room: RoomInstance

    __slots__ = ("transport", "buf", "session", "paused", "source", "preauth")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.session = Session(self)
        self.paused = False          # write buffer over its limit: the client is not reading
        self.source: SourceState | None = None  # its source address's access-policy state (counted there)
        self.preauth = False         # counted as unauthenticated in ``source``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.room.on_connect(self)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session.state == CLOSED or session.conn is not self:
            return
        if self.buf:
            data = self.buf + data
        room = self.room
        try:
            # before AUTH_OK only an AUTH is valid, and it is small: a client that has not
            # authenticated cannot make the room hold max_frame bytes for it
            frames, used = split(data, room.max_frame if session.state == OPEN else room.max_auth_frame)
        except FrameError as exc:
            room.fail(session, exc.code, exc.message)
            return
        self.buf = data[used:] if used < len(data) else b""
        for frame in frames:
            session = self.session  # an AUTH that resumed has moved this link to another session
            if session.state == CLOSED or session.conn is not self:
                return
            room.handle(session, frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.on_lost(self)

    def pause_writing(self) -> None:
        # the write buffer passed its high-water mark: the client is not reading
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class TlsClientConnection(ClientConnection):
    """The same protocol on the TLS port: the transport has decrypted the bytes already (it is
    made after the TLS handshake). Only counted apart."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        m.TLS_CONNECTIONS.inc()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        m.TLS_CONNECTIONS.dec()
        super().connection_lost(exc)

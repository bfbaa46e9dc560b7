"""The room's session: who is connected, what they are bound to, what they have not acked yet.

A ``Session`` outlives the TCP connection that opened it: when the link drops, the session stays
DETACHED for ``resume_grace_s`` (DESIGN.md §3 flash disconnect), holding its unacked messages
and what arrived meanwhile, and a client that comes back with its resume_token is attached to it
again, on this instance or (taken over through Room.TakeSession) on another one. The
``ClientConnection`` only moves bytes; every rule lives in ``RoomInstance``.

The state machine, written once (anything else is a bug, raised as ``InvalidTransition``)::

    HANDSHAKE      --AUTH verified, registration or take-over queued-->  AUTHENTICATING
    HANDSHAKE      --bad AUTH / handshake deadline / garbage / lost--->  CLOSED
    AUTHENTICATING --registered: AUTH_OK sent------------------------->  OPEN
    AUTHENTICATING --register failed / overloaded / deadline / lost--->  CLOSED
    OPEN           --link lost / silent past the heartbeat / slow----->  DETACHED
    OPEN           --KICK / replaced / fatal error / drain over------->  CLOSED
    DETACHED       --resumed on this instance------------------------->  OPEN
    DETACHED       --grace over / taken by another instance / KICK---->  CLOSED

With ``resume_grace_s = 0`` a lost link closes the session at once (no DETACHED).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.room.connection import ClientConnection


class State(enum.IntEnum):
    HANDSHAKE = 0
    AUTHENTICATING = 1
    OPEN = 2
    DETACHED = 3
    CLOSED = 4


class Event(enum.Enum):
    AUTH = "auth"              # AUTH verified; registration (or a take-over) is under way
    REGISTERED = "registered"  # register has the session: AUTH_OK goes out
    DETACH = "detach"          # the link is gone but the session is kept for a resume
    ATTACH = "attach"          # a resume on this instance gave the session a new link
    CLOSE = "close"            # the session ends: unregistered, offline event


HANDSHAKE, AUTHENTICATING, OPEN, DETACHED, CLOSED = (
    State.HANDSHAKE, State.AUTHENTICATING, State.OPEN, State.DETACHED, State.CLOSED)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (HANDSHAKE, Event.AUTH): AUTHENTICATING,
    (HANDSHAKE, Event.CLOSE): CLOSED,
    (AUTHENTICATING, Event.REGISTERED): OPEN,
    (AUTHENTICATING, Event.CLOSE): CLOSED,
    (OPEN, Event.DETACH): DETACHED,
    (OPEN, Event.CLOSE): CLOSED,
    (DETACHED, Event.ATTACH): OPEN,
    (DETACHED, Event.CLOSE): CLOSED,
}


class InvalidTransition(Exception):
    """A state change the table does not allow: a bug in the room, not the client's fault."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"{event.value} is not allowed in {state.name}") from None


class Held:
    """A message a session keeps until it is acked: its own copy of the fields a PUSH needs. A
    protobuf sub-message would keep the whole RPC message it came in (up to a thousand others)
    alive for as long as the session holds it. ``payload`` None: over the session's byte bound,
    only the id is kept (a resume reads the inbox for it). A broadcast's copy (``broadcast``,
    msg_id = the broadcast id) is one object shared by every session the fan-out wrote it to."""

    __slots__ = ("msg_id", "app", "payload", "created_ms", "seq", "broadcast")

    def __init__(self, msg_id: int, app: str, payload: bytes | None, created_ms: int, seq: int,
                 broadcast: bool = False) -> None:
        self.msg_id = msg_id
        self.app = app
        self.payload = payload
        self.created_ms = created_ms
        self.seq = seq
        self.broadcast = broadcast


class Session:
    __slots__ = (
        "conn", "state", "uid", "device_id", "apps", "sid", "net", "heartbeat_s", "deadline",
        "unacked", "pending", "registered", "connected_ms", "reload", "held_bytes", "filed_at",
    )

    def __init__(self, conn: ClientConnection | None = None) -> None:
        self.conn = conn             # the link it is attached to; None while DETACHED or CLOSED
        self.state = HANDSHAKE
        self.uid = ""
        self.device_id = ""
        self.apps: tuple[str, ...] = ()
        self.sid = 0                 # instance-local number; session_id = f"{instance}/{sid}"
        self.net = ""
        self.heartbeat_s = 0
        self.deadline = 0            # wheel second at which the current deadline passes; 0 = none
        # msg_id -> message written to the client and not acked yet (its body kept, within
        # held_bytes, so a resume writes it again without a storage reload); None while empty
        self.unacked: dict[int, Held] | None = None
        # messages that arrived while DETACHED, not written yet (attempt not counted yet)
        self.pending: list[Held] | None = None
        self.registered = False      # present in register (needs an unregister when it ends)
        self.connected_ms = 0        # wall-clock ms of the AUTH that opened it
        self.reload = False          # DETACHED and more arrived than it holds: a resume reads the inbox
        self.held_bytes = 0          # payload bytes kept in unacked and pending (bounded by resume_hold_bytes)
        self.filed_at = 0            # the wheel bucket of its live entry (HeartbeatWheel)

    def move(self, event: Event) -> None:
        self.state = next_state(self.state, event)

    def forget_held(self) -> None:
        self.unacked = self.pending = None
        self.held_bytes = 0

    @property
    def transport(self):
        conn = self.conn
        return conn.transport if conn is not None else None

"""Where a drained instance sends each client: the other instances of its region in the order
the dispatcher would rank them for that client (DESIGN.md §1: its sticky bucket's rendezvous
ranking), so a drain spreads its clients the way they would spread if this instance were gone,
instead of sending every one of them to the same address."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from services.common.codec import Op, encode
from services.common.discovery import Instance
from services.common.pb import client_pb2 as cpb
from services.dispatcher import routing
from services.room.session import Session

MAX_ADDRESSES = 8  # as many as the dispatcher hands out by default


def reconnect_frames(others: Sequence[Instance], region: str,
                     limit: int = MAX_ADDRESSES) -> Callable[[Session], bytes]:
    """A function giving a session its COMMAND RECONNECT frame. The frame depends only on the
    uid's sticky bucket, so it is built once per bucket."""
    rooms = [i for i in others if i.region == region and i.host and i.port > 0] or \
        [i for i in others if i.host and i.port > 0]
    table = routing._table(rooms) if rooms else None
    frames: dict[int, bytes] = {}
    empty = encode(Op.COMMAND, cpb.Command(kind="RECONNECT").SerializeToString())

    def frame_for(session: Session) -> bytes:
        if table is None:
            return empty  # nothing else alive: the client asks the dispatcher
        bucket = routing.sticky_bucket(session.uid)
        frame = frames.get(bucket)
        if frame is None:
            order = [rooms[i] for i in table.full_ranking(bucket)[:limit]]
            # full rooms would refuse the client: they go last, in the same order
            order.sort(key=routing.is_full)
            frame = frames[bucket] = encode(Op.COMMAND, cpb.Command(
                kind="RECONNECT", addresses=[routing.address(r) for r in order]).SerializeToString())
        return frame

    return frame_for


# Exit codes of an instance drained on an operator's request (Room.Drain), so that its
# supervisor tells it from a crash: start it again at once (a fresh process, not counted as a
# restart after a death), or leave its slot empty until the supervisor itself is restarted.
# 0 stays the exit of a SIGTERM drain; 75/76 follow sysexits' EX_TEMPFAIL and are not used
# elsewhere.
EXIT_DRAINED_RESTART = 75
EXIT_DRAINED_STAY = 76


class DrainRequest:
    """An operator's drain of this instance: ``ask`` sets the instance's stop event (the same
    path SIGTERM takes); ``exit_code`` is what the process then exits with (None: not asked)."""

    __slots__ = ("asked", "restart", "_stop")

    def __init__(self, stop) -> None:
        self._stop = stop  # the asyncio.Event serve() waits on
        self.asked = False
        self.restart = True

    def ask(self, restart: bool) -> bool:
        """Start the drain; False if the instance is stopping already (nothing changes)."""
        if self.asked or self._stop.is_set():
            return False
        self.asked, self.restart = True, restart
        self._stop.set()
        return True

    def exit_code(self) -> int | None:
        if not self.asked:
            return None
        return EXIT_DRAINED_RESTART if self.restart else EXIT_DRAINED_STAY

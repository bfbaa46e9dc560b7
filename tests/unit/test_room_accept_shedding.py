"""Accept-queue shedding: the decision from queue length and accept rate, and what a shed AUTH gets."""

from __future__ import annotations

import struct

from services.common.codec import HEADER_SIZE, ErrorCode, Op, encode, split
from services.common.pb import client_pb2 as cpb
from services.room import metrics as m
from services.room.config import RoomConfig
from services.room.connection import ClientConnection
from services.room.core import ACCEPT_RATE_FLOOR, MAX_SHED_RETRY_MS, RoomInstance


class Listener:
    """A listening socket as TCP_INFO shows it: tcpi_unacked = connections waiting for accept()."""

    def __init__(self) -> None:
        self.waiting = 0

    def getsockopt(self, level, option, size):
        raw = bytearray(size)
        struct.pack_into("II", raw, 24, self.waiting, 8192)
        return bytes(raw)


class Transport:
    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default  # no peer address: the per-address access policy does not apply


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_room(shed_s: float = 5.0):
    clock = Clock()
    room = RoomInstance(RoomConfig(accept_wait_shed_s=shed_s), "room-test", apps=None, backends=None, clock=clock)
    listener = Listener()
    room.listeners = [listener]
    return room, listener, clock


def tick(room, clock, accepted: int) -> None:
    clock.now += 1.0
    room.accepted += accepted
    room.check_accept_queue()


def test_a_queue_deeper_than_the_floor_rate_sheds_on_a_quiet_instance():
    room, listener, clock = make_room(shed_s=5.0)
    listener.waiting = int(ACCEPT_RATE_FLOOR * 5)  # exactly 5 s at the floor rate: not more
    tick(room, clock, 0)
    assert not room.shedding
    listener.waiting += 1
    tick(room, clock, 0)
    assert room.shedding
    assert m.ACCEPT_QUEUE.value() == listener.waiting and m.ACCEPT_SHEDDING.value() == 1
    listener.waiting = 10
    tick(room, clock, 0)
    assert not room.shedding and m.ACCEPT_SHEDDING.value() == 0


def test_a_fast_instance_tolerates_a_deeper_queue_and_one_stalled_second():
    room, listener, clock = make_room(shed_s=5.0)
    for _ in range(30):
        tick(room, clock, 2000)  # sustained 2,000 accepts/s
    assert 1900 < room.accept_rate <= 2000
    listener.waiting = 7000  # 3.5 s at that rate
    tick(room, clock, 2000)
    assert not room.shedding
    tick(room, clock, 0)  # a stalled second (a GC pause) leaves most of the estimate
    assert not room.shedding
    listener.waiting = 15000
    tick(room, clock, 2000)
    assert room.shedding


def test_the_first_second_of_a_storm_is_judged_by_its_own_rate():
    room, listener, clock = make_room(shed_s=5.0)
    tick(room, clock, 0)  # quiet: the smoothed rate is 0
    listener.waiting = 4000  # then a storm: 40 s at the floor rate, but 2 s at what it accepts
    tick(room, clock, 2000)
    assert room.accept_rate < 2000 * 0.25
    assert not room.shedding
    listener.waiting = 12000  # 6 s even at the last second's rate
    tick(room, clock, 2000)
    assert room.shedding


def test_a_shed_auth_is_told_to_come_back_when_the_queue_it_met_has_drained():
    room, listener, clock = make_room(shed_s=5.0)
    for _ in range(30):
        tick(room, clock, 1000)
    listener.waiting = 9000  # ~9 s at ~1,000 accepts/s
    tick(room, clock, 1000)
    assert room.shedding
    assert 8500 <= room.shed_retry_ms <= 9500
    listener.waiting = 10_000_000  # never more than the cap
    tick(room, clock, 1000)
    assert room.shed_retry_ms == MAX_SHED_RETRY_MS
    listener.waiting = 0  # never less than overload_retry_ms
    tick(room, clock, 1000)
    assert room.shed_retry_ms == room.cfg.overload_retry_ms


def test_zero_turns_shedding_off():
    room, listener, clock = make_room(shed_s=0)
    listener.waiting = 100_000
    tick(room, clock, 0)
    assert not room.shedding


def test_a_shed_auth_gets_overloaded_with_the_retry_after_before_any_token_work():
    room, listener, clock = make_room()
    room.shedding, room.shed_retry_ms = True, 7300
    conn = ClientConnection()
    t = Transport()
    conn.connection_made(t)
    # not even a valid AUTH body: a shedding room answers before decoding it
    conn.data_received(encode(Op.AUTH, b"\xff\xff not protobuf", 7))
    frames, _ = split(t.out, 1 << 20)
    assert [f.op for f in frames] == [Op.ERROR] and frames[0].seq == 7
    err = cpb.Error.FromString(t.out[HEADER_SIZE:])
    assert err.code == ErrorCode.OVERLOADED and err.fatal and err.retry_after_ms == 7300
    assert t.closed

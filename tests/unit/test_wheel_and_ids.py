from services.common.ids import IdGenerator, timestamp_ms
from services.room.wheel import HeartbeatWheel


class Conn:
    def __init__(self, deadline):
        self.deadline = deadline
        self.filed_at = 0


def test_wheel_expires_only_past_deadlines():
    wheel = HeartbeatWheel(now=100)
    a, b, c = Conn(103), Conn(105), Conn(110)
    for x in (a, b, c):
        wheel.add(x)
    expired = []
    wheel.advance(104, expired.append)
    assert expired == [a]
    b.deadline = 120  # a PING moved b's deadline: no wheel operation needed
    wheel.advance(110, expired.append)
    assert expired == [a, c]
    wheel.advance(119, expired.append)
    assert expired == [a, c]
    wheel.advance(120, expired.append)
    assert expired == [a, c, b]
    assert wheel.size == 0


def test_wheel_skips_closed_connections():
    wheel = HeartbeatWheel(now=0)
    a = Conn(2)
    wheel.add(a)
    a.deadline = 0
    expired = []
    wheel.advance(5, expired.append)
    assert expired == []


def test_ids_are_unique_increasing_and_time_ordered():
    t = [1_750_000_000.0]
    gen = IdGenerator(node=5, clock=lambda: t[0])
    ids = gen.batch(10_000)  # more than 4096 in one ms: borrows later ms, stays unique and increasing
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert abs(timestamp_ms(ids[0]) - 1_750_000_000_000) <= 1
    t[0] -= 5  # clock goes back: still increasing
    assert gen.next() > ids[-1]
    other = IdGenerator(node=6, clock=lambda: t[0])
    assert not set(other.batch(100)) & set(ids)


def test_a_deadline_moved_earlier_and_later_again_keeps_one_live_entry():
    wheel = HeartbeatWheel(now=100)
    c = Conn(200)
    wheel.add(c)
    for _ in range(20):  # a flaky link: an earlier deadline (grace), then a later one (resumed)
        c.deadline = 130
        wheel.add(c)
        c.deadline = 200
        wheel.add(c)
    assert wheel.size == 1
    expired = []
    wheel.advance(199, expired.append)
    assert expired == [] and wheel.size == 1
    wheel.advance(200, expired.append)
    assert expired == [c] and wheel.size == 0

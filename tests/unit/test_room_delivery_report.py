"""Delivery attempts wait delivery_report_ms for the client's ACK, which then carries them
(MessageRef.deliveries) instead of a MarkDelivered of their own."""
import asyncio

from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from tests.unit.room_harness import RoomHarness, message


def refs(queue) -> list[tuple[str, str, int, int]]:
    return [(r.uid, r.app, r.msg_id, r.deliveries) for r, _ in queue.items]


async def test_an_ack_within_the_wait_carries_the_attempt_and_no_mark_delivered_goes():
    h = RoomHarness(delivery_report_ms=5000)
    a = h.client()
    a.login()
    assert h.room.push([message(1), message(2)]) == 2
    assert a.pushed() == [1, 2]
    assert h.backends.delivered.items == [], "waiting for the ACK"
    a.send(Op.ACK, cpb.Ack(msg_ids=[1]))
    assert refs(h.backends.ack) == [("alice", "app1", 1, 1)]
    h.room.report_deliveries()  # what the timer does: the unacked one goes alone
    assert refs(h.backends.delivered) == [("alice", "app1", 2, 0)]
    a.send(Op.ACK, cpb.Ack(msg_ids=[2]))
    assert refs(h.backends.ack)[1] == ("alice", "app1", 2, 0), "its attempt was reported already"


async def test_the_timer_reports_what_no_ack_carried():
    h = RoomHarness(delivery_report_ms=10)
    a = h.client()
    a.login()
    h.room.push([message(3)])
    assert h.backends.delivered.items == []
    for _ in range(100):
        await asyncio.sleep(0.01)
        if h.backends.delivered.items:
            break
    assert refs(h.backends.delivered) == [("alice", "app1", 3, 0)]
    assert h.room._report_timer is None and h.room._unreported == {}


async def test_two_sessions_of_a_user_written_one_message_report_two_attempts_with_the_first_ack():
    h = RoomHarness(delivery_report_ms=5000)
    phone, tablet = h.client(), h.client()
    phone.login(device_id="phone")
    tablet.login(device_id="tablet")
    assert h.room.push([message(4)]) == 2
    tablet.send(Op.ACK, cpb.Ack(msg_ids=[4]))
    phone.send(Op.ACK, cpb.Ack(msg_ids=[4]))
    assert refs(h.backends.ack) == [("alice", "app1", 4, 2), ("alice", "app1", 4, 0)]
    h.room.report_deliveries()
    assert h.backends.delivered.items == []


async def test_a_session_handed_to_another_instance_reports_its_attempts_first():
    h = RoomHarness(delivery_report_ms=5000)
    a = h.client()
    ok = a.login(device_id="phone")
    h.room.push([message(5)])
    a.drop()
    taken = h.room.take_session(ipb.TakeSessionRequest(session_id=h.room.session_id(a.session), uid="alice",
                                                       to_instance="room-b:1"))
    assert taken.found and ok.resume_token
    assert refs(h.backends.delivered) == [("alice", "app1", 5, 0)], \
        "the ACK now reaches the other instance, which never saw this attempt"


async def test_a_drain_reports_every_attempt_still_waiting():
    h = RoomHarness(delivery_report_ms=5000)
    a = h.client()
    a.login()
    h.room.push([message(6), message(7)])
    h.room.close_all()
    assert sorted(r[2] for r in refs(h.backends.delivered)) == [6, 7]


async def test_zero_reports_every_attempt_at_once():
    h = RoomHarness(delivery_report_ms=0)
    a = h.client()
    a.login()
    h.room.push([message(8)])
    assert refs(h.backends.delivered) == [("alice", "app1", 8, 0)]
    a.send(Op.ACK, cpb.Ack(msg_ids=[8]))
    assert refs(h.backends.ack) == [("alice", "app1", 8, 0)]

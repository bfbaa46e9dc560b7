"""Broadcast fan-out in the room (services/room/fanout.py) on the socket-free harness."""

from __future__ import annotations

import asyncio

from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from services.room.session import DETACHED
from tests.unit.room_harness import RoomHarness, message


def bmsg(bid: int, app: str = "app1", payload: bytes = b"all", ttl_s: int = 60) -> ipb.StoredMessage:
    return ipb.StoredMessage(msg_id=bid, app=app, payload=payload, created_ms=1_700_000_000_000, ttl_s=ttl_s,
                             broadcast=True)


def pushes(client):
    return [list(body.messages) for op, body, _ in client.frames() if op == Op.PUSH]


async def test_a_broadcast_reaches_the_sessions_bound_to_its_app_and_no_other():
    h = RoomHarness()
    a, b, c = h.client(), h.client(), h.client()
    a.login(uid="a")
    b.login(uid="b", app="app2")
    c.login(uid="c", apps=("app1", "app2"))
    assert await h.room.fanout.broadcast(bmsg(500)) == 2
    (pa,), pb_, (pc,) = pushes(a), pushes(b), pushes(c)
    assert [(m.msg_id, m.broadcast, m.payload) for m in pa] == [(500, True, b"all")] and pb_ == []
    assert [m.msg_id for m in pc] == [500]
    assert h.backends.delivered.items == [], "a broadcast copy counts no delivery attempt"


async def test_broadcasts_back_to_back_leave_together_in_one_frame_per_session():
    h = RoomHarness()
    clients = [h.client() for _ in range(3)]
    for i, cl in enumerate(clients):
        cl.login(uid=f"u{i}")
    results = await asyncio.gather(*(h.room.fanout.broadcast(bmsg(600 + i)) for i in range(5)))
    assert results == [3] * 5
    for cl in clients:
        frames = pushes(cl)
        assert [m.msg_id for f in frames for m in f] == [600, 601, 602, 603, 604]
        assert len(frames) <= 2, "the first pass, then one frame for everything that queued behind it"
    assert h.room.fanout.passes <= 2


async def test_a_repeated_sub_task_answers_again_without_writing_twice():
    h = RoomHarness()
    a = h.client()
    a.login()
    assert await h.room.fanout.broadcast(bmsg(700)) == 1
    assert await h.room.fanout.broadcast(bmsg(700)) == 1
    assert [m.msg_id for f in pushes(a) for m in f] == [700]


async def test_a_broadcast_ack_is_stored_as_a_broadcast_ref_and_the_inbox_copy_is_not_written_again():
    h = RoomHarness()
    a = h.client()
    a.login()
    await h.room.fanout.broadcast(bmsg(800))
    assert [m.msg_id for f in pushes(a) for m in f] == [800]
    # the same broadcast arriving from an inbox load (the login raced the fan-out): not twice
    h.room.deliver(a.session, [bmsg(800)])
    assert pushes(a) == []
    a.send(Op.ACK, cpb.Ack(msg_ids=[800]))
    assert h.backends.ack.items == [], "broadcast acks gather for broadcast_ack_linger_ms"
    h.room.flush_broadcast_acks()
    refs = [r for r, _ in h.backends.ack.items]
    assert [(r.uid, r.app, r.msg_id, r.broadcast) for r in refs] == [("alice", "app1", 800, True)]
    assert a.session.unacked is None and a.session.held_bytes == 0


async def test_an_unacked_broadcast_loaded_at_login_is_written_and_acked_like_one():
    h = RoomHarness()
    a = h.client()
    a.auth()
    h.backends.register.complete()
    h.backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(5), bmsg(900)]))
    (frame,) = pushes(a)
    assert [(m.msg_id, m.broadcast) for m in frame] == [(5, False), (900, True)]
    assert [r.msg_id for r, _ in h.backends.delivered.items] == [5], "attempts for the unicast only"
    a.send(Op.ACK, cpb.Ack(msg_ids=[5, 900]))
    h.room.flush_broadcast_acks()
    assert [(r.msg_id, r.broadcast) for r, _ in h.backends.ack.items] == [(5, False), (900, True)]


async def test_broadcast_acks_of_several_frames_reach_storage_as_one_ref_per_user_and_app():
    h = RoomHarness(broadcast_ack_linger_ms=50)
    a = h.client()
    a.login(apps=("app1", "app2"))
    for bid, app in ((1301, "app1"), (1302, "app1"), (1303, "app2")):
        await h.room.fanout.broadcast(bmsg(bid, app=app))
    a.send(Op.ACK, cpb.Ack(msg_ids=[1301]))
    a.send(Op.ACK, cpb.Ack(msg_ids=[1302, 1303]))
    await asyncio.sleep(0.1)  # the linger's one timer for the instance
    got = sorted((r.app, r.msg_id, *r.more_broadcast_ids) for r, _ in h.backends.ack.items)
    assert got == [("app1", 1301, 1302), ("app2", 1303)] and all(r.broadcast for r, _ in h.backends.ack.items)


async def test_a_burst_of_broadcasts_waits_the_linger_and_leaves_as_one_frame():
    h = RoomHarness(broadcast_linger_ms=20)
    a = h.client()
    a.login()

    async def later(i):
        await asyncio.sleep(0.005 * i)
        return await h.room.fanout.broadcast(bmsg(1400 + i))

    assert await asyncio.gather(*(later(i) for i in range(4))) == [1] * 4
    assert [[m.msg_id for m in f] for f in pushes(a)] == [[1400, 1401, 1402, 1403]]


async def test_a_detached_session_holds_the_broadcast_for_its_resume_and_a_slow_one_is_dropped():
    h = RoomHarness()
    a, slow = h.client(), h.client()
    ok = a.login(uid="a")
    slow.login(uid="s")
    a.drop()
    assert a.session.state == DETACHED
    slow.conn.pause_writing()
    assert await h.room.fanout.broadcast(bmsg(1000)) == 0
    assert slow.transport.aborted, "a client that stopped reading loses its link, not the broadcast"
    back = h.client()
    back.auth(uid="a", resume_token=ok.resume_token)
    assert [m.msg_id for f in pushes(back) for m in f if m.broadcast] == [1000]


async def test_a_large_fan_out_runs_in_slices_that_yield_to_the_loop():
    h = RoomHarness()
    h.room.fanout.slice_sessions = 10
    clients = [h.client() for _ in range(35)]
    for i, cl in enumerate(clients):
        cl.login(uid=f"u{i}")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.get_running_loop().create_task(ticker())
    assert await h.room.fanout.broadcast(bmsg(1100)) == 35
    t.cancel()
    assert ticks >= 3, "the loop ran between slices"


async def test_pacing_spreads_a_fan_out_over_time():
    h = RoomHarness()
    clients = [h.client() for _ in range(20)]
    for i, cl in enumerate(clients):
        cl.login(uid=f"u{i}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await h.room.fanout.broadcast(bmsg(1200), max_per_s=100) == 20
    # slices of 10 (a tenth of a second's worth): the second is not written before it is due, at 0.1 s
    assert loop.time() - started >= 0.099


def test_the_app_index_follows_bind_unbind_and_close_and_is_exported_per_app():
    from services.room.metrics import _AppSessions

    h = RoomHarness()
    a, b = h.client(), h.client()
    a.login(uid="a")
    b.login(uid="b", apps=("app1", "app2"))
    assert {app: len(s) for app, s in h.room.by_app.items()} == {"app1": 2, "app2": 1}
    b.send(Op.UNBIND, cpb.Bind(apps=["app1"]))
    assert {app: len(s) for app, s in h.room.by_app.items()} == {"app1": 1, "app2": 1}
    (fam,) = _AppSessions(h.room).collect()
    assert sorted((s.labels["app"], s.value) for s in fam.samples) == [("app1", 1), ("app2", 1)]
    h.room.kick(["a"], [], "bye")
    b.drop()  # detached: still indexed (it gets broadcasts held for its resume)
    assert {app: len(s) for app, s in h.room.by_app.items()} == {"app2": 1}
    h.advance(h.cfg.resume_grace_s + 2)
    assert h.room.by_app == {}


def test_an_inbox_read_before_an_ack_does_not_write_the_acked_message_again():
    """The login's inbox load is in flight; a push writes message 7 meanwhile and the client acks
    it; the load, read before the ack reached saver, still lists 7: it is not written or counted
    again (a resume that raced its load used to count a second delivery attempt)."""
    h = RoomHarness()
    c = h.client()
    c.auth()
    h.backends.register.complete()
    c.frames()
    assert h.room.push([message(7)]) == 1
    assert c.pushed() == [7]
    c.send(Op.ACK, cpb.Ack(msg_ids=[7]))
    h.backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(7), message(8)]))
    assert c.pushed() == [8], "the acked one stays acked; the other is delivered"
    assert [r.msg_id for r, _ in h.backends.delivered.items] == [7, 8]
    assert h.room._loading == {}

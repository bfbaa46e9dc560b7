"""Every rule of the client protocol, on a socket-free room (tests/unit/room_harness.py)."""

from __future__ import annotations

import asyncio

from services.common.codec import ErrorCode, Op
from services.common.pb import client_pb2 as cpb
from services.common.pb import internal_pb2 as ipb
from services.room import resume
from services.room.session import (
    AUTHENTICATING,
    CLOSED,
    DETACHED,
    HANDSHAKE,
    OPEN,
    TRANSITIONS,
    Event,
    InvalidTransition,
    Session,
    State,
    next_state,
)
from tests.unit.room_harness import FakeBackends, RoomHarness, message


def ops(frames):
    return [op for op, _, _ in frames]


def error_of(frames):
    errs = [body for op, body, _ in frames if op == Op.ERROR]
    assert errs, f"no ERROR in {frames}"
    return errs[0]


# ---------------------------------------------------------------- the state table
def test_state_table_allows_only_the_written_transitions():
    assert next_state(HANDSHAKE, Event.AUTH) == AUTHENTICATING
    assert next_state(OPEN, Event.DETACH) == DETACHED
    assert next_state(DETACHED, Event.ATTACH) == OPEN
    for state in State:
        for event in Event:
            if (state, event) not in TRANSITIONS:
                try:
                    next_state(state, event)
                except InvalidTransition:
                    continue
                raise AssertionError(f"{state.name} --{event.value}--> allowed")
    assert not any(s == CLOSED for s, _ in TRANSITIONS), "nothing leaves CLOSED"


def test_session_and_connection_are_slotted():
    h = RoomHarness()
    c = h.client()
    assert not hasattr(c.conn, "__dict__") and not hasattr(Session(), "__dict__")


# ---------------------------------------------------------------- AUTH
def test_auth_registers_then_answers_auth_ok_and_loads_the_inbox():
    h = RoomHarness()
    c = h.client()
    c.auth(uid="alice", device_id="phone", net="WIFI", seq=9)
    assert c.session.state == AUTHENTICATING and c.frames() == []
    (registered, _), = h.backends.register.items
    assert registered.uid == "alice" and registered.device_id == "phone" and registered.apps == ["app1"]
    assert registered.connected_ms == h.wall[0], "presence carries when the session connected"
    assert registered.net == "wifi", "net is case-insensitive"
    h.backends.register.complete()
    (op, ok, seq), = c.frames()
    assert op == Op.AUTH_OK and seq == 9 and not ok.resumed and ok.resume_token
    assert ok.heartbeat_s == h.cfg.heartbeat_wifi_s, "WIFI gets the wifi interval"
    assert ok.session_id == registered.session_id
    assert [k.uid for k, _ in h.backends.load_inbox.items] == ["alice"]
    (online, _), = h.backends.status.items
    assert online.online and list(online.apps) == ["app1"]


def test_bad_token_expired_token_unknown_app_and_uid_mismatch_are_fatal_auth_errors():
    h = RoomHarness()
    cases = [(dict(secret="wrong"), ErrorCode.BAD_TOKEN), (dict(app="nope"), ErrorCode.UNKNOWN_APP)]
    for kw, code in cases:
        c = h.client()
        c.auth(**kw)
        assert error_of(c.frames()).code == code
        assert c.transport.closed and c.session.state == CLOSED
    c = h.client()
    token = __import__("services.common.tokens", fromlist=["sign"]).sign("s3cret-for-tests", "bob", "app1", 3600)[0]
    c.send(Op.AUTH, cpb.Auth(token=token, uid="alice"))
    assert error_of(c.frames()).code == ErrorCode.UID_MISMATCH
    assert h.backends.register.sent == []


def test_frames_before_auth_and_during_registration_are_protocol_violations():
    h = RoomHarness()
    c = h.client()
    c.send(Op.PING)
    assert error_of(c.frames()).code == ErrorCode.PROTOCOL_VIOLATION and c.transport.closed
    c = h.client()
    c.auth()
    c.send(Op.PING)
    assert error_of(c.frames()).code == ErrorCode.PROTOCOL_VIOLATION and c.transport.closed
    h.backends.register.complete()
    assert [s.session_id for s in h.backends.unregister.sent], "registered after it closed: taken back out"


def test_handshake_deadline_closes_a_silent_connection():
    h = RoomHarness(handshake_timeout_s=3)
    c = h.client()
    h.advance(3)
    assert c.frames() == [] and not c.transport.closed
    h.advance(1.5)
    assert error_of(c.frames()).code == ErrorCode.HANDSHAKE_TIMEOUT and c.transport.closed


def test_garbage_closes_the_connection_with_malformed_frame():
    h = RoomHarness()
    c = h.client()
    c.conn.data_received(b"\x00\x00\x00\x10\x07garbage-garbage")
    assert error_of(c.frames()).code in (ErrorCode.UNSUPPORTED_VERSION, ErrorCode.MALFORMED_FRAME)
    assert c.transport.closed


# ---------------------------------------------------------------- PUSH / ACK
def test_push_writes_one_frame_counts_attempts_and_ack_reaches_storage():
    h = RoomHarness()
    c = h.client()
    c.login()
    assert h.room.push([message(1), message(2), message(3, app="app2")]) == 2
    frames = c.frames()
    assert ops(frames) == [Op.PUSH], "messages of one batch leave as one PUSH frame"
    assert [m.msg_id for m in frames[0][1].messages] == [1, 2]
    assert [r.msg_id for r, _ in h.backends.delivered.items] == [1, 2]
    assert h.room.push([message(1)]) == 0, "already written and not acked: not again"
    c.send(Op.ACK, cpb.Ack(msg_ids=[1, 99]))
    assert [(r.uid, r.app, r.msg_id) for r, _ in h.backends.ack.items] == [("alice", "app1", 1)]
    c.send(Op.ACK, cpb.Ack(msg_ids=list(range(5000))), seq=4)
    err = error_of(c.frames())
    assert err.code == ErrorCode.TOO_MANY_ITEMS and not err.fatal and not c.transport.closed


def test_inbox_loaded_at_connect_is_delivered():
    h = RoomHarness()
    c = h.client()
    c.auth()
    h.backends.register.complete()
    h.backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(7), message(8)]))
    assert c.pushed() == [7, 8]


def test_ping_gets_pong_and_moves_the_interval_within_bounds():
    h = RoomHarness(heartbeat_max_s=600)
    c = h.client()
    c.login()
    c.send(Op.PING, cpb.Ping(propose_heartbeat_s=5000), seq=3)
    (op, pong, seq), = c.frames()
    assert op == Op.PONG and seq == 3 and pong.heartbeat_s == 600


# ---------------------------------------------------------------- BIND / UNBIND / UPSTREAM
def test_bind_adds_an_app_with_an_online_event_and_its_inbox_and_unbind_removes_it():
    h = RoomHarness()
    c = h.client()
    c.login()
    h.backends.status.items.clear()
    h.backends.register.items.clear()
    from services.common import tokens

    c.send(Op.BIND, cpb.Bind(apps=["app2"], tokens=[tokens.sign("s3cret-for-tests", "alice", "app2", 60)[0]]), seq=5)
    (op, cmd, seq), = c.frames()
    assert op == Op.COMMAND and cmd.kind == "BOUND" and list(cmd.apps) == ["app1", "app2"] and seq == 5
    (reg, _), = h.backends.register.items
    assert list(reg.apps) == ["app1", "app2"]
    (online, _), = h.backends.status.items
    assert online.online and list(online.apps) == ["app2"], "an app bound later gets its online event"
    assert list(h.backends.load_inbox.items[-1][0].apps) == ["app2"]
    h.room.push([message(4, app="app2")])
    c.frames()
    h.backends.status.items.clear()
    c.send(Op.UNBIND, cpb.Bind(apps=["app2"]), seq=6)
    assert list(c.frames()[0][1].apps) == ["app1"]
    (offline, _), = h.backends.status.items
    assert not offline.online and list(offline.apps) == ["app2"]
    assert 4 not in (c.session.unacked or {}), "an unbound app's messages are no longer held"


def test_bind_with_a_bad_token_is_a_non_fatal_error():
    h = RoomHarness()
    c = h.client()
    c.login()
    c.send(Op.BIND, cpb.Bind(apps=["app2"], tokens=["not-a-jwt"]), seq=2)
    err = error_of(c.frames())
    assert err.code == ErrorCode.BAD_TOKEN and not err.fatal and c.session.state == OPEN


def test_upstream_of_a_bound_app_is_forwarded_and_acked_and_of_another_refused():
    h = RoomHarness()
    c = h.client()
    c.login()
    c.send(Op.UPSTREAM, cpb.Upstream(app="app1", kind="chat", payload=b"x"), seq=11)
    (item, _), = h.backends.upstream.items
    assert item.uid == "alice" and item.kind == "chat" and item.session_id == h.room.session_id(c.session)
    h.backends.upstream.complete(True)
    (op, ack, seq), = c.frames()
    assert op == Op.UPSTREAM_ACK and ack.accepted and seq == 11
    c.send(Op.UPSTREAM, cpb.Upstream(app="app2", kind="chat"), seq=12)
    err = error_of(c.frames())
    assert err.code == ErrorCode.NOT_BOUND and not err.fatal


# ---------------------------------------------------------------- kick, idle, slow, drain
def test_kick_sends_kick_and_ends_the_session():
    h = RoomHarness()
    c = h.client()
    c.login()
    h.backends.status.items.clear()
    assert h.room.kick(["alice"], [], "bye") == 1
    (op, kick, _), = c.frames()
    assert op == Op.KICK and kick.reason == "bye" and c.transport.closed
    assert h.backends.unregister.sent and not h.backends.status.items[0][0].online
    assert h.room.sessions == 0 and h.room.detached == 0


def test_a_silent_session_is_closed_at_its_deadline_and_held_for_resume_until_the_grace_ends():
    h = RoomHarness(heartbeat_default_s=10, heartbeat_grace_s=2, resume_grace_s=30)
    c = h.client()
    c.login()
    h.backends.status.items.clear()
    h.advance(10 * 1.5 + 2)
    assert not c.transport.closed, "never early"
    h.advance(1.5)
    assert error_of(c.frames()).code == ErrorCode.IDLE_TIMEOUT and c.transport.closed
    assert c.session.state == DETACHED and h.backends.unregister.sent == [] and h.backends.status.items == []
    h.advance(31)
    assert c.session.state == CLOSED
    assert h.backends.unregister.sent and not h.backends.status.items[0][0].online


def test_a_slow_consumer_loses_its_link_not_its_messages():
    h = RoomHarness()
    c = h.client()
    ok = c.login()
    c.conn.pause_writing()
    h.room.push([message(1)])
    assert c.transport.aborted and c.session.state == DETACHED
    assert h.backends.delivered.items == [], "not written: no attempt counted"
    c2 = h.client()
    c2.auth(resume_token=ok.resume_token)
    assert c2.pushed() == [1]


def test_drain_sends_reconnect_and_holds_sessions_for_a_take_over():
    h = RoomHarness()
    c = h.client()
    c.login()
    h.room.draining = True
    n = h.room.drain(lambda s: __import__("services.common.codec", fromlist=["encode"]).encode(
        Op.COMMAND, cpb.Command(kind="RECONNECT", addresses=[f"{s.uid}:1"]).SerializeToString()))
    assert n == 1
    (op, cmd, _), = c.frames()
    assert cmd.kind == "RECONNECT" and list(cmd.addresses) == ["alice:1"] and c.transport.closed
    assert h.room.detached == 1 and h.backends.unregister.sent == []
    late = h.client()
    assert error_of(late.frames()).code == ErrorCode.UNAVAILABLE
    assert h.room.close_all() == 1 and h.backends.unregister.sent


def test_drain_order_is_each_clients_own_sticky_order_within_its_region():
    from services.common.codec import split
    from services.common.discovery import Instance
    from services.dispatcher import routing
    from services.room.drain import reconnect_frames

    rooms = [Instance("room", f"room-h{i}:7100", host=f"10.0.0.{i}", port=7100, region="eu") for i in range(6)]
    rooms.append(Instance("room", "room-us:7100", host="10.9.9.9", port=7100, region="us"))
    frame_for = reconnect_frames(rooms, "eu")
    firsts = set()
    for uid in (f"user{i}" for i in range(200)):
        s = Session()
        s.uid = uid
        (frame,), _ = split(frame_for(s), 1 << 20)
        addresses = list(cpb.Command.FromString(frame.body).addresses)
        assert "10.9.9.9:7100" not in addresses, "another region's instance"
        eu = rooms[:6]
        assert addresses[0] == routing.address(routing.sticky_room(uid, eu)), "the client's own sticky room first"
        firsts.add(addresses[0])
    assert len(firsts) == 6, "clients spread over the other instances"


# ---------------------------------------------------------------- duplicate login
def test_a_new_login_of_the_same_uid_and_device_replaces_the_old_one():
    h = RoomHarness()
    first = h.client()
    first.login(device_id="phone")
    other_device = h.client()
    other_device.login(device_id="tablet")
    h.backends.status.items.clear()
    second = h.client()
    second.login(device_id="phone")
    (op, kick, _), = first.frames()
    assert op == Op.KICK and kick.reason == "replaced" and first.transport.closed
    assert first.session.state == CLOSED and second.session.state == OPEN and other_device.session.state == OPEN
    events = [(e.online, e.session_id) for e, _ in h.backends.status.items]
    assert events[0] == (False, h.room.session_id(first.session)), "offline of the old before online of the new"
    no_device = [h.client(), h.client()]
    for c in no_device:
        c.login()
    assert all(c.session.state == OPEN for c in no_device), "without a device id nothing is replaced"


# ---------------------------------------------------------------- resume
def test_resume_on_the_same_instance_keeps_the_session_without_reload_or_another_attempt():
    h = RoomHarness()
    c = h.client()
    ok = c.login(device_id="phone")
    h.room.push([message(1)])
    assert c.pushed() == [1]
    h.backends.status.items.clear()
    c.drop()
    assert c.session.state == DETACHED and h.room.detached == 1
    assert h.backends.unregister.sent == [] and h.backends.status.items == [], "presence stays online"
    h.room.push([message(2)])  # arrives during the gap
    delivered_before = len(h.backends.delivered.sent)
    registered_before = len(h.backends.register.sent)
    loads_before = len(h.backends.load_inbox.sent)
    c2 = h.client()
    c2.auth(device_id="phone", resume_token=ok.resume_token)
    frames = c2.frames()
    assert frames[0][0] == Op.AUTH_OK and frames[0][1].resumed
    assert frames[0][1].resume_token and frames[0][1].session_id == ok.session_id
    assert [m.msg_id for op, body, _ in frames if op == Op.PUSH for m in body.messages] == [1, 2]
    assert [r.msg_id for r in h.backends.delivered.sent[delivered_before:]] == [2], "msg 1: no second attempt"
    assert len(h.backends.register.sent) == registered_before and len(h.backends.load_inbox.sent) == loads_before
    assert h.backends.status.items == [] and h.room.detached == 0 and h.room.sessions == 1
    c2.send(Op.ACK, cpb.Ack(msg_ids=[1, 2]))
    assert [r.msg_id for r, _ in h.backends.ack.items] == [1, 2]


def test_a_detached_session_holds_within_its_bounds_and_the_resume_reads_the_rest():
    h = RoomHarness(resume_hold_bytes=250)
    c = h.client()
    ok = c.login()
    c.drop()
    h.room.push([message(i, payload=b"x" * 100) for i in range(1, 5)])
    assert [m.msg_id for m in c.session.pending] == [1, 2] and c.session.reload
    loads = len(h.backends.load_inbox.sent)
    c2 = h.client()
    c2.auth(resume_token=ok.resume_token)
    assert c2.pushed() == [1, 2]
    assert len(h.backends.load_inbox.sent) == loads + 1, "what it could not hold comes from the inbox"
    h.backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(i) for i in range(1, 5)]))
    assert c2.pushed() == [3, 4], "what it already holds is not written twice"


def test_forged_foreign_expired_or_stale_tokens_fall_back_to_a_normal_login():
    h = RoomHarness(resume_grace_s=20)
    alice = h.client()
    ok = alice.login()
    alice.drop()
    forged = ok.resume_token[:-3] + ("AAA" if not ok.resume_token.endswith("AAA") else "BBB")
    bob_token = resume.mint(h.room.resume_secret, h.room.id, "", alice.session.sid, "bob", h.wall[0] // 1000)
    for token, uid in ((forged, "alice"), ("garbage", "alice"), (bob_token, "alice"), (ok.resume_token, "bob")):
        c = h.client()
        c.auth(uid=uid, resume_token=token)
        assert c.session.state == AUTHENTICATING and h.backends.register.items, f"{token!r} resumed"
        h.backends.register.complete()
        assert not [b for op, b, _ in c.frames() if op == Op.AUTH_OK][0].resumed
    h.advance(21)  # the held session's grace is over
    c = h.client()
    c.auth(resume_token=ok.resume_token)
    h.backends.register.complete()
    assert not c.frames()[0][1].resumed
    old = resume.mint(h.room.resume_secret, h.room.id, "", 1, "alice", h.wall[0] // 1000 - 8 * 86400)
    assert resume.verify(h.room.resume_secret, old, "alice", h.wall[0] // 1000, h.cfg.resume_token_max_age_s) is None


async def test_resume_on_another_instance_takes_the_session_over():
    a = RoomHarness("room-a:7100", grpc="10.0.0.1:7200")
    b = RoomHarness("room-b:7101", grpc="10.0.0.2:7201")
    b.backends.take_handler = lambda target, req: a.room.take_session(req)
    c = a.client()
    ok = c.login(device_id="phone")
    a.room.push([message(1)])
    c.drop()
    a.room.push([message(2)])
    a.backends.status.items.clear()
    c2 = b.client()
    c2.auth(device_id="phone", resume_token=ok.resume_token)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    (target, req), = b.backends.takes
    assert target == "10.0.0.1:7200" and req.session_id == a.room.session_id(c.session) and req.uid == "alice"
    assert a.room.detached == 0 and a.backends.unregister.sent == [] and a.backends.status.items == [], \
        "the old instance hands over silently"
    (reg, _), = b.backends.register.items
    assert reg.connected_ms == ok.server_time_ms, "presence keeps the original connect time"
    assert b.backends.unregister.sent == []
    b.backends.register.complete()
    frames = c2.frames()
    assert frames[0][0] == Op.AUTH_OK and frames[0][1].resumed
    assert [m.msg_id for op, body, _ in frames if op == Op.PUSH for m in body.messages] == [1, 2]
    assert [r.msg_id for r in b.backends.delivered.sent] == [2], "msg 1 was counted on the old instance"
    (old_entry,) = b.backends.unregister.sent
    assert old_entry.session_id == req.session_id and old_entry.instance == "room-a:7100"
    assert b.backends.status.sent == [], "no offline/online flap"
    assert b.backends.load_inbox.sent, "what reached the old instance during the hand-over is read once"


async def test_a_resume_to_a_dead_instance_is_a_normal_login():
    a = RoomHarness("room-a:7100", grpc="10.0.0.1:7200")
    b = RoomHarness("room-b:7101", grpc="10.0.0.2:7201")
    c = a.client()
    ok = c.login()
    c2 = b.client()
    c2.auth(resume_token=ok.resume_token)
    for _ in range(3):
        await asyncio.sleep(0)
    assert b.backends.takes and b.backends.register.items
    b.backends.register.complete()
    assert not c2.frames()[0][1].resumed


# ---------------------------------------------------------------- register recovery
async def test_a_new_register_epoch_registers_every_session_again_and_reads_their_inboxes():
    backends = FakeBackends()
    h = RoomHarness(backends=backends)
    clients = [h.client() for _ in range(3)]
    for i, c in enumerate(clients):
        c.login(uid=f"u{i}")
    clients[2].drop()  # detached sessions are registered again too
    h.room.on_register_epoch("e1")
    assert backends.register.items == [], "the first epoch seen is the baseline"
    h.room.on_register_epoch("e1")
    h.room.on_register_epoch("e2")
    await asyncio.sleep(0)
    assert sorted(s.uid for s, _ in backends.register.items) == ["u0", "u1", "u2"]
    backends.register.complete()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    keys = [k.uid for k, _ in backends.load_inbox.items]
    assert sorted(keys) == ["u0", "u1", "u2"]
    backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(5, uid=key.uid)]))
    assert clients[0].pushed() == [5]
    await asyncio.sleep(0)
    assert h.room._reregister_task is None


async def test_an_inbox_read_that_fails_after_a_register_epoch_change_is_tried_again(monkeypatch):
    """Pushes while register had lost its sessions found nobody online and were only stored; if the
    read that follows the re-registration fails (saver still rebuilding its Redis), they would
    wait for the client's next connect, however long it stays connected."""
    from services.room import core

    monkeypatch.setattr(core, "REREGISTER_RETRY_PAUSES_S", (0.0,))
    backends = FakeBackends()
    h = RoomHarness(backends=backends)
    c = h.client()
    c.login(uid="u0")
    h.room.on_register_epoch("e1")
    h.room.on_register_epoch("e2")
    await asyncio.sleep(0)
    backends.register.complete()
    for _ in range(3):
        await asyncio.sleep(0)
    assert [k.uid for k, _ in backends.load_inbox.items] == ["u0"]
    backends.load_inbox.complete(None, error=RuntimeError("saver: Redis unavailable"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert [k.uid for k, _ in backends.load_inbox.items] == ["u0"], "the failed read is tried again"
    backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(7, uid=key.uid)]))
    assert c.pushed() == [7]
    for _ in range(3):
        await asyncio.sleep(0)
    assert h.room._reregister_task is None


async def test_the_periodic_epoch_check_asks_register():
    backends = FakeBackends()
    h = RoomHarness(backends=backends, register_check_s=2)
    c = h.client()
    c.login()
    h.room.on_register_epoch("epoch-1")
    backends.epoch = "epoch-2"
    h.clock.now += 2.5
    h.room.check_register_epoch()
    for _ in range(3):
        await asyncio.sleep(0)
    assert h.room.register_epoch == "epoch-2"
    assert [s.uid for s, _ in backends.register.items] == ["alice"]


# ---------------------------------------------------------------- what a session holds
def test_held_messages_are_copies_within_a_byte_bound_and_a_resume_reads_the_rest():
    from services.room.session import Held

    h = RoomHarness(resume_hold_bytes=250)
    c = h.client()
    ok = c.login()
    h.room.push([message(i, payload=b"x" * 100) for i in range(1, 5)])
    assert c.pushed() == [1, 2, 3, 4]
    held = c.session.unacked
    assert all(type(v) is Held for v in held.values()), "not protobuf sub-messages: they pin the whole RPC"
    assert [i for i, v in held.items() if v.payload is not None] == [1, 2] and c.session.held_bytes == 200
    c.send(Op.ACK, cpb.Ack(msg_ids=[1]))
    assert c.session.held_bytes == 100
    c.drop()
    loads = len(h.backends.load_inbox.sent)
    c2 = h.client()
    c2.auth(resume_token=ok.resume_token)
    assert c2.pushed() == [2], "the one it kept a body of"
    assert len(h.backends.load_inbox.sent) == loads + 1, "the bodiless ones come from the inbox"
    h.backends.load_inbox.complete(lambda key: ipb.Inbox(uid=key.uid, messages=[message(3), message(4)]))
    assert c2.pushed() == [3, 4]
    c2.send(Op.ACK, cpb.Ack(msg_ids=[2, 3, 4]))
    assert c2.session.unacked is None and c2.session.held_bytes == 0, "an emptied dict is let go"


def test_an_answer_to_a_request_of_the_old_link_is_not_sent_on_the_new_one():
    h = RoomHarness()
    c = h.client()
    ok = c.login()
    c.send(Op.UPSTREAM, cpb.Upstream(app="app1", kind="chat"), seq=2)
    c.drop()
    c2 = h.client()
    c2.auth(resume_token=ok.resume_token)
    c2.frames()
    h.backends.upstream.complete(True)
    assert [op for op, _, _ in c2.frames()] == [], "seq 2 of the old link means nothing on the new one"


async def test_a_handed_over_session_is_unregistered_by_its_old_instance_too_after_a_while(monkeypatch):
    from services.room import core

    monkeypatch.setattr(core, "HANDOVER_UNREGISTER_S", 0.05)
    h = RoomHarness(instance_id="room-a:1")
    c = h.client()
    c.login()
    sid = h.room.session_id(c.session)
    taken = h.room.take_session(ipb.TakeSessionRequest(session_id=sid, uid="alice", to_instance="room-b:1"))
    assert taken.found and h.backends.unregister.sent == [], "not at once: presence stays online"
    await asyncio.sleep(0.2)
    assert [s.session_id for s in h.backends.unregister.sent] == [sid]


async def test_a_session_that_ends_while_its_registration_is_written_again_is_taken_out_again():
    backends = FakeBackends()
    h = RoomHarness(backends=backends)
    c = h.client()
    c.login()
    h.room.on_register_epoch("e1")
    h.room.on_register_epoch("e2")
    await asyncio.sleep(0)
    assert len(backends.register.items) == 1
    h.room.kick(["alice"], [], "bye")  # its unregister goes before the queued write
    unregisters = len(backends.unregister.sent)
    backends.register.complete()
    assert len(backends.unregister.sent) == unregisters + 1

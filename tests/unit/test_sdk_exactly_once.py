"""Exactly once to the handler: redelivery, resume, the dedupe file, ack after the handler, KICK replaced.

The client runs against the fake room of test_sdk_client (the real codec on loopback).
"""

import asyncio

import pytest
from pylon_sdk import ClientClosed, DedupeStoreError, Kicked, State
from pylon_sdk.dedupe import HandledIdsFile

from services.common.codec import Op
from services.common.pb import client_pb2 as pb
from tests.unit.test_sdk_client import FakeRoom, Recorder, make_client, until


@pytest.fixture
async def room():
    r = await FakeRoom().start()
    yield r
    await r.stop()


def ids(rec):
    return [m.msg_id for m in rec.messages]


async def reconnect(room, client, n):
    """Drop the newest connection and wait until the client is up on connection ``n``."""
    room.conns[-1].close()
    await until(lambda: len(room.conns) == n and client.connected and room.conns[-1].auth is not None)


async def test_redelivery_after_reconnect_is_handed_over_once_and_acked_twice(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    first = room.conns[0]
    first.push((1, "app1", b"a"), (2, "app1", b"b"))
    await until(lambda: sorted(first.acked()) == [1, 2])
    await reconnect(room, client, 2)
    second = room.conns[1]
    second.push((1, "app1", b"a"), (2, "app1", b"b"), (3, "app1", b"c"))  # inbox reloaded: 1 and 2 again
    await until(lambda: sorted(second.acked()) == [1, 2, 3])
    assert ids(rec) == [1, 2, 3]
    assert first.acked().count(1) + second.acked().count(1) == 2
    assert client.duplicates_dropped == 2
    await client.close()


async def test_resume_token_is_sent_at_every_reconnect_and_resumed_is_surfaced(room):
    room.resume = True
    client, rec = make_client([room])
    await client.start(timeout=5)
    assert room.conns[0].auth.resume_token == "" and client.resumed is False
    assert rec.events[0][1]["resumed"] is False
    await reconnect(room, client, 2)
    assert room.conns[1].auth.resume_token == "r1"
    assert client.resumed is True and client.resume_token == "r2"
    assert [d["resumed"] for k, d in rec.events if k == "connected"] == [False, True]
    room.resume = False                                   # grace period over: a normal login
    await reconnect(room, client, 3)
    assert room.conns[2].auth.resume_token == "r2"        # always the latest AUTH_OK's token
    assert client.resumed is False and client.resume_token == "r3"
    await client.close()


async def test_a_resumed_session_keeps_bound_apps_and_dedupe(room):
    room.resume = True
    client, rec = make_client([room])
    await client.start(timeout=5)
    assert await client.bind(["app2"], tokens=["tok2"]) == ["app1", "app2"]
    room.conns[0].push((5, "app2", b"x"))
    await until(lambda: room.conns[0].acked() == [5])
    await reconnect(room, client, 2)
    assert client.resumed
    assert list(room.conns[1].auth.apps) == ["app1", "app2"] and list(room.conns[1].auth.tokens) == ["tok2"]
    room.conns[1].push((5, "app2", b"x"), (6, "app2", b"y"))  # the resumed session rewrites what was unacked
    await until(lambda: sorted(room.conns[1].acked()) == [5, 6])
    assert ids(rec) == [5, 6]
    await client.close()


async def test_ack_is_never_sent_before_the_handler_returns(room):
    release = asyncio.Event()
    started = asyncio.Event()
    handled = []

    async def on_message(msg):
        started.set()
        await release.wait()
        handled.append(msg.msg_id)

    rec = Recorder()
    rec.on_message = on_message
    client, _ = make_client([room], rec)
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((1, "app1", b"a"))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)
    assert conn.acked() == [] and handled == []
    release.set()
    await until(lambda: conn.acked() == [1])
    assert handled == [1]
    await client.close()


async def test_a_handler_running_when_the_connection_drops_finishes_and_is_not_repeated(room):
    room.resume = True
    release = asyncio.Event()
    started = asyncio.Event()
    handled = []

    async def on_message(msg):
        started.set()
        await release.wait()
        handled.append(msg.msg_id)

    rec = Recorder()
    rec.on_message = on_message
    client, _ = make_client([room], rec)
    await client.start(timeout=5)
    room.conns[0].push((1, "app1", b"a"))
    await asyncio.wait_for(started.wait(), 5)
    await reconnect(room, client, 2)                      # the handler is still busy with 1
    assert client.resumed
    room.conns[1].push((1, "app1", b"a"))                 # unacked, so the resumed session sends it again
    await asyncio.sleep(0.05)
    release.set()
    await until(lambda: room.conns[1].acked() == [1, 1])  # once when the handler returned, once as a duplicate
    assert handled == [1] and room.conns[0].acked() == []
    await client.close()


async def test_handler_raising_is_neither_acked_nor_recorded_and_comes_again(room, tmp_path):
    path = tmp_path / "handled.db"
    client, rec = make_client([room], Recorder(fail_ids={2}), dedupe_path=path)
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((1, "app1", b"a"), (2, "app1", b"b"), (3, "app1", b"c"))
    await until(lambda: sorted(conn.acked()) == [1, 3])
    probe = HandledIdsFile(path, "alice")
    probe.open()
    assert [probe.contains("app1", i) for i in (1, 2, 3)] == [True, False, True]
    await reconnect(room, client, 2)
    room.conns[1].push((1, "app1", b"a"), (2, "app1", b"b"), (3, "app1", b"c"))
    await until(lambda: sorted(room.conns[1].acked()) == [1, 2, 3])
    assert ids(rec) == [1, 3, 2]
    assert probe.contains("app1", 2)
    probe.close()
    await client.close()


async def test_a_handler_whose_own_await_is_cancelled_fails_that_message_only(room):
    calls = []

    async def on_message(msg):
        calls.append(msg.msg_id)
        if msg.msg_id == 1:
            raise asyncio.CancelledError  # e.g. an inner wait_for gave up

    rec = Recorder()
    rec.on_message = on_message
    client, _ = make_client([room], rec)
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((1, "app1", b"a"), (2, "app1", b"b"))
    await until(lambda: conn.acked() == [2])
    conn.push((3, "app1", b"c"))
    await until(lambda: conn.acked() == [2, 3])
    assert calls == [1, 2, 3] and client.connected
    await client.close()


async def test_broadcast_copies_are_deduplicated_and_acked(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((900, "app1", b"all", True))
    await until(lambda: conn.acked() == [900])
    await reconnect(room, client, 2)
    room.conns[1].push((900, "app1", b"all", True), (901, "app1", b"one"))  # a lost ACK: the copy again
    await until(lambda: sorted(room.conns[1].acked()) == [900, 901])
    assert ids(rec) == [900, 901] and rec.messages[0].broadcast and not rec.messages[1].broadcast
    await client.close()


async def test_the_dedupe_file_survives_a_new_client_on_the_same_file(room, tmp_path):
    path = tmp_path / "handled.db"
    first, rec1 = make_client([room], dedupe_path=str(path))
    await first.start(timeout=5)
    room.conns[0].push((1, "app1", b"a"), (2, "app1", b"b"), (50, "app1", b"all", True))
    await until(lambda: sorted(room.conns[0].acked()) == [1, 2, 50])
    await first.close()                                   # the app process ends

    second, rec2 = make_client([room], dedupe_path=path)  # the app started again
    await second.start(timeout=5)
    conn = room.conns[1]
    conn.push((2, "app1", b"b"), (50, "app1", b"all", True), (3, "app1", b"c"))  # 2's ACK was lost
    await until(lambda: sorted(conn.acked()) == [2, 3, 50])
    assert ids(rec1) == [1, 2, 50] and ids(rec2) == [3]
    assert second.duplicates_dropped == 2
    await second.close()


async def test_the_id_is_in_the_file_before_its_ack_leaves(tmp_path):
    path = tmp_path / "handled.db"
    in_file_at_ack = []

    class CheckingRoom(FakeRoom):
        def _answer(self, conn, f):
            if f.op == Op.ACK:
                probe = HandledIdsFile(path, "alice")   # another connection: sees only what is committed
                probe.open()
                in_file_at_ack.extend(probe.contains("app1", i) for i in pb.Ack.FromString(f.body).msg_ids)
                probe.close()
            super()._answer(conn, f)

    room = await CheckingRoom().start()
    client, _ = make_client([room], dedupe_path=path)
    await client.start(timeout=5)
    room.conns[0].push((1, "app1", b"a"), (2, "app1", b"b"))
    await until(lambda: len(in_file_at_ack) == 2)
    assert in_file_at_ack == [True, True]
    await client.close()
    await room.stop()


async def test_a_dedupe_file_that_fails_is_reported_and_the_message_still_acked(room, tmp_path):
    client, rec = make_client([room], dedupe_path=tmp_path / "handled.db")
    await client.start(timeout=5)
    client._handled_file._db.close()                      # every read and write of the file now fails
    room.conns[0].push((1, "app1", b"a"))
    await until(lambda: room.conns[0].acked() == [1])
    assert ids(rec) == [1]
    assert any(k == "error" and isinstance(d, DedupeStoreError) for k, d in rec.events)
    room.conns[0].push((1, "app1", b"a"))                 # still known in memory
    await until(lambda: room.conns[0].acked() == [1, 1])
    assert ids(rec) == [1]
    await client.close()


async def test_an_unusable_dedupe_path_fails_start(tmp_path):
    client, _ = make_client([("127.0.0.1", 1)], dedupe_path=tmp_path / "missing-dir" / "handled.db")
    with pytest.raises(DedupeStoreError):
        await client.start(timeout=1)
    assert client.state is State.IDLE


async def test_kick_replaced_stops_reconnecting_and_is_reported(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    room.conns[0].send(Op.KICK, pb.Kick(reason="replaced"))
    assert await asyncio.wait_for(client.wait_closed(), 5) == "kicked: replaced"
    assert client.state is State.CLOSED and client.kick_reason == "replaced"
    assert isinstance(client.close_error, Kicked) and client.close_error.reason == "replaced"
    assert ("kicked", "kicked: replaced") in rec.events and rec.kinds()[-1] == "closed"
    assert client.resume_token == ""
    await asyncio.sleep(0.2)
    assert len(room.conns) == 1                           # no reconnect that would take the session back
    with pytest.raises(Kicked):
        await client.wait_connected(1)
    await client.close()


async def test_other_kick_reasons_also_stop(room):
    client, rec = make_client([room])
    await client.start(timeout=5)
    room.conns[0].send(Op.KICK, pb.Kick(reason="admin"))
    assert await asyncio.wait_for(client.wait_closed(), 5) == "kicked: admin"
    assert client.kick_reason == "admin" and isinstance(client.close_error, Kicked)
    await asyncio.sleep(0.2)
    assert len(room.conns) == 1
    await client.close()


async def test_kick_replaced_answering_auth_fails_start_without_trying_elsewhere(room):
    other = await FakeRoom().start()
    room.auth_kick = "replaced"
    client, _ = make_client([room, other])
    with pytest.raises(Kicked) as e:
        await client.start(timeout=5)
    assert isinstance(e.value, ClientClosed) and e.value.reason == "replaced"
    await asyncio.sleep(0.2)
    assert len(room.conns) == 1 and other.conns == []
    await client.close()
    await other.stop()


async def test_kick_replaced_drops_the_frames_not_yet_handed_over(room):
    release = asyncio.Event()
    handled = []

    async def on_message(msg):
        handled.append(msg.msg_id)
        await release.wait()

    rec = Recorder()
    rec.on_message = on_message
    client, _ = make_client([room], rec)
    await client.start(timeout=5)
    conn = room.conns[0]
    conn.push((1, "app1", b"a"))
    conn.push((2, "app1", b"b"))                          # waits behind 1; the new session owns it now
    await until(lambda: handled == [1])
    conn.send(Op.KICK, pb.Kick(reason="replaced"))
    await asyncio.wait_for(client.wait_closed(), 5)
    release.set()
    await asyncio.sleep(0.1)
    assert handled == [1] and conn.acked() == []
    await client.close()

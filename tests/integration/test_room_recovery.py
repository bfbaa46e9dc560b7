"""Sessions across instances and losses, with real processes: flash resume on another instance,
duplicate login across instances, presence through a drop, and register losing its Redis data
while clients stay connected. A system of its own (own Redis database and MySQL schema): these
tests flush its data."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis.asyncio as aioredis

from services.common import tokens
from services.common.codec import Op
from services.common.pb import client_pb2 as cpb
from services.launcher.cluster import LocalCluster, Ports
from tests.integration.conftest import TEST_ENV
from tests.integration.test_e2e import api, push, uid
from tests.stores import own_stores
from tests.wire_client import WireClient


@pytest.fixture(scope="module")
def system(backing_stores):
    common, tmp = backing_stores
    common = own_stores(common, "room_recovery", mysql_database="pylon_room_recovery")
    env = dict(TEST_ENV, PYLON_ROOM_RESUME_GRACE_S="20", PYLON_ROOM_REGISTER_CHECK_S="0.5")
    c = LocalCluster(os.path.join(tmp, "room-recovery"), Ports.free(2), room_instances=2, common=common, env=env)
    c.start()
    c.create_demo_app()
    try:
        yield c
    finally:
        c.stop()


async def login(system, user, room, device="phone", resume_token=""):
    token, _ = tokens.sign(system.app["secret"], user, system.app["id"], 300, device_id=device)
    host, port = system.room_addresses[room]
    c = await WireClient.connect(host, port)
    ok = await c.auth(token, user, device_id=device, resume_token=resume_token)
    return c, ok


async def online(system, user) -> bool:
    status, body = await api(system, "GET", f"/v1/users/{user}")
    assert status == 200, body
    return body["online"]


async def wait_for(check, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


async def test_resume_on_another_instance_gets_the_unacked_message_without_another_attempt(system):
    user = uid()
    c, ok = await login(system, user, room=0)
    (msg_id,) = await push(system, [user], "before the drop")
    _, p = await c.expect(Op.PUSH)
    assert [str(m.msg_id) for m in p.messages] == [msg_id]
    c.writer.transport.abort()  # the link breaks; no ACK was sent
    await asyncio.sleep(0.3)
    assert await online(system, user), "presence stays online while the session is held"
    (during,) = await push(system, [user], "during the gap")
    c2, ok2 = await login(system, user, room=1, resume_token=ok.resume_token)
    assert ok2.resumed and ok2.session_id != ok.session_id
    got = []
    while len(got) < 2:
        _, p = await c2.expect(Op.PUSH)
        got += [str(m.msg_id) for m in p.messages]
    assert got[:2] == [msg_id, during]
    status, state = await api(system, "GET", f"/v1/messages/{msg_id}")
    assert state["attempts"] == 1, f"the resume counted another delivery attempt: {state}"
    c2.send(Op.ACK, cpb.Ack(msg_ids=[int(msg_id), int(during)]))

    async def only_the_new_session():
        status, body = await api(system, "GET", f"/v1/users/{user}")
        sessions = body["sessions"]
        return [s["session_id"] for s in sessions] == [ok2.session_id] and sessions[0]["connected_ms"] > 0

    await wait_for(only_the_new_session, "the old instance's entry replaced by the new session")
    await c2.close()


async def test_a_forged_resume_token_is_a_normal_login(system):
    user = uid()
    c, ok = await login(system, user, room=0, resume_token="forged.token")
    assert not ok.resumed
    await c.close()


async def test_a_second_login_of_the_same_device_on_another_instance_replaces_the_first(system):
    user = uid()
    first, _ = await login(system, user, room=0)
    second, ok = await login(system, user, room=1)
    _, kick = await first.expect(Op.KICK)
    assert kick.reason == "replaced"
    assert await first.closed()
    (msg_id,) = await push(system, [user], "to the new one")
    _, p = await second.expect(Op.PUSH)
    assert [str(m.msg_id) for m in p.messages] == [msg_id]
    await second.close()


async def test_register_losing_its_data_does_not_cut_off_connected_clients(system):
    users = [uid() for _ in range(4)]
    clients = [(await login(system, u, room=i % 2))[0] for i, u in enumerate(users)]
    client = aioredis.Redis.from_url(system.common.redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()

    async def all_online():
        return all([await online(system, u) for u in users])

    await wait_for(all_online, "every connected client registered again without reconnecting")
    for u, c in zip(users, clients, strict=True):
        (msg_id,) = await push(system, [u], "after the loss")
        _, p = await c.expect(Op.PUSH, timeout=10)
        assert [str(m.msg_id) for m in p.messages] == [msg_id]
        await c.close()


async def test_a_link_that_drops_again_and_again_never_gets_its_message_parked(system):
    """Each reconnect resumes: the unacked message comes again without counting another
    delivery attempt, so twelve drops before the ACK (the park limit is 10) park nothing."""
    user = uid()
    c, ok = await login(system, user, room=0)
    (msg_id,) = await push(system, [user], "keep me")
    for i in range(12):
        _, p = await c.expect(Op.PUSH)
        assert [str(m.msg_id) for m in p.messages] == [msg_id]
        c.writer.transport.abort()
        c, ok = await login(system, user, room=i % 2, resume_token=ok.resume_token)
        assert ok.resumed
    _, p = await c.expect(Op.PUSH)
    c.send(Op.ACK, cpb.Ack(msg_ids=[int(msg_id)]))

    async def acked():
        status, state = await api(system, "GET", f"/v1/messages/{msg_id}")
        return state["state"] == "acked" and state["attempts"] == 1

    await wait_for(acked, f"message {msg_id} acked after one delivery attempt")
    await c.close()


async def test_a_message_acked_at_once_has_its_attempt_counted_by_the_ack(system):
    """The ACK arrives within room.delivery_report_ms: it reports the delivery attempt itself
    (no MarkDelivered), and saver counts it with the ack, in Redis and in MySQL."""
    user = uid()
    c, _ = await login(system, user, room=0)
    (msg_id,) = await push(system, [user], "ack me")
    _, p = await c.expect(Op.PUSH)
    assert [str(m.msg_id) for m in p.messages] == [msg_id]
    c.send(Op.ACK, cpb.Ack(msg_ids=[int(msg_id)]))

    async def acked():
        status, state = await api(system, "GET", f"/v1/messages/{msg_id}")
        return state["state"] == "acked" and state["attempts"] == 1

    await wait_for(acked, f"message {msg_id} acked with one delivery attempt")
    await asyncio.sleep(0.5)  # past delivery_report_ms: nothing reports the attempt a second time
    status, state = await api(system, "GET", f"/v1/messages/{msg_id}")
    assert (state["state"], state["attempts"]) == ("acked", 1), state
    await c.close()


async def test_three_logins_of_one_device_leave_one_session(system):
    user = uid()
    clients = []
    for i in range(3):
        c, _ = await login(system, user, room=i % 2)
        clients.append(c)
    for c in clients[:2]:
        _, kick = await c.expect(Op.KICK)
        assert kick.reason == "replaced"

    async def one_session():
        status, body = await api(system, "GET", f"/v1/users/{user}")
        return len(body["sessions"]) == 1

    await wait_for(one_session, "one session left for the device")
    await clients[2].close()

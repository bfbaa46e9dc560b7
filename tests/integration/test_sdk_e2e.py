"""The README path: the SDK routes through the dispatcher, gets a push, acks it; the demo client prints it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

from pylon_sdk import PylonClient

from tests.integration.test_e2e import api, message_state, push, wait_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def test_sdk_receives_acks_and_dedupes(cluster):
    user = "sdk-" + uuid.uuid4().hex[:8]
    status, body = await api(cluster, "POST", "/v1/tokens", {"uid": user, "device_id": "phone"})
    assert status == 200
    got: asyncio.Queue = asyncio.Queue()
    client = PylonClient(cluster.dispatcher_url, uid=user, token=body["token"], device_id="phone",
                         on_message=lambda m: got.put_nowait(m))
    await client.start(timeout=10)
    try:
        assert client.connected and client.session_id
        (msg_id,) = await push(cluster, [user], "via the sdk")
        msg = await asyncio.wait_for(got.get(), 10)
        assert str(msg.msg_id) == msg_id and msg.payload == b"via the sdk"
        await wait_state(cluster, msg_id, "acked")
        ok = await client.send_upstream(cluster.app["id"], "noop", b"x")
        assert ok is False  # the demo app has no webhook: refused, not lost silently
    finally:
        await client.close()


async def test_demo_client_prints_a_pushed_message(cluster, tmp_path):
    local = tmp_path / "local.json"
    cluster.write_local_json(str(local))
    user = "demo-" + uuid.uuid4().hex[:8]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "sdk/python/examples/demo_client.py"), "--uid", user,
        "--local-json", str(local), "--count", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        # push until the client is online to receive it (it may still be connecting)
        for _ in range(100):
            status, body = await api(cluster, "GET", f"/v1/users/{user}")
            if body.get("online"):
                break
            await asyncio.sleep(0.1)
        (msg_id,) = await push(cluster, [user], "hello from curl")
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        assert f"{msg_id} {cluster.app['id']} hello from curl" in out.decode()
        await wait_state(cluster, msg_id, "acked")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert json.loads(local.read_text())["app"]["id"] == cluster.app["id"]


async def test_sdk_dedupe_file_hands_nothing_over_twice_across_an_app_restart(cluster, tmp_path):
    """The app handles a message and stops before its ACK leaves; the restarted app (a new client
    on the same dedupe file) gets it again from the server and acks it without handing it over."""
    user = "sdk-" + uuid.uuid4().hex[:8]
    status, body = await api(cluster, "POST", "/v1/tokens", {"uid": user, "device_id": "phone"})
    assert status == 200
    path = tmp_path / "handled.db"
    first_got: list = []
    first: PylonClient | None = None

    async def stop_after_handling(msg):
        first_got.append(msg.msg_id)
        await first.close()       # the app ends right after its handler: the ACK never leaves

    first = PylonClient(cluster.dispatcher_url, uid=user, token=body["token"], device_id="phone",
                        on_message=stop_after_handling, dedupe_path=path)
    await first.start(timeout=10)
    (msg_id,) = await push(cluster, [user], "exactly once")
    await asyncio.wait_for(first.wait_closed(), 10)
    assert [str(i) for i in first_got] == [msg_id]
    assert await message_state(cluster, msg_id) != "acked"

    second_got: list = []
    second = PylonClient(cluster.dispatcher_url, uid=user, token=body["token"], device_id="phone",
                         on_message=second_got.append, dedupe_path=path)
    await second.start(timeout=10)
    try:
        await wait_state(cluster, msg_id, "acked", timeout=15)
        assert second_got == [] and second.duplicates_dropped == 1
    finally:
        await second.close()


async def test_sdk_resumes_after_a_flash_disconnect_and_hands_the_rewritten_message_over_once(cluster):
    """The connection drops after the handler returned but before its ACK could leave; the SDK
    reconnects with its resume_token, the room resumes the session and writes the unacked message
    again, and the SDK acks it without handing it over a second time."""
    user = "sdk-" + uuid.uuid4().hex[:8]
    status, body = await api(cluster, "POST", "/v1/tokens", {"uid": user, "device_id": "phone"})
    assert status == 200
    got: list = []
    client: PylonClient | None = None

    def drop_before_ack(msg):
        got.append(msg.msg_id)
        if len(got) == 1:
            client._link.close()  # the network goes, between the handler and its ACK

    client = PylonClient(cluster.dispatcher_url, uid=user, token=body["token"], device_id="phone",
                         on_message=drop_before_ack, reconnect_min_s=0.05, reconnect_max_s=0.2)
    await client.start(timeout=10)
    try:
        assert client.resumed is False and client.resume_token
        (msg_id,) = await push(cluster, [user], "once, across a resume")
        await wait_state(cluster, msg_id, "acked", timeout=15)
        assert client.connected and client.resumed is True
        assert [str(i) for i in got] == [msg_id] and client.duplicates_dropped == 1
    finally:
        await client.close()


async def test_sdk_replaced_by_a_second_copy_stops_and_leaves_the_session_to_it(cluster):
    user = "sdk-" + uuid.uuid4().hex[:8]
    status, body = await api(cluster, "POST", "/v1/tokens", {"uid": user, "device_id": "phone"})
    assert status == 200
    older = PylonClient(cluster.dispatcher_url, uid=user, token=body["token"], device_id="phone",
                        reconnect_min_s=0.05, reconnect_max_s=0.2)
    got: asyncio.Queue = asyncio.Queue()
    newer = PylonClient(cluster.dispatcher_url, uid=user, token=body["token"], device_id="phone",
                        on_message=lambda m: got.put_nowait(m))
    await older.start(timeout=10)
    try:
        await newer.start(timeout=10)
        assert await asyncio.wait_for(older.wait_closed(), 10) == "kicked: replaced"
        assert older.kick_reason == "replaced"
        (msg_id,) = await push(cluster, [user], "to the newer copy")
        msg = await asyncio.wait_for(got.get(), 10)
        assert str(msg.msg_id) == msg_id
        await asyncio.sleep(0.5)
        assert newer.connected and not older.connected   # the older one did not come back to fight
    finally:
        await older.close()
        await newer.close()

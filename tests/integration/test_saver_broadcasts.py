"""Stored broadcasts in a real `pylon saver` over the test Redis and MariaDB (through gRPC):
stored once, handed to every (uid, app) at load until that user acks it, expired by TTL, brought
back from MySQL after Redis lost its data."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.common.pb import internal_pb2 as pb
from services.saver.broadcasts import unpack_acked
from tests.integration.test_saver import db, load, new_id, redis, saver_cfg, saver_proc, stub  # noqa: F401


def bc(app: str = "bcapp", payload: bytes = b"to everyone", ttl_s: int = 60) -> pb.StoredMessage:
    return pb.StoredMessage(msg_id=new_id(), app=app, payload=payload, created_ms=int(time.time() * 1000),
                            ttl_s=ttl_s, broadcast=True)


def bc_ack(uid: str, b: pb.StoredMessage) -> pb.MessageRef:
    return pb.MessageRef(uid=uid, app=b.app, msg_id=b.msg_id, broadcast=True)


async def test_a_broadcast_is_loaded_by_every_user_of_its_app_until_acked(stub, db):  # noqa: F811
    b = bc()
    assert (await stub.StoreBroadcast(pb.StoreRequest(messages=[b]), timeout=5)).n == 1
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT app, payload FROM broadcasts WHERE id=%s", (b.msg_id,))
        assert await cur.fetchone() == ("bcapp", b"to everyone")
    for user in ("bc-u1", "bc-u2"):
        got = [m for m in await load(stub, user, apps=("bcapp",)) if m.msg_id == b.msg_id]
        assert len(got) == 1 and got[0].broadcast and got[0].payload == b"to everyone" and 0 < got[0].ttl_s <= 60
    assert not [m for m in await load(stub, "bc-u1", apps=("otherapp",)) if m.msg_id == b.msg_id]

    assert (await stub.Ack(pb.MessageRefs(refs=[bc_ack("bc-u1", b)]), timeout=5)).n == 1
    assert not [m for m in await load(stub, "bc-u1", apps=("bcapp",)) if m.msg_id == b.msg_id]
    assert [m.msg_id for m in await load(stub, "bc-u2", apps=("bcapp",)) if m.msg_id == b.msg_id] == [b.msg_id]
    # an ack again changes nothing; the durable copy is one row per user
    await stub.Ack(pb.MessageRefs(refs=[bc_ack("bc-u1", b)]), timeout=5)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM broadcast_acks WHERE app=%s AND uid=%s", (b"bcapp", b"bc-u1"))
        assert (await cur.fetchone())[0] == 1


async def test_acked_sets_are_a_union_one_row_per_user_and_ignore_what_is_no_live_broadcast(stub, db, redis):  # noqa: F811
    first, second = bc(), bc()
    await stub.StoreBroadcast(pb.StoreRequest(messages=[first, second]), timeout=5)
    await stub.Ack(pb.MessageRefs(refs=[bc_ack("bc-union", second)]), timeout=5)
    await stub.Ack(pb.MessageRefs(refs=[bc_ack("bc-union", first), pb.MessageRef(
        uid="bc-union", app="bcapp", msg_id=new_id(), broadcast=True)]), timeout=5)
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT acked FROM broadcast_acks WHERE app=%s AND uid=%s", (b"bcapp", b"bc-union"))
        rows = await cur.fetchall()
    assert len(rows) == 1
    assert {bid for bid, _ in unpack_acked(rows[0][0])} == {first.msg_id, second.msg_id}
    assert {int(f) for f in await redis.hkeys("pylon:bca:bc-union:bcapp")} == {first.msg_id, second.msg_id}
    left = {m.msg_id for m in await load(stub, "bc-union", apps=("bcapp",))}
    assert not left & {first.msg_id, second.msg_id}


async def test_unicast_and_broadcast_acks_in_one_call(stub):  # noqa: F811
    b = bc()
    await stub.StoreBroadcast(pb.StoreRequest(messages=[b]), timeout=5)
    uni = pb.StoredMessage(msg_id=new_id(), uid="bc-mix", app="bcapp", payload=b"just you",
                           created_ms=int(time.time() * 1000))
    await stub.Store(pb.StoreRequest(messages=[uni]), timeout=5)
    assert {m.msg_id for m in await load(stub, "bc-mix", apps=("bcapp",))} >= {b.msg_id, uni.msg_id}
    refs = [pb.MessageRef(uid="bc-mix", app="bcapp", msg_id=uni.msg_id), bc_ack("bc-mix", b)]
    assert (await stub.Ack(pb.MessageRefs(refs=refs), timeout=5)).n == 2
    left = {m.msg_id for m in await load(stub, "bc-mix", apps=("bcapp",))}
    assert b.msg_id not in left and uni.msg_id not in left


async def test_an_expired_broadcast_is_not_loaded(stub, redis):  # noqa: F811
    b = bc(ttl_s=1)
    await stub.StoreBroadcast(pb.StoreRequest(messages=[b]), timeout=5)
    assert [m.msg_id for m in await load(stub, "bc-late", apps=("bcapp",)) if m.msg_id == b.msg_id] == [b.msg_id]
    await stub.Ack(pb.MessageRefs(refs=[bc_ack("bc-late", b)]), timeout=5)
    await asyncio.sleep(1.2)
    assert not [m for m in await load(stub, "bc-late", apps=("bcapp",)) if m.msg_id == b.msg_id]
    assert str(b.msg_id).encode() not in await redis.hkeys("pylon:bca:bc-late:bcapp"), "pruned once expired"


@pytest.mark.parametrize("bad, why", [
    (pb.StoredMessage(msg_id=1, app="bcapp", payload=b"x", ttl_s=5), "broadcast must be true"),
    (pb.StoredMessage(msg_id=1, uid="someone", app="bcapp", payload=b"x", broadcast=True), "no uid"),
    (pb.StoredMessage(msg_id=1, app="bad app!", payload=b"x", broadcast=True), "valid app id"),
    (pb.StoredMessage(msg_id=1, app="bcapp", payload=b"x" * 70_000, broadcast=True), "over the limit"),
])
async def test_bad_broadcasts_are_refused_and_nothing_is_stored(stub, bad, why):  # noqa: F811
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StoreBroadcast(pb.StoreRequest(messages=[bc(), bad]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details()


async def test_live_broadcasts_and_acks_come_back_after_redis_lost_them(stub, redis):  # noqa: F811
    kept, acked = bc(payload=b"kept"), bc(payload=b"acked")
    await stub.StoreBroadcast(pb.StoreRequest(messages=[kept, acked]), timeout=5)
    await stub.Ack(pb.MessageRefs(refs=[bc_ack("bc-r1", acked)]), timeout=5)
    await redis.flushdb()
    deadline = time.monotonic() + 20
    while True:
        try:
            got = {m.msg_id for m in await load(stub, "bc-r1", apps=("bcapp",))}
            break
        except grpc.aio.AioRpcError as exc:  # UNAVAILABLE while the saver rebuilds Redis
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert kept.msg_id in got and acked.msg_id not in got
    assert acked.msg_id in {m.msg_id for m in await load(stub, "bc-r2", apps=("bcapp",))}

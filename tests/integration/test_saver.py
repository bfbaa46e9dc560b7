"""Saver service: a real `pylon saver` process over the test Redis and MariaDB, called through gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
import urllib.request

import aiomysql
import grpc
import pytest

from services.common import runtime
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.launcher import backing, procs
from tests.stores import own_stores

MAX_ATTEMPTS = 3
ACK_RETENTION_S = 3
_ids = itertools.count(int(time.time() * 1000) << 20)


def new_id() -> int:
    return next(_ids)


def _start(cfg, tmp, name: str, extra_env: dict[str, str] | None = None):
    port, mport = backing.free_port(), backing.free_port()
    env = procs.common_env(cfg, {"PYLON_SAVER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                                 "PYLON_SAVER_ACK_RETENTION_S": str(ACK_RETENTION_S),
                                 "PYLON_SAVER_SWEEP_INTERVAL_S": "0.5", **(extra_env or {})})
    proc = procs.start(name, ["saver", "--grpc-port", str(port), "--metrics-port", str(mport)], env=env,
                       log_dir=tmp, wait_for=[("127.0.0.1", port)], timeout_s=60)
    return proc, port, mport


@pytest.fixture(scope="module")
def saver_cfg(backing_stores):
    cfg, tmp = backing_stores
    return own_stores(cfg, "saver", mysql_database="pylon_saver_it"), tmp


@pytest.fixture(scope="module")
def saver_proc(saver_cfg):
    cfg, tmp = saver_cfg
    proc, port, mport = _start(cfg, tmp, "saver-it")
    yield proc, port, mport
    assert proc.stop() == 0, proc.log_text()[-3000:]
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]


@pytest.fixture(scope="module")
async def stub(saver_proc):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{saver_proc[1]}")
    yield pbg.SaverStub(channel)
    await channel.close()


@pytest.fixture(scope="module")
async def redis(saver_cfg):
    client = runtime.redis_client(saver_cfg[0].redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def db(saver_cfg, saver_proc):
    cfg = saver_cfg[0]
    pool = await aiomysql.create_pool(host=cfg.mysql_host, port=cfg.mysql_port, user=cfg.mysql_user,
                                      password=cfg.mysql_password, db=cfg.mysql_database, autocommit=True)
    yield pool
    pool.close()
    await pool.wait_closed()


async def row(db, msg_id: int):
    async with db.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT uid, app, seq, payload, state, attempts, acked_ms FROM messages WHERE msg_id=%s",
                          (msg_id,))
        return await cur.fetchone()


def msg(uid: str, app: str = "app1", payload: bytes = b"hello", ttl_s: int = 0, msg_id: int | None = None):
    return pb.StoredMessage(msg_id=msg_id or new_id(), uid=uid, app=app, payload=payload,
                            created_ms=int(time.time() * 1000), ttl_s=ttl_s)


def ref(m: pb.StoredMessage, uid: str | None = None, app: str | None = None) -> pb.MessageRef:
    return pb.MessageRef(uid=uid if uid is not None else m.uid, app=app if app is not None else m.app,
                         msg_id=m.msg_id)


async def load(stub, uid, apps=("app1",), limit=0):
    reply = await stub.LoadInbox(pb.LoadRequest(keys=[pb.InboxKey(uid=uid, apps=list(apps))],
                                                limit_per_inbox=limit), timeout=5)
    return list(reply.inboxes[0].messages)


async def state(stub, msg_id) -> pb.MessageState:
    return await stub.GetMessage(pb.GetMessageRequest(msg_id=msg_id), timeout=5)


async def test_store_assigns_seqs_in_request_order(stub, db):
    batch = [msg("sv-a"), msg("sv-b"), msg("sv-a"), msg("sv-a", app="app2"), msg("sv-a")]
    reply = await stub.Store(pb.StoreRequest(messages=batch), timeout=5)
    assert list(reply.seqs) == [1, 1, 2, 1, 3]
    again = await stub.Store(pb.StoreRequest(messages=[msg("sv-a")]), timeout=5)
    assert list(again.seqs) == [4]
    r = await row(db, batch[2].msg_id)
    assert r == ("sv-a", "app1", 2, b"hello", 0, 0, 0)


async def test_binary_payload_and_unusual_uid_round_trip(stub, db):
    payload = bytes(range(256)) * 4
    m = msg("sv-o'brien\\ü-%s", payload=payload)
    await stub.Store(pb.StoreRequest(messages=[m]), timeout=5)
    assert (await row(db, m.msg_id))[:4] == (m.uid, "app1", 1, payload)
    assert [(x.uid, x.payload) for x in await load(stub, m.uid)] == [(m.uid, payload)]


async def test_load_returns_lowest_seq_first_per_key_in_order(stub):
    first = [msg("sv-l1", payload=b"p%d" % i) for i in range(5)]
    other_app = msg("sv-l1", app="app2", payload=b"other")
    await stub.Store(pb.StoreRequest(messages=first + [other_app, msg("sv-l2")]), timeout=5)
    reply = await stub.LoadInbox(pb.LoadRequest(keys=[
        pb.InboxKey(uid="sv-l2", apps=["app1"]), pb.InboxKey(uid="sv-nobody", apps=["app1"]),
        pb.InboxKey(uid="sv-l1", apps=["app1", "app2"])], limit_per_inbox=3), timeout=5)
    assert [i.uid for i in reply.inboxes] == ["sv-l2", "sv-nobody", "sv-l1"]
    assert len(reply.inboxes[0].messages) == 1 and not reply.inboxes[1].messages
    got = reply.inboxes[2].messages
    assert [(m.app, m.payload, m.seq) for m in got] == [("app1", b"p0", 1), ("app1", b"p1", 2), ("app1", b"p2", 3),
                                                        ("app2", b"other", 1)]
    assert got[0].msg_id == first[0].msg_id and got[0].uid == "sv-l1"
    assert got[0].created_ms == first[0].created_ms
    assert 7 * 86400 - 5 < got[0].ttl_s <= 7 * 86400  # default ttl


async def test_lifecycle_stored_delivered_acked(stub, db, redis):
    m = msg("sv-life", payload=b"body")
    await stub.Store(pb.StoreRequest(messages=[m]), timeout=5)
    s = await state(stub, m.msg_id)
    assert (s.found, s.state, s.uid, s.app, s.attempts, s.seq) == (True, "stored", "sv-life", "app1", 0, 1)
    assert s.expires_ms == m.created_ms + 7 * 86400 * 1000

    assert (await stub.MarkDelivered(pb.MessageRefs(refs=[ref(m)]), timeout=5)).n == 1
    s = await state(stub, m.msg_id)
    assert (s.state, s.attempts) == ("delivered", 1)
    assert [x.msg_id for x in await load(stub, "sv-life")] == [m.msg_id]  # delivered but unacked: still pending

    assert (await stub.Ack(pb.MessageRefs(refs=[ref(m), ref(m)]), timeout=5)).n == 1  # duplicate ack counts once
    s = await state(stub, m.msg_id)
    assert s.state == "acked" and s.acked_ms >= m.created_ms
    assert await load(stub, "sv-life") == []
    assert await redis.hget(f"pylon:m:{m.msg_id}", "payload") is None
    assert 0 < await redis.ttl(f"pylon:m:{m.msg_id}") <= ACK_RETENTION_S
    r = await row(db, m.msg_id)
    assert (r[3], r[4], r[6]) == (b"", 2, s.acked_ms)
    assert (await stub.Ack(pb.MessageRefs(refs=[ref(m)]), timeout=5)).n == 0
    assert (await stub.MarkDelivered(pb.MessageRefs(refs=[ref(m)]), timeout=5)).n == 0

    # once Redis forgot the record, the MySQL row answers
    await redis.delete(f"pylon:m:{m.msg_id}")
    s = await state(stub, m.msg_id)
    assert (s.found, s.state, s.acked_ms, s.seq) == (True, "acked", r[6], 1)


async def test_ack_of_someone_elses_message_is_ignored(stub, redis):
    m = msg("sv-owner")
    await stub.Store(pb.StoreRequest(messages=[m]), timeout=5)
    refs = [ref(m, uid="sv-intruder"), ref(m, app="app2")]
    assert (await stub.Ack(pb.MessageRefs(refs=refs), timeout=5)).n == 0
    assert (await stub.MarkDelivered(pb.MessageRefs(refs=refs), timeout=5)).n == 0
    assert (await state(stub, m.msg_id)).state == "stored"
    assert [x.msg_id for x in await load(stub, "sv-owner")] == [m.msg_id]
    assert not await redis.exists("pylon:in:sv-intruder:app1")


async def test_an_ack_reports_the_attempts_the_room_had_not_reported(stub, db, redis):
    """A room that got the ACK within its delivery_report_ms sends no MarkDelivered: the ack's
    ``deliveries`` are counted with it, in Redis and in the same MySQL UPDATE."""
    m, other = msg("sv-ackd"), msg("sv-ackd")
    await stub.Store(pb.StoreRequest(messages=[m, other]), timeout=5)
    carrying = pb.MessageRef(uid=m.uid, app=m.app, msg_id=m.msg_id, deliveries=2)
    intruder = pb.MessageRef(uid="sv-intruder", app=other.app, msg_id=other.msg_id, deliveries=5)
    assert (await stub.Ack(pb.MessageRefs(refs=[carrying, intruder]), timeout=5)).n == 1
    s = await state(stub, m.msg_id)
    assert (s.state, s.attempts) == ("acked", 2)
    r = await row(db, m.msg_id)
    assert (r[4], r[5]) == (2, 2), "state acked, attempts 2 in MySQL"
    assert (await state(stub, other.msg_id)).attempts == 0, "someone else's ack counts nothing"
    assert (await row(db, other.msg_id))[5] == 0
    again = pb.MessageRef(uid=m.uid, app=m.app, msg_id=m.msg_id, deliveries=1)
    assert (await stub.Ack(pb.MessageRefs(refs=[again]), timeout=5)).n == 0
    assert (await state(stub, m.msg_id)).attempts == 2, "an ack that does not apply counts nothing"
    assert (await row(db, m.msg_id))[5] == 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Ack(pb.MessageRefs(refs=[pb.MessageRef(uid=m.uid, app=m.app, msg_id=other.msg_id,
                                                          deliveries=1001)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deliveries" in info.value.details()


async def test_ttl_expiry(stub, redis):
    short, long = msg("sv-ttl", ttl_s=1), msg("sv-ttl", ttl_s=60)
    await stub.Store(pb.StoreRequest(messages=[short, long]), timeout=5)
    assert 50 < await redis.ttl("pylon:in:sv-ttl:app1") <= 60  # the inbox lives as long as its longest message
    assert len(await load(stub, "sv-ttl")) == 2
    await asyncio.sleep(1.1)
    assert (await state(stub, short.msg_id)).state == "expired"
    assert [x.msg_id for x in await load(stub, "sv-ttl")] == [long.msg_id]
    assert await redis.zrange("pylon:in:sv-ttl:app1", 0, -1) == [str(long.msg_id).encode()]  # pruned
    assert (await state(stub, long.msg_id)).state == "stored"


async def test_parked_after_max_attempts(stub, db):
    m, other = msg("sv-poison"), msg("sv-poison")
    await stub.Store(pb.StoreRequest(messages=[m, other]), timeout=5)
    for attempt in range(1, MAX_ATTEMPTS):
        assert (await stub.MarkDelivered(pb.MessageRefs(refs=[ref(m)]), timeout=5)).n == 1
        assert (await state(stub, m.msg_id)).attempts == attempt
    assert (await stub.MarkDelivered(pb.MessageRefs(refs=[ref(m)]), timeout=5)).n == 1
    s = await state(stub, m.msg_id)
    assert (s.state, s.attempts) == ("parked", MAX_ATTEMPTS)
    assert [x.msg_id for x in await load(stub, "sv-poison")] == [other.msg_id]
    assert (await stub.MarkDelivered(pb.MessageRefs(refs=[ref(m)]), timeout=5)).n == 0
    r = await row(db, m.msg_id)
    assert (r[4], r[5]) == (3, MAX_ATTEMPTS)


async def test_retried_store_keeps_one_row(stub, db):
    m = msg("sv-retry")
    assert list((await stub.Store(pb.StoreRequest(messages=[m]), timeout=5)).seqs) == [1]
    assert list((await stub.Store(pb.StoreRequest(messages=[m]), timeout=5)).seqs) == [2]
    assert [x.seq for x in await load(stub, "sv-retry")] == [2]
    assert (await row(db, m.msg_id))[2] == 2


async def test_unknown_message_not_found(stub):
    s = await state(stub, 12345)
    assert (s.found, s.msg_id) == (False, 12345)


async def test_sweep_deletes_long_expired_rows(stub, db):
    m = msg("sv-sweep", ttl_s=1)
    await stub.Store(pb.StoreRequest(messages=[m]), timeout=5)
    assert await row(db, m.msg_id) is not None
    deadline = time.monotonic() + 1 + ACK_RETENTION_S + 5
    while await row(db, m.msg_id) is not None:
        assert time.monotonic() < deadline, "sweep did not delete the expired row"
        await asyncio.sleep(0.2)


async def insert_stats(metrics_port: int, op: str = "insert") -> tuple[float, float]:
    """(statements, rows) of one kind of MySQL write so far, from the saver's /metrics."""
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode())
    stats = {"count": 0.0, "sum": 0.0}
    for line in body.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'pylon_saver_mysql_batch_rows_{part}{{op="{op}"}}'):
                stats[part] = float(line.split()[-1])
    return stats["count"], stats["sum"]


async def test_concurrent_stores_share_mysql_inserts(stub, saver_proc):
    statements0, rows0 = await insert_stats(saver_proc[2])
    batches = [[msg(f"sv-c{i}-{j}") for j in range(20)] for i in range(50)]
    replies = await asyncio.gather(*(stub.Store(pb.StoreRequest(messages=b), timeout=10) for b in batches))
    assert all(list(r.seqs) == [1] * 20 for r in replies)
    statements1, rows1 = await insert_stats(saver_proc[2])
    assert rows1 - rows0 == 1000
    assert statements1 - statements0 < 50  # rows of several RPCs share one INSERT


async def test_concurrent_deliveries_and_acks_share_mysql_updates(stub, saver_proc, db):
    batches = [[msg(f"sv-u{i}") for _ in range(10)] for i in range(40)]
    await asyncio.gather(*(stub.Store(pb.StoreRequest(messages=b), timeout=10) for b in batches))
    for op, call in (("deliver", stub.MarkDelivered), ("ack", stub.Ack)):
        statements0, rows0 = await insert_stats(saver_proc[2], op)
        replies = await asyncio.gather(*(call(pb.MessageRefs(refs=[ref(m) for m in b]), timeout=10) for b in batches))
        assert [r.n for r in replies] == [10] * 40
        statements1, rows1 = await insert_stats(saver_proc[2], op)
        assert rows1 - rows0 == 400
        assert statements1 - statements0 < 40, op  # refs of several RPCs share one UPDATE
    r = await row(db, batches[-1][-1].msg_id)
    assert (r[4], r[5]) == (2, 1)  # acked, after one counted delivery


@pytest.mark.parametrize("call", [
    lambda st: st.Store(pb.StoreRequest(messages=[msg("x") for _ in range(5001)]), timeout=10),
    lambda st: st.Store(pb.StoreRequest(messages=[msg("x", app="Bad:App")]), timeout=5),
    lambda st: st.Store(pb.StoreRequest(messages=[msg("")]), timeout=5),
    lambda st: st.Store(pb.StoreRequest(messages=[msg("x", payload=b"x" * 65537)]), timeout=5),
    lambda st: st.Store(pb.StoreRequest(messages=[msg("x", msg_id=7), msg("y", msg_id=7)]), timeout=5),
    lambda st: st.Store(pb.StoreRequest(messages=[pb.StoredMessage(msg_id=0, uid="x", app="app1")]), timeout=5),
    lambda st: st.Ack(pb.MessageRefs(refs=[pb.MessageRef(uid="x", app="app1", msg_id=1)] * 5001), timeout=5),
    lambda st: st.MarkDelivered(pb.MessageRefs(refs=[pb.MessageRef(uid="x", app="", msg_id=1)]), timeout=5),
    lambda st: st.LoadInbox(pb.LoadRequest(keys=[pb.InboxKey(uid="x", apps=["a"])] * 5001), timeout=5),
    lambda st: st.LoadInbox(pb.LoadRequest(keys=[pb.InboxKey(uid="x", apps=[f"a{i}" for i in range(65)])]),
                            timeout=5),
    lambda st: st.GetMessage(pb.GetMessageRequest(msg_id=0), timeout=5),
])
async def test_bad_requests_are_invalid_argument(stub, call):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(stub)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("saver.")


async def test_dead_redis_is_unavailable(saver_cfg):
    cfg, tmp = saver_cfg
    dead = dataclasses.replace(cfg, redis_url=f"redis://127.0.0.1:{backing.free_port()}/0")
    proc, port, _ = _start(dead, tmp, "saver-deadredis")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.SaverStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Store(pb.StoreRequest(messages=[msg("sv-dead")]), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Redis unavailable" in info.value.details()
    finally:
        assert proc.stop() == 0
    text = proc.log_text()
    assert "Traceback" not in text and text.count("Redis unavailable") == 1, text


async def test_dead_mysql_is_unavailable(saver_cfg):
    """A private MariaDB that dies under a running saver: Store answers UNAVAILABLE, reads from Redis go on."""
    cfg, tmp = saver_cfg
    data = os.path.join(tmp, "mariadb-doomed")
    mport = backing.free_port()
    maria = backing.start_mariadb(data, mport)
    try:
        own = dataclasses.replace(cfg, mysql_port=mport)
        proc, port, _ = _start(own, tmp, "saver-deadmysql", {"PYLON_SAVER_MYSQL_TIMEOUT_S": "3"})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pbg.SaverStub(channel)
                kept = msg("sv-mysqldown")
                await stub.Store(pb.StoreRequest(messages=[kept]), timeout=5)
                maria.stop()
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Store(pb.StoreRequest(messages=[msg("sv-mysqldown")]), timeout=8)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
                    assert "MySQL unavailable" in info.value.details()
                # nothing was added to the inbox by the failed stores
                assert [x.msg_id for x in await load(stub, "sv-mysqldown")] == [kept.msg_id]
        finally:
            assert proc.stop() == 0
        text = proc.log_text()
        assert "Traceback" not in text and text.count("MySQL unavailable") == 1, text
    finally:
        maria.stop()

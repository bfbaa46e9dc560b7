"""Saver durability: Redis loses its data (FLUSHDB, a new empty server, kill -9) and the saver
brings inboxes, states, attempts and sequence counters back from MySQL.

Real saver processes over a private redis-server (started here, so it can be flushed, killed
and restarted) and the session's MariaDB, each test on its own Redis database and MySQL database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import time
import urllib.request

import aiomysql
import grpc
import pytest

from services.common import runtime
from services.common.pb import internal_pb2 as pb
from services.common.pb import internal_pb2_grpc as pbg
from services.launcher import backing, procs
from services.saver.keys import EPOCH_KEY
from tests.stores import own_stores

MAX_ATTEMPTS = 3
_ids = itertools.count(int(time.time() * 1000) << 20)


def new_id() -> int:
    return next(_ids)


@pytest.fixture(scope="module")
def private_redis(backing_stores):
    """(port, data dir) of a redis-server of this module's own, append-only file on."""
    _, tmp = backing_stores
    data, port = os.path.join(tmp, "redis-saver-recovery"), backing.free_port()
    server = backing.start_redis(data, port)
    yield port, data
    server.stop()


def stores_for(backing_stores, private_redis, db: int, mysql_database: str):
    cfg, _ = backing_stores
    cfg = own_stores(cfg, "saver_recovery", mysql_database=mysql_database)
    return dataclasses.replace(cfg, redis_url=f"redis://127.0.0.1:{private_redis[0]}/{db}")


class Saver:
    """A `pylon saver` process and a stub to call it."""

    def __init__(self, cfg, log_dir: str, name: str, env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = backing.free_port(), backing.free_port()
        while self.metrics_port == self.port:  # metrics listen first: the same port would pass for gRPC
            self.metrics_port = backing.free_port()
        env = procs.common_env(cfg, {"PYLON_SAVER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                                     "PYLON_SAVER_ACK_RETENTION_S": "600", **(env or {})})
        self.proc = procs.start(name, ["saver", "--grpc-port", str(self.port), "--metrics-port", str(self.metrics_port)],
                                env=env, log_dir=log_dir, wait_for=[("127.0.0.1", self.port)], timeout_s=60)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pbg.SaverStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
        code = self.proc.stop()
        text = self.proc.log_text()
        assert code == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]

    async def metric(self, name: str) -> float:
        """The value of one sample (``name`` with its labels, as /metrics prints it); 0 if absent."""
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode())
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    async def rebuilds(self) -> float:
        return await self.metric('pylon_saver_rebuilds_total{outcome="done"}')

    async def store(self, *messages) -> list[int]:
        return list((await self.stub.Store(pb.StoreRequest(messages=list(messages)), timeout=10)).seqs)

    async def load(self, uid: str, app: str = "app1", timeout: float = 10) -> list[pb.StoredMessage]:
        reply = await self.stub.LoadInbox(pb.LoadRequest(keys=[pb.InboxKey(uid=uid, apps=[app])]), timeout=timeout)
        return list(reply.inboxes[0].messages)

    async def delivered(self, *messages) -> int:
        return (await self.stub.MarkDelivered(pb.MessageRefs(refs=[ref(m) for m in messages]), timeout=5)).n

    async def ack(self, *refs) -> int:
        return (await self.stub.Ack(pb.MessageRefs(refs=list(refs)), timeout=5)).n

    async def state(self, msg_id: int) -> pb.MessageState:
        return await self.stub.GetMessage(pb.GetMessageRequest(msg_id=msg_id), timeout=5)


def msg(uid: str, app: str = "app1", payload: bytes = b"hello", ttl_s: int = 0) -> pb.StoredMessage:
    return pb.StoredMessage(msg_id=new_id(), uid=uid, app=app, payload=payload,
                            created_ms=int(time.time() * 1000), ttl_s=ttl_s)


def ref(m: pb.StoredMessage, uid: str | None = None) -> pb.MessageRef:
    return pb.MessageRef(uid=m.uid if uid is None else uid, app=m.app, msg_id=m.msg_id)


@pytest.fixture
async def redis_db():
    """Opens Redis clients on a cfg's database; closes them after the test."""
    clients = []

    def open_(cfg):
        client = runtime.redis_client(cfg.redis_url)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.aclose()


@pytest.fixture
async def mysql_db():
    """Opens MySQL pools on a cfg's database; closes them after the test."""
    pools = []

    async def open_(cfg):
        pool = await aiomysql.create_pool(host=cfg.mysql_host, port=cfg.mysql_port, user=cfg.mysql_user,
                                          password=cfg.mysql_password, db=cfg.mysql_database, autocommit=True)
        pools.append(pool)
        return pool

    yield open_
    for pool in pools:
        pool.close()
        await pool.wait_closed()


async def mysql_row(pool, msg_id: int):
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT state, attempts, acked_ms FROM messages WHERE msg_id=%s", (msg_id,))
        return await cur.fetchone()


async def wait_for_epoch(redis, timeout_s: float = 5.0) -> float:
    """Seconds until Redis has an epoch again (fails past ``timeout_s``)."""
    started = time.monotonic()
    while not await redis.exists(EPOCH_KEY):
        assert time.monotonic() - started < timeout_s, "no rebuild within the time allowed"
        await asyncio.sleep(0.05)
    return time.monotonic() - started



def kill_and_restart(server, data: str, port: int):
    """kill -9 a redis-server and start it again on the same dir and port (its append-only file)."""
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(5)
    server.stop()
    return backing.start_redis(data, port)

async def test_flushdb_brings_back_pending_messages_states_attempts_and_seqs(
        backing_stores, private_redis, redis_db, mysql_db):
    cfg = stores_for(backing_stores, private_redis, 1, "pylon_saver_rec_flush")
    saver = Saver(cfg, backing_stores[1], "saver-rec-flush")
    try:
        redis, db = redis_db(cfg), await mysql_db(cfg)
        a1 = [msg("rc-a", payload=b"a1-%d" % i) for i in range(4)]
        a2 = [msg("rc-a", app="app2") for _ in range(2)]
        b1 = [msg("rc-b") for _ in range(3)]
        c1 = [msg("rc-c")]
        assert await saver.store(*a1, *a2, *b1, *c1) == [1, 2, 3, 4, 1, 2, 1, 2, 3, 1]
        assert await saver.delivered(a1[0], b1[1]) == 2
        assert await saver.delivered(a1[0]) == 1                  # a1[0]: delivered twice
        for _ in range(MAX_ATTEMPTS):
            await saver.delivered(a2[0])                          # a2[0]: parked
        await saver.delivered(b1[0])
        assert await saver.ack(ref(a1[1]), ref(b1[0]), ref(c1[0])) == 3  # c1's only message: inbox now empty
        before = {m.msg_id: await saver.state(m.msg_id) for m in (*a1, *a2, *b1, *c1)}
        assert [before[m.msg_id].state for m in (a1[0], a1[1], a2[0], b1[0], b1[1], b1[2])] == [
            "delivered", "acked", "parked", "acked", "delivered", "stored"]
        assert (before[a1[0].msg_id].attempts, before[a2[0].msg_id].attempts) == (2, MAX_ATTEMPTS)
        rebuilds = await saver.rebuilds()

        await redis.flushdb()
        # nothing asks: the periodic check notices within about a second
        assert await wait_for_epoch(redis) < 4
        assert await saver.rebuilds() == rebuilds + 1

        assert [(m.msg_id, m.seq, m.payload) for m in await saver.load("rc-a")] == [
            (a1[i].msg_id, i + 1, b"a1-%d" % i) for i in (0, 2, 3)]
        assert [(m.msg_id, m.seq) for m in await saver.load("rc-a", "app2")] == [(a2[1].msg_id, 2)]
        assert [(m.msg_id, m.seq) for m in await saver.load("rc-b")] == [(b1[1].msg_id, 2), (b1[2].msg_id, 3)]
        assert await saver.load("rc-c") == []
        for msg_id, was in before.items():
            now = await saver.state(msg_id)
            assert (now.state, now.attempts, now.seq, now.uid, now.app, now.acked_ms) == (
                was.state, was.attempts, was.seq, was.uid, was.app, was.acked_ms), msg_id
        assert await redis.hget(f"pylon:m:{a1[0].msg_id}", "state") == b"delivered"

        # the counters continue above every seq a client saw, acked and parked ones included
        assert await saver.store(msg("rc-a"), msg("rc-a", app="app2"), msg("rc-b"), msg("rc-c")) == [5, 3, 4, 2]
        # delivery counts go on from the rebuilt attempts: b1[1] had 1, a1[0] had 2 (one more parks it)
        assert await saver.delivered(b1[1], a1[0]) == 2
        assert [((await saver.state(m.msg_id)).state, await mysql_row(db, m.msg_id)) for m in (b1[1], a1[0])] == [
            ("delivered", (1, 2, 0)), ("parked", (3, MAX_ATTEMPTS, 0))]
        assert "rebuilt Redis from MySQL" in saver.proc.log_text()
    finally:
        await saver.close()


async def test_store_right_after_the_loss_is_numbered_after_the_rebuild(
        backing_stores, private_redis, redis_db):
    """No periodic check to help (60 s): the seq script itself refuses without an epoch."""
    cfg = stores_for(backing_stores, private_redis, 2, "pylon_saver_rec_write")
    saver = Saver(cfg, backing_stores[1], "saver-rec-write", {"PYLON_SAVER_EPOCH_CHECK_INTERVAL_S": "60"})
    try:
        redis = redis_db(cfg)
        first = [msg("rw-a") for _ in range(3)]
        assert await saver.store(*first) == [1, 2, 3]
        assert await saver.ack(ref(first[2])) == 1
        await redis.flushdb()
        late = msg("rw-a")
        assert await saver.store(late, msg("rw-new")) == [4, 1]
        assert await saver.metric("pylon_saver_epoch_refusals_total") >= 1
        assert [m.msg_id for m in await saver.load("rw-a")] == [first[0].msg_id, first[1].msg_id, late.msg_id]
    finally:
        await saver.close()


async def test_ack_reaches_mysql_when_redis_lost_the_message(backing_stores, private_redis, redis_db, mysql_db):
    cfg = stores_for(backing_stores, private_redis, 3, "pylon_saver_rec_ack")
    saver = Saver(cfg, backing_stores[1], "saver-rec-ack")
    try:
        redis, db = redis_db(cfg), await mysql_db(cfg)
        gone, kept = msg("ra-owner"), msg("ra-owner")
        await saver.store(gone, kept)
        await redis.delete(f"pylon:m:{gone.msg_id}", f"pylon:m:{kept.msg_id}")  # Redis forgot both bodies
        # someone else's acks, a uid differing only in case or a trailing space: not the owner's
        assert await saver.ack(ref(kept, uid="RA-OWNER"), ref(kept, uid="ra-owner "), ref(kept, uid="ra-x")) == 0
        assert (await mysql_row(db, kept.msg_id))[0] == 0
        assert await saver.ack(ref(gone)) == 0   # Redis had nothing to change ...
        state, _, acked_ms = await mysql_row(db, gone.msg_id)
        assert state == 2 and acked_ms > 0       # ... but the ack is in MySQL
        s = await saver.state(gone.msg_id)
        assert (s.state, s.acked_ms) == ("acked", acked_ms)

        await redis.flushdb()
        await wait_for_epoch(redis)
        assert [m.msg_id for m in await saver.load("ra-owner")] == [kept.msg_id]  # the acked one stays gone
        assert (await saver.state(gone.msg_id)).state == "acked"
    finally:
        await saver.close()


async def test_saver_started_on_an_empty_redis_rebuilds_before_answering(
        backing_stores, private_redis, redis_db):
    cfg = stores_for(backing_stores, private_redis, 4, "pylon_saver_rec_start")
    first = Saver(cfg, backing_stores[1], "saver-rec-start1")
    try:
        pending = [msg("rs-a", payload=b"p%d" % i) for i in range(3)]
        await first.store(*pending)
        await first.delivered(pending[0])
        await first.ack(ref(pending[1]))
    finally:
        await first.close()
    empty = dataclasses.replace(cfg, redis_url=cfg.redis_url.rsplit("/", 1)[0] + "/5")  # a new, empty Redis
    assert not await redis_db(empty).exists(EPOCH_KEY)
    second = Saver(empty, backing_stores[1], "saver-rec-start2")
    try:
        # the first call after the port opened already sees the rebuilt inbox
        got = await second.load("rs-a")
        assert [(m.msg_id, m.seq) for m in got] == [(pending[0].msg_id, 1), (pending[2].msg_id, 3)]
        s = await second.state(pending[0].msg_id)
        assert (s.state, s.attempts) == ("delivered", 1)
        assert await second.store(msg("rs-a")) == [4]
        assert await second.rebuilds() == 1
    finally:
        await second.close()


async def test_redis_killed_and_restarted_on_its_dir_keeps_everything_without_a_rebuild(
        backing_stores, redis_db):
    cfg0, tmp = backing_stores
    data, port = os.path.join(tmp, "redis-saver-kill"), backing.free_port()
    server = backing.start_redis(data, port)
    cfg = dataclasses.replace(own_stores(cfg0, "saver_recovery", mysql_database="pylon_saver_rec_kill"),
                              redis_url=f"redis://127.0.0.1:{port}/0")
    saver = Saver(cfg, tmp, "saver-rec-kill")
    try:
        redis = redis_db(cfg)
        await wait_for_epoch(redis)
        epoch = await redis.get(EPOCH_KEY)
        rebuilds = await saver.rebuilds()  # the first start on an empty Redis: one (empty) rebuild
        msgs = [msg("rk-a") for _ in range(3)]
        await saver.store(*msgs)
        await saver.delivered(msgs[0])
        await saver.ack(ref(msgs[1]))

        server = kill_and_restart(server, data, port)
        redis = redis_db(cfg)  # the old client's connection died with the server

        assert [(m.msg_id, m.seq) for m in await saver.load("rk-a")] == [(msgs[0].msg_id, 1), (msgs[2].msg_id, 3)]
        assert await saver.store(msg("rk-a")) == [4]
        assert (await saver.state(msgs[0].msg_id)).attempts == 1
        await asyncio.sleep(1.5)  # past a periodic check
        assert await redis.get(EPOCH_KEY) == epoch
        assert await saver.rebuilds() == rebuilds
    finally:
        await saver.close()
        server.stop()


async def test_two_savers_one_rebuild_and_no_answer_from_half_built_data(
        backing_stores, private_redis, redis_db):
    """Thousands of rows rebuilt in pages of 50 while both savers are asked for the last inbox
    restored: each call waits for the whole rebuild, and only one saver runs it."""
    cfg = stores_for(backing_stores, private_redis, 6, "pylon_saver_rec_many")
    env = {"PYLON_SAVER_REBUILD_CHUNK_ROWS": "50"}
    savers = [Saver(cfg, backing_stores[1], f"saver-rec-many{i}", env) for i in range(2)]
    try:
        redis = redis_db(cfg)
        await wait_for_epoch(redis)
        batches = [[msg(f"rm-{i % 200}", payload=b"x" * 100) for i in range(j, j + 1000)] for j in range(0, 4000, 1000)]
        for batch in batches:
            await savers[0].store(*batch)
        last = [m for m in batches[-1] if m.uid == batches[-1][-1].uid]  # the pair restored last
        rebuilds = [await s.rebuilds() for s in savers]

        await redis.flushdb()
        started = time.monotonic()
        loads = await asyncio.gather(*(s.load(last[0].uid) for s in savers))
        waited = time.monotonic() - started
        for got in loads:
            assert [m.msg_id for m in got][-len(last):] == [m.msg_id for m in last]
            assert len(got) == 20  # 4,000 messages over 200 pairs
        assert sum([await s.rebuilds() for s in savers]) == sum(rebuilds) + 1
        assert await savers[1].store(msg(last[0].uid)) == [21]
        rows = await savers[0].metric("pylon_saver_rebuild_rows_total") + await savers[1].metric(
            "pylon_saver_rebuild_rows_total")
        assert rows >= 4000, rows
        assert waited < 10
    finally:
        for s in savers:
            await s.close()


async def test_redis_back_without_its_last_writes_is_rebuilt(backing_stores, redis_db):
    """A host crash between two fsyncs of the append-only file: Redis restarts with its epoch but
    without its newest writes. Simulated by undoing them (a counter set back, records deleted)
    before a kill -9; the saver finds the gap against the newest MySQL rows and rebuilds."""
    cfg0, tmp = backing_stores
    data, port = os.path.join(tmp, "redis-saver-tail"), backing.free_port()
    server = backing.start_redis(data, port)
    cfg = dataclasses.replace(own_stores(cfg0, "saver_recovery", mysql_database="pylon_saver_rec_tail"),
                              redis_url=f"redis://127.0.0.1:{port}/0")
    saver = Saver(cfg, tmp, "saver-rec-tail")
    try:
        redis = redis_db(cfg)
        await wait_for_epoch(redis)
        epoch = await redis.get(EPOCH_KEY)
        rebuilds = await saver.rebuilds()
        old = int(time.time() * 1000) - 60_000  # stored a minute ago: their Stores are long finished
        msgs = [pb.StoredMessage(msg_id=new_id(), uid="rt-a", app="app1", payload=b"t", created_ms=old)
                for _ in range(4)]
        assert await saver.store(*msgs) == [1, 2, 3, 4]
        await redis.set("pylon:seq:rt-a:app1", 2)
        await redis.delete(*(f"pylon:m:{m.msg_id}" for m in msgs[2:]))

        server = kill_and_restart(server, data, port)
        redis = redis_db(cfg)

        deadline = time.monotonic() + 5
        while await saver.rebuilds() == rebuilds:
            assert time.monotonic() < deadline, "the lost tail was not noticed"
            await asyncio.sleep(0.1)
        await wait_for_epoch(redis)
        assert await redis.get(EPOCH_KEY) != epoch
        assert [(m.msg_id, m.seq) for m in await saver.load("rt-a")] == [(m.msg_id, i + 1) for i, m in enumerate(msgs)]
        assert await saver.store(msg("rt-a")) == [5]
        assert "came back without its latest writes" in saver.proc.log_text()
    finally:
        await saver.close()
        server.stop()


async def test_a_saver_dying_mid_rebuild_is_taken_over(backing_stores, private_redis, redis_db):
    """The rebuilding saver is killed (kill -9) half-way; its lock expires (1 s here) and the
    other saver rebuilds from the start, while its callers wait."""
    cfg = stores_for(backing_stores, private_redis, 7, "pylon_saver_rec_takeover")
    env = {"PYLON_SAVER_REBUILD_CHUNK_ROWS": "5", "PYLON_SAVER_REBUILD_LOCK_TTL_S": "1"}
    savers = [Saver(cfg, backing_stores[1], f"saver-rec-takeover{i}", env) for i in range(2)]
    try:
        redis = redis_db(cfg)
        await wait_for_epoch(redis)
        for _ in range(3):
            await savers[0].store(*(msg(f"rt-{i % 50}") for i in range(1000)))
        marks = [len(s.proc.log_text()) for s in savers]

        await redis.flushdb()
        deadline = time.monotonic() + 5
        rebuilding = None
        while rebuilding is None:
            assert time.monotonic() < deadline, "no saver started a rebuild"
            for s, mark in zip(savers, marks, strict=True):
                if "rebuilding from MySQL" in s.proc.log_text()[mark:]:
                    rebuilding = s
            await asyncio.sleep(0.02)
        survivor = savers[1] if rebuilding is savers[0] else savers[0]
        rebuilding.proc.signal(signal.SIGKILL)
        rebuilding.proc.proc.wait(5)
        assert not await redis.exists(EPOCH_KEY)  # killed before it finished

        got = await survivor.load("rt-49", timeout=15)
        assert [m.seq for m in got] == list(range(1, 61))
        assert await survivor.rebuilds() >= 1
        assert await survivor.store(msg("rt-49")) == [61]
    finally:
        for s in savers:
            await s.channel.close()
            s.proc.stop()


async def test_an_ack_redis_lost_with_its_last_writes_does_not_bring_the_message_back(backing_stores, redis_db):
    """A host crash took the Redis side of an ACK (MySQL committed it first): Redis restarts
    with the message still delivered and in its inbox. The saver compares the newest rows with
    Redis, rebuilds, and MySQL's acked state wins: the message is never delivered again."""
    cfg0, tmp = backing_stores
    data, port = os.path.join(tmp, "redis-saver-lost-ack"), backing.free_port()
    server = backing.start_redis(data, port)
    cfg = dataclasses.replace(own_stores(cfg0, "saver_recovery", mysql_database="pylon_saver_rec_lost_ack"),
                              redis_url=f"redis://127.0.0.1:{port}/0")
    saver = Saver(cfg, tmp, "saver-rec-lost-ack")
    try:
        redis = redis_db(cfg)
        await wait_for_epoch(redis)
        rebuilds = await saver.rebuilds()
        msgs = [msg("la-a") for _ in range(3)]
        assert await saver.store(*msgs) == [1, 2, 3]
        await saver.delivered(*msgs)
        assert await saver.ack(pb.MessageRef(uid="la-a", app="app1", msg_id=msgs[0].msg_id)) == 1
        # undo the Redis side of the ack, as a Redis missing its last second would have it
        await redis.hset(f"pylon:m:{msgs[0].msg_id}", mapping={"state": "delivered", "payload": b"p"})
        await redis.zadd("pylon:in:la-a:app1", {str(msgs[0].msg_id): 1})

        server = kill_and_restart(server, data, port)
        redis = redis_db(cfg)

        deadline = time.monotonic() + 5
        while await saver.rebuilds() == rebuilds:
            assert time.monotonic() < deadline, "the lost ack was not noticed"
            await asyncio.sleep(0.1)
        await wait_for_epoch(redis)
        assert [m.msg_id for m in await saver.load("la-a")] == [m.msg_id for m in msgs[1:]]
        assert (await redis.hget(f"pylon:m:{msgs[0].msg_id}", "state")) == b"acked"
    finally:
        await saver.close()
        server.stop()

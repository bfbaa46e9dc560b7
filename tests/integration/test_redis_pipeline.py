"""The lean pipeline against a real redis-server: replies in order, error replies, NOSCRIPT
reload, and a connection that died under it."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.common.redis_scripts import Script, run_pipeline
from services.common.runtime import redis_client
from services.launcher import backing
from tests.stores import own_stores

ECHO = Script("return ARGV[1]")


@pytest.fixture
async def redis(backing_stores):
    cfg, _ = backing_stores
    client = redis_client(own_stores(cfg, "redis_pipeline").redis_url, fail_fast=True)
    await client.delete("pipetest:h", "pipetest:s", "pipetest:z")
    yield client
    await client.aclose()


async def test_replies_in_order(redis):
    def build(pipe):
        pipe.hset("pipetest:h", "f", b"\x00bin")
        pipe.sadd("pipetest:s", "a", "b")
        pipe.hgetall("pipetest:h")
        pipe.hmget("pipetest:h", ["f", "missing"])
        pipe.zrange("pipetest:z", 0, -1)

    r = await run_pipeline(redis, build)
    assert r[0] == 1 and r[1] == 2
    fields = r[2] if isinstance(r[2], dict) else dict(zip(r[2][0::2], r[2][1::2], strict=True))
    assert fields == {b"f": b"\x00bin"}
    assert r[3] == [b"\x00bin", None]
    assert r[4] == []


async def test_error_reply_raises_after_reading_everything(redis):
    def build(pipe):
        pipe.sadd("pipetest:s", "x")
        pipe.execute_command("INCR", "pipetest:s")  # WRONGTYPE
        pipe.sadd("pipetest:s", "y")

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await run_pipeline(redis, build)
    # the connection was not left mid-reply: the next batch reads its own replies
    assert await run_pipeline(redis, lambda p: p.execute_command("SMEMBERS", "pipetest:s")) in (
        [{b"x", b"y"}], [[b"x", b"y"]], [[b"y", b"x"]])


async def test_noscript_loads_and_replays(redis):
    await redis.script_flush()
    r = await run_pipeline(redis, lambda p: ECHO.queue(p, [], ["hi"]), (ECHO,))
    assert r == [b"hi"]


async def _kill_idle_connections(redis, killer) -> int:
    """Close, from another client, every connection this test's pool holds (Redis side)."""
    db = int(redis.connection_pool.connection_kwargs.get("db", 0))
    ids = [c["id"] for c in await killer.client_list() if int(c["db"]) == db and c["cmd"] != "client|list"]
    for cid in ids:
        await killer.client_kill_filter(_id=cid)
    return len(ids)


async def test_connections_closed_while_idle_are_replaced_without_an_error(redis, backing_stores):
    """Redis closed every pooled connection while idle: the next batches still succeed (the
    first on each stale connection is sent again on a fresh one)."""
    ping = await asyncio.gather(*(run_pipeline(redis, lambda p: p.execute_command("PING")) for _ in range(4)))
    assert len(ping) == 4 and len(redis.connection_pool._available_connections) == 4
    killer = redis_client(backing_stores[0].redis_url)
    try:
        assert await _kill_idle_connections(redis, killer) == 4
    finally:
        await killer.aclose()
    await asyncio.sleep(0.2)
    for _ in range(3):
        assert await asyncio.gather(*(run_pipeline(redis, lambda p: p.execute_command("ECHO", "again"))
                                      for _ in range(4))) == [[b"again"]] * 4


async def test_a_dead_redis_still_fails_at_once(backing_stores):
    client = redis_client(f"redis://127.0.0.1:{backing.free_port()}/0", fail_fast=True)
    try:
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await run_pipeline(client, lambda p: p.execute_command("PING"))
        assert time.monotonic() - started < 2
    finally:
        await client.aclose()


async def test_more_concurrent_batches_than_pooled_connections_wait_for_one(backing_stores):
    client = redis_client(own_stores(backing_stores[0], "redis_pipeline").redis_url, max_connections=2,
                          fail_fast=True)
    try:
        replies = await asyncio.gather(*(run_pipeline(client, lambda p, i=i: p.execute_command("ECHO", str(i)))
                                         for i in range(40)))
        assert replies == [[str(i).encode()] for i in range(40)]
        assert len(client.connection_pool._in_use_connections) == 0
    finally:
        await client.aclose()

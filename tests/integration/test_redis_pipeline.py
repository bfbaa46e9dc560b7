"""The lean pipeline against a real redis-server: replies in order, error replies, NOSCRIPT
reload, and a connection that died under it."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from services.common.redis_scripts import Script, run_pipeline
from services.common.runtime import redis_client

ECHO = Script("return ARGV[1]")


@pytest.fixture
async def redis(backing_stores):
    cfg, _ = backing_stores
    client = redis_client(cfg.redis_url, fail_fast=True)
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


async def test_killed_connection_is_replaced(redis):
    assert await run_pipeline(redis, lambda p: p.execute_command("PING")) in ([b"PONG"], ["PONG"], [True])
    await redis.client_kill_filter(_type="normal", skipme=True)
    # the pool notices the closed connection and hands out a fresh one
    for _ in range(3):
        r = await run_pipeline(redis, lambda p: p.execute_command("ECHO", "again"))
        assert r == [b"again"]

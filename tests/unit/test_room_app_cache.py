import asyncio

from services.common.apps import REDIS_KEY, App
from services.room.app_cache import AppCache


class CountingRedis:
    """Stands in for the one Redis call AppCache makes, counting concurrent reads."""

    def __init__(self) -> None:
        self.calls = 0
        self.table = {}

    async def hgetall(self, key):
        assert key == REDIS_KEY
        self.calls += 1
        await asyncio.sleep(0.01)
        return dict(self.table)


async def test_a_burst_of_misses_triggers_one_refresh():
    redis = CountingRedis()
    cache = AppCache(redis, refresh_s=60)
    await cache.start()
    assert redis.calls == 1
    redis.table = {b"new": App("new", "s").to_json()}
    results = []
    for _ in range(500):
        assert cache.wait_refresh(results.append)
    await asyncio.sleep(0.05)
    assert redis.calls == 2 and results == [True] * 500
    assert cache.get("new").secret == "s"
    await cache.close()


async def test_a_table_gone_all_at_once_is_kept_until_it_is_back():
    redis = CountingRedis()
    redis.table = {b"a": App("a", "s1").to_json(), b"b": App("b", "s2").to_json()}
    cache = AppCache(redis, refresh_s=60)
    await cache.start()
    redis.table = {}  # Redis lost its data: center puts the table back shortly
    results = []
    cache.wait_refresh(results.append)
    await asyncio.sleep(0.05)
    assert results == [True] and cache.get("a").secret == "s1", "AUTHs keep working meanwhile"
    redis.table = {b"a": App("a", "s1").to_json()}  # back, without b (deleted meanwhile)
    cache.wait_refresh(results.append)
    await asyncio.sleep(0.05)
    assert cache.get("b") is None and cache.get("a") is not None
    await cache.close()

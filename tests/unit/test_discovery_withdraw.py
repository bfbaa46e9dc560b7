import logging

from services.common.discovery import Discovery, Instance


class DeadRedis:
    """Every pipeline fails as it would with Redis unreachable."""

    def pipeline(self, transaction=False):
        return self

    def zrem(self, *a):
        pass

    def hdel(self, *a):
        pass

    def set(self, *a, **kw):
        pass

    async def execute(self):
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")


async def test_withdraw_with_redis_gone_logs_and_returns(caplog):
    d = Discovery(DeadRedis())
    d._mine[("room", "r1")] = Instance(service="room", id="r1")
    with caplog.at_level(logging.WARNING):
        await d.withdraw()  # must not raise: a draining room still has to drain
    assert "peers drop us after the TTL" in caplog.text
    assert not d._mine

"""A read that finds no instance at all, where there were some within a TTL, keeps the last
list: Redis most likely lost its data and the records come back with the next heartbeats."""

from services.common import discovery as disc
from services.common.discovery import Discovery, Instance


class FakeRedis:
    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self.records: dict[bytes, str] = {}

    async def zrangebyscore(self, key, low, high):
        return list(self.ids) if low != "-inf" else []

    async def hmget(self, key, ids):
        return [self.records.get(i) for i in ids]


async def test_an_empty_read_after_a_full_one_keeps_the_list_for_a_ttl(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(disc.time, "monotonic", lambda: now[0])
    r = FakeRedis()
    r.ids = [b"register-1"]
    r.records = {b"register-1": Instance(service="register", id="register-1", grpc="h:1").to_json()}
    d = Discovery(r, ttl_s=3, refresh_s=0.5)
    assert [i.id for i in await d.instances("register")] == ["register-1"]
    r.ids, r.records = [], {}  # FLUSHALL
    now[0] += 1
    assert [i.id for i in await d.instances("register", fresh=True)] == ["register-1"]
    now[0] += 2.5  # a whole TTL with nothing: it is really gone
    assert await d.instances("register", fresh=True) == []

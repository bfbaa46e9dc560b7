"""A read that finds no instance at all, where there were some within a TTL, keeps those that
did not withdraw until their records would have expired: Redis lost its data and the records
come back with the next heartbeats. An instance that withdrew is gone at once."""

from services.common import discovery as disc
from services.common.discovery import Discovery, Instance


class FakeRedis:
    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self.records: dict[bytes, str] = {}
        self.gone: set[str] = set()

    async def zrangebyscore(self, key, low, high):
        return list(self.ids) if low != "-inf" else []

    async def hmget(self, key, ids):
        return [self.records.get(i) for i in ids]


    async def mget(self, keys):
        return [b"1" if k in self.gone else None for k in keys]

    def pipeline(self, transaction=False):
        return self

    def zrem(self, key, member):
        self.ids = [i for i in self.ids if i != member.encode()]

    def hdel(self, key, member):
        self.records.pop(member.encode(), None)

    def set(self, key, value, ex=None):
        self.gone.add(key)

    async def execute(self):
        return []


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


async def test_an_instance_that_withdrew_is_gone_at_once():
    r = FakeRedis()
    me = Instance(service="register", id="register-1", grpc="h:1")
    r.ids = [b"register-1"]
    r.records = {b"register-1": me.to_json()}
    reader = Discovery(r, ttl_s=3, refresh_s=0.5)
    assert [i.id for i in await reader.instances("register")] == ["register-1"]
    leaving = Discovery(r, ttl_s=3)
    leaving._mine[("register", "register-1")] = me
    await leaving.withdraw()
    assert await reader.instances("register", fresh=True) == []

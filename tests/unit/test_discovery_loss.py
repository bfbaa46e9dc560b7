"""A read that misses instances an earlier read found, whose records have not expired, keeps
those that did not withdraw until their records would have expired: Redis lost its data and the
records come back with the next heartbeats, one instance after another. An instance that
withdrew is gone at once; one that died expires as its record said."""

from services.common import discovery as disc
from services.common.discovery import Discovery, Instance


class FakeRedis:
    def __init__(self, now) -> None:
        self.now = now  # seconds, the clock the test moves
        self.ids: list[bytes] = []
        self.expires: dict[bytes, float] = {}  # unix ms; absent: now + 3 s
        self.records: dict[bytes, str] = {}
        self.gone: set[str] = set()

    def _score(self, i: bytes) -> float:
        return self.expires.get(i, self.now[0] * 1000 + 3000)

    async def zrangebyscore(self, key, low, high, withscores=False):
        if low == "-inf":
            return []
        live = [i for i in self.ids if self._score(i) >= low]
        return [(i, self._score(i)) for i in live] if withscores else live

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


def _clock(monkeypatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(disc.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(disc.time, "time", lambda: now[0])
    return now


def _record(r: FakeRedis, iid: str) -> None:
    r.ids.append(iid.encode())
    r.records[iid.encode()] = Instance(service="room", id=iid, grpc="h:1").to_json()


async def test_an_empty_read_after_a_full_one_keeps_the_list_for_a_ttl(monkeypatch):
    now = _clock(monkeypatch)
    r = FakeRedis(now)
    r.ids = [b"register-1"]
    r.records = {b"register-1": Instance(service="register", id="register-1", grpc="h:1").to_json()}
    d = Discovery(r, ttl_s=3, refresh_s=0.5)
    assert [i.id for i in await d.instances("register")] == ["register-1"]
    r.ids, r.records = [], {}  # FLUSHALL
    now[0] += 1
    assert [i.id for i in await d.instances("register", fresh=True)] == ["register-1"]
    now[0] += 2.5  # a whole TTL with nothing: it is really gone
    assert await d.instances("register", fresh=True) == []


async def test_a_partial_read_after_a_loss_keeps_the_instances_not_back_yet(monkeypatch):
    """After a Redis restart the rooms heartbeat again one by one: the first one back must not
    make the others look dead (a push to their sessions would then wait for a reconnect)."""
    now = _clock(monkeypatch)
    r = FakeRedis(now)
    for iid in ("room-0", "room-1", "room-2"):
        _record(r, iid)
    d = Discovery(r, ttl_s=3, refresh_s=0.5)
    assert [i.id for i in await d.instances("room")] == ["room-0", "room-1", "room-2"]
    r.ids, r.records = [], {}  # Redis lost everything
    now[0] += 1
    _record(r, "room-1")  # one heartbeat came through
    assert [i.id for i in await d.instances("room", fresh=True)] == ["room-0", "room-1", "room-2"]
    now[0] += 2.5  # past the records' expiry: the two that never came back are gone
    r.expires.clear()
    assert [i.id for i in await d.instances("room", fresh=True)] == ["room-1"]


async def test_an_instance_that_died_expires_as_its_record_said(monkeypatch):
    now = _clock(monkeypatch)
    r = FakeRedis(now)
    _record(r, "room-0")
    _record(r, "room-1")
    r.expires[b"room-1"] = now[0] * 1000 + 1500
    d = Discovery(r, ttl_s=3, refresh_s=0.5)
    assert len(await d.instances("room")) == 2
    now[0] += 2  # room-1 stopped renewing: its record is past its expiry, Redis no longer lists it
    assert [i.id for i in await d.instances("room", fresh=True)] == ["room-0"]


async def test_an_instance_that_withdrew_is_gone_at_once(monkeypatch):
    now = _clock(monkeypatch)
    r = FakeRedis(now)
    me = Instance(service="register", id="register-1", grpc="h:1")
    r.ids = [b"register-1"]
    r.records = {b"register-1": me.to_json()}
    reader = Discovery(r, ttl_s=3, refresh_s=0.5)
    assert [i.id for i in await reader.instances("register")] == ["register-1"]
    leaving = Discovery(r, ttl_s=3)
    leaving._mine[("register", "register-1")] = me
    await leaving.withdraw()
    assert await reader.instances("register", fresh=True) == []

"""Service discovery in Redis: every instance heartbeats its address and load with a TTL.

Keys, per service name ``S``:
  ``pylon:disc:S``       ZSET  instance id -> expiry (unix ms); an instance is live while its score is in the future
  ``pylon:discinfo:S``   HASH  instance id -> JSON ``Instance``

Writers refresh both every ``ttl/3``; readers cache the live set and refresh it every
``refresh_s`` (or on demand). No coordination server; a dead instance simply stops renewing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Instance:
    service: str
    id: str
    host: str = ""          # public address (room: client TCP; center/dispatcher: HTTP)
    port: int = 0
    grpc: str = ""          # internal gRPC "host:port", if any
    metrics: str = ""       # "host:port" serving /metrics
    region: str = "default"
    load: int = 0           # room: sessions held; others: in-flight work
    capacity: int = 0       # room: sessions it is sized for
    draining: bool = False
    started_ms: int = 0
    nets: list[str] = field(default_factory=list)  # network types served; empty = all
    tls_port: int = 0       # room: the TLS client port beside ``port``; 0 = none
    lane: str = ""          # internal calls' framed-TCP "host:port" beside ``grpc`` (services/common/lanes.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Instance:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _zkey(service: str) -> str:
    return f"pylon:disc:{service}"


def _gone_key(service: str, instance_id: str) -> str:
    return f"pylon:disc:gone:{service}:{instance_id}"


def _hkey(service: str) -> str:
    return f"pylon:discinfo:{service}"


class Discovery:
    """Announce this process and read others. One heartbeat task per process, not per item."""

    def __init__(self, redis, ttl_s: float = 10.0, refresh_s: float = 2.0) -> None:
        self._redis = redis
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self._mine: dict[tuple[str, str], Instance] = {}
        self._cache: dict[str, tuple[float, list[Instance]]] = {}
        # per service, every instance a read found: id -> (its record's expiry in unix ms, it)
        self._seen: dict[str, dict[str, tuple[int, Instance]]] = {}
        self._task: asyncio.Task | None = None

    async def announce(self, inst: Instance) -> None:
        if not inst.started_ms:
            inst.started_ms = int(time.time() * 1000)
        self._mine[(inst.service, inst.id)] = inst
        await self._beat()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def withdraw(self, inst: Instance | None = None) -> None:
        """Leave discovery now. Never raises: if Redis is unreachable the records expire by TTL."""
        targets = [inst] if inst else list(self._mine.values())
        if inst is None and self._task is not None:
            self._task.cancel()
            self._task = None
        pipe = self._redis.pipeline(transaction=False)
        for i in targets:
            self._mine.pop((i.service, i.id), None)
            pipe.zrem(_zkey(i.service), i.id)
            pipe.hdel(_hkey(i.service), i.id)
            # readers that find no instance at all tell a withdrawal from a Redis data loss by this
            pipe.set(_gone_key(i.service, i.id), 1, ex=max(1, math.ceil(self.ttl_s)))
        try:
            await pipe.execute()
        except Exception as exc:  # shutting down with Redis away must still shut down
            log.warning("could not withdraw from discovery (peers drop us after the TTL): %s", exc)

    async def _beat(self) -> None:
        expires = int((time.time() + self.ttl_s) * 1000)
        pipe = self._redis.pipeline(transaction=False)
        for inst in self._mine.values():
            pipe.zadd(_zkey(inst.service), {inst.id: expires})
            pipe.hset(_hkey(inst.service), inst.id, inst.to_json())
        await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        pause, failing = self.ttl_s / 3, False
        while True:
            await asyncio.sleep(pause)
            try:
                await self._beat()
            except Exception as exc:  # Redis down: keep trying; peers drop us after the TTL
                # again within a second, not a third of the TTL: after a Redis restart the first
                # command on a pooled connection fails, and peers must see us back soon
                (log.debug if failing else log.warning)("discovery heartbeat failed: %s", exc)
                pause, failing = min(1.0, self.ttl_s / 3), True
            else:
                if failing:
                    log.info("discovery heartbeat through again")
                pause, failing = self.ttl_s / 3, False

    async def instances(self, service: str, fresh: bool = False) -> list[Instance]:
        now = time.monotonic()
        cached = self._cache.get(service)
        if cached and not fresh and now - cached[0] < self.refresh_s:
            return cached[1]
        try:
            found = await self._with_vanished(service, await self._read(service))
        except Exception as exc:
            if cached:  # serve the last known list rather than nothing while Redis blips
                log.warning("discovery read of %s failed, using cache: %s", service, exc)
                return cached[1]
            raise
        self._cache[service] = (now, found)
        return found

    async def _with_vanished(self, service: str, found: list[tuple[Instance, int]]) -> list[Instance]:
        """``found`` plus the instances an earlier read found whose records vanished before they
        expired without a withdrawal: Redis lost its data, and they come back with their next
        heartbeat. Until then they are live as their records said (their sessions are registered
        again sooner, and a push must not take them for dead). A withdrawal leaves a marker, so an
        instance that left is gone at once; one that died stops renewing and expires as before."""
        now_ms = int(time.time() * 1000)
        seen = self._seen.setdefault(service, {})
        out = []
        for inst, expires_ms in found:
            seen[inst.id] = (expires_ms, inst)
            out.append(inst)
        present = {i.id for i in out}
        vanished = []
        for iid, (expires_ms, inst) in list(seen.items()):
            if expires_ms <= now_ms:
                del seen[iid]
            elif iid not in present:
                vanished.append(inst)
        if vanished:
            kept = await self._not_withdrawn(service, vanished)
            kept_ids = {i.id for i in kept}
            for inst in vanished:
                if inst.id not in kept_ids:
                    seen.pop(inst.id, None)
            out += kept
            out.sort(key=lambda i: i.id)
        return out

    async def _not_withdrawn(self, service: str, instances: list[Instance]) -> list[Instance]:
        try:
            gone = await self._redis.mget([_gone_key(service, i.id) for i in instances])
        except Exception:
            return []
        return [i for i, g in zip(instances, gone, strict=True) if not g]

    async def _read(self, service: str) -> list[tuple[Instance, int]]:
        """The live instances in Redis with their records' expiries (unix ms), by id."""
        now_ms = int(time.time() * 1000)
        scored = await self._redis.zrangebyscore(_zkey(service), now_ms, "+inf", withscores=True)
        if not scored:
            return []
        raw = await self._redis.hmget(_hkey(service), [i for i, _ in scored])
        out = []
        for (_, expires), text in zip(scored, raw, strict=True):
            if text:
                try:
                    out.append((Instance.from_json(text), int(expires)))
                except (ValueError, TypeError) as exc:
                    log.warning("bad discovery record for %s: %s", service, exc)
        # prune the dead now and then (cheap; any reader may do it)
        dead = await self._redis.zrangebyscore(_zkey(service), "-inf", now_ms - 1)
        if dead:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zremrangebyscore(_zkey(service), "-inf", now_ms - 1)
            pipe.hdel(_hkey(service), *dead)
            await pipe.execute()
        out.sort(key=lambda p: p[0].id)
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

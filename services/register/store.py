"""SessionStore: the register's core, batch operations over Redis (one pipeline per batch)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from services.common.pb import internal_pb2
from services.common.redis_scripts import Script, run_pipeline
from services.register import keys
from services.register import metrics as m
from services.register.epoch import EpochTracker
from services.register.lua import UNREGISTER_IF_OWNED

log = logging.getLogger(__name__)


class SessionStore:
    """Register / Epoch / Unregister / Lookup / DropInstance. Validates its input
    (``keys.RequestError``); Redis errors propagate to the adapter."""

    def __init__(self, redis, *, max_items: int = 5000, drop_chunk: int = 1000) -> None:
        self._redis = redis
        self.max_items = max_items
        self.drop_chunk = drop_chunk
        self._unregister = Script(UNREGISTER_IF_OWNED)
        self.epochs = EpochTracker()

    async def register(self, sessions: Sequence[internal_pb2.Session]
                       ) -> tuple[int, str, list[internal_pb2.Session]]:
        """Write the sessions (idempotent: writing one again only overwrites it); returns how
        many, the epoch read after the writes (see ``services/register/epoch.py``), and the
        sessions of the same uid and device_id that other instances held before (to replace)."""
        keys.check_sessions("Register", sessions, self.max_items)
        if not sessions:
            return 0, await self.epoch(), []
        with_device = [s for s in sessions if s.device_id]

        def build(pipe) -> None:
            for s in with_device:  # before the writes: what this login replaces
                pipe.hgetall(keys.user_key(s.uid))
            for s in sessions:
                pipe.hset(keys.user_key(s.uid), s.session_id, s.SerializeToString())
            for instance, names in _members_by_instance(sessions).items():  # one SADD per instance
                pipe.sadd(keys.instance_key(instance), *names)
            # after the writes: data lost before them shows as a new epoch in this very reply
            self.epochs.queue(pipe)

        replies = await run_pipeline(self._redis, build)
        m.REGISTERED.inc(len(sessions))
        epoch = self.epochs.observe(replies[-2], replies[-1]) or await self.epoch()
        replaced = []
        for s, fields in zip(with_device, replies[:len(with_device)], strict=True):
            for old in self._parse(s.uid, fields):
                # only an older login is replaced: a session written again (after an epoch change,
                # a BIND) must not replace a newer one, and a take-over keeps its connect time
                if (old.device_id == s.device_id and old.instance != s.instance and old.session_id != s.session_id
                        and old.connected_ms < s.connected_ms):
                    replaced.append(old)
        m.REPLACED.inc(len(replaced))
        return len(sessions), epoch, replaced

    async def epoch(self) -> str:
        """The current epoch, created if Redis holds none."""
        for _ in range(3):  # "" only if the key was deleted between SET NX and GET
            replies = await run_pipeline(self._redis, self.epochs.queue)
            epoch = self.epochs.observe(replies[0], replies[1])
            if epoch:
                return epoch
        raise RuntimeError("the register epoch key keeps vanishing between SET NX and GET")

    async def unregister(self, sessions: Sequence[internal_pb2.Session]) -> int:
        """Remove sessions still owned by the instance named in each Session; returns how many."""
        keys.check_sessions("Unregister", sessions, self.max_items)
        if not sessions:
            return 0
        script = self._unregister

        def build(pipe) -> None:
            for s in sessions:
                script.queue(pipe, [keys.user_key(s.uid)], [s.session_id, s.instance])
            for instance, names in _members_by_instance(sessions).items():  # after the scripts
                pipe.srem(keys.instance_key(instance), *names)

        results = await run_pipeline(self._redis, build, (script,))
        removed = sum(int(r) for r in results[:len(sessions)])
        m.UNREGISTERED.labels("unregister").inc(removed)
        return removed

    async def lookup(self, uids: Sequence[str]) -> list[internal_pb2.UserSessions]:
        """One UserSessions per requested uid, in request order (no sessions = offline)."""
        uids = keys.check_uids("Lookup", uids, self.max_items)
        if not uids:
            return []

        def build(pipe) -> None:
            for uid in uids:
                pipe.hgetall(keys.user_key(uid))

        results = await run_pipeline(self._redis, build)
        m.LOOKUPS.inc(len(uids))
        return [internal_pb2.UserSessions(uid=uid, sessions=self._parse(uid, fields))
                for uid, fields in zip(uids, results, strict=True)]

    @staticmethod
    def _parse(uid: str, fields: dict | list) -> list[internal_pb2.Session]:
        out = []
        # HGETALL's raw reply: a map under RESP3, a flat field, value ... list under RESP2
        for raw in (fields.values() if isinstance(fields, dict) else fields[1::2]):
            s = internal_pb2.Session()
            try:
                s.ParseFromString(raw)
            except DecodeError:
                m.CORRUPT.inc()
                log.warning("skipping a session of uid %r that does not parse", uid)
                continue
            out.append(s)
        out.sort(key=lambda s: (s.connected_ms, s.session_id))
        return out

    async def drop_instance(self, instance: str) -> int:
        """Forget every session an instance registered (it restarted or died); returns how many
        were removed. Sessions that have since resumed on another instance are kept."""
        keys.check_instance(instance)
        set_key = keys.instance_key(instance)
        script = self._unregister
        removed = 0
        while True:
            # SPOP in chunks: bounded replies, and a member popped here is never seen twice
            members = await self._redis.spop(set_key, self.drop_chunk)
            if not members:
                break
            pairs = [p for p in map(keys.split_member, members) if p is not None]

            def build(pipe, pairs=pairs) -> None:
                for uid, session_id in pairs:
                    script.queue(pipe, [keys.user_key(uid)], [session_id, instance])

            if pairs:
                removed += sum(int(r) for r in await run_pipeline(self._redis, build, (script,)))
            if len(members) < self.drop_chunk:
                break
        m.UNREGISTERED.labels("drop_instance").inc(removed)
        return removed


def _members_by_instance(sessions: Sequence[internal_pb2.Session]) -> dict[str, list[str]]:
    """Instance-set members of ``sessions``, grouped by instance: one SADD/SREM per instance."""
    out: dict[str, list[str]] = {}
    for s in sessions:
        out.setdefault(s.instance, []).append(keys.member(s.uid, s.session_id))
    return out

"""Kick: find the sessions of some users in register, then tell each room instance holding one.

``plan_kick`` is the pure part (which session on which instance); ``Kicker`` runs the plan
through three injected calls so it can be driven without a network; ``RpcKickPeers`` is the
production implementation of those calls over the shared ServiceClient.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from services.common.pb import internal_pb2 as pb
from services.coordinator import metrics as m

log = logging.getLogger(__name__)

LOOKUP_CHUNK = 1000  # uids per Register.Lookup call: one call must carry many items, but not unbounded


class KickPeers(Protocol):
    async def lookup(self, uids: list[str]) -> list[pb.Session]: ...
    async def rooms(self, fresh: bool = False) -> dict[str, str]: ...  # room instance id -> gRPC address
    async def kick(self, target: str, uids: list[str], session_ids: list[str], reason: str, app: str) -> int: ...


def plan_kick(sessions: Iterable[pb.Session], app: str = "", session_ids: Iterable[str] = ()
              ) -> dict[str, list[pb.Session]]:
    """Room instance id → sessions to kick there. ``app`` keeps sessions bound to it;
    ``session_ids`` (if any) keeps only those sessions."""
    only = set(session_ids)
    plan: dict[str, list[pb.Session]] = {}
    seen: set[str] = set()
    for s in sessions:
        if not s.instance or s.session_id in seen:
            continue
        if app and app not in s.apps:
            continue
        if only and s.session_id not in only:
            continue
        seen.add(s.session_id)
        plan.setdefault(s.instance, []).append(s)
    return plan


class Kicker:
    def __init__(self, peers: KickPeers, concurrency: int = 16) -> None:
        self.peers = peers
        self.concurrency = concurrency

    async def kick(self, uids: list[str], session_ids: list[str] = (), app: str = "", reason: str = "") -> int:
        """Sessions kicked, as reported by the rooms.

        With ``uids``: their sessions (optionally only ``session_ids``, only those bound to
        ``app``). With ``session_ids`` alone register cannot locate them, so every live room
        instance is asked; rooms ignore ids they do not hold.
        """
        if uids:
            sessions = await self.peers.lookup(list(dict.fromkeys(uids)))
            plan = plan_kick(sessions, app, session_ids)
            if not plan:
                m.KICK_REQUESTS.labels("nobody").inc()
                return 0
            rooms = await self.peers.rooms()
            if any(inst not in rooms for inst in plan):
                rooms = await self.peers.rooms(fresh=True)  # a room that started since the cache was filled
        elif session_ids:
            rooms = await self.peers.rooms(fresh=True)
            unlocated = [pb.Session(session_id=sid) for sid in dict.fromkeys(session_ids)]
            plan = {inst: unlocated for inst in rooms}
        else:
            return 0
        sem = asyncio.Semaphore(self.concurrency)

        async def one(instance: str, sessions: list[pb.Session]) -> int:
            target = rooms.get(instance)
            if not target:
                # the room died; register forgets its sessions when the instance is dropped
                log.info("kick: room instance %s is not live; %d sessions skipped", instance, len(sessions))
                return 0
            # uids let the room find the sessions by user instead of scanning every connection
            kick_uids = list(dict.fromkeys(s.uid for s in sessions if s.uid))
            ids = [s.session_id for s in sessions]
            async with sem:
                try:
                    return await self.peers.kick(target, kick_uids, ids, reason, app)
                except Exception as exc:
                    m.KICK_REQUESTS.labels("room_failed").inc()
                    log.warning("kick: room %s (%s) failed: %s", instance, target, exc)
                    return 0

        results = await asyncio.gather(*(one(inst, sessions) for inst, sessions in plan.items()))
        kicked = sum(results)
        m.KICKED_SESSIONS.inc(kicked)
        m.KICK_REQUESTS.labels("ok").inc()
        return kicked


class RpcKickPeers:
    """``KickPeers`` over gRPC: register via a ServiceClient, rooms by their discovery id."""

    def __init__(self, register_client, room_client, deadline_s: float = 5.0) -> None:
        self.register = register_client  # ServiceClient(..., "register", RegisterStub)
        self.room = room_client          # ServiceClient(..., "room", RoomStub)
        self.deadline_s = deadline_s

    async def lookup(self, uids: list[str]) -> list[pb.Session]:
        out: list[pb.Session] = []
        for i in range(0, len(uids), LOOKUP_CHUNK):
            reply = await self.register.call("Lookup", pb.LookupRequest(uids=uids[i:i + LOOKUP_CHUNK]))
            for user in reply.users:
                out.extend(user.sessions)
        return out

    async def rooms(self, fresh: bool = False) -> dict[str, str]:
        live = await self.room.discovery.instances(self.room.service, fresh=fresh)
        return {i.id: i.grpc for i in live if i.grpc}

    async def kick(self, target: str, uids: list[str], session_ids: list[str], reason: str, app: str) -> int:
        req = pb.KickRequest(uids=uids, session_ids=session_ids, reason=reason, app=app)
        reply = await self.room.call("Kick", req, target=target, deadline_s=self.deadline_s)
        return reply.kicked

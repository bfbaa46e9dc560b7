"""gRPC Room service: thin adapter from center/coordinator calls to the RoomInstance."""

from __future__ import annotations

import grpc

from services.common.pb import internal_pb2 as ipb
from services.common.pb import internal_pb2_grpc as igrpc
from services.room.core import RoomInstance
from services.room.drain import DrainRequest

MAX_MESSAGES_PER_PUSH = 10_000
MAX_KICK_ITEMS = 10_000


class RoomServicer(igrpc.RoomServicer):
    def __init__(self, room: RoomInstance, drain: DrainRequest | None = None) -> None:
        self.room = room
        self.drain = drain

    async def Push(self, request: ipb.PushRequest, context) -> ipb.PushReply:
        if len(request.messages) > MAX_MESSAGES_PER_PUSH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_MESSAGES_PER_PUSH} messages per Push")
        return ipb.PushReply(delivered=self.room.push(request.messages))

    async def Broadcast(self, request: ipb.BroadcastRequest, context) -> ipb.PushReply:
        msg = request.message
        if not msg.app or not msg.msg_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "broadcast message needs an app and a msg_id")
        if len(msg.payload) > self.room.max_frame:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "broadcast payload is over the client frame limit")
        return ipb.PushReply(delivered=await self.room.fanout.broadcast(msg, request.max_per_s))

    async def Kick(self, request: ipb.KickRequest, context) -> ipb.KickReply:
        if len(request.uids) + len(request.session_ids) > MAX_KICK_ITEMS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_KICK_ITEMS} uids/sessions per Kick")
        kicked = self.room.kick(request.uids, request.session_ids, request.reason or "kicked", request.app)
        return ipb.KickReply(kicked=kicked)

    async def TakeSession(self, request: ipb.TakeSessionRequest, context) -> ipb.TakenSession:
        return self.room.take_session(request)

    async def Drain(self, request: ipb.DrainRequest, context) -> ipb.DrainReply:
        if self.drain is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this room instance takes no drain requests")
        sessions = self.room.sessions
        started = self.drain.ask(request.restart)
        return ipb.DrainReply(instance=self.room.id, sessions=sessions, already_draining=not started)

"""Presence (Register.Lookup) and kick (Coordinator.Kick) of one user."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Presence:
    uid: str
    sessions: list[pb.Session]

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "online": bool(self.sessions),
            "sessions": [{"session_id": s.session_id, "instance": s.instance, "apps": list(s.apps),
                          "device_id": s.device_id, "connected_ms": s.connected_ms, "net": s.net}
                         for s in self.sessions],
        }


class UserService:
    def __init__(self, register: ServiceClient, coordinator: ServiceClient) -> None:
        self.register = register
        self.coordinator = coordinator

    async def presence(self, uid: str, app_id: str | None) -> Presence:
        """The user's sessions; only those bound to ``app_id`` unless it is None (admin, all apps)."""
        try:
            reply = await self.register.call("Lookup", pb.LookupRequest(uids=[uid]))
        except BACKEND_ERRORS as exc:
            log.warning("Register.Lookup failed: %s", describe(exc))
            raise unavailable("register", exc) from exc
        sessions = [s for user in reply.users if user.uid == uid for s in user.sessions
                    if app_id is None or app_id in s.apps]
        sessions.sort(key=lambda s: (s.connected_ms, s.session_id))
        return Presence(uid, sessions)

    async def kick(self, uid: str, app_id: str | None, reason: str) -> int:
        """Close the user's sessions bound to ``app_id`` (every session if None); how many were closed."""
        request = pb.KickRequest(uids=[uid], app=app_id or "", reason=reason)
        try:
            reply = await self.coordinator.call("Kick", request)
        except BACKEND_ERRORS as exc:
            log.warning("Coordinator.Kick failed: %s", describe(exc))
            raise unavailable("coordinator", exc) from exc
        return reply.kicked

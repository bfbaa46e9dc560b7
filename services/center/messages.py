"""Message state (Saver.GetMessage)."""

from __future__ import annotations

import logging
from typing import Any

from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.center.errors import NotFound
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)


def state_view(state: pb.MessageState) -> dict[str, Any]:
    return {"msg_id": str(state.msg_id), "state": state.state, "uid": state.uid, "app": state.app,
            "created_ms": state.created_ms, "expires_ms": state.expires_ms, "attempts": state.attempts,
            "acked_ms": state.acked_ms, "seq": state.seq}


class MessageQuery:
    def __init__(self, saver: ServiceClient) -> None:
        self.saver = saver

    async def state(self, msg_id: int, app_id: str | None) -> pb.MessageState:
        """The message's state. An app only sees its own messages: others are reported as not found,
        so that ids of other apps cannot be probed."""
        try:
            state = await self.saver.call("GetMessage", pb.GetMessageRequest(msg_id=msg_id))
        except BACKEND_ERRORS as exc:
            log.warning("Saver.GetMessage failed: %s", describe(exc))
            raise unavailable("saver", exc) from exc
        if not state.found or (app_id is not None and state.app != app_id):
            raise NotFound(f"no message {msg_id}", "unknown_message")
        return state

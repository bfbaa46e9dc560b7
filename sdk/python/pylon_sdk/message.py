"""The message object handed to ``on_message``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Message:
    msg_id: int
    app: str
    payload: bytes
    created_ms: int = 0
    seq: int = 0          # per-(uid, app) increasing; a gap means missed messages. 0 for broadcasts
    broadcast: bool = False

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

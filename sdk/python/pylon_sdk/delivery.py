"""Exactly once to the app on top of at-least-once from the server: the order of handler, record, ACK.

For each message of a PUSH frame, in order:

1. already handled (in ``RecentIds``, or in the dedupe file after a restart)? → ACK it again, do
   not hand it over. The server sends a message again when our ACK was lost, after a reconnect
   (inbox reloaded) and after a resume (unacked messages written again), always with the same
   msg_id; broadcast copies carry the broadcast id as msg_id and are treated the same.
2. otherwise hand it to ``on_message`` and wait until the handler returns;
3. record the id as handled (memory, then the file, committed), and only then
4. list it for the frame's ACK, which the client sends after the whole frame.

A handler that raises leaves its message unrecorded and unacked: the server still holds it and
delivers it again at the next connection (or resume), and the handler sees it again. Nothing is
acked that the handler has not finished with, so a crash of the app process never loses a
message; with a dedupe file, one that was handled before the crash is not handed over again.

No sockets here: ``Delivery`` takes decoded frames and returns the ids to ACK.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from pylon_sdk.dedupe import HandledIdsFile, RecentIds
from pylon_sdk.errors import DedupeStoreError
from pylon_sdk.message import Message

log = logging.getLogger("pylon_sdk")

OnMessage = Callable[[Message], Any]


class Delivery:
    __slots__ = ("handler", "recent", "store", "on_store_error", "duplicates")

    def __init__(self, handler: OnMessage | None, recent: RecentIds, store: HandledIdsFile | None = None,
                 on_store_error: Callable[[DedupeStoreError], None] | None = None) -> None:
        self.handler = handler
        self.recent = recent
        self.store = store
        self.on_store_error = on_store_error
        self.duplicates = 0   # messages acked again without handing them over

    def handled_before(self, msg: Message) -> bool:
        if self.recent.seen(msg.msg_id):
            return True
        if self.store is None:
            return False
        try:
            found = self.store.contains(msg.app, msg.msg_id)
        except DedupeStoreError as exc:
            # Unknown: hand it over. A possible duplicate is better than a message never shown.
            self._store_failed(exc)
            return False
        if found:
            self.recent.add(msg.msg_id)
        return found

    def record(self, msg: Message) -> None:
        self.recent.add(msg.msg_id)
        if self.store is None:
            return
        try:
            self.store.record(msg.app, msg.msg_id)
        except DedupeStoreError as exc:
            # The ACK still goes: once acked the server does not send it again, and this process
            # remembers it in memory; only a lost ACK followed by a restart could show it twice.
            self._store_failed(exc)

    async def deliver(self, messages: tuple[Message, ...], stopped: Callable[[], bool]) -> list[int]:
        """Hand the new messages of one PUSH frame to the handler, in order; return the ids to ACK
        (duplicates, and new ones whose handler returned, each already recorded). Stops early,
        after the message in hand is recorded, once ``stopped()`` is true (the client closed)."""
        acks: list[int] = []
        for msg in messages:
            if stopped():
                break
            if self.handled_before(msg):
                self.duplicates += 1
                acks.append(msg.msg_id)
                continue
            if self.handler is not None:
                try:
                    result = self.handler(msg)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("pylon: on_message failed for msg_id=%d (not acked; the server delivers it "
                                  "again at the next connection)", msg.msg_id)
                    continue
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # the client is closing: the message stays unrecorded and unacked
                    # The handler's own await was cancelled: that is its failure, not a stop.
                    log.error("pylon: on_message for msg_id=%d was cancelled (not acked; the server delivers "
                              "it again at the next connection)", msg.msg_id)
                    continue
            self.record(msg)
            acks.append(msg.msg_id)
        return acks

    def _store_failed(self, exc: DedupeStoreError) -> None:
        log.error("pylon: %s", exc)
        if self.on_store_error is not None:
            self.on_store_error(exc)

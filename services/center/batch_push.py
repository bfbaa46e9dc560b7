"""The batch form of POST /v1/push on top of PushService: a payload and TTL per message.

``PushService.push`` takes one payload for many uids. Until it takes per-message payloads
itself, this adapter builds the StoredMessages and runs the same steps as ``push`` (admission,
in-flight bound, Saver.Store, Register.Lookup, Room.Push) through the service's own helpers, so
the two forms share the store-before-send path, its limits and its counters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.center import telemetry
from services.center.push import _MESSAGE_OVERHEAD, PushResult, PushService, plan_room_pushes
from services.center.validation import BatchMessage
from services.common.apps import App
from services.common.pb import internal_pb2 as pb


async def push_messages(service: PushService, app: App, batch: Sequence[BatchMessage]) -> PushResult:
    """Store every message of ``batch`` (one Saver.Store per ``rpc_batch_items``), then deliver.

    All or nothing towards the caller: a failed Store fails the request (503) and returns no ids."""
    n_bytes = sum(len(m.payload) + _MESSAGE_OVERHEAD for m in batch)
    with service._in_flight(n_bytes):
        service._admit(app, len(batch))
        started = time.perf_counter()
        now_ms = int(service._clock() * 1000)
        msg_ids = service.ids.batch(len(batch))
        messages = [pb.StoredMessage(msg_id=i, uid=m.uid, app=app.id, payload=m.payload, created_ms=now_ms,
                                     ttl_s=m.ttl_s) for i, m in zip(msg_ids, batch, strict=True)]
        await service._store(messages)
        users = await service._lookup(list(dict.fromkeys(m.uid for m in batch)))
        plan, online = plan_room_pushes(messages, users, app.id)
        delivered, failures = await service._push_to_rooms(plan)
    service.tally.pushes += 1
    service.tally.messages += len(messages)
    service.tally.delivered += delivered
    telemetry.PUSH_REQUESTS.labels("unicast").inc()
    telemetry.PUSH_MESSAGES.inc(len(messages))
    telemetry.DELIVERED.labels("unicast").inc(delivered)
    telemetry.PUSH_SECONDS.labels("unicast").observe(time.perf_counter() - started)
    return PushResult(msg_ids, online, delivered, failures)

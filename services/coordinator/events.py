"""Webhook event encoding. Each event is serialised once, when queued; a batch body is a join.

Body of every webhook request::

    {"app": "<app id>", "events": [<event>, ...]}

    upstream: {"type": "upstream", "uid", "device_id", "session_id", "kind", "payload_b64", "ts_ms"}
    status:   {"type": "online" | "offline", "uid", "device_id", "session_id", "instance", "ts_ms"}
"""

from __future__ import annotations

import base64
import json
import time

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _now_ms() -> int:
    return int(time.time() * 1000)


def upstream_event(item) -> bytes:
    """``item`` is an ``internal_pb2.UpstreamItem``."""
    return _dumps({
        "type": "upstream",
        "uid": item.uid,
        "device_id": item.device_id,
        "session_id": item.session_id,
        "kind": item.kind,
        "payload_b64": base64.b64encode(item.payload).decode("ascii"),
        "ts_ms": item.ts_ms or _now_ms(),
    }).encode()


def status_event(ev) -> bytes:
    """``ev`` is an ``internal_pb2.StatusEvent``; the same bytes serve every app it names."""
    return _dumps({
        "type": "online" if ev.online else "offline",
        "uid": ev.uid,
        "device_id": ev.device_id,
        "session_id": ev.session_id,
        "instance": ev.instance,
        "ts_ms": ev.ts_ms or _now_ms(),
    }).encode()


def body(app_id: str, events: list[bytes]) -> bytes:
    return b'{"app":' + _dumps(app_id).encode() + b',"events":[' + b",".join(events) + b"]}"


def body_overhead(app_id: str) -> int:
    return len(body(app_id, []))

"""Redis keys and the message state model of the saver (pure, no I/O).

States (``MessageState.state``), written down once:

    stored ──MarkDelivered──▶ delivered ──MarkDelivered × max_attempts──▶ parked
      │                          │                                          │
      └──────────────Ack─────────┴──────────────────Ack─────────────────────┴──▶ acked
    stored/delivered past expires_ms read as ``expired`` (derived, never written).

MySQL stores the written states as codes (``messages.state``): 0 stored, 1 delivered, 2 acked, 3 parked.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STORED = "stored"
    DELIVERED = "delivered"
    ACKED = "acked"
    EXPIRED = "expired"
    PARKED = "parked"


STATE_CODES = {State.STORED: 0, State.DELIVERED: 1, State.ACKED: 2, State.PARKED: 3}
CODE_STATES = {code: state for state, code in STATE_CODES.items()}
# states still waiting in an inbox for delivery or an ack
PENDING = frozenset((State.STORED, State.DELIVERED))


# The epoch: a token the saver that last rebuilt Redis from MySQL (or found it empty and new)
# wrote. Its absence means Redis lost the saver's data (FLUSHALL, a restart without
# persistence, a new server): inboxes and sequence counters must be rebuilt before anything is
# read or numbered. The lock shares its hash tag, so the scripts that check one and set the
# other touch one cluster slot.
EPOCH_KEY = "pylon:saver:{epoch}"
REBUILD_LOCK_KEY = "pylon:saver:{epoch}:rebuild-lock"


def message_key(msg_id: int) -> str:
    return f"pylon:m:{msg_id}"


def inbox_key(uid: str, app: str) -> str:
    # app ids never contain ':' (apps.valid_app_id), so (uid, app) -> key is one-to-one
    return f"pylon:in:{uid}:{app}"


def seq_key(uid: str, app: str) -> str:
    return f"pylon:seq:{uid}:{app}"


def derive_state(written: str, expires_ms: int, now_ms: int) -> str:
    """The state a reader sees: a pending message past its expiry is ``expired``."""
    if written in PENDING and expires_ms and expires_ms <= now_ms:
        return State.EXPIRED.value
    return written


def state_from_code(code: int) -> str:
    try:
        return CODE_STATES[code].value
    except KeyError:
        raise ValueError(f"unknown message state code {code}") from None


def remaining_ttl_s(expires_ms: int, now_ms: int) -> int:
    """Whole seconds left, rounded up, so a live message never reports 0."""
    left = expires_ms - now_ms
    return 0 if left <= 0 else (left + 999) // 1000

"""saver: Redis keys and the state model (pure)."""

from __future__ import annotations

import pytest

from services.saver import keys
from services.saver.keys import State


def test_keys_follow_the_shared_contract():
    assert keys.message_key(42) == "pylon:m:42"
    assert keys.inbox_key("alice", "app1") == "pylon:in:alice:app1"
    assert keys.seq_key("alice", "app1") == "pylon:seq:alice:app1"


@pytest.mark.parametrize("written, expires_ms, now_ms, seen", [
    ("stored", 2000, 1000, "stored"),
    ("stored", 1000, 1000, "expired"),
    ("delivered", 999, 1000, "expired"),
    ("delivered", 5000, 1000, "delivered"),
    ("acked", 1, 1000, "acked"),      # an acked message stays acked after its expiry
    ("parked", 1, 1000, "parked"),
    ("stored", 0, 1000, "stored"),    # no expiry known: never derived as expired
])
def test_derive_state(written, expires_ms, now_ms, seen):
    assert keys.derive_state(written, expires_ms, now_ms) == seen


def test_state_codes_match_the_schema():
    # services/common/migrations/001_initial.sql: 0 stored, 1 delivered, 2 acked, 3 parked
    assert [keys.state_from_code(c) for c in range(4)] == ["stored", "delivered", "acked", "parked"]
    assert State.EXPIRED not in keys.STATE_CODES  # derived, never written
    with pytest.raises(ValueError, match="unknown message state code 9"):
        keys.state_from_code(9)


@pytest.mark.parametrize("expires_ms, now_ms, left", [(10_000, 0, 10), (10_001, 0, 11), (1, 0, 1), (5, 5, 0),
                                                      (0, 5, 0)])
def test_remaining_ttl_rounds_up(expires_ms, now_ms, left):
    assert keys.remaining_ttl_s(expires_ms, now_ms) == left

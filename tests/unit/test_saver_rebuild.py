"""Pure parts of the saver's durability: what a page of MySQL rows becomes in Redis, and the
batched UPDATEs that record acks and deliveries."""

from __future__ import annotations

import re

import pytest

from services.common.config import ConfigError
from services.saver.config import SaverConfig
from services.saver.epoch import new_epoch
from services.saver.journal import ack_sql, delivered_sql
from services.saver.rebuild import TAIL_SETTLED_MS, plan_chunk, tail_loss
from services.saver.validation import Ref

NOW = 1_000_000_000
RETENTION = 60


def row(msg_id, uid="u", app="a", seq=1, state=0, attempts=0, expires_ms=NOW + 10_000, payload=b"p"):
    return (msg_id, uid, app, seq, NOW - 1000, expires_ms, state, attempts, payload)


def test_pending_rows_come_back_with_state_attempts_and_seq():
    plan = plan_chunk([row(1, seq=1), row(2, seq=2, state=1, attempts=3)], NOW, RETENTION)
    assert plan.bodies == [
        (1, "u", "a", b"p", NOW - 1000, NOW + 10_000, 1, "stored", 0, 10 + RETENTION),
        (2, "u", "a", b"p", NOW - 1000, NOW + 10_000, 2, "delivered", 3, 10 + RETENTION)]
    assert plan.inboxes == {"pylon:in:u:a": [10, 1, 1, 2, 2]}


def test_acked_parked_and_expired_rows_stay_out_but_count_for_the_sequence():
    rows = [row(1, seq=7, state=2), row(2, seq=9, state=3), row(3, seq=8, expires_ms=NOW), row(4, seq=5)]
    plan = plan_chunk(rows, NOW, RETENTION)
    assert [b[0] for b in plan.bodies] == [4]
    assert plan.counters == {"pylon:seq:u:a": 9}


def test_acked_and_parked_rows_are_settled_in_redis_too():
    rows = [row(1, seq=7, state=2), row(2, seq=9, state=3), row(3, seq=8, state=2, expires_ms=NOW)]
    plan = plan_chunk(rows, NOW, RETENTION)
    # MySQL wins for what it holds as acked or parked (a Redis that lost that write has it pending)
    assert plan.settled == [(1, "u", "a", "acked"), (2, "u", "a", "parked")]


def test_each_pair_has_its_own_inbox_counter_and_longest_ttl():
    rows = [row(1, uid="x", seq=3, expires_ms=NOW + 5_000), row(2, uid="x", seq=4, expires_ms=NOW + 20_500),
            row(3, uid="X", seq=1), row(4, uid="x", app="b", seq=2, state=2)]
    plan = plan_chunk(rows, NOW, RETENTION)
    # uids differing only in case are different users
    assert plan.counters == {"pylon:seq:x:a": 4, "pylon:seq:X:a": 1, "pylon:seq:x:b": 2}
    assert plan.inboxes == {"pylon:in:x:a": [21, 3, 1, 4, 2], "pylon:in:X:a": [10, 1, 3]}


def test_empty_page():
    plan = plan_chunk([], NOW, RETENTION)
    assert (plan.bodies, plan.inboxes, plan.counters) == ([], {}, {})


def tail_row(msg_id, uid="u", seq=1, state=0, created_ms=NOW - TAIL_SETTLED_MS, expires_ms=NOW + 10_000):
    return (msg_id, uid, "a", seq, created_ms, expires_ms, state, 0)


def test_tail_intact():
    rows = [tail_row(2, seq=2), tail_row(1, seq=1, state=2)]
    assert tail_loss(rows, {"pylon:seq:u:a": 2}, {2: "stored", 1: "acked"}, NOW) == (0, 0)
    assert tail_loss(rows, {"pylon:seq:u:a": 2}, {2: "delivered", 1: None}, NOW) == (0, 0)


def test_tail_with_an_ack_redis_lost():
    rows = [tail_row(2, seq=2, state=2), tail_row(1, seq=1, state=3)]
    # MySQL has 2 acked and 1 parked; Redis came back with both still pending
    assert tail_loss(rows, {"pylon:seq:u:a": 2}, {2: "delivered", 1: "stored"}, NOW) == (0, 2)


def test_tail_with_a_counter_behind_mysql():
    rows = [tail_row(3, seq=3, state=2), tail_row(2, uid="v", seq=1, state=2)]
    assert tail_loss(rows, {"pylon:seq:u:a": 2}, {}, NOW) == (2, 0)  # v's counter is gone altogether


def test_tail_with_settled_messages_missing_but_not_ones_still_being_stored():
    rows = [tail_row(4, seq=4, created_ms=NOW - 5), tail_row(3, seq=3), tail_row(2, seq=2, expires_ms=NOW),
            tail_row(1, seq=1, state=3)]
    # 4: its Store may still be writing Redis; 2: expired; 1: parked (no record needed)
    assert tail_loss(rows, {"pylon:seq:u:a": 4}, {}, NOW) == (0, 1)


def placeholders(sql: str) -> int:
    return len(re.findall(r"%s", sql))


def test_ack_sql_is_one_owner_checked_statement_for_the_whole_flush():
    acks = [(Ref("u1", "a", 10), 111), (Ref("u2", "b", 20), 222), (Ref("intruder", "a", 10), 333)]
    sql, args = ack_sql(acks)
    assert sql.count("UPDATE") == 1 and placeholders(sql) == len(args)
    assert "BINARY uid=%s AND BINARY app=%s" in sql and "state<>2" in sql and "payload=''" in sql
    # one acked_ms per id (the first), every id once in the IN list, every ref's owner check
    assert args[:4] == [10, 111, 20, 222]
    assert args[4:6] == [10, 20]
    assert args[6:] == [10, "u1", "a", 20, "u2", "b", 10, "intruder", "a"]


def test_ack_sql_adds_the_attempts_an_ack_reports():
    acks = [(Ref("u1", "a", 10, 2), 111), (Ref("u2", "b", 20), 222), (Ref("u1", "a", 10, 5), 333)]
    sql, args = ack_sql(acks)
    assert sql.count("UPDATE") == 1 and placeholders(sql) == len(args)
    assert "attempts=attempts+CASE msg_id WHEN %s THEN %s ELSE 0 END" in sql
    # acked_ms per id, then the first ref's reported attempts for the ids that report any
    assert args[:6] == [10, 111, 20, 222, 10, 2]
    assert args[6:8] == [10, 20]
    assert "attempts=" not in ack_sql([(Ref("u2", "b", 20), 222)])[0]


def test_delivered_sql_keeps_the_highest_count_and_parks():
    sql, args = delivered_sql([(1, 1), (2, 2), (1, 2), (3, -10)])
    assert sql.count("UPDATE") == 1 and placeholders(sql) == len(args)
    assert "GREATEST(attempts" in sql and "state<2" in sql and "THEN 3" in sql
    assert args == [1, 2, 2, 2, 3, 10, 3, 1, 2, 3]


def test_delivered_sql_without_parks():
    sql, args = delivered_sql([(5, 1)])
    assert "IF(state=0, 1, state)" in sql and "THEN 3" not in sql
    assert args == [5, 1, 5]


def test_epochs_are_unique_and_time_ordered():
    a, b = new_epoch(), new_epoch()
    assert a != b
    assert re.fullmatch(r"\d{13}-[0-9a-f]{8}", a)
    assert int(a.split("-")[0]) <= int(b.split("-")[0])


@pytest.mark.parametrize("field,value", [
    ("epoch_check_interval_s", 0), ("rebuild_chunk_rows", 0), ("rebuild_chunk_rows", 10_001),
    ("rebuild_lock_ttl_s", 0.5), ("rebuild_wait_s", -1), ("tail_check_rows", -1)])
def test_rebuild_config_bounds(field, value):
    with pytest.raises(ConfigError):
        SaverConfig(**{field: value}).validate()

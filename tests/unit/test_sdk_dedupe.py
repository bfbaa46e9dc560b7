"""The SDK's memory of handled message ids (in memory and in the optional file) and the delivery order."""

import pytest
from pylon_sdk import DedupeStoreError, Message
from pylon_sdk.dedupe import HandledIdsFile, RecentIds
from pylon_sdk.delivery import Delivery


def test_remembers_and_forgets_the_oldest():
    r = RecentIds(3)
    for i in (1, 2, 3):
        assert not r.seen(i)
        r.add(i)
    assert r.seen(1) and r.seen(2) and r.seen(3)
    r.add(4)
    assert len(r) == 3
    assert not r.seen(1)  # oldest evicted
    assert r.seen(4)


def test_seen_refreshes_an_id():
    r = RecentIds(3)
    for i in (1, 2, 3):
        r.add(i)
    assert r.seen(1)      # a duplicate of 1 arrived: keep it known
    r.add(4)
    assert r.seen(1)
    assert not r.seen(2)


def test_capacity_is_enforced_under_load():
    r = RecentIds(10_000)
    for i in range(50_000):
        r.add(i)
    assert len(r) == 10_000
    assert 49_999 in r and 39_999 not in r


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        RecentIds(0)


# ---------------------------------------------------------------- the dedupe file


def opened(path, uid="alice", **kw):
    f = HandledIdsFile(path, uid, **kw)
    f.open()
    return f


def test_file_remembers_across_reopen_and_per_uid_and_app(tmp_path):
    path = tmp_path / "h.db"
    f = opened(path)
    f.record("app1", 1)
    f.record("app1", 2**64 - 1)           # u64 ids past the signed range
    f.close()
    f = opened(path)
    assert f.contains("app1", 1) and f.contains("app1", 2**64 - 1)
    assert not f.contains("app2", 1) and not f.contains("app1", 3)
    bob = opened(path, uid="bob")
    assert not bob.contains("app1", 1)
    bob.close()
    f.close()


def test_file_uses_wal_and_the_chosen_sync(tmp_path):
    f = opened(tmp_path / "h.db")
    assert f._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert f._db.execute("PRAGMA synchronous").fetchone()[0] == 1      # NORMAL
    f.close()
    g = opened(tmp_path / "g.db", fsync=True)
    assert g._db.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    g.close()


def test_file_keeps_a_bounded_number_per_key_oldest_handled_go_first(tmp_path):
    f = opened(tmp_path / "h.db", keep=100)
    f.record("other", 7)
    for i in range(1000):
        f.record("app1", 10_000 - i)      # ids need not rise: the order handled is what counts
        assert f.count("app1") <= 110
    assert f.contains("app1", 10_000 - 999) and f.contains("app1", 10_000 - 900)
    assert not f.contains("app1", 10_000)
    assert f.contains("other", 7)          # another app's ids are not pushed out
    f.close()


def test_file_record_again_makes_an_id_the_newest(tmp_path):
    f = opened(tmp_path / "h.db", keep=10)
    for i in range(10):
        f.record("a", i)
    f.record("a", 0)                       # a duplicate came again: keep it known
    for i in range(10, 19):
        f.record("a", i)
    assert f.contains("a", 0) and not f.contains("a", 1)
    f.close()


def test_file_open_prunes_a_file_kept_with_a_larger_bound(tmp_path):
    f = opened(tmp_path / "h.db", keep=1000)
    for i in range(500):
        f.record("a", i)
    f.close()
    f = opened(tmp_path / "h.db", keep=50)
    f.record("a", 500)
    assert f.count("a") == 50
    f.close()


def test_file_errors_are_typed(tmp_path):
    with pytest.raises(DedupeStoreError):
        opened(tmp_path / "no-such-dir" / "h.db")
    f = HandledIdsFile(tmp_path / "h.db", "alice")
    with pytest.raises(DedupeStoreError):
        f.contains("a", 1)                 # not open
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(DedupeStoreError):
        opened(tmp_path / "junk.db")
    with pytest.raises(ValueError):
        HandledIdsFile(tmp_path / "h.db", "alice", keep=0)


# ---------------------------------------------------------------- Delivery: handler, record, ack


def msg(i, app="a"):
    return Message(i, app, b"x")


def never():
    return False


async def test_delivery_hands_over_once_records_after_the_handler_and_skips_failures(tmp_path):
    f = opened(tmp_path / "h.db")
    order = []

    def handler(m):
        order.append(("handler", m.msg_id, f.contains(m.app, m.msg_id)))
        if m.msg_id == 2:
            raise RuntimeError("app bug")

    d = Delivery(handler, RecentIds(100), f)
    assert await d.deliver((msg(1), msg(2), msg(3), msg(1)), never) == [1, 3, 1]
    assert order == [("handler", 1, False), ("handler", 2, False), ("handler", 3, False)]
    assert [f.contains("a", i) for i in (1, 2, 3)] == [True, False, True]
    assert d.duplicates == 1
    f.close()


async def test_delivery_after_a_restart_finds_the_id_in_the_file(tmp_path):
    f = opened(tmp_path / "h.db")
    f.record("a", 5)
    got = []
    d = Delivery(got.append, RecentIds(100), f)  # a new process: memory empty
    assert await d.deliver((msg(5), msg(6)), never) == [5, 6]
    assert [m.msg_id for m in got] == [6]
    assert 5 in d.recent                           # learnt from the file, so the next lookup stays in memory
    f.close()


async def test_delivery_stops_after_the_message_in_hand_once_closed():
    stop = []
    got = []

    def handler(m):
        got.append(m.msg_id)
        stop.append(True)                          # the handler closed the client

    d = Delivery(handler, RecentIds(100))
    assert await d.deliver((msg(1), msg(2)), lambda: bool(stop)) == [1]
    assert got == [1] and 1 in d.recent

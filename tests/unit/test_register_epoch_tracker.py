"""register epoch: the commands queued after a batch's writes and the reading of their replies (pure)."""

from __future__ import annotations

import logging

from services.common.redis_scripts import Pipe
from services.register import keys
from services.register import metrics as m
from services.register.epoch import EpochTracker, new_epoch


def _value(metric, *labels) -> float:
    target = metric.labels(*labels) if labels else metric
    return target._value.get()


def test_queue_creates_only_if_missing_then_reads():
    pipe = Pipe()
    EpochTracker.queue(pipe)
    (set_cmd, get_cmd) = pipe.commands
    assert set_cmd[:2] == ("SET", keys.EPOCH_KEY) and set_cmd[3] == "NX" and len(set_cmd[2]) == 16
    assert get_cmd == ("GET", keys.EPOCH_KEY)
    assert new_epoch() != new_epoch()


def test_existing_epoch_is_read_without_counting_a_change(caplog):
    t = EpochTracker()
    started, changes = _value(m.EPOCHS_STARTED), _value(m.EPOCH_CHANGES)
    with caplog.at_level(logging.WARNING):
        assert t.observe(None, b"aaaa") == "aaaa"
        assert t.observe(None, b"aaaa") == "aaaa"
    assert _value(m.EPOCHS_STARTED) == started and _value(m.EPOCH_CHANGES) == changes
    assert not caplog.records
    assert _value(m.EPOCH_INFO, "aaaa") == 1


def test_new_epoch_is_logged_and_counted(caplog):
    t = EpochTracker()
    t.observe(None, b"old1")
    started, changes = _value(m.EPOCHS_STARTED), _value(m.EPOCH_CHANGES)
    with caplog.at_level(logging.WARNING):
        assert t.observe(b"OK", b"new2") == "new2"  # this register's SET NX wrote it
    assert _value(m.EPOCHS_STARTED) == started + 1
    assert _value(m.EPOCH_CHANGES) == changes + 1
    text = caplog.text
    assert "started a new epoch new2" in text and "changed from old1 to new2" in text
    # the info gauge names the current epoch only
    assert _value(m.EPOCH_INFO, "new2") == 1
    assert {s.labels["epoch"] for s in m.EPOCH_INFO.collect()[0].samples} == {"new2"}


def test_epoch_created_by_another_register_is_a_change_not_a_start():
    t = EpochTracker()
    t.observe(None, b"e1")
    started, changes = _value(m.EPOCHS_STARTED), _value(m.EPOCH_CHANGES)
    assert t.observe(None, b"e2") == "e2"
    assert _value(m.EPOCHS_STARTED) == started and _value(m.EPOCH_CHANGES) == changes + 1


def test_key_deleted_between_set_and_get_asks_again():
    t = EpochTracker()
    assert t.observe(b"OK", None) == ""
    assert t.current == ""

"""saver: request validation and normalisation, config and SQL building (pure)."""

from __future__ import annotations

import logging

import pytest

from services.common import config
from services.common.outage import OutageLog
from services.common.pb import internal_pb2 as pb
from services.saver import validation
from services.saver.config import SaverConfig
from services.saver.journal import insert_sql
from services.saver.validation import RequestError

CFG = SaverConfig(max_items=10, default_ttl_s=100, max_ttl_s=1000, max_payload_bytes=16)
NOW = 1_700_000_000_000


def m(**kw):
    base = dict(msg_id=1, uid="u", app="app1", payload=b"x", created_ms=NOW - 5)
    base.update(kw)
    return pb.StoredMessage(**base)


def test_store_items_resolve_ttl_and_expiry():
    items = validation.store_items([m(msg_id=1), m(msg_id=2, ttl_s=50), m(msg_id=3, ttl_s=5000),
                                    m(msg_id=4, created_ms=0)], CFG, NOW)
    assert [(i.ttl_s, i.expires_ms) for i in items] == [
        (100, NOW - 5 + 100_000), (50, NOW - 5 + 50_000), (1000, NOW - 5 + 1_000_000), (100, NOW + 100_000)]
    assert items[3].created_ms == NOW
    assert (items[0].uid, items[0].app, items[0].payload) == ("u", "app1", b"x")


@pytest.mark.parametrize("bad, fragment", [
    (m(msg_id=0), "msg_id must be > 0"),
    (m(uid=""), "uid must not be empty"),
    (m(uid="x" * 129), "longer than 128"),
    (m(app="App1"), "not a valid app id"),
    (m(app="a:b"), "not a valid app id"),
    (m(app=""), "not a valid app id"),
    (m(payload=b"x" * 17), "17 bytes is over the limit of 16"),
    (m(broadcast=True), "broadcast"),
])
def test_store_rejects_bad_messages_by_index(bad, fragment):
    with pytest.raises(RequestError, match=fragment) as info:
        validation.store_items([m(msg_id=1000), bad], CFG, NOW)
    assert str(info.value).startswith("Store: messages[1]: ")


def test_store_rejects_duplicates_and_oversized_batches():
    with pytest.raises(RequestError, match="appears twice"):
        validation.store_items([m(msg_id=5), m(msg_id=5)], CFG, NOW)
    with pytest.raises(RequestError, match="11 items in one request, the limit is 10"):
        validation.store_items([m(msg_id=i + 1) for i in range(11)], CFG, NOW)


def test_refs():
    refs = validation.refs("Ack", [pb.MessageRef(uid="u", app="a", msg_id=3)], CFG)
    assert refs == [validation.Ref("u", "a", 3)]
    with pytest.raises(RequestError, match=r"Ack: refs\[0\]: msg_id"):
        validation.refs("Ack", [pb.MessageRef(uid="u", app="a")], CFG)
    with pytest.raises(RequestError, match="limit is 10"):
        validation.refs("MarkDelivered", [pb.MessageRef(uid="u", app="a", msg_id=1)] * 11, CFG)
    acked = validation.refs("Ack", [pb.MessageRef(uid="u", app="a", msg_id=3, deliveries=2)], CFG)
    assert acked == [validation.Ref("u", "a", 3, 2)]
    counted = validation.refs("MarkDelivered", [pb.MessageRef(uid="u", app="a", msg_id=3, deliveries=2)], CFG)
    assert counted == [validation.Ref("u", "a", 3, 0)], "MarkDelivered counts one per ref"
    with pytest.raises(RequestError, match=r"Ack: refs\[0\]: deliveries 1001 is over the limit of 1000"):
        validation.refs("Ack", [pb.MessageRef(uid="u", app="a", msg_id=3, deliveries=1001)], CFG)


def test_load_keys_limit_and_dedupe():
    keys = [pb.InboxKey(uid="u", apps=["a", "b", "a"]), pb.InboxKey(uid="v", apps=[])]
    inboxes, limit = validation.load_keys(keys, 0, CFG)
    assert inboxes == [[("u", "a"), ("u", "b")], []]
    assert limit == CFG.load_default_limit
    assert validation.load_keys(keys, 5, CFG)[1] == 5
    assert validation.load_keys(keys, 10**6, CFG)[1] == CFG.load_max_limit


def test_load_keys_bounds():
    with pytest.raises(RequestError, match="LoadInbox: 11 items"):
        validation.load_keys([pb.InboxKey(uid="u", apps=["a"])] * 11, 0, CFG)
    # few keys, but too many (uid, app) inboxes in total
    with pytest.raises(RequestError, match="inboxes: 12 items"):
        validation.load_keys([pb.InboxKey(uid="u", apps=[f"a{i}" for i in range(6)])] * 2, 0, CFG)
    with pytest.raises(RequestError, match=r"keys\[0\]: 65 apps"):
        validation.load_keys([pb.InboxKey(uid="u", apps=[f"a{i}" for i in range(65)])], 0,
                             SaverConfig(max_items=1000))


def test_insert_sql_escapes_strings_and_hexes_payloads():
    sql = insert_sql([(1, "o'brien\\ü", "app1", 2, b"\x00'\xff", 3, 4), (5, "u", "a", 6, b"", 7, 8)])
    assert sql == ("INSERT INTO messages (msg_id, uid, app, seq, payload, created_ms, expires_ms) VALUES "
                   "(1,'o\\'brien\\\\ü','app1',2,X'0027ff',3,4),(5,'u','a',6,X'',7,8) "
                   "ON DUPLICATE KEY UPDATE seq=VALUES(seq)")
    # the statement runs without args, so a '%' in a value is only data
    assert "'100%s'" in insert_sql([(1, "100%s", "a", 1, b"", 1, 1)])
    assert "'it''s'" in insert_sql([(1, "it's", "a", 1, b"", 1, 1)], lambda s: s.replace("'", "''"))


def test_config_env_override_and_errors():
    cfg = config.build(SaverConfig, "saver", {}, env={"PYLON_SAVER_MAX_ATTEMPTS": "3"})
    assert (cfg.max_attempts, cfg.default_ttl_s, cfg.ack_retention_s) == (3, 7 * 86400, 86400)
    with pytest.raises(config.ConfigError, match="saver.max_attempts"):
        config.build(SaverConfig, "saver", {"max_attempts": 0}, env={})
    with pytest.raises(config.ConfigError, match="saver.default_ttl_s"):
        config.build(SaverConfig, "saver", {"default_ttl_s": 10, "max_ttl_s": 5}, env={})
    with pytest.raises(config.ConfigError, match="saver.mysql_flush_concurrency"):
        config.build(SaverConfig, "saver", {"mysql_flush_concurrency": 8, "mysql_pool_size": 8}, env={})


def test_outage_log_writes_one_line_per_outage(caplog):
    log = OutageLog("MySQL", every_s=3600)
    with caplog.at_level(logging.INFO, logger="services.common.outage"):
        for _ in range(100):
            log.failed(RuntimeError("MySQL unavailable: boom"))
        log.ok()
        log.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["MySQL unavailable: boom", "MySQL reachable again after 0.0s (100 failures)"]

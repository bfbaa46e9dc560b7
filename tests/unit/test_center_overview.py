"""The overview's pure parts: the /metrics text parser and sample aggregation (rates, restarts, apps)."""

import pytest

from services.center.cluster_metrics import MetricsTextError, Scrape, parse
from services.center.overview import WANTED, aggregate
from services.common.discovery import Instance

ROOM_TEXT = """# HELP pylon_room_sessions Authenticated sessions
# TYPE pylon_room_sessions gauge
pylon_room_sessions 12.0
pylon_room_connections 14.0
pylon_room_auths_total{result="ok"} 30.0
pylon_room_auths_total{result="bad_token"} 2.0
pylon_room_messages_delivered_total{kind="unicast"} 100.0
pylon_room_messages_delivered_total{kind="broadcast"} 50.0
pylon_room_frames_in_total{op="PING"} 7.0
"""


def center_text(messages: float, app_messages: dict[str, float], status5: float = 0) -> str:
    lines = [f"pylon_center_push_messages_total {messages}",
             'pylon_center_push_requests_total{kind="unicast"} 3.0',
             f'pylon_center_http_requests_total{{method="POST",route="/v1/push",status="200"}} {messages}',
             f'pylon_center_http_requests_total{{method="POST",route="/v1/push",status="503"}} {status5}',
             "pylon_center_push_messages_created 1.7e9"]
    lines += [f'pylon_center_app_messages_total{{app="{a}"}} {v}' for a, v in app_messages.items()]
    return "\n".join(lines) + "\n"


def scrape(service: str, iid: str, text: str) -> Scrape:
    return Scrape(Instance(service=service, id=iid), parse(text, WANTED))


def test_parse_keeps_only_wanted_series_with_their_labels():
    series = parse(ROOM_TEXT, {"pylon_room_sessions", "pylon_room_auths_total"})
    assert series == {"pylon_room_sessions": {(): 12.0},
                      "pylon_room_auths_total": {(("result", "ok"),): 30.0, (("result", "bad_token"),): 2.0}}


def test_parse_label_escapes_timestamps_and_nan():
    text = 'm{b="x\\"y",a="1\\\\2"} 3 1700000000000\nm{a="n"} NaN\nm 4e2\n'
    assert parse(text, {"m"}) == {"m": {(("a", "1\\2"), ("b", 'x"y')): 3.0, (): 400.0}}


@pytest.mark.parametrize("text", ['m{a="x} 1\n', "m\n", "m{a=x} 1\n", "m one\n", 'm{a="x"}\n'])
def test_parse_refuses_malformed_text(text):
    with pytest.raises(MetricsTextError):
        parse(text, {"m"})


def test_scrape_helpers_sum_and_split_by_label():
    s = scrape("room", "r1", ROOM_TEXT)
    assert s.value("pylon_room_messages_delivered_total") == 150
    assert s.value("pylon_room_auths_total", result="ok") == 30
    assert s.by_label("pylon_room_messages_delivered_total", "kind") == {"unicast": 100, "broadcast": 50}


def test_aggregate_sums_gauges_and_derives_rates_per_process():
    first = aggregate([scrape("room", "r1", ROOM_TEXT), scrape("room", "r2", ROOM_TEXT),
                       scrape("center", "c1", center_text(10, {"a": 10}))], None, 1_000)
    assert first.gauges["sessions"] == 24 and first.gauges["connections"] == 28
    assert first.rates == {} and first.room_connections == {"r1": 14, "r2": 14}
    more_room = ROOM_TEXT.replace('{kind="unicast"} 100.0', '{kind="unicast"} 120.0')
    second = aggregate([scrape("room", "r1", more_room), scrape("room", "r2", ROOM_TEXT),
                        scrape("center", "c1", center_text(30, {"a": 20, "b": 10}, status5=4))], first, 3_000)
    assert second.rates["delivered"] == 10.0  # 20 more in 2 s
    assert second.rates["messages"] == 10.0
    assert second.rates["http_5xx"] == 2.0 and second.rates["errors"] == 2.0
    # app b is new in a known process: it counts from 0
    assert second.app_rates == {"a": {"messages": 5.0}, "b": {"messages": 5.0}}


def test_a_restarted_process_counts_from_zero_and_a_missed_one_not_at_all():
    first = aggregate([scrape("center", "c1", center_text(1000, {}))], None, 0)
    second = aggregate([scrape("center", "c1", center_text(8, {})), scrape("center", "c2", center_text(500, {}))],
                       first, 2_000)
    assert second.rates["messages"] == 4.0  # c1 restarted: 8 since; c2 has no baseline yet


def test_a_failed_scrape_is_listed_not_counted():
    failed = Scrape(Instance(service="saver", id="s1"), error="TimeoutError")
    sample = aggregate([failed, scrape("room", "r1", ROOM_TEXT)], None, 0)
    assert sample.failed == [{"service": "saver", "id": "s1", "error": "TimeoutError"}]
    assert sample.gauges["sessions"] == 12


def test_room_instances_are_live_draining_or_gone_and_gone_ones_are_forgotten():
    from services.center.overview import GONE_KEPT_S, OverviewCollector

    overview = OverviewCollector(discovery=None, scraper=None, redis=None, pool=None)
    a = Instance(service="room", id="room-a", host="h", port=1, load=50, capacity=100)
    b = Instance(service="room", id="room-b", host="h", port=2, load=10, capacity=100, draining=True)
    rooms = overview._rooms([a, b], None, 1_000)
    assert [(r["id"], r["state"], r["fill"]) for r in rooms] == [("room-a", "live", 0.5), ("room-b", "draining", 0.1)]
    rooms = overview._rooms([a], None, 2_000)
    assert [(r["id"], r["state"], r["sessions"]) for r in rooms] == [("room-a", "live", 50), ("room-b", "gone", 0)]
    assert rooms[1]["last_seen_ms"] == 1_000
    rooms = overview._rooms([a], None, 1_000 + int(GONE_KEPT_S * 1000) + 1)
    assert [r["id"] for r in rooms] == ["room-a"]


def test_a_process_missing_one_round_gets_its_rate_over_both_intervals():
    silent = Scrape(Instance(service="center", id="c1"), error="TimeoutError")
    first = aggregate([scrape("center", "c1", center_text(0, {}))], None, 0)
    second = aggregate([silent], first, 2_000)
    assert second.rates["messages"] == 0.0 and second.counters == first.counters
    third = aggregate([scrape("center", "c1", center_text(40, {}))], second, 4_000)
    assert third.rates["messages"] == 10.0  # 40 over the 4 s since c1 last answered


def test_online_per_app_sums_the_rooms_own_counts_and_names_rooms_that_did_not_answer():
    text = ROOM_TEXT + 'pylon_room_app_sessions{app="a"} 5.0\npylon_room_app_sessions{app="b"} 2.0\n'
    other = ROOM_TEXT + 'pylon_room_app_sessions{app="a"} 3.0\n'
    silent = Scrape(Instance(service="room", id="r3"), error="timed out")
    sample = aggregate([scrape("room", "r1", text), scrape("room", "r2", other), silent], None, 1000)
    assert sample.app_online == {"a": 8.0, "b": 2.0}
    assert [f["id"] for f in sample.failed if f["service"] == "room"] == ["r3"]

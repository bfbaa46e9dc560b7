import pytest

from services.common.discovery import Instance
from services.dispatcher.routing import (
    InvalidQuery,
    NoRooms,
    RouteQuery,
    choose,
    hrw_score,
    normalize_address,
    order_rooms,
    parse_query,
    route_view,
)


def room(n, host="10.0.0.1", load=0, capacity=1000, region="eu", nets=(), draining=False):
    return Instance(service="room", id=f"room-{host}:{7000 + n}", host=host, port=7000 + n, load=load,
                    capacity=capacity, region=region, nets=list(nets), draining=draining)


ROOMS = [room(i, host=f"10.0.0.{i % 3}") for i in range(10)]
UIDS = [f"user-{i}" for i in range(3000)]


def first(uid, rooms):
    return choose(rooms, RouteQuery(uid=uid, count=32)).rooms[0].id


def test_hash_is_stable_across_processes():
    # blake2b, not the salted builtin hash(): a fixed value proves every dispatcher agrees
    assert hrw_score("alice", "room-10.0.0.1:7000") == 0x73eb6aab825da270
    assert 0 <= hrw_score("alice", "x") < 2**64


def test_same_uid_same_first_room_whatever_the_input_order():
    for uid in UIDS[:200]:
        assert first(uid, ROOMS) == first(uid, list(reversed(ROOMS)))


def test_sticky_choice_spreads_evenly():
    counts = {}
    for uid in UIDS:
        counts[first(uid, ROOMS)] = counts.get(first(uid, ROOMS), 0) + 1
    assert len(counts) == len(ROOMS)
    assert max(counts.values()) < 2 * len(UIDS) / len(ROOMS)


def test_adding_a_room_moves_about_one_nth_of_users_and_only_to_it():
    before = {uid: first(uid, ROOMS) for uid in UIDS}
    new = room(99, host="10.0.0.9")
    after = {uid: first(uid, [*ROOMS, new]) for uid in UIDS}
    moved = [uid for uid in UIDS if before[uid] != after[uid]]
    assert all(after[uid] == new.id for uid in moved)
    share = len(moved) / len(UIDS)
    assert 0.5 / 11 < share < 1.6 / 11


def test_removing_a_room_moves_only_its_users():
    before = {uid: first(uid, ROOMS) for uid in UIDS}
    gone = ROOMS[3]
    after = {uid: first(uid, [r for r in ROOMS if r is not gone]) for uid in UIDS}
    assert all(before[uid] == gone.id for uid in UIDS if before[uid] != after[uid])


def test_rest_is_ordered_by_load_with_a_per_uid_tie_break():
    rooms = [room(0, load=900), room(1, load=100), room(2, load=500), room(3, load=100), room(4, load=0)]
    ordered = order_rooms("bob", rooms)
    rest = ordered[1:]
    ratios = [r.load / r.capacity for r in rest]
    assert ratios == sorted(ratios)
    # equal loads: order differs between users (spreads clients) but is fixed for one user
    equal = [room(i, load=100) for i in range(8)]
    orders = {tuple(r.id for r in order_rooms(f"u{i}", equal)[1:]) for i in range(20)}
    assert len(orders) > 1
    assert order_rooms("u1", equal) == order_rooms("u1", list(reversed(equal)))


def test_alternatives_prefer_other_hosts_within_a_load_bucket():
    rooms = [room(i, host="h1") for i in range(4)] + [room(10 + i, host="h2") for i in range(4)]
    ordered = order_rooms("carol", rooms)
    sticky_host = ordered[0].host
    assert ordered[1].host != sticky_host


def test_full_sticky_room_yields_to_the_next_hrw_choice():
    rooms = [room(i) for i in range(5)]
    sticky = order_rooms("dave", rooms)[0]
    full = [room(int(r.port) - 7000, load=1000 if r.id == sticky.id else 0) for r in rooms]
    ordered = order_rooms("dave", full)
    assert ordered[0].id != sticky.id and ordered[-1].id == sticky.id


def test_draining_rooms_are_never_handed_out():
    rooms = [room(0, draining=True), room(1)]
    assert [r.id for r in choose(rooms, RouteQuery(uid="x")).rooms] == [rooms[1].id]
    with pytest.raises(NoRooms):
        choose([room(0, draining=True)], RouteQuery(uid="x"))
    with pytest.raises(NoRooms):
        choose([], RouteQuery(uid="x"))


def test_count_limits_the_answer():
    assert len(choose(ROOMS, RouteQuery(uid="x", count=3)).rooms) == 3


def test_exclude_removes_addresses_and_keeps_sticky_order():
    full = choose(ROOMS, RouteQuery(uid="erin", count=32)).rooms
    bad = {f"{r.host}:{r.port}" for r in full[:2]}
    answer = choose(ROOMS, RouteQuery(uid="erin", exclude=frozenset(bad), count=32))
    assert {f"{r.host}:{r.port}" for r in answer.rooms}.isdisjoint(bad)
    assert len(answer.rooms) == len(ROOMS) - 2 and not answer.all_excluded


def test_everything_excluded_answers_with_all_again_flagged():
    everything = frozenset(f"{r.host}:{r.port}" for r in ROOMS)
    answer = choose(ROOMS, RouteQuery(uid="x", exclude=everything, count=32))
    assert answer.all_excluded and len(answer.rooms) == len(ROOMS)


def test_region_filter_and_fallback_when_all_its_rooms_are_excluded():
    eu = [room(i, region="eu") for i in range(3)]
    us = [room(10 + i, host="10.1.0.1", region="us") for i in range(3)]
    rooms = eu + us
    answer = choose(rooms, RouteQuery(uid="x", region="eu", count=32))
    assert {r.region for r in answer.rooms} == {"eu"} and not answer.region_fallback
    some = frozenset(f"{r.host}:{r.port}" for r in eu[:2])
    answer = choose(rooms, RouteQuery(uid="x", region="eu", exclude=some, count=32))
    assert [r.id for r in answer.rooms] == [eu[2].id]
    all_eu = frozenset(f"{r.host}:{r.port}" for r in eu)
    answer = choose(rooms, RouteQuery(uid="x", region="eu", exclude=all_eu, count=32))
    assert {r.region for r in answer.rooms} == {"us"} and answer.region_fallback
    answer = choose(rooms, RouteQuery(uid="x", region="mars", count=32))
    assert len(answer.rooms) == 6 and answer.region_fallback
    assert len(choose(rooms, RouteQuery(uid="x", count=32)).rooms) == 6


def test_net_filter():
    rooms = [room(0, nets=["wifi"]), room(1, nets=["cellular"]), room(2)]
    ids = {r.id for r in choose(rooms, RouteQuery(uid="x", net="wifi", count=32)).rooms}
    assert ids == {rooms[0].id, rooms[2].id}
    ids = {r.id for r in choose(rooms, RouteQuery(uid="x", net="cellular", count=32)).rooms}
    assert ids == {rooms[1].id, rooms[2].id}
    # nobody declares "satellite": any room beats no answer
    only_declared = rooms[:2]
    assert len(choose(only_declared, RouteQuery(uid="x", net="satellite", count=32)).rooms) == 2


def test_parse_query():
    q = parse_query({"uid": "u1", "net": "WiFi", "region": "eu", "exclude": "10.0.0.1:7000, [::1]:7001,", "count": "3"})
    assert q == RouteQuery(uid="u1", net="wifi", region="eu", exclude=frozenset({"10.0.0.1:7000", "::1:7001"}), count=3)
    assert parse_query({"uid": "u"}).count == 8
    assert parse_query({"uid": "u", "count": "1000"}, max_count=32).count == 32


@pytest.mark.parametrize("params, code", [
    ({}, "missing_uid"),
    ({"uid": ""}, "missing_uid"),
    ({"uid": "x" * 129}, "bad_uid"),
    ({"uid": "a\nb"}, "bad_uid"),
    ({"uid": "u", "count": "0"}, "bad_count"),
    ({"uid": "u", "count": "-1"}, "bad_count"),
    ({"uid": "u", "count": "two"}, "bad_count"),
    ({"uid": "u", "exclude": ",".join(f"h:{i}" for i in range(65))}, "bad_exclude"),
    ({"uid": "u", "net": "n" * 33}, "bad_net"),
])
def test_parse_query_rejections(params, code):
    with pytest.raises(InvalidQuery) as err:
        parse_query(params)
    assert err.value.code == code


def test_normalize_address_and_view():
    assert normalize_address(" Room1.Example:7000 ") == "room1.example:7000"
    assert normalize_address("[::1]:80") == "::1:80"
    view = route_view(choose([room(0)], RouteQuery(uid="x")))
    assert view == {"rooms": [{"host": "10.0.0.1", "port": 7000, "instance": "room-10.0.0.1:7000", "region": "eu"}],
                    "region_fallback": False, "all_excluded": False}


def test_batched_scores_equal_single_scores():
    from services.dispatcher import routing

    ids = [f"room-10.0.0.{i}:7000" for i in range(20)]
    for uid in ("alice", "bob", "ü-ñ", ""):
        assert routing._scores(b"pylon-hrw", uid, ids) == [routing.hrw_score(uid, i) for i in ids]
        assert routing._scores(b"pylon-tie", uid, ids) == [routing.tie_break(uid, i) for i in ids]


def test_sticky_room_alone_is_the_head_of_the_full_order():
    import random

    from services.dispatcher.routing import order_rooms

    rng = random.Random(7)
    rooms = [room(i, host=f"10.0.0.{i % 3}") for i in range(40)]
    for i in range(500):
        for r in rooms:
            r.load = rng.choice([0, 500, 999, 1000])  # 1000 = full
        assert order_rooms(f"u{i}", rooms, count=1) == order_rooms(f"u{i}", rooms)[:1]
    for r in rooms:
        r.load = 1000  # all full: still the sticky one
    assert order_rooms("u", rooms, count=1) == order_rooms("u", rooms)[:1]


def test_sticky_room_is_the_rendezvous_winner_of_the_uids_bucket():
    from services.dispatcher import routing

    rooms = [room(i, host=f"10.0.0.{i % 3}") for i in range(56)]
    for i in range(300):
        uid = f"user-{i}"
        bucket = routing.sticky_bucket(uid)
        want = max(rooms, key=lambda r: (hrw_score(f"#{bucket}", r.id), r.id))
        assert order_rooms(uid, rooms, count=1) == [want]
        # past the ranking kept per bucket (every kept room full), the next one in the full ranking
        ranked = sorted(rooms, key=lambda r: (hrw_score(f"#{bucket}", r.id), r.id), reverse=True)
        full = {r.id for r in ranked[:routing.STICKY_DEPTH]}
        loaded = [room(int(r.port) - 7000, host=r.host, load=1000 if r.id in full else 0) for r in rooms]
        assert order_rooms(uid, loaded, count=1)[0].id == ranked[routing.STICKY_DEPTH].id


def test_sticky_spread_over_many_rooms_is_even():
    rooms = [room(i, host=f"10.0.0.{i % 3}") for i in range(56)]
    counts: dict[str, int] = {}
    n = 20_000
    for i in range(n):
        r = order_rooms(f"spread-{i}", rooms, count=1)[0]
        counts[r.id] = counts.get(r.id, 0) + 1
    assert len(counts) == 56
    assert max(counts.values()) < 1.3 * n / 56 and min(counts.values()) > 0.7 * n / 56


def test_fewer_rooms_than_the_ranking_depth_all_full():
    rooms = [room(i, load=1000) for i in range(2)]
    assert order_rooms("x", rooms, count=1) == order_rooms("x", rooms)[:1]
    assert order_rooms("x", rooms[:1], count=1) == rooms[:1]

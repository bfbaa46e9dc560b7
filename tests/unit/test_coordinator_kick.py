"""Kick planning and fan-out with in-memory peers (no network)."""

import pytest

from services.common.pb import internal_pb2 as pb
from services.coordinator.kick import Kicker, plan_kick


def sess(uid, sid, inst, apps=("a",)):
    return pb.Session(uid=uid, session_id=sid, instance=inst, apps=list(apps))


SESSIONS = [sess("u1", "s1", "room-1", ("a", "b")), sess("u1", "s2", "room-2", ("b",)),
            sess("u2", "s3", "room-1", ("a",)), sess("u3", "s4", "", ("a",)), sess("u1", "s1", "room-1")]


def ids(plan):
    return {inst: [s.session_id for s in sessions] for inst, sessions in plan.items()}


def test_plan_groups_by_instance_and_drops_duplicates():
    assert ids(plan_kick(SESSIONS)) == {"room-1": ["s1", "s3"], "room-2": ["s2"]}


def test_plan_filters_by_app_and_session_ids():
    assert ids(plan_kick(SESSIONS, app="b")) == {"room-1": ["s1"], "room-2": ["s2"]}
    assert ids(plan_kick(SESSIONS, session_ids=["s2", "s9"])) == {"room-2": ["s2"]}
    assert plan_kick(SESSIONS, app="zzz") == {}


class Peers:
    def __init__(self, sessions, rooms, fail=()):
        self.sessions = sessions
        self.room_map = rooms
        self.fail = set(fail)
        self.kicks = []
        self.uids = []
        self.fresh_reads = 0

    async def lookup(self, uids):
        return [s for s in self.sessions if s.uid in uids]

    async def rooms(self, fresh=False):
        self.fresh_reads += fresh
        return dict(self.room_map)

    async def kick(self, target, uids, session_ids, reason, app):
        if target in self.fail:
            raise ConnectionError("room down")
        self.uids.append((target, list(uids)))
        self.kicks.append((target, list(session_ids), reason, app))
        return len(session_ids)


async def test_kick_fans_out_per_room_and_sums():
    peers = Peers(SESSIONS, {"room-1": "h:1", "room-2": "h:2"})
    assert await Kicker(peers).kick(["u1", "u2"], reason="bye") == 3
    assert sorted(peers.kicks) == [("h:1", ["s1", "s3"], "bye", ""), ("h:2", ["s2"], "bye", "")]
    assert sorted(peers.uids) == [("h:1", ["u1", "u2"]), ("h:2", ["u1"])]


async def test_kick_only_sessions_of_one_app():
    peers = Peers(SESSIONS, {"room-1": "h:1", "room-2": "h:2"})
    assert await Kicker(peers).kick(["u1"], app="a", reason="r") == 1
    assert peers.kicks == [("h:1", ["s1"], "r", "a")]


async def test_dead_room_and_failing_room_are_skipped():
    peers = Peers(SESSIONS, {"room-1": "h:1", "room-2": "h:2"}, fail={"h:2"})
    assert await Kicker(peers).kick(["u1"]) == 1
    peers = Peers(SESSIONS, {"room-2": "h:2"})
    assert await Kicker(peers).kick(["u1", "u2"]) == 1
    assert peers.fresh_reads == 1  # an unknown instance triggers one fresh discovery read


async def test_session_ids_alone_go_to_every_room():
    peers = Peers([], {"room-1": "h:1", "room-2": "h:2"})
    assert await Kicker(peers).kick([], session_ids=["s9", "s9"]) == 2
    assert sorted(k[:2] for k in peers.kicks) == [("h:1", ["s9"]), ("h:2", ["s9"])]
    assert peers.uids == [("h:1", []), ("h:2", [])]


@pytest.mark.parametrize("uids", [[], ["nobody"]])
async def test_nothing_to_kick(uids):
    peers = Peers(SESSIONS, {"room-1": "h:1"})
    assert await Kicker(peers).kick(uids) == 0
    assert peers.kicks == []

"""The tallies of center processes sharing a port: one slot each, summed by any of them."""

import os

import pytest

from services.center.config import CenterConfig
from services.center.shared_tally import FIELDS, SharedTallies, SlotTally
from services.center.telemetry import Tally
from services.common.config import ConfigError, build


def test_a_slot_behaves_like_a_tally():
    assert set(FIELDS) == set(Tally().to_dict())
    slot = SharedTallies(2).slot(1)
    slot.requests += 3
    slot.errors_4xx += 1
    assert slot.requests == 3 and slot.to_dict() == {**Tally().to_dict(), "requests": 3, "errors_4xx": 1}
    assert isinstance(slot, SlotTally)


def test_sums_cover_every_slot_written_by_forked_children():
    tallies = SharedTallies(3)
    mine = tallies.slot(0)
    mine.pushes += 2
    children = []
    for index in (1, 2):
        pid = os.fork()
        if pid == 0:
            slot = tallies.slot(index)
            slot.pushes += 10 * index
            slot.messages += 1000
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    total = tallies.total()
    assert total["pushes"] == 2 + 10 + 20 and total["messages"] == 2000
    # a process started again in slot 1 continues from what its predecessor counted
    assert tallies.slot(1).pushes == 10


def test_slot_bounds():
    with pytest.raises(IndexError):
        SharedTallies(2).slot(2)


def test_processes_config():
    assert build(CenterConfig, "center", {"processes": 4}, {}).processes == 4
    with pytest.raises(ConfigError) as err:
        build(CenterConfig, "center", {"processes": 2, "port": 0}, {})
    assert "center.processes" in str(err.value)
    with pytest.raises(ConfigError):
        build(CenterConfig, "center", {"processes": 0}, {})


def test_a_port_held_by_a_reuseport_group_is_reported_taken():
    import socket

    from services.center.processes import port_taken

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert isinstance(port_taken("127.0.0.1", port), OSError)
    assert port_taken("127.0.0.1", port) is None

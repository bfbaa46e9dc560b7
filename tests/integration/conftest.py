"""The whole system for integration tests: all six services as real processes (session scope)."""

from __future__ import annotations

import os

import pytest

from services.launcher.cluster import LocalCluster, Ports
from tests.stores import own_stores

# Short limits so idle and handshake timeouts are testable in seconds.
TEST_ENV = {
    "PYLON_ROOM_HEARTBEAT_MIN_S": "1",
    "PYLON_ROOM_HEARTBEAT_GRACE_S": "1",
    "PYLON_ROOM_HANDSHAKE_TIMEOUT_S": "2",
    # a dropped session is held this long for a resume, and only then goes offline
    "PYLON_ROOM_RESUME_GRACE_S": "3",
    "PYLON_ROOM_WRITE_BUFFER_LIMIT": "65536",
    "PYLON_LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="session")
def cluster(backing_stores):
    common, tmp = backing_stores
    common = own_stores(common, "cluster", mysql_database="pylon_e2e")
    c = LocalCluster(os.path.join(tmp, "cluster"), Ports.free(2), room_instances=2, common=common, env=TEST_ENV)
    c.start()
    c.create_demo_app()
    try:
        yield c
    finally:
        c.stop()

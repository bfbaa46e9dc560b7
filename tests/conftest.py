"""Shared fixtures: real redis-server and MariaDB on free ports in temp dirs (session scope)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from services.common.config import CommonConfig
from services.launcher import backing


@pytest.fixture(scope="session")
def backing_stores():
    """(CommonConfig pointing at a private Redis and MariaDB, tmp dir)."""
    backing.ensure_installed(["redis-server", "mariadbd", "mariadb-install-db"])
    tmp = tempfile.mkdtemp(prefix="pylon-test-")
    rport, mport = backing.free_port(), backing.free_port()
    redis = backing.start_redis(os.path.join(tmp, "redis"), rport)
    maria = backing.start_mariadb(os.path.join(tmp, "mariadb"), mport)
    cfg = CommonConfig(redis_url=f"redis://127.0.0.1:{rport}/0", mysql_host="127.0.0.1", mysql_port=mport,
                       mysql_database="pylon_test", discovery_ttl_s=3, discovery_refresh_s=0.5)
    try:
        yield cfg, tmp
    finally:
        maria.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

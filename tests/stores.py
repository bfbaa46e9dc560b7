"""One Redis database per test module that starts services of its own.

Discovery lives in Redis, so a service started on the cluster's database joins the cluster: the
session-wide cluster's rooms would send part of their acks to a test's saver and lose them when
that test stops it. Every module that starts its own register, saver, center, dispatcher or
coordinator takes its database from here; the cluster keeps database 0.
"""

from __future__ import annotations

import dataclasses

from services.common.config import CommonConfig

REDIS_DBS = {
    "cluster": 0,
    "redis_pipeline": 1,
    "rpc": 2,
    "center_api": 3,
    "dispatcher": 4,
    "register": 5,
    "saver": 6,
    "coordinator": 7,
    "saver_recovery": 8,
    "register_epoch": 9,
    "room_resume": 10,
    "room_recovery": 11,
    "center_processes": 12,
    "api_fuzz": 13,
    "secret_rotation": 14,
    "broadcast_center": 15,
}


def own_stores(cfg: CommonConfig, module: str, **changes) -> CommonConfig:
    """``cfg`` on ``module``'s own Redis database (and any other field changed)."""
    base = cfg.redis_url.rsplit("/", 1)[0]
    return dataclasses.replace(cfg, redis_url=f"{base}/{REDIS_DBS[module]}", **changes)

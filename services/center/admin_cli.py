"""``pylon app create|list|rotate-key|rotate-secret``: manage apps directly in MySQL (and publish them to Redis).

Uses the same core functions as the admin HTTP routes, so both paths create identical apps.
Prints JSON on stdout; errors go to stderr with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import warnings

import pymysql

from services.center import app_registry
from services.center.config import CenterConfig
from services.center.errors import CenterError
from services.common import config, mysql, runtime
from services.common.config import CommonConfig, ConfigError


def add_arguments(p) -> None:
    p.add_argument("--config", help="TOML config file (the [pylon] section locates MySQL and Redis)")
    # --config is accepted before or after the action ("pylon app --config F list" or "pylon app list --config F")
    sub = p.add_subparsers(dest="action", metavar="action")
    sub.required = True
    create = sub.add_parser("create", help="create an app; prints its id, secret and API key (shown once)")
    create.add_argument("id", help="app id: 1-64 characters of a-z 0-9 - _ .")
    create.add_argument("--webhook", default="", help="URL receiving upstream data and status events")
    create.add_argument("--status-events", action="store_true", help="send online/offline events to the webhook")
    create.add_argument("--push-rate", type=int, default=0, help="messages per second (0 = unlimited)")
    create.add_argument("--broadcasts-per-min", type=int, default=None,
                        help="POST /v1/broadcast requests per minute (default 60; 0 = unlimited)")
    create.add_argument("--broadcast-rate", type=int, default=0,
                        help="deliveries per second of one broadcast, all room instances together (0 = unlimited)")
    create.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    lst = sub.add_parser("list", help="list apps")
    lst.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    rotate = sub.add_parser("rotate-key", help="give an app a new API key (prints it, once)")
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=int, default=0, metavar="SECONDS",
                        help="the old key keeps working this long (default 0: it stops now)")
    rotate.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    rotate_secret = sub.add_parser("rotate-secret", help="give an app a new token signing secret (prints it, once)")
    rotate_secret.add_argument("id")
    rotate_secret.add_argument("--overlap", type=int, default=0, metavar="SECONDS",
                               help="tokens signed with the old secret still verify this long (default 0)")
    rotate_secret.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)


async def _run(common: CommonConfig, args) -> object:
    redis = runtime.redis_client(common.redis_url)
    pool = await mysql.connect_pool(common)
    try:
        await mysql.migrate(pool)
        if args.action == "create":
            created = await app_registry.create_app(pool, redis, args.id, webhook_url=args.webhook,
                                                    status_events=args.status_events, push_rate_per_s=args.push_rate,
                                                    broadcasts_per_min=args.broadcasts_per_min,
                                                    broadcast_deliveries_per_s=args.broadcast_rate)
            return created.to_dict()
        if args.action == "rotate-key":
            return (await app_registry.rotate_api_key(pool, args.id, args.grace)).to_dict()
        if args.action == "rotate-secret":
            return (await app_registry.rotate_secret(pool, redis, args.id, args.overlap)).to_dict()
        return {"apps": [s.to_dict() for s in await app_registry.list_apps(pool)]}
    finally:
        pool.close()
        await pool.wait_closed()
        await redis.aclose()


def main(args) -> int:
    path = getattr(args, "sub_config", None) or args.config
    # MySQL notes from the idempotent migration ("database exists", "table already exists") are not news
    warnings.filterwarnings("ignore", message=r".*(database exists|already exists)")
    try:
        common, _ = config.load(CenterConfig, "center", path)
        if args.action == "create" and args.push_rate < 0:
            raise ConfigError("--push-rate must be >= 0")
        if args.action == "create" and (args.broadcast_rate < 0 or (args.broadcasts_per_min or 0) < 0):
            raise ConfigError("--broadcasts-per-min and --broadcast-rate must be >= 0")
        result = asyncio.run(_run(common, args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    except CenterError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    except (pymysql.err.MySQLError, OSError) as exc:
        print(f"cannot reach MySQL/Redis: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0

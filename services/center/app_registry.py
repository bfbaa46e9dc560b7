"""The app registry: apps in MySQL (source of truth), published to Redis for rooms and coordinators.

The module-level functions are the one implementation of create/list/update used by the HTTP
routes, ``pylon app`` and the local launcher. ``AppRegistry`` adds the center's cached read side
(lookup by API key hash or id) on top of them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pymysql

from services.center.errors import BackendUnavailable, Conflict, NotFound
from services.center.validation import check_app_id, webhook_url_field
from services.common import apps
from services.common.apps import App

log = logging.getLogger(__name__)

_COLUMNS = "id, secret, webhook_url, status_events, push_rate_per_s, broadcasts_per_min, broadcast_deliveries_per_s"
_DUPLICATE_KEY = 1062  # MySQL ER_DUP_ENTRY


@dataclass(frozen=True, slots=True)
class CreatedApp:
    """A new app, or an app with a new API key: the only moment the key is visible."""

    app: App
    api_key: str

    def to_dict(self) -> dict[str, Any]:
        return {**app_view(self.app), "api_key": self.api_key}


@dataclass(frozen=True, slots=True)
class StoredApp:
    app: App
    created_at: int  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        return {**app_view(self.app), "created_at": self.created_at}


def app_view(app: App) -> dict[str, Any]:
    return {"id": app.id, "secret": app.secret, "webhook_url": app.webhook_url,
            "status_events": app.status_events, "push_rate_per_s": app.push_rate_per_s,
            "broadcasts_per_min": app.broadcasts_per_min, "broadcast_deliveries_per_s": app.broadcast_deliveries_per_s}


def _row_to_app(row: tuple) -> App:
    return App(id=row[0], secret=row[1], webhook_url=row[2] or "", status_events=bool(row[3]),
               push_rate_per_s=int(row[4]), broadcasts_per_min=int(row[5]), broadcast_deliveries_per_s=int(row[6]))


@contextlib.contextmanager
def _mysql_errors(what: str) -> Iterator[None]:
    """MySQL unreachable or failing becomes BackendUnavailable (503); integrity errors stay as they are."""
    try:
        yield
    except pymysql.err.IntegrityError:
        raise
    except (pymysql.err.MySQLError, OSError) as exc:
        log.warning("MySQL failed during %s: %s", what, exc)
        raise BackendUnavailable(f"app database unavailable ({what})") from exc


async def create_app(pool, redis, app_id: str, *, webhook_url: str = "", status_events: bool = False,
                     push_rate_per_s: int = 0, broadcasts_per_min: int | None = None,
                     broadcast_deliveries_per_s: int = 0) -> CreatedApp:
    """Insert a new app with a fresh secret and API key, publish it to Redis.

    Raises Conflict if the id exists, InvalidRequest for a bad id or URL. A failed publish is
    only logged: the app exists in MySQL and every center republishes all apps periodically.
    """
    check_app_id(app_id)
    webhook_url = webhook_url_field(webhook_url)
    app = App(id=app_id, secret=apps.new_secret(), webhook_url=webhook_url, status_events=bool(status_events),
              push_rate_per_s=int(push_rate_per_s), broadcast_deliveries_per_s=int(broadcast_deliveries_per_s))
    if broadcasts_per_min is not None:
        app = replace(app, broadcasts_per_min=int(broadcasts_per_min))
    api_key = apps.new_api_key()
    with _mysql_errors("create app"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            try:
                await cur.execute(
                    "INSERT INTO apps (id, secret, api_key_sha256, webhook_url, status_events, push_rate_per_s, "
                    "broadcasts_per_min, broadcast_deliveries_per_s) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (app.id, app.secret, apps.hash_api_key(api_key), app.webhook_url, int(app.status_events),
                     app.push_rate_per_s, app.broadcasts_per_min, app.broadcast_deliveries_per_s))
            except pymysql.err.IntegrityError as exc:
                if exc.args and exc.args[0] == _DUPLICATE_KEY:
                    raise Conflict(f"app {app_id!r} already exists", "app_exists") from None
                raise
    await _publish(redis, app)
    return CreatedApp(app, api_key)


async def get_app(pool, app_id: str) -> App | None:
    with _mysql_errors("app lookup"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM apps WHERE id = %s", (app_id,))
            row = await cur.fetchone()
    return _row_to_app(row) if row else None


async def app_by_key_hash(pool, key_hash: str) -> App | None:
    with _mysql_errors("API key lookup"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM apps WHERE api_key_sha256 = %s", (key_hash,))
            row = await cur.fetchone()
    return _row_to_app(row) if row else None


async def list_apps(pool) -> list[StoredApp]:
    with _mysql_errors("app list"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT {_COLUMNS}, UNIX_TIMESTAMP(created_at) FROM apps ORDER BY id")
            rows = await cur.fetchall()
    return [StoredApp(_row_to_app(r), int(r[5] or 0)) for r in rows]


async def update_app(pool, redis, app_id: str, *, webhook_url: str | None = None, status_events: bool | None = None,
                     push_rate_per_s: int | None = None, broadcasts_per_min: int | None = None,
                     broadcast_deliveries_per_s: int | None = None) -> App:
    """Change the given fields (None = keep), publish the result. NotFound if no such app."""
    app = await get_app(pool, app_id)
    if app is None:
        raise NotFound(f"no app {app_id!r}", "unknown_app")
    changes: dict[str, Any] = {}
    if webhook_url is not None:
        changes["webhook_url"] = webhook_url_field(webhook_url)
    if status_events is not None:
        changes["status_events"] = bool(status_events)
    if push_rate_per_s is not None:
        changes["push_rate_per_s"] = int(push_rate_per_s)
    if broadcasts_per_min is not None:
        changes["broadcasts_per_min"] = int(broadcasts_per_min)
    if broadcast_deliveries_per_s is not None:
        changes["broadcast_deliveries_per_s"] = int(broadcast_deliveries_per_s)
    app = replace(app, **changes)
    with _mysql_errors("app update"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("UPDATE apps SET webhook_url = %s, status_events = %s, push_rate_per_s = %s, "
                              "broadcasts_per_min = %s, broadcast_deliveries_per_s = %s WHERE id = %s",
                              (app.webhook_url, int(app.status_events), app.push_rate_per_s, app.broadcasts_per_min,
                               app.broadcast_deliveries_per_s, app.id))
    await _publish(redis, app)
    return app


async def rotate_api_key(pool, app_id: str) -> CreatedApp:
    """Replace an app's API key (the old one stops working once centers' caches expire)."""
    app = await get_app(pool, app_id)
    if app is None:
        raise NotFound(f"no app {app_id!r}", "unknown_app")
    api_key = apps.new_api_key()
    with _mysql_errors("API key rotation"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("UPDATE apps SET api_key_sha256 = %s WHERE id = %s", (apps.hash_api_key(api_key), app_id))
    return CreatedApp(app, api_key)


async def publish_all(pool, redis) -> int:
    """Copy every app from MySQL to Redis (at start, and periodically to heal a Redis loss)."""
    stored = await list_apps(pool)
    if stored:
        pipe = redis.pipeline(transaction=False)
        for s in stored:
            pipe.hset(apps.REDIS_KEY, s.app.id, s.app.to_json())
        await pipe.execute()
    return len(stored)


async def _publish(redis, app: App) -> None:
    try:
        await apps.publish(redis, app)
    except Exception as exc:  # Redis blip: the periodic republish catches up
        log.warning("could not publish app %s to Redis (will retry with the next republish): %s", app.id, exc)


class AppRegistry:
    """The center's view of the apps: cached lookups plus the write operations."""

    def __init__(self, pool, redis, ttl_s: float = 10.0, miss_ttl_s: float = 2.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.redis = redis
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self._max = max_entries
        self._clock = clock
        self._by_key: dict[str, tuple[float, App | None]] = {}
        self._by_id: dict[str, tuple[float, App | None]] = {}

    def _cache_get(self, cache: dict[str, tuple[float, App | None]], key: str) -> App | None | bool:
        hit = cache.get(key)
        if hit is None or hit[0] < self._clock():
            return False
        return hit[1]

    def _cache_put(self, cache: dict[str, tuple[float, App | None]], key: str, app: App | None) -> None:
        if len(cache) >= self._max:
            cache.clear()  # wrong keys are the only way to grow it; dropping everything is cheap and safe
        cache[key] = (self._clock() + (self.ttl_s if app else self.miss_ttl_s), app)

    async def by_api_key(self, api_key: str) -> App | None:
        key_hash = apps.hash_api_key(api_key)
        hit = self._cache_get(self._by_key, key_hash)
        if hit is not False:
            return hit
        app = await app_by_key_hash(self.pool, key_hash)
        self._cache_put(self._by_key, key_hash, app)
        return app

    async def by_id(self, app_id: str) -> App | None:
        if not apps.valid_app_id(app_id):
            return None
        hit = self._cache_get(self._by_id, app_id)
        if hit is not False:
            return hit
        app = await get_app(self.pool, app_id)
        self._cache_put(self._by_id, app_id, app)
        return app

    def _forget(self, app_id: str) -> None:
        self._by_id.pop(app_id, None)
        self._by_key.clear()  # entries are keyed by key hash; app edits are rare enough to drop them all

    async def create(self, app_id: str, **fields: Any) -> CreatedApp:
        created = await create_app(self.pool, self.redis, app_id, **fields)
        self._forget(app_id)
        return created

    async def update(self, app_id: str, **fields: Any) -> App:
        app = await update_app(self.pool, self.redis, app_id, **fields)
        self._forget(app_id)
        return app

    async def rotate_key(self, app_id: str) -> CreatedApp:
        created = await rotate_api_key(self.pool, app_id)
        self._forget(app_id)
        return created

    async def list(self) -> list[StoredApp]:
        return await list_apps(self.pool)

    async def get(self, app_id: str) -> App:
        app = await get_app(self.pool, app_id)
        if app is None:
            raise NotFound(f"no app {app_id!r}", "unknown_app")
        return app

    async def publish_all(self) -> int:
        return await publish_all(self.pool, self.redis)

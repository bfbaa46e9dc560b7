"""The app registry: apps in MySQL (source of truth), published to Redis for rooms and coordinators.

The module-level functions are the one implementation of create/list/update/rotate used by the
HTTP routes, ``pylon app`` and the local launcher. An app's secret and API key leave this module
only at create and rotate (``CreatedApp``, ``RotatedKey``, ``RotatedSecret``); ``app_view``, used
by every listing, carries neither. ``AppRegistry`` adds the center's cached read side
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

from services.center.errors import BackendUnavailable, Conflict, InvalidRequest, NotFound
from services.center.validation import MAX_ROTATION_WINDOW_S, check_app_id, webhook_url_field
from services.common import apps
from services.common.apps import App

log = logging.getLogger(__name__)

_COLUMNS = "id, secret, webhook_url, status_events, push_rate_per_s, broadcasts_per_min, broadcast_deliveries_per_s"
_N_COLUMNS = len(_COLUMNS.split(","))
_ROTATION_COLUMNS = "previous_secret, previous_secret_until"  # follow _COLUMNS in every SELECT of an app
_DUPLICATE_KEY = 1062  # MySQL ER_DUP_ENTRY


@dataclass(frozen=True, slots=True)
class CreatedApp:
    """A new app, or an app with a new API key: the only moment the key is visible."""

    app: App
    api_key: str

    def to_dict(self) -> dict[str, Any]:
        return {**app_view(self.app), "secret": str(self.app.secret), "api_key": self.api_key}


@dataclass(frozen=True, slots=True)
class RotatedKey:
    """An app's new API key, shown once; the old one works until ``previous_key_until`` (0 = not at all)."""

    app: App
    api_key: str
    previous_key_until: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.app.id, "api_key": self.api_key, "previous_key_until": self.previous_key_until}


@dataclass(frozen=True, slots=True)
class RotatedSecret:
    """An app's new signing secret, shown once; tokens signed with the old one verify until
    ``previous_secret_until`` (0 = not at all)."""

    app: App

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.app.id, "secret": str(self.app.secret),
                "previous_secret_until": self.app.previous_secret_until}


@dataclass(frozen=True, slots=True)
class StoredApp:
    app: App
    created_at: int  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        return {**app_view(self.app), "created_at": self.created_at}


def app_view(app: App) -> dict[str, Any]:
    return {"id": app.id, "webhook_url": app.webhook_url,
            "status_events": app.status_events, "push_rate_per_s": app.push_rate_per_s,
            "broadcasts_per_min": app.broadcasts_per_min, "broadcast_deliveries_per_s": app.broadcast_deliveries_per_s}


def _row_to_app(row: tuple) -> App:
    return App(id=row[0], secret=row[1], webhook_url=row[2] or "", status_events=bool(row[3]),
               push_rate_per_s=int(row[4]), broadcasts_per_min=int(row[5]), broadcast_deliveries_per_s=int(row[6]))


def _app_of_row(row: tuple) -> App:
    """An app from a row of ``_COLUMNS`` then ``_ROTATION_COLUMNS``."""
    app = _row_to_app(row)
    previous, until = row[_N_COLUMNS], int(row[_N_COLUMNS + 1] or 0)
    return replace(app, previous_secret=previous, previous_secret_until=until) if previous else app


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
            await cur.execute(f"SELECT {_COLUMNS}, {_ROTATION_COLUMNS} FROM apps WHERE id = %s", (app_id,))
            row = await cur.fetchone()
    return _app_of_row(row) if row else None


async def app_by_key_hash(pool, key_hash: str) -> tuple[App | None, int]:
    """The app whose current API key, or previous one still in its grace period, has this hash,
    and until when the key works (unix seconds; 0 = no end: the current key)."""
    with _mysql_errors("API key lookup"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT {_COLUMNS}, {_ROTATION_COLUMNS}, "
                "IF(api_key_sha256 = %s, 0, previous_api_key_until) FROM apps "
                "WHERE api_key_sha256 = %s OR (previous_api_key_sha256 = %s AND previous_api_key_until > UNIX_TIMESTAMP()) "
                "ORDER BY api_key_sha256 = %s DESC LIMIT 1",
                (key_hash, key_hash, key_hash, key_hash))
            row = await cur.fetchone()
    return (_app_of_row(row), int(row[_N_COLUMNS + 2])) if row else (None, 0)


async def list_apps(pool) -> list[StoredApp]:
    with _mysql_errors("app list"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"SELECT {_COLUMNS}, {_ROTATION_COLUMNS}, UNIX_TIMESTAMP(created_at) FROM apps ORDER BY id")
            rows = await cur.fetchall()
    return [StoredApp(_app_of_row(r), int(r[_N_COLUMNS + 2] or 0)) for r in rows]


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


def _window_end(seconds: int) -> int:
    if not 0 <= seconds <= MAX_ROTATION_WINDOW_S:
        raise InvalidRequest(f"an overlap must be 0 .. {MAX_ROTATION_WINDOW_S} seconds", "bad_rotation_window")
    return int(time.time()) + seconds if seconds else 0


async def rotate_api_key(pool, app_id: str, grace_s: int = 0) -> RotatedKey:
    """Give an app a new API key. The old one keeps working for ``grace_s`` seconds (0: it stops
    once centers' caches of it expire, ``AppRegistry.ttl_s``); a key before that one stops now."""
    until = _window_end(grace_s)
    app = await get_app(pool, app_id)
    if app is None:
        raise NotFound(f"no app {app_id!r}", "unknown_app")
    api_key = apps.new_api_key()
    with _mysql_errors("API key rotation"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            # MySQL assigns left to right: previous_api_key_sha256 takes the key being replaced
            await cur.execute("UPDATE apps SET previous_api_key_sha256 = IF(%s > 0, api_key_sha256, NULL), "
                              "previous_api_key_until = %s, api_key_sha256 = %s WHERE id = %s",
                              (until, until, apps.hash_api_key(api_key), app_id))
    log.info("app %s: new API key; the old one works %s", app_id, f"until {until} (unix s)" if until else "no longer")
    return RotatedKey(app, api_key, until)


async def rotate_secret(pool, redis, app_id: str, overlap_s: int = 0) -> RotatedSecret:
    """Give an app a new signing secret and publish it. Tokens signed with the old one verify
    for ``overlap_s`` more seconds (0: not at all, once rooms have the new one, a few seconds);
    the secret before that one stops now. Webhooks are signed with the new one at once."""
    until = _window_end(overlap_s)
    app = await get_app(pool, app_id)
    if app is None:
        raise NotFound(f"no app {app_id!r}", "unknown_app")
    previous = str(app.secret) if until else ""
    app = replace(app, secret=apps.new_secret(), previous_secret=previous, previous_secret_until=until)
    with _mysql_errors("secret rotation"):
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("UPDATE apps SET previous_secret = %s, previous_secret_until = %s, secret = %s WHERE id = %s",
                              (previous, until, str(app.secret), app_id))
    log.info("app %s: new signing secret; tokens signed with the old one verify %s", app_id,
             f"until {until} (unix s)" if until else "no longer")
    await _publish(redis, app)
    return RotatedSecret(app)


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
        app, until = await app_by_key_hash(self.pool, key_hash)
        self._cache_put(self._by_key, key_hash, app)
        if until:  # an old key in its grace period: cached no longer than the grace lasts
            expires = min(self._by_key[key_hash][0], self._clock() + until - time.time())
            self._by_key[key_hash] = (expires, app)
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

    async def rotate_key(self, app_id: str, grace_s: int = 0) -> RotatedKey:
        rotated = await rotate_api_key(self.pool, app_id, grace_s)
        self._forget(app_id)
        return rotated

    async def rotate_secret(self, app_id: str, overlap_s: int = 0) -> RotatedSecret:
        rotated = await rotate_secret(self.pool, self.redis, app_id, overlap_s)
        self._forget(app_id)
        return rotated

    async def list(self) -> list[StoredApp]:
        return await list_apps(self.pool)

    async def get(self, app_id: str) -> App:
        app = await get_app(self.pool, app_id)
        if app is None:
            raise NotFound(f"no app {app_id!r}", "unknown_app")
        return app

    async def publish_all(self) -> int:
        return await publish_all(self.pool, self.redis)

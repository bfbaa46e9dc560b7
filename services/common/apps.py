"""The app directory: id, secret, webhook and options of every app.

MySQL (table ``apps``) is the source of truth, owned by center. Center publishes every app to
Redis (``pylon:apps`` HASH id -> JSON) so that rooms and coordinators, which never talk to
MySQL, can verify tokens and sign webhooks. Readers cache with a short TTL and re-read on a miss,
so a newly created app works at once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from services.common.tokens import SigningSecret

REDIS_KEY = "pylon:apps"
_APP_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(slots=True, frozen=True)
class App:
    id: str
    secret: str
    webhook_url: str = ""
    status_events: bool = False  # POST online/offline events to the webhook
    push_rate_per_s: int = 0     # 0 = unlimited
    # POST /v1/broadcast requests per minute (per center; 0 = unlimited): a broadcast reaches every
    # user of the app, so a runaway script sending one per second is a flood, not a feature
    broadcasts_per_min: int = 60
    # deliveries per second of one broadcast across all room instances (0 = unlimited): keeps the
    # reactions of millions of clients from hitting the app's own servers at once
    broadcast_deliveries_per_s: int = 0

    # secret rotation: tokens signed with the secret before the last rotation still verify until
    # previous_secret_until (unix seconds); `secret` is then a SigningSecret that carries both
    previous_secret: str = ""
    previous_secret_until: int = 0

    def __post_init__(self) -> None:
        if self.previous_secret:
            secret = SigningSecret(str(self.secret), self.previous_secret, self.previous_secret_until)
        else:
            secret = str(self.secret)
        object.__setattr__(self, "secret", secret)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> App:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def valid_app_id(app_id: str) -> bool:
    return 0 < len(app_id) <= 64 and set(app_id) <= _APP_ID_CHARS


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_api_key() -> str:
    return "pk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AppDirectory:
    """Read side (rooms, coordinators): cached lookups by app id."""

    def __init__(self, redis, ttl_s: float = 5.0, miss_ttl_s: float = 1.0) -> None:
        self._redis = redis
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self._cache: dict[str, tuple[float, App | None]] = {}

    def cached(self, app_id: str) -> App | None | bool:
        """The cached App, None if cached as unknown, False if it must be (re)read."""
        hit = self._cache.get(app_id)
        if hit is None or hit[0] < time.monotonic():
            return False
        return hit[1]

    async def get(self, app_id: str) -> App | None:
        hit = self.cached(app_id)
        if hit is not False:
            return hit
        raw = await self._redis.hget(REDIS_KEY, app_id) if valid_app_id(app_id) else None
        app = App.from_json(raw) if raw else None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[app_id] = (time.monotonic() + (self.ttl_s if app else self.miss_ttl_s), app)
        return app

    async def get_many(self, app_ids: list[str]) -> dict[str, App | None]:
        return {a: await self.get(a) for a in dict.fromkeys(app_ids)}


async def publish(redis, app: App) -> None:
    await redis.hset(REDIS_KEY, app.id, app.to_json())


async def unpublish(redis, app_id: str) -> None:
    await redis.hdel(REDIS_KEY, app_id)

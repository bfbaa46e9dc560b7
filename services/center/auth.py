"""Who is calling: an app (by its API key) or the operator (admin key), and which app a call acts for."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from services.center.app_registry import AppRegistry
from services.center.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from services.common.apps import App

MAX_KEY_LEN = 256  # our keys are ~46 characters; anything much longer is not one of ours


@dataclass(frozen=True, slots=True)
class Principal:
    admin: bool
    app: App | None  # the key's app; None for the admin key


def bearer_key(header: str | None) -> str:
    """The key from ``Authorization: Bearer <key>``."""
    if not header:
        raise Unauthenticated("missing Authorization: Bearer <api key> header", "missing_api_key")
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthenticated("Authorization header must be 'Bearer <api key>'", "missing_api_key")
    if len(key) > MAX_KEY_LEN or not key.isascii():
        raise Unauthenticated("invalid API key", "invalid_api_key")
    return key


class Authenticator:
    def __init__(self, registry: AppRegistry, admin_key: str) -> None:
        self.registry = registry
        self._admin_key = admin_key.encode()

    def _is_admin(self, key: str) -> bool:
        return bool(self._admin_key) and hmac.compare_digest(key.encode(), self._admin_key)

    async def authenticate(self, header: str | None) -> Principal:
        key = bearer_key(header)
        if self._is_admin(key):
            return Principal(admin=True, app=None)
        app = await self.registry.by_api_key(key)
        if app is None:
            raise Unauthenticated("invalid API key", "invalid_api_key")
        return Principal(admin=False, app=app)

    async def authenticate_admin(self, header: str | None) -> Principal:
        key = bearer_key(header)
        if not self._admin_key:
            raise Unauthenticated("admin routes are disabled: this center has no admin key configured", "admin_disabled")
        if self._is_admin(key):
            return Principal(admin=True, app=None)
        if await self.registry.by_api_key(key) is not None:
            raise Forbidden("this route needs the admin key; an app API key is not enough", "admin_required")
        raise Unauthenticated("invalid admin key", "invalid_api_key")

    async def target_app(self, principal: Principal, requested: str | None) -> App:
        """The app a call acts for: the key's own app, or for the admin whichever app it names."""
        if principal.app is not None:
            if requested is not None and requested != principal.app.id:
                raise Forbidden(f"this API key belongs to app {principal.app.id!r}, not {requested!r}", "app_forbidden")
            return principal.app
        if requested is None:
            raise InvalidRequest('the admin key acts for any app: name it with "app"', "missing_app")
        app = await self.registry.by_id(requested)
        if app is None:
            raise NotFound(f"no app {requested!r}", "unknown_app")
        return app

    def app_filter(self, principal: Principal, requested: str | None) -> str | None:
        """For read routes: an app key sees only its app; the admin sees all, or the one it names."""
        if principal.app is not None:
            if requested is not None and requested != principal.app.id:
                raise Forbidden(f"this API key belongs to app {principal.app.id!r}, not {requested!r}", "app_forbidden")
            return principal.app.id
        return requested

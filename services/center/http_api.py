"""The center's HTTP adapter: routes → validate → core call → JSON. No business logic here."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.center import audit, telemetry, validation
from services.center.admin_api import AdminRoutes, AdminService
from services.center.app_registry import AppRegistry, app_view
from services.center.auth import Authenticator, Principal
from services.center.broadcasts import BroadcastService
from services.center.errors import NotFound
from services.center.http_errors import json_response, make_middleware
from services.center.messages import MessageQuery, state_view
from services.center.overview import OverviewCollector
from services.center.push import PushService
from services.center.push_decoding import decode_push
from services.center.stats import StatsCollector
from services.center.telemetry import Tally
from services.center.users import UserService
from services.center.validation import Limits
from services.common import logs, tokens
from services.common.http_guard import body_limit

log = logging.getLogger(__name__)


def request_id_middleware(prefix: str | None = None):
    """Gives each request an id: the caller's ``X-Request-Id`` when it is sane (1-64 of
    ``A-Za-z0-9._:-``), else ``<process prefix>-<counter>`` (a random prefix per process, so ids
    of several centers do not collide). It is ``logs.REQUEST_ID`` while the request is handled, so
    every line logged for it and every RPC made for it (services/common/rpc.py) carry it, and it
    is sent back in the ``X-Request-Id`` header of every answer, errors included."""
    prefix = prefix or os.urandom(4).hex()
    counter = itertools.count(1)

    @web.middleware
    async def request_id(request: web.Request, handler) -> web.StreamResponse:
        rid = logs.sane_request_id(request.headers.get(logs.HEADER)) or f"{prefix}-{next(counter):x}"
        token = logs.REQUEST_ID.set(rid)
        try:
            response = await handler(request)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s: %d", request.method, request.path, response.status)
        except web.HTTPException as exc:  # a redirect or the like: the errors middleware answers the rest
            exc.headers[logs.HEADER] = rid
            raise
        finally:
            logs.REQUEST_ID.reset(token)
        response.headers[logs.HEADER] = rid
        return response

    return request_id


@dataclass
class CenterParts:
    """The core objects the routes call into (built by main)."""

    auth: Authenticator
    registry: AppRegistry
    push: PushService
    users: UserService
    messages: MessageQuery
    stats: StatsCollector
    tally: Tally
    limits: Limits
    broadcasts: BroadcastService | None = None
    openapi: bytes = b"{}"
    dashboard: bytes = b""
    overview: OverviewCollector | None = None
    admin: AdminService | None = None


class CenterApi:
    def __init__(self, parts: CenterParts) -> None:
        self.p = parts

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
            web.get("/dashboard", self.dashboard),
            web.post("/v1/tokens", self.mint_token),
            web.post("/v1/push", self.push),
            web.post("/v1/broadcast", self.broadcast),
            web.get("/v1/broadcasts/{id}", self.broadcast_progress),
            web.get("/v1/admin/broadcasts", self.recent_broadcasts),
            web.get("/v1/messages/{id}", self.message_state),
            web.get("/v1/users/{uid}", self.presence),
            web.post("/v1/users/{uid}/kick", self.kick),
            web.get("/v1/stats", self.stats),
            web.get("/v1/admin/overview", self.overview),
            web.post("/v1/apps", self.create_app),
            web.get("/v1/apps", self.list_apps),
            web.get("/v1/apps/{id}", self.get_app),
            web.patch("/v1/apps/{id}", self.update_app),
            web.post("/v1/apps/{id}/rotate-key", self.rotate_key),
            web.post("/v1/apps/{id}/rotate-secret", self.rotate_secret),
            *AdminRoutes(self.p).routes(),
        ]

    # ------------------------------------------------------------ plumbing

    async def _body(self, request: web.Request, allow_empty: bool = False) -> dict:
        return validation.parse_json(await request.read(), allow_empty)

    async def _principal(self, request: web.Request) -> Principal:
        return await self.p.auth.authenticate(request.headers.get("Authorization"))

    async def _admin(self, request: web.Request) -> Principal:
        return await self.p.auth.authenticate_admin(request.headers.get("Authorization"))

    @staticmethod
    def _query_app(request: web.Request) -> str | None:
        return validation.app_field({"app": request.query.get("app")})

    # ------------------------------------------------------------ ops

    async def healthz(self, request: web.Request) -> web.Response:
        # which process answered: with center.processes > 1 the kernel picks one per connection
        return json_response({"status": "ok", "center": self.p.stats.center_id, "pid": os.getpid()})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.p.openapi, content_type="application/json")

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=self.p.dashboard, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def stats(self, request: web.Request) -> web.Response:
        await self._principal(request)
        return json_response(await self.p.stats.snapshot())

    async def overview(self, request: web.Request) -> web.Response:
        await self._admin(request)
        if self.p.overview is None:
            raise NotFound("this center keeps no cluster overview", "overview_disabled")
        return json_response(await self.p.overview.overview(), headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------ app servers

    async def mint_token(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        body = validation.token_body(await self._body(request), self.p.limits)
        app = await self.p.auth.target_app(principal, body.app)
        token, expires_at = tokens.sign(app.secret, body.uid, app.id, body.ttl_s, device_id=body.device_id)
        return json_response({"token": token, "expires_at": expires_at})

    async def push(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        body = decode_push(await request.read(), self.p.limits)
        app = await self.p.auth.target_app(principal, body.app)
        if isinstance(body, validation.BatchPushBody):
            result = await self.p.push.push_messages(app, body.messages)
        else:
            result = await self.p.push.push(app, body.uids, body.payload, body.ttl_s)
        telemetry.APP_MESSAGES.labels(app.id).inc(len(result.msg_ids))
        return json_response({"msg_ids": [str(i) for i in result.msg_ids], "online": result.online,
                              "delivered": result.delivered})

    async def broadcast(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        body = validation.broadcast_body(await self._body(request), self.p.limits)
        app = await self.p.auth.target_app(principal, body.app)
        accepted = await self.p.broadcasts.submit(app, body.payload, body.ttl_s)
        telemetry.APP_BROADCASTS.labels(app.id).inc()
        if principal.admin:  # an operator speaking for an app to all its users (an app's own are its traffic)
            audit.record(principal, "broadcast", app=app.id, broadcast_id=accepted.broadcast_id, ttl_s=body.ttl_s)
        return json_response({"broadcast_id": str(accepted.broadcast_id), "subtasks": accepted.subtasks})

    async def broadcast_progress(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        bid = validation.parse_broadcast_id(request.match_info["id"])
        app_id = None if principal.admin else principal.app.id
        return json_response((await self.p.broadcasts.progress(bid, app_id)).to_dict())

    async def recent_broadcasts(self, request: web.Request) -> web.Response:
        await self._admin(request)
        limit = validation.list_limit(request.query.get("limit"))
        return json_response({"broadcasts": [p.to_dict() for p in await self.p.broadcasts.recent(limit)]})

    async def message_state(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        msg_id = validation.parse_msg_id(request.match_info["id"])
        app_id = self.p.auth.app_filter(principal, self._query_app(request))
        return json_response(state_view(await self.p.messages.state(msg_id, app_id)))

    async def presence(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        uid = validation.check_uid(request.match_info["uid"], self.p.limits)
        app_id = self.p.auth.app_filter(principal, self._query_app(request))
        return json_response((await self.p.users.presence(uid, app_id)).to_dict())

    async def kick(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        uid = validation.check_uid(request.match_info["uid"], self.p.limits)
        body = validation.kick_body(await self._body(request, allow_empty=True))
        app_id = self.p.auth.app_filter(principal, body.app)
        if app_id is not None and principal.admin:
            await self.p.auth.target_app(principal, app_id)  # 404 for an unknown app
        kicked = await self.p.users.kick(uid, app_id, body.reason)
        audit.record(principal, "kick", uid=uid, app=app_id, reason=body.reason, kicked=kicked)
        return json_response({"kicked": kicked})

    # ------------------------------------------------------------ admin

    async def create_app(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        body = validation.new_app_body(await self._body(request))
        created = await self.p.registry.create(body.id, webhook_url=body.webhook_url, status_events=body.status_events,
                                               push_rate_per_s=body.push_rate_per_s,
                                               broadcasts_per_min=body.broadcasts_per_min,
                                               broadcast_deliveries_per_s=body.broadcast_deliveries_per_s)
        audit.record(principal, "app_create", app=body.id)
        return json_response(created.to_dict(), status=201)

    async def list_apps(self, request: web.Request) -> web.Response:
        await self._admin(request)
        return json_response({"apps": [s.to_dict() for s in await self.p.registry.list()]})

    async def get_app(self, request: web.Request) -> web.Response:
        await self._admin(request)
        app = await self.p.registry.get(validation.check_app_id(request.match_info["id"]))
        return json_response(app_view(app))

    async def update_app(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        app_id = validation.check_app_id(request.match_info["id"])
        changes = validation.app_changes_body(await self._body(request))
        app = await self.p.registry.update(app_id, webhook_url=changes.webhook_url, status_events=changes.status_events,
                                           push_rate_per_s=changes.push_rate_per_s,
                                           broadcasts_per_min=changes.broadcasts_per_min,
                                           broadcast_deliveries_per_s=changes.broadcast_deliveries_per_s)
        audit.record(principal, "app_update", app=app_id,
                     fields=[k for k in ("webhook_url", "status_events", "push_rate_per_s", "broadcasts_per_min",
                                         "broadcast_deliveries_per_s") if getattr(changes, k) is not None])
        return json_response(app_view(app))

    async def rotate_key(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        app_id = validation.check_app_id(request.match_info["id"])
        grace_s = validation.rotation_window(await self._body(request, allow_empty=True), "grace_s")
        rotated = await self.p.registry.rotate_key(app_id, grace_s)
        audit.record(principal, "rotate_key", app=app_id, grace_s=grace_s)
        return json_response(rotated.to_dict())

    async def rotate_secret(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        app_id = validation.check_app_id(request.match_info["id"])
        overlap_s = validation.rotation_window(await self._body(request, allow_empty=True), "overlap_s")
        rotated = await self.p.registry.rotate_secret(app_id, overlap_s)
        audit.record(principal, "rotate_secret", app=app_id, overlap_s=overlap_s)
        return json_response(rotated.to_dict())


def make_app(parts: CenterParts, max_body_bytes: int = 4 * 1024 * 1024) -> web.Application:
    app = web.Application(middlewares=[request_id_middleware(), make_middleware(parts.tally),
                                       body_limit(max_body_bytes)],
                          client_max_size=max_body_bytes)
    app.add_routes(CenterApi(parts).routes())
    return app

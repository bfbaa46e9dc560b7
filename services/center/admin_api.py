"""Operator routes: parked messages (list, requeue), one user's whole state, draining a room instance.

Routes (admin key only; each action that changes something writes an audit line, ``audit.py``):

    GET  /v1/admin/parked?app=&uid=&limit=&after=   parked messages, in (app, msg_id) order, keyset pages
    POST /v1/admin/parked/requeue                  {"msg_ids": [...]} or {"app": ..., "uid": ..., "limit": n}
    GET  /v1/admin/users/{uid}?app=&limit=&payload= sessions, inboxes, broadcast position
    POST /v1/admin/rooms/{instance}/drain          {"restart": true}: the instance drains as on SIGTERM

A requeued message is stored again (MySQL, then its Redis inbox: ``Saver.Requeue``) and handed
at once to the rooms holding its user's sessions, through the push path's lookup and Room.Push
(``PushService.deliver_again``); what no room took (offline, or a room call failed) waits in the
inbox for the next login, and failed room calls are tried again by the push path's redelivery.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.center import audit, validation
from services.center.auth import Principal
from services.center.backend import BACKEND_ERRORS, describe, unavailable
from services.center.errors import InvalidRequest, NotFound
from services.center.http_errors import json_response
from services.common.apps import valid_app_id
from services.common.pb import internal_pb2 as pb
from services.common.rpc import ServiceClient

log = logging.getLogger(__name__)

MAX_PAGE = 1000            # parked messages per page and per requeue by app/uid (saver's bound too)
DEFAULT_PAGE = 100
MAX_REQUEUE_IDS = 1000     # msg_ids in one requeue request
MAX_INBOX_ENTRIES = 1000   # inbox entries shown per app of a user
DEFAULT_INBOX_ENTRIES = 100
MAX_INSPECTED_APPS = 200   # apps looked at for a user when the request names none
APPS_PER_KEY = 64          # saver's bound on apps per InboxKey
MAX_INSTANCE_ID_LEN = 256


# ---------------------------------------------------------------- request parsing (pure)

def query_limit(text: str | None, default: int, maximum: int) -> int:
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= maximum:
        raise InvalidRequest(f'"limit" must be a number from 1 to {maximum}', "bad_limit")
    return int(text)


def query_flag(text: str | None, name: str) -> bool:
    if text is None:
        return False
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise InvalidRequest(f'"{name}" must be true or false', f"bad_{name}")


def app_id_param(text: str | None, name: str = "app") -> str | None:
    if text is None:
        return None
    if not valid_app_id(text):
        raise InvalidRequest(f'"{name}" must be an app id (1-64 characters of a-z 0-9 - _ .)', f"bad_{name}")
    return text


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of parked messages starts: after this (app, msg_id)."""

    app: str
    msg_id: int

    def __str__(self) -> str:
        return f"{self.app}:{self.msg_id}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor | None:
        if text is None:
            return None
        app, sep, msg_id = text.rpartition(":")
        if not sep or not valid_app_id(app):
            raise InvalidRequest('"after" must be the "next" of the previous page (app:msg_id)', "bad_after")
        try:
            return cls(app, validation.parse_msg_id(msg_id))
        except InvalidRequest:
            raise InvalidRequest('"after" must be the "next" of the previous page (app:msg_id)', "bad_after") from None


@dataclass(frozen=True, slots=True)
class RequeueBody:
    msg_ids: tuple[int, ...]
    app: str | None
    uid: str | None
    limit: int


def requeue_body(data: dict[str, Any], limits: validation.Limits) -> RequeueBody:
    ids = data.get("msg_ids")
    app = data.get("app")
    uid = data.get("uid")
    if app is not None and (not isinstance(app, str) or not valid_app_id(app)):
        raise InvalidRequest('"app" must be an app id (1-64 characters of a-z 0-9 - _ .)', "bad_app")
    if uid is not None:
        uid = validation.check_uid(uid, limits, '"uid"')
    limit = data.get("limit", MAX_PAGE)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f'"limit" must be an integer from 1 to {MAX_PAGE}', "bad_limit")
    if ids is None:
        if app is None:
            raise InvalidRequest('name the messages ("msg_ids") or an "app" (and optionally a "uid")', "missing_msg_ids")
        return RequeueBody((), app, uid, limit)
    if app is not None or uid is not None:
        raise InvalidRequest('give "msg_ids", or "app" and "uid", not both', "bad_requeue_form")
    if not isinstance(ids, list) or not ids:
        raise InvalidRequest('"msg_ids" must be a non-empty list of message ids', "bad_msg_ids")
    if len(ids) > MAX_REQUEUE_IDS:
        raise InvalidRequest(f'at most {MAX_REQUEUE_IDS} "msg_ids" per request', "too_many_msg_ids")
    parsed = []
    for i, raw in enumerate(ids):
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise InvalidRequest(f"msg_ids[{i}] must be a message id (a decimal string)", "bad_msg_id")
        try:
            parsed.append(validation.parse_msg_id(str(raw)))
        except InvalidRequest:
            raise InvalidRequest(f"msg_ids[{i}] must be a message id (a decimal string)", "bad_msg_id") from None
    return RequeueBody(tuple(dict.fromkeys(parsed)), None, None, limit)


def drain_body(data: dict[str, Any]) -> bool:
    """``restart`` (default true): start a fresh instance in its place once it has drained."""
    restart = data.get("restart", True)
    if not isinstance(restart, bool):
        raise InvalidRequest('"restart" must be true or false', "bad_restart")
    return restart


def instance_param(text: str) -> str:
    if not text or len(text) > MAX_INSTANCE_ID_LEN or not text.isascii() or validation.CONTROL_CHARS.search(text):
        raise InvalidRequest("instance must be a room instance id (as in the overview's rooms)", "bad_instance")
    return text


# ---------------------------------------------------------------- views

def parked_view(s: pb.MessageState) -> dict[str, Any]:
    return {"msg_id": str(s.msg_id), "uid": s.uid, "app": s.app, "seq": s.seq, "attempts": s.attempts,
            "created_ms": s.created_ms, "expires_ms": s.expires_ms}


def inbox_view(v: pb.InboxView, with_payload: bool) -> dict[str, Any]:
    messages = []
    for i, e in enumerate(v.entries):
        item = {"msg_id": str(e.msg_id), "state": e.state if e.found else "gone", "seq": e.seq,
                "attempts": e.attempts, "created_ms": e.created_ms, "expires_ms": e.expires_ms}
        if with_payload:
            item["payload_b64"] = base64.b64encode(v.payloads[i] if i < len(v.payloads) else b"").decode()
        messages.append(item)
    return {"app": v.app, "pending": v.total, "messages": messages,
            "broadcasts": [{"broadcast_id": str(b.broadcast_id), "expires_ms": b.expires_ms, "acked": b.acked}
                           for b in v.broadcasts],
            "broadcasts_acked": sum(1 for b in v.broadcasts if b.acked)}


# ---------------------------------------------------------------- core

class AdminService:
    def __init__(self, *, saver: ServiceClient, rooms: ServiceClient, users, registry, push) -> None:
        self.saver = saver
        self.rooms = rooms
        self.users = users        # UserService: sessions from register
        self.registry = registry  # AppRegistry: the app ids a user may have inboxes in
        self.push = push          # PushService: delivery of requeued messages to online sessions

    async def _saver(self, method: str, request, failover: bool = True):
        try:
            return await self.saver.call(method, request, failover=failover)
        except BACKEND_ERRORS as exc:
            log.warning("Saver.%s failed: %s", method, describe(exc))
            raise unavailable("saver", exc) from exc

    async def parked(self, app: str | None, uid: str | None, after: Cursor | None, limit: int) -> dict[str, Any]:
        page = await self._saver("ListParked", pb.ParkedQuery(
            app=app or "", uid=uid or "", after_app=after.app if after else "",
            after_msg_id=after.msg_id if after else 0, limit=limit))
        items = [parked_view(s) for s in page.messages]
        last = page.messages[-1] if page.messages else None
        return {"messages": items, "next": str(Cursor(last.app, last.msg_id)) if page.more and last else None}

    async def requeue(self, body: RequeueBody) -> dict[str, Any]:
        # not retried on another saver: a first call that did its work would report it skipped
        reply = await self._saver("Requeue", pb.RequeueRequest(
            msg_ids=body.msg_ids, app=body.app or "", uid=body.uid or "", limit=body.limit), failover=False)
        messages = list(reply.requeued)
        if messages:
            try:
                failed = await self.push.deliver_again(messages)
            except BACKEND_ERRORS as exc:  # stored again either way: the inbox has them
                log.warning("delivery of %d requeued messages failed: %s", len(messages), describe(exc))
                failed = messages
            if failed:
                self.push.redelivery.add(failed)
        return {"requeued": [str(m.msg_id) for m in messages], "skipped": [str(i) for i in reply.skipped]}

    async def user(self, uid: str, app: str | None, limit: int, with_payload: bool) -> dict[str, Any]:
        presence = await self.users.presence(uid, app)
        if app is not None:
            apps, truncated = [app], False
        else:
            known = sorted(s.app.id for s in await self.registry.list())
            session_apps = [a for s in presence.sessions for a in s.apps]
            apps = list(dict.fromkeys([*session_apps, *known]))
            truncated = len(apps) > MAX_INSPECTED_APPS
            apps = apps[:MAX_INSPECTED_APPS]
        keys = [pb.InboxKey(uid=uid, apps=apps[i:i + APPS_PER_KEY]) for i in range(0, len(apps), APPS_PER_KEY)]
        views = []
        if keys:
            reply = await self._saver("InspectInboxes", pb.InspectRequest(keys=keys, limit_per_inbox=limit,
                                                                          with_payload=with_payload))
            bound = {a for s in presence.sessions for a in s.apps}
            # an app named, or one this user has something in: not every app of the cluster
            views = [inbox_view(v, with_payload) for v in reply.inboxes
                     if app is not None or v.total or v.app in bound or any(b.acked for b in v.broadcasts)]
        out = {**presence.to_dict(), "inboxes": views}
        if truncated:
            out["apps_truncated"] = True
        return out

    async def drain(self, instance: str, restart: bool) -> dict[str, Any]:
        try:
            live = await self.rooms.discovery.instances("room", fresh=True)
        except BACKEND_ERRORS as exc:
            raise unavailable("discovery", exc) from exc
        target = next((i for i in live if i.id == instance), None)
        if target is None or not target.grpc:
            raise NotFound(f"no live room instance {instance!r}", "unknown_instance")
        try:
            reply = await self.rooms.call("Drain", pb.DrainRequest(restart=restart), target=target.grpc)
        except BACKEND_ERRORS as exc:
            log.warning("Room.Drain of %s failed: %s", instance, describe(exc))
            raise unavailable(f"room instance {instance}", exc) from exc
        return {"instance": reply.instance or instance, "sessions": reply.sessions, "restart": restart,
                "already_draining": reply.already_draining}


# ---------------------------------------------------------------- HTTP adapter

class AdminRoutes:
    """Thin handlers: authenticate (admin key), validate, call AdminService, audit, answer."""

    def __init__(self, parts) -> None:
        self.p = parts  # CenterParts: auth, limits, admin

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/admin/parked", self.parked),
            web.post("/v1/admin/parked/requeue", self.requeue),
            web.get("/v1/admin/users/{uid}", self.user),
            web.post("/v1/admin/rooms/{instance}/drain", self.drain),
        ]

    async def _admin(self, request: web.Request) -> Principal:
        return await self.p.auth.authenticate_admin(request.headers.get("Authorization"))

    async def _known_app(self, principal: Principal, app: str | None) -> None:
        if app is not None:
            await self.p.auth.target_app(principal, app)  # 404 unknown_app

    async def parked(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        q = request.query
        app = app_id_param(q.get("app"))
        uid = validation.check_uid(q["uid"], self.p.limits) if "uid" in q else None
        after = Cursor.parse(q.get("after"))
        limit = query_limit(q.get("limit"), DEFAULT_PAGE, MAX_PAGE)
        await self._known_app(principal, app)
        return json_response(await self.p.admin.parked(app, uid, after, limit), headers={"Cache-Control": "no-store"})

    async def requeue(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        body = requeue_body(validation.parse_json(await request.read()), self.p.limits)
        await self._known_app(principal, body.app)
        result = await self.p.admin.requeue(body)
        audit.record(principal, "requeue", **({"msg_ids": len(body.msg_ids)} if body.msg_ids else
                                              {"app": body.app, "uid": body.uid, "limit": body.limit}),
                     requeued=len(result["requeued"]), skipped=len(result["skipped"]))
        return json_response(result)

    async def user(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        uid = validation.check_uid(request.match_info["uid"], self.p.limits)
        q = request.query
        app = app_id_param(q.get("app"))
        limit = query_limit(q.get("limit"), DEFAULT_INBOX_ENTRIES, MAX_INBOX_ENTRIES)
        with_payload = query_flag(q.get("payload"), "payload")
        await self._known_app(principal, app)
        return json_response(await self.p.admin.user(uid, app, limit, with_payload),
                             headers={"Cache-Control": "no-store"})

    async def drain(self, request: web.Request) -> web.Response:
        principal = await self._admin(request)
        instance = instance_param(request.match_info["instance"])
        restart = drain_body(validation.parse_json(await request.read(), allow_empty=True))
        result = await self.p.admin.drain(instance, restart)
        audit.record(principal, "drain", instance=instance, restart=restart, sessions=result["sessions"],
                     already_draining=result["already_draining"])
        return json_response(result)

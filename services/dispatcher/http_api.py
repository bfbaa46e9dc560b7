"""The dispatcher's HTTP adapter: GET /v1/route, POST /v1/routes, /healthz, /metrics, /openapi.json; JSON errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import redis.exceptions
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from services.common.discovery import Discovery
from services.common.http_guard import body_limit
from services.dispatcher import routing
from services.dispatcher.config import DispatcherConfig

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("pylon_dispatcher_http_requests_total", "HTTP requests by route template and status",
                        ["route", "status"])
ROUTE_SECONDS = Histogram("pylon_dispatcher_route_seconds", "Time to answer /v1/route",
                          buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
FALLBACKS = Counter("pylon_dispatcher_fallbacks_total", "Answers that skipped a filter to have any room",
                    ["kind"])  # region | all_excluded | no_rooms

OPENAPI = (pathlib.Path(__file__).parent / "openapi.json").read_bytes()
MAX_BATCH_UIDS = 1000
MAX_BODY_BYTES = 256 * 1024  # bodies only on POST /v1/routes: 1,000 uids of up to 128 characters
_AIOHTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                  414: "uri_too_long", 431: "headers_too_large"}


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


@web.middleware
async def errors_and_metrics(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except routing.InvalidQuery as exc:
        response = error_response(400, exc.code, str(exc))
    except routing.NoRooms as exc:
        FALLBACKS.labels("no_rooms").inc()
        response = error_response(503, exc.code, str(exc))
    except redis.exceptions.RedisError as exc:
        log.warning("discovery unavailable: %s", exc)
        response = error_response(503, "backend_unavailable", "room discovery is unavailable")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, _AIOHTTP_CODES.get(exc.status, f"http_{exc.status}"),
                                  exc.reason or "request failed")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = error_response(500, "internal_error", "internal error; it has been logged")
    resource = request.match_info.route.resource
    HTTP_REQUESTS.labels(resource.canonical if resource is not None else "unmatched", str(response.status)).inc()
    return response


class DispatcherApi:
    def __init__(self, discovery: Discovery, cfg: DispatcherConfig) -> None:
        self.discovery = discovery
        self.cfg = cfg

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/route", self.route),
            web.post("/v1/routes", self.routes_batch),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
        ]

    async def route(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        query = routing.parse_query(request.query, self.cfg.default_count, self.cfg.max_count, self.cfg.max_exclude)
        rooms = await self.discovery.instances("room")
        answer = routing.choose(rooms, query, self.cfg.load_step)
        if answer.region_fallback:
            FALLBACKS.labels("region").inc()
        if answer.all_excluded:
            FALLBACKS.labels("all_excluded").inc()
        ROUTE_SECONDS.observe(time.perf_counter() - started)
        return json_response(routing.route_view(answer))

    async def routes_batch(self, request: web.Request) -> web.Response:
        """Routes for many uids in one request: for app-server side proxies and load generators,
        where one HTTP round trip per connection would cost more than the connection itself."""
        started = time.perf_counter()
        try:
            body = await request.json()
        except ValueError:
            raise routing.InvalidQuery("request body is not JSON") from None
        uids = body.get("uids") if isinstance(body, dict) else None
        if not isinstance(uids, list) or not uids or len(uids) > MAX_BATCH_UIDS:
            raise routing.InvalidQuery(f"uids must be a list of 1..{MAX_BATCH_UIDS} uids")
        params = {k: str(body[k]) for k in ("net", "region", "count", "exclude") if k in body}
        params["uid"] = "-"
        shared = routing.parse_query(params, self.cfg.default_count, self.cfg.max_count, self.cfg.max_exclude)
        for uid in uids:
            if not isinstance(uid, str):
                raise routing.InvalidQuery("every uid must be a string")
            routing.check_uid(uid)
        # every uid of the batch has the same filters: the candidate rooms are found once
        found = routing.candidates(await self.discovery.instances("room"), shared)
        out = {}
        for uid in uids:
            route = routing.choose((), dataclasses.replace(shared, uid=uid), self.cfg.load_step, found)
            out[uid] = routing.route_view(route)["rooms"]
        ROUTE_SECONDS.observe(time.perf_counter() - started)
        return json_response({"routes": out})

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI, content_type="application/json")


def make_app(discovery: Discovery, cfg: DispatcherConfig) -> web.Application:
    app = web.Application(middlewares=[errors_and_metrics, body_limit(MAX_BODY_BYTES)], client_max_size=MAX_BODY_BYTES)
    app.add_routes(DispatcherApi(discovery, cfg).routes())
    return app

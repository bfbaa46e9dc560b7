"""The dispatcher's OpenAPI document describes exactly the routes it serves, and it serves it."""

import json
import pathlib

from services.dispatcher import http_api
from services.dispatcher.config import DispatcherConfig
from tests.openapi_refs import assert_refs_resolve

OPENAPI = pathlib.Path(__file__).parents[2] / "services" / "dispatcher" / "openapi.json"


def test_every_route_is_documented_and_nothing_else():
    doc = json.loads(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops
                  if method in ("get", "post", "patch", "put", "delete")}
    app = http_api.make_app(discovery=None, cfg=DispatcherConfig())
    served = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method != "HEAD"}
    assert documented == served


def test_the_served_document_is_the_file():
    assert json.loads(http_api.OPENAPI) == json.loads(OPENAPI.read_text())


def test_every_reference_resolves():
    assert_refs_resolve(json.loads(OPENAPI.read_text()))

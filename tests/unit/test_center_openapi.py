"""The OpenAPI document describes exactly the routes the app serves; errors map to the right status."""

import json
import pathlib

from services.center import errors
from services.center.http_api import CenterParts, make_app
from services.center.http_errors import status_of
from services.center.telemetry import Tally
from tests.openapi_refs import assert_refs_resolve

OPENAPI = pathlib.Path(__file__).parents[2] / "services" / "center" / "openapi.json"


def served_routes() -> set[tuple[str, str]]:
    parts = CenterParts(auth=None, registry=None, push=None, users=None, messages=None, stats=None, tally=Tally(),
                        limits=None)
    app = make_app(parts)
    return {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method != "HEAD"}


def test_every_route_is_documented_and_nothing_else():
    doc = json.loads(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops
                  if method in ("get", "post", "patch", "put", "delete")}
    assert documented == served_routes()


def test_every_reference_resolves():
    assert_refs_resolve(json.loads(OPENAPI.read_text()))


def test_error_statuses():
    assert status_of(errors.InvalidRequest("x")) == 400
    assert status_of(errors.Unauthenticated("x")) == 401
    assert status_of(errors.Forbidden("x")) == 403
    assert status_of(errors.NotFound("x")) == 404
    assert status_of(errors.Conflict("x")) == 409
    assert status_of(errors.PayloadTooLarge("x")) == 413
    assert status_of(errors.RateLimited("x", 1.0)) == 429
    assert status_of(errors.BackendUnavailable("x")) == 503


def test_push_documents_both_forms_with_the_configured_limits():
    from services.center.config import CenterConfig

    doc = json.loads(OPENAPI.read_text())
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/push"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/PushRequest"}
    forms = {ref["$ref"].rsplit("/", 1)[1] for ref in schemas["PushRequest"]["oneOf"]}
    assert forms == {"UnicastPushRequest", "BatchPushRequest"}
    cfg = CenterConfig()
    assert schemas["UnicastPushRequest"]["properties"]["uids"]["maxItems"] == cfg.max_uids_per_push
    batch = schemas["BatchPushRequest"]
    assert batch["required"] == ["messages"]
    assert batch["properties"]["messages"]["maxItems"] == cfg.max_messages_per_push
    assert batch["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/BatchMessage"}
    message = schemas["BatchMessage"]
    assert set(message["properties"]) == {"uid", "payload", "payload_b64", "ttl_s"} and message["required"] == ["uid"]
    assert message["properties"]["uid"]["maxLength"] == cfg.max_uid_len
    assert "index" in schemas["Error"]["properties"]["error"]["properties"]


def test_documented_push_fields_are_the_decoders_fields_with_the_same_types():
    """The msgspec Structs that decode POST /v1/push (push_decoding.py) and the OpenAPI document
    name the same fields with the same JSON types: a field added to one is missing from the other."""
    import msgspec

    from services.center.push_decoding import WireMessage, WirePush

    doc = json.loads(OPENAPI.read_text())["components"]["schemas"]

    def struct_types(struct) -> dict[str, str]:
        schema = msgspec.json.schema(struct)
        props = schema["$defs"][struct.__name__]["properties"]
        out = {}
        for name, prop in props.items():
            kinds = [p["type"] for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
            out[name] = kinds[0]
        return out

    def doc_types(*names) -> dict[str, str]:
        out = {}
        for name in names:
            for field, prop in doc[name]["properties"].items():
                out[field] = prop.get("type", "object")
        return out

    assert struct_types(WirePush) == doc_types("UnicastPushRequest", "BatchPushRequest")
    assert struct_types(WireMessage) == doc_types("BatchMessage")

"""Request validation and normalisation for the saver (pure, no I/O). Every bound lives here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.apps import valid_app_id
from services.common.requests import MAX_UID_LEN, RequestError, check_count, check_uid  # noqa: F401 (callers import them from here)
from services.saver.config import SaverConfig

MAX_APPS_PER_KEY = 64
MAX_MSG_ID = (1 << 64) - 1


@dataclass(slots=True, frozen=True)
class StoreItem:
    msg_id: int
    uid: str
    app: str
    payload: bytes
    created_ms: int
    ttl_s: int
    expires_ms: int


@dataclass(slots=True, frozen=True)
class Ref:
    uid: str
    app: str
    msg_id: int
    deliveries: int = 0  # an Ack's: attempts it also reports (MessageRef.deliveries)


def check_app(app: str) -> None:
    if not valid_app_id(app):
        raise RequestError(f"app {app[:64]!r} is not a valid app id (1-64 of a-z 0-9 - _ .)")


def check_msg_id(msg_id: int) -> None:
    if msg_id <= 0:
        raise RequestError("msg_id must be > 0")


def effective_ttl_s(ttl_s: int, cfg: SaverConfig) -> int:
    """0 means the default; longer than the maximum is cut to the maximum."""
    if ttl_s <= 0:
        return cfg.default_ttl_s
    return min(ttl_s, cfg.max_ttl_s)


def store_items(messages: Sequence, cfg: SaverConfig, now_ms: int) -> list[StoreItem]:
    """StoredMessage protos → StoreItems with ttl and expiry resolved (created_ms 0 = now)."""
    check_count("Store", len(messages), cfg.max_items)
    items: list[StoreItem] = []
    seen: set[int] = set()
    for i, msg in enumerate(messages):
        try:
            if msg.broadcast:
                raise RequestError("broadcast messages are not stored in inboxes")
            check_msg_id(msg.msg_id)
            if msg.msg_id in seen:
                raise RequestError(f"msg_id {msg.msg_id} appears twice in the request")
            seen.add(msg.msg_id)
            check_uid(msg.uid)
            check_app(msg.app)
            if len(msg.payload) > cfg.max_payload_bytes:
                raise RequestError(f"payload of {len(msg.payload)} bytes is over the limit of {cfg.max_payload_bytes}")
        except RequestError as exc:
            raise RequestError(f"Store: messages[{i}]: {exc}") from None
        created = msg.created_ms or now_ms
        ttl = effective_ttl_s(msg.ttl_s, cfg)
        items.append(StoreItem(msg.msg_id, msg.uid, msg.app, msg.payload, created, ttl, created + ttl * 1000))
    return items


MAX_DELIVERIES_PER_ACK = 1000


def refs(what: str, raw_refs: Sequence, cfg: SaverConfig) -> list[Ref]:
    """Validated refs. ``deliveries`` counts only in an Ack (MarkDelivered counts one per ref)."""
    check_count(what, len(raw_refs), cfg.max_items)
    acks = what == "Ack"
    out = []
    for i, r in enumerate(raw_refs):
        try:
            check_msg_id(r.msg_id)
            check_uid(r.uid)
            check_app(r.app)
            if acks and r.deliveries > MAX_DELIVERIES_PER_ACK:
                raise RequestError(f"deliveries {r.deliveries} is over the limit of {MAX_DELIVERIES_PER_ACK}")
        except RequestError as exc:
            raise RequestError(f"{what}: refs[{i}]: {exc}") from None
        out.append(Ref(r.uid, r.app, r.msg_id, r.deliveries if acks else 0))
    return out


def load_keys(keys: Sequence, limit: int, cfg: SaverConfig) -> tuple[list[list[tuple[str, str]]], int]:
    """Per request key, its (uid, app) inboxes; and the per-inbox limit (0 = default, capped)."""
    check_count("LoadInbox", len(keys), cfg.max_items)
    inboxes: list[list[tuple[str, str]]] = []
    total = 0
    for i, key in enumerate(keys):
        try:
            check_uid(key.uid)
            if len(key.apps) > MAX_APPS_PER_KEY:
                raise RequestError(f"{len(key.apps)} apps, the limit is {MAX_APPS_PER_KEY}")
            for app in key.apps:
                check_app(app)
        except RequestError as exc:
            raise RequestError(f"LoadInbox: keys[{i}]: {exc}") from None
        apps = list(dict.fromkeys(key.apps))  # a repeated app must not load its inbox twice
        total += len(apps)
        inboxes.append([(key.uid, app) for app in apps])
    check_count("LoadInbox (uid, app) inboxes", total, cfg.max_items)
    effective = cfg.load_default_limit if limit <= 0 else min(limit, cfg.load_max_limit)
    return inboxes, effective

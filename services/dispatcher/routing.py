"""Which room addresses a client gets, in which order (pure: no I/O, no clock, no randomness).

Order: the sticky room first — rendezvous (highest-random-weight) hashing of the uid over the
usable rooms, so the same user lands on the same instance (its flash-disconnect session is
cached there) and adding or removing one of N rooms moves only ~1/N of the users — then the
other rooms from least to most loaded, ties broken by a per-uid hash so clients spread out.

Filters, in order: live and not draining → serves the client's network type (a room with no
``nets`` serves all) → not excluded by the client → in the client's region, unless none is
left there, then other regions. Each filter that would leave nothing is skipped rather than
answering with nothing: a client with some address can still try; a client with none cannot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.common.discovery import Instance

MAX_UID_LEN = 128
MAX_NET_LEN = 32
MAX_REGION_LEN = 64
MAX_ADDRESS_LEN = 300  # a DNS name (253) plus ":port"


class RouteError(Exception):
    code = "route_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidQuery(RouteError):
    code = "invalid_request"


class NoRooms(RouteError):
    code = "no_rooms"


@dataclass(frozen=True, slots=True)
class RouteQuery:
    uid: str
    net: str = ""
    region: str = ""
    exclude: frozenset[str] = frozenset()
    count: int = 8


@dataclass(frozen=True, slots=True)
class Route:
    rooms: list[Instance]
    region_fallback: bool = False  # the asked region had no usable room: these are from other regions
    all_excluded: bool = False     # the client excluded every live room: here they are again


# ---------------------------------------------------------------- hashing


def _h64(person: bytes, uid: str, instance_id: str) -> int:
    # blake2b, not hash(): Python's str hash is salted per process, and every dispatcher must agree
    digest = hashlib.blake2b(f"{uid}\x00{instance_id}".encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def hrw_score(uid: str, instance_id: str) -> int:
    return _h64(b"pylon-hrw", uid, instance_id)


_encoded: dict[str, bytes] = {}


def _scores(person: bytes, uid: str, instance_ids: Sequence[str]) -> list[int]:
    """``_h64`` for one uid and many instances: the uid's prefix is hashed once and the hasher
    copied per instance (same digests, ~3x cheaper than a new hasher each); instance ids are
    encoded once per process, not once per uid."""
    base = hashlib.blake2b(f"{uid}\x00".encode(), digest_size=8, person=person)
    encoded = _encoded
    from_bytes = int.from_bytes
    out = []
    for instance_id in instance_ids:
        raw = encoded.get(instance_id)
        if raw is None:
            if len(encoded) > 100_000:
                encoded.clear()
            raw = encoded[instance_id] = instance_id.encode()
        h = base.copy()
        h.update(raw)
        out.append(from_bytes(h.digest(), "big"))
    return out


def tie_break(uid: str, instance_id: str) -> int:
    return _h64(b"pylon-tie", uid, instance_id)


# ---------------------------------------------------------------- ordering


def address(room: Instance) -> str:
    return f"{room.host}:{room.port}"


def normalize_address(text: str) -> str:
    """"[::1]:7000" and "::1:7000" name the same room; hosts compare case-insensitively."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        text = host + rest
    host, sep, port = text.rpartition(":")
    return f"{host.lower()}{sep}{port}" if sep else text.lower()


def load_ratio(room: Instance) -> float:
    # capacity 0 = not declared: treated as empty rather than guessing a size
    return room.load / room.capacity if room.capacity > 0 else 0.0


def is_full(room: Instance) -> bool:
    return room.capacity > 0 and room.load >= room.capacity


def _best(scores: list[int], rooms: Sequence[Instance], skip_full: bool) -> Instance | None:
    best, best_score = None, -1
    for score, r in zip(scores, rooms, strict=True):
        if skip_full and 0 < r.capacity <= r.load:
            continue
        if score > best_score or (score == best_score and r.id > best.id):
            best, best_score = r, score
    return best


def order_rooms(uid: str, rooms: Sequence[Instance], load_step: float = 0.05, count: int = 0) -> list[Instance]:
    """Sticky room first, then the rest by load (in ``load_step`` buckets), per-uid tie-break.
    ``count`` = 1 skips ordering the rest (the answer is the sticky room alone)."""
    if not rooms:
        return []
    scores = _scores(b"pylon-hrw", uid, [r.id for r in rooms])
    if count == 1:  # the sticky room alone: the best (score, id) among rooms that are not full
        return [_best(scores, rooms, skip_full=True) or _best(scores, rooms, skip_full=False)]
    by_score = [r for _, _, r in sorted(zip(scores, (r.id for r in rooms), rooms, strict=True),
                                        key=lambda t: (t[0], t[1]), reverse=True)]
    # a full room would refuse the connection; the next HRW choice is just as sticky for this uid
    sticky = next((r for r in by_score if not is_full(r)), by_score[0])
    rest = [r for r in rooms if r is not sticky]
    ties = dict(zip((r.id for r in rest), _scores(b"pylon-tie", uid, [r.id for r in rest]), strict=True))
    # rooms on another host than the sticky one come first within a load bucket: if that host
    # is down, the second address must not be on it too
    rest.sort(key=lambda r: (int(load_ratio(r) / load_step), r.host == sticky.host, ties[r.id], r.id))
    return [sticky, *rest]


def choose(rooms: Iterable[Instance], query: RouteQuery, load_step: float = 0.05) -> Route:
    live = [r for r in rooms if not r.draining and r.host and r.port > 0]
    if not live:
        raise NoRooms("no live room instance")
    if query.net:
        serving = [r for r in live if not r.nets or query.net in (n.lower() for n in r.nets)]
        if serving:
            live = serving
    usable = [r for r in live if normalize_address(address(r)) not in query.exclude] if query.exclude else live
    all_excluded = not usable
    if all_excluded:
        usable = live
    region_fallback = False
    if query.region:
        local = [r for r in usable if r.region == query.region]
        if local:
            usable = local
        else:
            region_fallback = True
    return Route(order_rooms(query.uid, usable, load_step, query.count)[:query.count], region_fallback, all_excluded)


# ---------------------------------------------------------------- query parsing


def parse_query(params: Mapping[str, str], default_count: int = 8, max_count: int = 32,
                max_exclude: int = 64) -> RouteQuery:
    uid = params.get("uid", "")
    if not uid:
        raise InvalidQuery("uid is required", "missing_uid")
    if len(uid) > MAX_UID_LEN or any(ord(c) < 0x20 or ord(c) == 0x7F for c in uid):
        raise InvalidQuery(f"uid must be at most {MAX_UID_LEN} printable characters", "bad_uid")
    net = params.get("net", "").strip().lower()
    if len(net) > MAX_NET_LEN:
        raise InvalidQuery(f"net must be at most {MAX_NET_LEN} characters", "bad_net")
    region = params.get("region", "").strip()
    if len(region) > MAX_REGION_LEN:
        raise InvalidQuery(f"region must be at most {MAX_REGION_LEN} characters", "bad_region")
    raw_count = params.get("count", "").strip()
    if raw_count:
        if not raw_count.isascii() or not raw_count.isdigit() or len(raw_count) > 6:
            raise InvalidQuery("count must be a positive integer", "bad_count")
        count = int(raw_count)
        if count < 1:
            raise InvalidQuery("count must be a positive integer", "bad_count")
        count = min(count, max_count)
    else:
        count = default_count
    entries = [e for e in params.get("exclude", "").split(",") if e.strip()]
    if len(entries) > max_exclude:
        raise InvalidQuery(f"exclude lists {len(entries)} addresses; at most {max_exclude}", "bad_exclude")
    if any(len(e) > MAX_ADDRESS_LEN for e in entries):
        raise InvalidQuery("exclude entries must be host:port", "bad_exclude")
    return RouteQuery(uid=uid, net=net, region=region, exclude=frozenset(normalize_address(e) for e in entries),
                      count=count)


def route_view(route: Route) -> dict:
    return {
        "rooms": [{"host": r.host, "port": r.port, "instance": r.id, "region": r.region} for r in route.rooms],
        "region_fallback": route.region_fallback,
        "all_excluded": route.all_excluded,
    }

"""Which room addresses a client gets, in which order (pure: no I/O, no clock, no randomness).

Order: the sticky room first, then the other rooms from least to most loaded, ties broken by a
per-uid hash so clients spread out. The sticky room: a uid hashes to one of 65,536 buckets, and
each bucket's rooms are ranked by rendezvous (highest-random-weight) hashing of the bucket over
the usable rooms. The same user lands on the same instance (its flash-disconnect session is
cached there), and adding or removing one of N rooms moves only ~1/N of the buckets. A bucket's
ranking is computed once per set of rooms, so a route costs one hash instead of one per room
(56 rooms: 18 µs of hashing per uid, most of the dispatcher's time in a connect storm).

Filters, in order: live and not draining → serves the client's network type (a room with no
``nets`` serves all) → not excluded by the client → in the client's region, unless none is
left there, then other regions. Each filter that would leave nothing is skipped rather than
answering with nothing: a client with some address can still try; a client with none cannot.
"""

from __future__ import annotations

import array
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


STICKY_BUCKETS = 1 << 16
STICKY_DEPTH = 4        # ranked rooms kept per bucket; past them (all full) the bucket is ranked again
MAX_STICKY_TABLES = 8   # room sets remembered (filters by net, region, exclude make different sets)


def sticky_bucket(uid: str) -> int:
    digest = hashlib.blake2b(uid.encode(), digest_size=8, person=b"pylon-bucket").digest()
    return int.from_bytes(digest, "big") & (STICKY_BUCKETS - 1)


UNFILLED, NO_ROOM = 0xFFFF, 0xFFFE


class _StickyTable:
    """One room set's HRW ranking of each bucket: the indexes (into the set) of its best
    ``STICKY_DEPTH`` rooms, filled on first use, in one flat array (512 KiB, no object per bucket)."""

    __slots__ = ("ids", "top")

    def __init__(self, ids: tuple[str, ...]) -> None:
        if len(ids) >= NO_ROOM:
            raise ValueError(f"{len(ids)} rooms in one set; at most {NO_ROOM - 1}")
        self.ids = ids
        self.top = array.array("H", [UNFILLED]) * (STICKY_BUCKETS * STICKY_DEPTH)

    def full_ranking(self, bucket: int) -> list[int]:
        ids = self.ids
        scores = _scores(b"pylon-hrw", f"#{bucket}", ids)
        return sorted(range(len(ids)), key=lambda i: (scores[i], ids[i]), reverse=True)

    def ranking(self, bucket: int) -> array.array:
        at = bucket * STICKY_DEPTH
        top = self.top
        if top[at] == UNFILLED:
            best = self.full_ranking(bucket)[:STICKY_DEPTH]
            best += [NO_ROOM] * (STICKY_DEPTH - len(best))
            top[at:at + STICKY_DEPTH] = array.array("H", best)
        return top[at:at + STICKY_DEPTH]


_tables: dict[tuple[str, ...], _StickyTable] = {}


def _table(rooms: Sequence[Instance]) -> _StickyTable:
    ids = tuple(r.id for r in rooms)
    table = _tables.get(ids)
    if table is None:
        if len(_tables) >= MAX_STICKY_TABLES:
            del _tables[next(iter(_tables))]  # the oldest set: rooms came or went since
        table = _tables[ids] = _StickyTable(ids)
    return table


def sticky_room(uid: str, rooms: Sequence[Instance], table: _StickyTable | None = None) -> Instance:
    """The uid's room: the first of its bucket's ranking that is not full (a full room would
    refuse the connection; the next choice is just as sticky), or the first if all are full."""
    table = table or _table(rooms)
    bucket = sticky_bucket(uid)
    ranking = table.ranking(bucket)
    for i in ranking:
        if i == NO_ROOM:
            return rooms[ranking[0]]  # fewer rooms than the depth, all full
        if not is_full(rooms[i]):
            return rooms[i]
    for i in table.full_ranking(bucket)[STICKY_DEPTH:]:
        if not is_full(rooms[i]):
            return rooms[i]
    return rooms[ranking[0]]


def order_rooms(uid: str, rooms: Sequence[Instance], load_step: float = 0.05, count: int = 0,
                table: _StickyTable | None = None) -> list[Instance]:
    """Sticky room first, then the rest by load (in ``load_step`` buckets), per-uid tie-break.
    ``count`` = 1 skips ordering the rest (the answer is the sticky room alone). The answer does
    not depend on the order of ``rooms``; a set listed in the same order reuses its table."""
    if not rooms:
        return []
    sticky = sticky_room(uid, rooms, table)
    if count == 1:
        return [sticky]
    rest = [r for r in rooms if r is not sticky]
    ties = dict(zip((r.id for r in rest), _scores(b"pylon-tie", uid, [r.id for r in rest]), strict=True))
    # rooms on another host than the sticky one come first within a load bucket: if that host
    # is down, the second address must not be on it too
    rest.sort(key=lambda r: (int(load_ratio(r) / load_step), r.host == sticky.host, ties[r.id], r.id))
    return [sticky, *rest]


@dataclass(frozen=True, slots=True)
class Candidates:
    """The rooms a query may be given, before ordering for one uid (the same for every uid of a batch)."""
    rooms: list[Instance]
    region_fallback: bool
    all_excluded: bool
    table: _StickyTable


def candidates(rooms: Iterable[Instance], query: RouteQuery) -> Candidates:
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
    return Candidates(usable, region_fallback, all_excluded, _table(usable))


def choose(rooms: Iterable[Instance], query: RouteQuery, load_step: float = 0.05,
           found: Candidates | None = None) -> Route:
    c = found or candidates(rooms, query)
    return Route(order_rooms(query.uid, c.rooms, load_step, query.count, c.table)[:query.count],
                 c.region_fallback, c.all_excluded)


# ---------------------------------------------------------------- query parsing


def check_uid(uid: str) -> None:
    if not uid:
        raise InvalidQuery("uid is required", "missing_uid")
    if len(uid) > MAX_UID_LEN or any(ord(c) < 0x20 or ord(c) == 0x7F for c in uid):
        raise InvalidQuery(f"uid must be at most {MAX_UID_LEN} printable characters", "bad_uid")


def parse_query(params: Mapping[str, str], default_count: int = 8, max_count: int = 32,
                max_exclude: int = 64) -> RouteQuery:
    uid = params.get("uid", "")
    check_uid(uid)
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
        "rooms": [{"host": r.host, "port": r.port, "instance": r.id, "region": r.region,
                   **({"tls_port": r.tls_port} if r.tls_port else {})} for r in route.rooms],
        "region_fallback": route.region_fallback,
        "all_excluded": route.all_excluded,
    }

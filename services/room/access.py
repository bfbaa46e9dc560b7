"""Access policy at accept time (DESIGN.md §1): who may open a connection to this room instance.

Decided once per connection, in ``connection_made``, with O(1) work and before any byte of the
client is read:

1. the instance's connection cap (answered with ``INSTANCE_FULL`` instead of running out of
   file descriptors in the middle of a storm);
2. the CIDR allow and deny lists (``ACCESS_DENIED``), looked up once per source address;
3. a token bucket per source address for the connect rate (``RATE_LIMITED``);
4. concurrent connections and pre-auth connections (handshake not finished) per source address
   (``TOO_MANY_CONNECTIONS``).

Every refusal carries a retry-after. Per-address state lives in one dict of slotted
``SourceState`` objects, bounded by ``max_tracked_sources``: an address with no open connection
and a full bucket is forgotten (nothing would change if it came back), and when the dict is full
every address without an open connection is, so it never holds more entries than the bound, and
a flood of new addresses cannot grow it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from services.common.codec import ErrorCode

# Refusal reasons, as the metric labels them.
FULL, DENIED, RATE, PER_SOURCE, PREAUTH = "instance_full", "denied", "rate", "per_source", "preauth"
REASONS = (FULL, DENIED, RATE, PER_SOURCE, PREAUTH)
# A refused client should not come back sooner than this even when a token would be ready sooner:
# the retry-after spreads reconnects; 100 ms is under any human-noticeable wait.
MIN_RETRY_MS = 100


class Refusal:
    __slots__ = ("reason", "code", "message", "retry_after_ms")

    def __init__(self, reason: str, code: ErrorCode, message: str, retry_after_ms: int) -> None:
        self.reason = reason
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


class SourceState:
    """One source address: its connect-rate bucket and what it holds open here."""

    __slots__ = ("tokens", "stamp", "conns", "preauth", "allowed", "limited")

    def __init__(self, burst: float, now: float, allowed: bool, limited: bool) -> None:
        self.tokens = burst    # connect tokens left, refilled at the configured rate
        self.stamp = now       # when ``tokens`` was last brought up to date
        self.conns = 0         # open connections from this address
        self.preauth = 0       # of which still in their handshake (no AUTH_OK yet)
        self.allowed = allowed  # the allow and deny lists' answer, computed once
        self.limited = limited  # False: exempt from the per-address limits


class CidrSet:
    """A set of CIDR blocks; ``contains(ip)`` is one set lookup per distinct prefix length (at most
    33 for IPv4, 129 for IPv6, in practice a handful), independent of how many blocks there are."""

    __slots__ = ("_by_len",)

    def __init__(self, blocks: Iterable[str]) -> None:
        self._by_len: dict[tuple[int, int], set[int]] = {}
        for text in blocks:
            net = ipaddress.ip_network(text.strip(), strict=False)
            bits = net.max_prefixlen
            key = (net.version, net.prefixlen)
            self._by_len.setdefault(key, set()).add(int(net.network_address) >> (bits - net.prefixlen))

    def __bool__(self) -> bool:
        return bool(self._by_len)

    def contains(self, ip: str) -> bool:
        value, version = parse_ip(ip)
        if value < 0:
            return False
        bits = 32 if version == 4 else 128
        for (v, plen), prefixes in self._by_len.items():
            if v == version and value >> (bits - plen) in prefixes:
                return True
        return False


def parse_ip(ip: str) -> tuple[int, int]:
    """(integer value, 4 or 6); (-1, 0) when ``ip`` is not an address. An IPv4-mapped IPv6
    address (a dual-stack listener's view of an IPv4 client) counts as the IPv4 address."""
    try:
        if ":" not in ip:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big"), 4
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0]), "big")
    except OSError:
        return -1, 0
    if value >> 32 == 0xFFFF:
        return value & 0xFFFFFFFF, 4
    return value, 6


def check_cidrs(blocks: Iterable[str]) -> str:
    """'' if every entry is a CIDR block (or address), else the first bad one."""
    for text in blocks:
        try:
            ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            return text
    return ""


class AccessPolicy:
    """Admission of new connections; see the module docstring. ``admit`` is called for every
    accepted connection, ``authenticated`` when its handshake succeeded, ``released`` when it
    ends (each at most once per admitted connection)."""

    def __init__(self, *, max_connections: int, rate_per_source: float, burst_per_source: float,
                 max_per_source: int, max_preauth_per_source: int, allow: Iterable[str] = (),
                 deny: Iterable[str] = (), exempt: Iterable[str] = (), max_tracked_sources: int = 65_536,
                 retry_ms: int = 5_000, full_retry_ms: int = 2_000, denied_retry_ms: int = 600_000,
                 clock: Callable[[], float]) -> None:
        self.max_connections = max_connections        # 0 = no cap
        self.rate = rate_per_source                   # connects per second; 0 = no rate limit
        self.burst = max(burst_per_source, 1.0)
        self.max_per_source = max_per_source          # 0 = unlimited
        self.max_preauth = max_preauth_per_source     # 0 = unlimited
        self.allow = CidrSet(allow)
        self.deny = CidrSet(deny)
        self.exempt = CidrSet(exempt)
        self.max_tracked = max_tracked_sources
        self.retry_ms = retry_ms
        self.full_retry_ms = full_retry_ms
        self.denied_retry_ms = denied_retry_ms
        self.clock = clock
        self.sources: dict[str, SourceState] = {}
        self.refused = dict.fromkeys(REASONS, 0)
        self._denied = Refusal(DENIED, ErrorCode.ACCESS_DENIED, "connections from this address are not allowed",
                               denied_retry_ms)
        self._full = Refusal(FULL, ErrorCode.INSTANCE_FULL, "this room instance is full; try another address",
                             full_retry_ms)
        self._per_source = Refusal(PER_SOURCE, ErrorCode.TOO_MANY_CONNECTIONS,
                                   f"more than {max_per_source} connections from this address", retry_ms)
        self._preauth = Refusal(PREAUTH, ErrorCode.TOO_MANY_CONNECTIONS,
                                f"more than {max_preauth_per_source} unauthenticated connections from this address",
                                retry_ms)

    @classmethod
    def from_config(cls, cfg, max_connections: int, clock: Callable[[], float]) -> AccessPolicy:
        return cls(max_connections=max_connections, rate_per_source=cfg.connect_rate_per_ip,
                   burst_per_source=cfg.connect_burst_per_ip, max_per_source=cfg.max_connections_per_ip,
                   max_preauth_per_source=cfg.max_preauth_per_ip, allow=cfg.allow_cidrs, deny=cfg.deny_cidrs,
                   exempt=cfg.access_exempt_cidrs, max_tracked_sources=cfg.max_tracked_ips,
                   retry_ms=cfg.access_retry_ms, full_retry_ms=cfg.overload_retry_ms,
                   denied_retry_ms=cfg.denied_retry_ms, clock=clock)

    def admit(self, ip: str | None, open_connections: int) -> tuple[SourceState | None, Refusal | None]:
        """(the source's state, counted for this connection; None) or (None, why not)."""
        if self.max_connections and open_connections >= self.max_connections:
            return self._refuse(self._full)
        if ip is None:  # not an IP socket (a test transport, a Unix socket): no per-address policy
            return None, None
        src = self.sources.get(ip)
        now = self.clock()
        if src is None:
            src = self._track(ip, now)
        if not src.allowed:
            return self._refuse(self._denied)
        if src.limited:
            if self.rate:
                tokens = src.tokens + (now - src.stamp) * self.rate
                if tokens > self.burst:
                    tokens = self.burst
                src.stamp = now
                if tokens < 1.0:
                    src.tokens = tokens
                    wait_ms = max(MIN_RETRY_MS, int((1.0 - tokens) / self.rate * 1000) + 1)
                    self.refused[RATE] += 1
                    return None, Refusal(RATE, ErrorCode.RATE_LIMITED,
                                         f"more than {self.rate:g} connects per second from this address", wait_ms)
                src.tokens = tokens - 1.0
            if self.max_per_source and src.conns >= self.max_per_source:
                return self._refuse(self._per_source)
            if self.max_preauth and src.preauth >= self.max_preauth:
                return self._refuse(self._preauth)
        src.conns += 1
        src.preauth += 1
        return src, None

    def authenticated(self, src: SourceState) -> None:
        src.preauth -= 1

    def released(self, src: SourceState, preauth: bool) -> None:
        src.conns -= 1
        if preauth:
            src.preauth -= 1

    def _refuse(self, refusal: Refusal) -> tuple[None, Refusal]:
        self.refused[refusal.reason] += 1
        return None, refusal

    def _track(self, ip: str, now: float) -> SourceState:
        if len(self.sources) >= self.max_tracked:
            self.prune(now)
            if len(self.sources) >= self.max_tracked:
                self.prune(now, keep_buckets=False)
        allowed = not self.deny.contains(ip) and (not self.allow or self.allow.contains(ip))
        src = self.sources[ip] = SourceState(self.burst, now, allowed, not self.exempt.contains(ip))
        return src

    def prune(self, now: float | None = None, keep_buckets: bool = True) -> int:
        """Forget addresses that hold no connection and whose bucket is full again (nothing about
        them would differ from a new entry); with ``keep_buckets=False`` every address that holds
        no connection (a flooder's partly drained bucket is forgotten: the bound wins). Returns
        how many were forgotten."""
        if now is None:
            now = self.clock()
        rate, burst = self.rate, self.burst
        idle = [ip for ip, s in self.sources.items()
                if not s.conns and (not keep_buckets or not rate or s.tokens + (now - s.stamp) * rate >= burst)]
        for ip in idle:
            del self.sources[ip]
        return len(idle)


def open_file_limit() -> int:
    """This process's soft limit of open files (RLIMIT_NOFILE)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft limit of open files to the hard one (many systems start processes at 1,024
    soft with a far higher hard limit) and return the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return open_file_limit()

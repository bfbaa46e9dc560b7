"""Resume tokens: which session a reconnecting client had, signed so it cannot be forged.

A token names the session's instance (its discovery id and its gRPC address, so that another
instance can take the session over even from an instance that is draining and has left
discovery), the instance-local session number and the uid, with the time it was minted. It is
HMAC-SHA256 signed with a secret every room instance of the cluster shares (a Redis key created
once, or ``room.resume_secret``). The client treats it as opaque. A token that does not verify,
is older than ``max_age_s`` or names another uid gives ``None``: the caller falls back to a
normal login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

VERSION = b"1"
MAC_BYTES = 16   # 128 bits of HMAC-SHA256: forging one is out of reach; keeps the token short
MAX_TOKEN_LEN = 1024
# A token minted by a host whose clock runs ahead of ours is still good for a resume.
CLOCK_SKEW_S = 300


@dataclass(frozen=True, slots=True)
class ResumeClaim:
    instance: str
    grpc: str
    sid: int
    uid: str
    minted_s: int


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def mint(secret: bytes, instance: str, grpc: str, sid: int, uid: str, now_s: int) -> str:
    # uid last, so a uid holding the separator still splits right (maxsplit)
    payload = b"|".join((VERSION, str(now_s).encode(), str(sid).encode(), instance.encode(), grpc.encode(),
                         uid.encode()))
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_BYTES]
    return (_b64(payload) + b"." + _b64(mac)).decode()


def verify(secret: bytes, token: str, uid: str, now_s: int, max_age_s: int) -> ResumeClaim | None:
    if not token or len(token) > MAX_TOKEN_LEN:
        return None
    try:
        head, _, sig = token.encode("ascii").partition(b".")
        payload, mac = _unb64(head), _unb64(sig)
    except (UnicodeEncodeError, ValueError):
        return None
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_BYTES]):
        return None
    parts = payload.split(b"|", 5)
    if len(parts) != 6 or parts[0] != VERSION:
        return None
    try:
        minted, sid = int(parts[1]), int(parts[2])
        claim = ResumeClaim(parts[3].decode(), parts[4].decode(), sid, parts[5].decode(), minted)
    except (ValueError, UnicodeDecodeError):
        return None
    if claim.uid != uid or not -CLOCK_SKEW_S <= now_s - claim.minted_s <= max_age_s:
        return None
    return claim
